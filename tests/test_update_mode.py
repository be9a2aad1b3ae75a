"""The compressed-update mode (``deepreduce.UpdateSync``): bitwise-identical parameters on
2 and 3 ranks for lossless and lossy specs, with one and several local steps, an outer
Nesterov step and overlapped exchanges; checkpoints that resume bit for bit; the same
result under DDP (local gradients); and, at ratio 1 with lossless codecs, plain
data-parallel training with per-rank optimizers averaged."""

from __future__ import annotations

import pytest
import torch

import deepreduce as dr
from helpers import SoloTransport
from launching import gloo_run, worker
from workers import update_mode


@pytest.fixture(scope="module", params=[2, 3], ids=["two", "three"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"update{request.param}")
    gloo_run(request.param, worker("update_mode"), str(out), timeout=300)
    return [torch.load(out / f"rank{r}.pt") for r in range(request.param)]


@pytest.mark.slow
def test_parameters_identical_on_every_rank(ranks):
    for name in update_mode.CONFIGS:
        digests = {r[name]["digest"] for r in ranks}
        assert len(digests) == 1, name
        stats = ranks[0][name]["stats"]
        local_steps = update_mode.CONFIGS[name][1]["local_steps"]
        assert stats["optimizer_steps"] == update_mode.STEPS
        assert stats["exchanges"] == update_mode.STEPS // local_steps + (1 if update_mode.CONFIGS[name][1].get("overlap") else 0)
        assert stats["compressed_buckets"] > 0 and stats["ratio"] > 2, (name, stats)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(ranks):
    for rank in ranks:
        for name in update_mode.CONFIGS:
            assert rank[name]["resumed_digest"] == rank[name]["digest"], name


@pytest.mark.slow
def test_ddp_with_local_gradients_equals_plain_loop(ranks):
    for rank in ranks:
        assert rank["ddp"]["digest"] == rank["lossy-h1"]["digest"]


@pytest.mark.slow
def test_lossless_full_ratio_equals_averaged_local_optimizers(ranks):
    for rank in ranks:
        diffs = rank["equals_dense"]["diffs"]
        assert max(diffs) < 1e-5, diffs
        assert rank["equals_dense"]["stats"]["dense_fallbacks"] == 0


# --- in process -----------------------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 2))


def test_density_per_exchange_scales_with_local_steps():
    model = _model()
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.01/eliasfano/fp16", local_steps=4, transport=SoloTransport())
    assert sync.compressor.ratio == pytest.approx(0.04) and sync.ratio == 0.01
    capped = dr.UpdateSync(model.named_parameters(), "topk:0.5/eliasfano/fp16", local_steps=4, transport=SoloTransport())
    assert capped.compressor.ratio == 1.0


def test_density_follows_the_learning_rate_with_the_same_bytes_over_the_run():
    def lr_at(step):
        return 0.1 if step < 20 else 0.01

    schedule = dr.DensityFollowsLR(lr_at, 40, start=4)
    factors = [schedule(step) for step in range(4, 40)]
    assert sum(factors) / len(factors) == pytest.approx(1.0)
    assert factors[0] / factors[-1] == pytest.approx(10.0) and schedule(0) == factors[0] and schedule(99) == factors[-1]
    assert dr.DensityFollowsLR(lr_at, 40, start=4, power=2)(4) / dr.DensityFollowsLR(lr_at, 40, start=4, power=2)(39) \
        == pytest.approx(100.0)
    # A negative power leans the same bytes towards the decay.
    late = dr.DensityFollowsLR(lr_at, 40, start=4, power=-0.5)
    late_factors = [late(step) for step in range(4, 40)]
    assert sum(late_factors) / len(late_factors) == pytest.approx(1.0)
    assert late_factors[-1] / late_factors[0] == pytest.approx(10 ** 0.5)
    # Exchange e follows optimizer step (e + 1) * H - 1; every rank computes the same densities.
    model = _model()
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.01/eliasfano/fp16", local_steps=2, start_iter=2, min_numel=0,
                         transport=SoloTransport(), density_schedule=schedule)
    assert sync.engine.density(2) == float(f"{0.02 * schedule(5):.3g}")
    assert sync.engine.density(15) == float(f"{0.02 * schedule(31):.3g}")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []
    for _ in range(40):
        model(torch.randn(8, 20)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        before = sync.stats()["kept"]
        sync.step()
        kept.append(sync.stats()["kept"] - before)
    compressed = kept[5::2]  # the exchanges after the 2 dense ones (an exchange follows every second step)
    assert compressed[0] > 5 * compressed[-1] > 0
    import pickle

    assert pickle.loads(pickle.dumps(sync.config))["density_schedule"].factors == schedule.factors


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 10, "start": 10}, "0 <= start < steps"),
    ({"steps": 10, "power": float("nan")}, "power must be a finite number"),
    ({"steps": 10, "power": "1"}, "power must be a finite number"),
    ({"steps": 10, "lr_at": lambda step: 0.0}, r"lr_at\(0\) returned 0.0"),
    ({"steps": 10, "start": 2, "lr_at": lambda step: "fast"}, r"lr_at\(2\) returned 'fast'"),
])
def test_density_follows_lr_refuses_bad_settings(kwargs, match):
    kwargs.setdefault("lr_at", lambda step: 0.1)
    with pytest.raises(dr.ConfigError, match=match):
        dr.DensityFollowsLR(**kwargs)


def test_exchanges_every_local_steps_and_keeps_what_was_not_sent():
    """One rank: exchanges happen every local_steps; nothing is lost, only delayed: the
    anchor plus the residual is the start plus every round's local progress, and the
    parameters equal the anchor after each exchange."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.05/eliasfano/raw", local_steps=3, min_numel=0,
                         transport=SoloTransport())
    start = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    progress = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    exchanged = []
    for step in range(6):
        anchors = {n: a.clone() for n, a in sync.anchors.items()}
        model(torch.randn(8, 20)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        local = {n: p.detach().clone() for n, p in model.named_parameters()}
        exchanged.append(sync.step())
        if exchanged[-1]:
            for name, p in model.named_parameters():
                progress[name] += (local[name] - anchors[name]).double()
                residual = sync.engine.memory.residual(name).view_as(p).double()
                assert torch.allclose(sync.anchors[name].double() + residual, start[name] + progress[name], atol=1e-6), name
                assert torch.equal(p, sync.anchors[name])
                assert int(torch.count_nonzero(p.detach() - anchors[name])) <= max(1, round(sync.compressor.ratio * p.numel()))
    assert exchanged == [False, False, True, False, False, True]
    assert sync.exchanges == 2
    assert any(not torch.equal(start[n].float(), p) for n, p in model.named_parameters())


def test_keep_unsent_keeps_each_ranks_unsent_update_in_its_parameters():
    """keep_unsent: after an exchange the parameters are the agreed anchor plus this rank's
    residual (what it has not sent yet); finish() sends everything densely."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.05/eliasfano/raw", min_numel=0, keep_unsent=True,
                         transport=SoloTransport())
    for _ in range(3):
        model(torch.randn(8, 20)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        local = {n: p.detach().clone() for n, p in model.named_parameters()}
        sync.step()
        for name, p in model.named_parameters():
            residual = sync.engine.memory.residual(name).view_as(p)
            assert torch.allclose(p, sync.anchors[name] + residual) and torch.allclose(p, local[name], atol=1e-6)
            assert torch.count_nonzero(residual) > 0
    sync.finish()
    assert all(torch.equal(p, sync.anchors[n]) for n, p in model.named_parameters())
    assert all(torch.allclose(p, local[n], atol=1e-6) for n, p in model.named_parameters())  # nothing lost
    with pytest.raises(dr.ConfigError, match="keep_unsent and overlap"):
        dr.UpdateSync(_model().named_parameters(), keep_unsent=True, overlap=True, transport=SoloTransport())


def test_unsent_scale_puts_a_multiple_of_the_residual_in_the_parameters_and_flushes_it_whole():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.05/eliasfano/raw", min_numel=0, keep_unsent=True,
                         unsent_scale=1.5, transport=SoloTransport())
    assert sync.config["unsent_scale"] == 1.5
    after_exchange = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor = {n: a.clone() for n, a in sync.anchors.items()}
    residual = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(3):
        model(torch.randn(8, 20)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        progress = {n: p.detach() - after_exchange[n] for n, p in model.named_parameters()}
        sync.step()
        for name, p in model.named_parameters():
            # the engine's residual is unscaled: the old one plus this round's progress, less what was sent
            sent = sync.anchors[name] - anchor[name]
            now = sync.engine.memory.residual(name).view_as(p)
            assert torch.allclose(now, residual[name] + progress[name] - sent, atol=1e-6)
            assert torch.count_nonzero(now) > 0 and torch.count_nonzero(sent) > 0
            assert torch.allclose(p, sync.anchors[name] + 1.5 * now)  # the parameters run ahead of it
            after_exchange[name], anchor[name], residual[name] = p.detach().clone(), sync.anchors[name].clone(), now.clone()
    sync.finish()
    for name, p in model.named_parameters():  # the whole residual is sent, not 1.5x it
        assert torch.equal(p, sync.anchors[name]) and torch.allclose(p, anchor[name] + residual[name], atol=1e-6)
    for kwargs, match in [({"unsent_scale": 1.5}, "needs keep_unsent=True"),
                          ({"keep_unsent": True, "unsent_scale": 0.0}, "unsent_scale must be a finite number > 0"),
                          ({"keep_unsent": True, "unsent_scale": float("inf")}, "unsent_scale must be"),
                          ({"keep_unsent": True, "unsent_scale": True}, "unsent_scale must be")]:
        with pytest.raises(dr.ConfigError, match=match):
            dr.UpdateSync(_model().named_parameters(), transport=SoloTransport(), **kwargs)


def test_consensus_evaluates_the_agreed_parameters():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.1/eliasfano/raw", local_steps=2, transport=SoloTransport())
    model(torch.randn(8, 20)).sum().backward()
    optimizer.step()
    sync.step()  # no exchange yet: local parameters moved, anchors did not
    local = [p.detach().clone() for p in model.parameters()]
    with sync.consensus():
        assert all(torch.equal(p, sync.anchors[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), local))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"local_steps": 0}, "local_steps must be a positive int"),
        ({"outer_lr": 0}, "outer_lr must be > 0"),
        ({"outer_momentum": 1.0}, "outer_momentum must be in"),
        ({"nesterov": True}, "nesterov needs outer_momentum > 0"),
        ({"compressor": 3}, "compressor must be a Compressor or a spec string"),
    ],
)
def test_bad_configuration_is_reported(kwargs, match):
    with pytest.raises(dr.ConfigError, match=match):
        dr.UpdateSync(_model().named_parameters(), transport=SoloTransport(), **kwargs)


def test_state_dict_rejects_another_model_or_settings():
    sync = dr.UpdateSync(_model().named_parameters(), transport=SoloTransport())
    state = sync.state_dict()
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="saved parameters differ"):
        dr.UpdateSync(other.named_parameters(), transport=SoloTransport()).load_state_dict(state)
    with pytest.raises(ValueError, match="overlap or outer-step"):
        dr.UpdateSync(_model().named_parameters(), transport=SoloTransport(), overlap=True).load_state_dict(state)
    with pytest.raises(ValueError, match="not an UpdateSync state dict"):
        sync.load_state_dict({"format": 0})


def test_configuration_pickles_and_rebuilds_the_same_synchroniser():
    """An UpdateSync is bound to live parameters and cannot be pickled (the error says
    what to pickle instead); its ``config`` can, and rebuilds one that trains alike."""
    import pickle

    def train(sync, model, steps=6):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(3)
        for _ in range(steps):
            model(torch.randn(8, 20, generator=gen)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            sync.step()
        return [p.detach().clone() for p in model.parameters()]

    model = _model()
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.05/eliasfano/fp16", local_steps=2, keep_unsent=True,
                         min_numel=0, transport=SoloTransport())
    with pytest.raises(TypeError, match="sync.config"):
        pickle.dumps(sync)
    config = pickle.loads(pickle.dumps(sync.config))
    assert config["compressor"] == "topk:0.05/eliasfano/fp16" and config["local_steps"] == 2 and config["keep_unsent"]
    twin_model = _model()
    twin = dr.UpdateSync(twin_model.named_parameters(), transport=SoloTransport(), **config)
    assert twin.engine.describe() == sync.engine.describe()
    for a, b in zip(train(sync, model), train(twin, twin_model)):
        assert torch.equal(a, b)


class _Recording(SoloTransport):
    """One rank that keeps the messages it gathers."""

    def __init__(self) -> None:
        self.messages: list[torch.Tensor] = []

    def allgather_async(self, payload, sizes):
        self.messages.append(payload.clone())
        return super().allgather_async(payload, sizes)


def _norms_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64),
                               torch.nn.LayerNorm(64), torch.nn.Linear(64, 700), torch.nn.Linear(700, 4))


def test_small_tensors_share_payloads_and_keep_per_tensor_residuals():
    """With a small compressor the tensors below min_numel travel in one pack, through the
    small compressor even where the pack reaches min_numel: fewer headers, fewer bytes,
    and the error feedback, the keep-unsent parameters and the checkpoint stay per tensor."""
    from deepreduce.engine import plan_groups
    from deepreduce.engine.framing import unframe
    from deepreduce.compressor import decode

    def run(packed: bool):
        model = _norms_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        transport = _Recording()
        sync = dr.UpdateSync(model.named_parameters(), "topk:0.05/eliasfano/fp16", keep_unsent=True, min_numel=1024,
                             small_compressor="cyclic:0.125/strided/fp16", transport=transport,
                             pack_tensors=False)  # the large tensors' own payloads: tests/test_packed_tensors.py
        if not packed:
            sync.groups = plan_groups(list(sync.anchors.items()))
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(8, 40)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            sync.step()
            for name, p in model.named_parameters():
                assert torch.allclose(p, sync.anchors[name] + sync.engine.memory.residual(name).view_as(p)), name
        return model, sync, transport.messages

    small = {name for name, p in _norms_model().named_parameters() if p.numel() < 1024}
    model, sync, messages = run(packed=True)
    _, _, apart = run(packed=False)
    segments = sync.groups[0].segments
    packs = [seg for seg in segments if seg.parts is not None]
    # Six of 64 elements, then 700 + 4: 1,088 elements, above min_numel, in one pack.
    assert [[name for name, _ in seg.parts] for seg in packs] == [["0.bias", "1.weight", "1.bias", "2.bias", "3.weight",
                                                                   "3.bias", "4.bias", "5.bias"]]
    assert packs[0].numel == 1088 and packs[0].is_small(1024)
    assert [seg.name for seg in segments if seg.parts is None] == ["0.weight", "2.weight", "4.weight", "5.weight"]
    entries = unframe(messages[-1], len(segments), padded=True)
    assert len(entries) == len(segments) == 5
    # The small compressor's eighth of the pack, not the large tensors' 5 %.
    assert decode(entries[segments.index(packs[0])]).k == 1088 // 8
    saved = len(list(model.parameters())) - len(segments)  # headers (64 bytes each) no longer sent
    assert len(messages) == len(apart) == 4  # the configuration check, then the three exchanges
    assert all(m.numel() <= a.numel() - 64 * saved for m, a in zip(messages[1:], apart[1:]))
    residuals = sync.state_dict()["engine"]["memory"]["residuals"]
    assert small <= set(residuals) and all(residuals[n].numel() == p.numel() for n, p in model.named_parameters())
    # The same error feedback either way: each small tensor sends an eighth per exchange.
    assert all(int(torch.count_nonzero(residuals[n])) >= p.numel() * 7 // 8 - 8 for n, p in model.named_parameters() if n in small)
