"""Inputs the update mode (``deepreduce.UpdateSync``, ``deepreduce.LocalAdamW``) refuses or
handles: ranks that disagree on their parameters, frozen parameters, bad options,
``model.parameters()`` or tied weights where named parameters belong, checkpoints saved
with other settings or for another model, and a repeated ``finish()``.

Run as a script (``RANK``/``WORLD_SIZE``/``MASTER_*`` set, one process per rank), this file is
the worker of the two-rank test: ``test_update_inputs.py OUT_DIR``."""

from __future__ import annotations

import sys

import pytest
import torch

import deepreduce as dr
from deepreduce.engine.flat import check_named_tensors
from helpers import SoloTransport


def _model(out: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, out)).to(dtype)


def _sync(model: torch.nn.Module | None = None, **options) -> dr.UpdateSync:
    model = _model() if model is None else model
    return dr.UpdateSync(model.named_parameters(), "topk:0.1/eliasfano/raw", min_numel=0, transport=SoloTransport(),
                         **options)


def _train(model: torch.nn.Module, sync: dr.UpdateSync, steps: int, seed: int = 1) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 20, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.step()


def _trained_state(steps: int = 3, **options) -> dict:
    model = _model()
    sync = _sync(model, **options)
    _train(model, sync, steps)
    return sync.state_dict()


class _Log(SoloTransport):
    """One rank that records its collectives in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def allgather_async(self, payload, sizes):
        self.calls.append(("allgather", tuple(payload.shape)))
        return super().allgather_async(payload, sizes)

    def allreduce_async(self, tensor):
        self.calls.append(("allreduce", tuple(tensor.shape)))
        return super().allreduce_async(tensor)


# --- construction --------------------------------------------------------------------------------------


def test_configuration_is_compared_before_the_broadcast_and_only_once():
    """A rank with other parameters must get the agreement check's ConfigError, not fail
    inside the broadcast's collectives; the first exchange does not compare again."""
    model = _model()
    transport = _Log()
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.1/eliasfano/raw", transport=transport)
    kinds = [kind for kind, _ in transport.calls]
    assert kinds[0] == "allgather" and kinds.count("allgather") == 1, kinds
    assert [shape for kind, shape in transport.calls if kind == "allreduce"] == \
        [tuple(p.shape) for p in model.parameters()]
    transport.calls.clear()
    _train(model, sync, 1)
    assert len(transport.calls) == 1, transport.calls  # the exchange alone
    # Without the broadcast the comparison waits for the first exchange, as before.
    transport = _Log()
    lazy = dr.UpdateSync(model.named_parameters(), transport=transport, broadcast=False)
    assert transport.calls == []
    _train(model, lazy, 1)
    assert [kind for kind, _ in transport.calls] == ["allgather", "allreduce"]


def test_frozen_parameters_are_broadcast_and_refused_once_unfrozen():
    model = _model()
    model[0].requires_grad_(False)
    transport = _Log()
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.1/eliasfano/raw", min_numel=0, transport=transport)
    # Every parameter is broadcast, the frozen ones too; only the trainable ones are exchanged.
    assert [shape for kind, shape in transport.calls if kind == "allreduce"] == \
        [tuple(p.shape) for p in (model[2].weight, model[2].bias, model[0].weight, model[0].bias)]
    assert [name for name, _ in sync.named_parameters] == ["2.weight", "2.bias"]
    assert sync.engine.describe()["frozen"] == [["0.weight", [30, 20], "torch.float32"], ["0.bias", [30], "torch.float32"]]
    _train(model, sync, 2)
    model[0].bias.requires_grad_(True)
    with pytest.raises(dr.ConfigError, match=r"'0\.bias' had requires_grad=False .* Build the UpdateSync after unfreezing"):
        sync.step()
    with pytest.raises(dr.ConfigError, match=r"'0\.bias'"):
        sync.finish()
    assert sync.local_step == 2
    # Built after unfreezing, the parameter is exchanged.
    assert "0.bias" in dict(dr.UpdateSync(model.named_parameters(), transport=SoloTransport()).named_parameters)


@pytest.mark.parametrize("options, match", [
    ({"outer_lr": float("inf")}, "outer_lr must be > 0 and finite, got inf"),
    ({"outer_lr": float("nan")}, "outer_lr must be > 0 and finite, got nan"),
    ({"outer_lr": "1"}, "outer_lr must be > 0 and finite, got '1'"),
    ({"outer_lr": None}, "outer_lr must be > 0 and finite, got None"),
    ({"outer_lr": True}, "outer_lr must be > 0 and finite, got True"),
    ({"outer_momentum": "0.9"}, r"outer_momentum must be in \[0, 1\), got '0.9'"),
    ({"outer_momentum": None}, r"outer_momentum must be in \[0, 1\), got None"),
    ({"outer_momentum": float("nan")}, r"outer_momentum must be in \[0, 1\), got nan"),
    ({"nesterov": "no", "outer_momentum": 0.9}, "nesterov must be True or False, got 'no'"),
    ({"overlap": 1}, "overlap must be True or False, got 1"),
    ({"keep_unsent": "yes"}, "keep_unsent must be True or False, got 'yes'"),
    ({"broadcast": None}, "broadcast must be True or False, got None"),
    ({"keep_unsent": True, "error_feedback": False}, "keep_unsent=True needs error_feedback=True"),
    ({"ddp": 5}, r"ddp must be a DistributedDataParallel model \(or None\), got int"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(dr.ConfigError, match=match):
        _sync(**options)


def test_numpy_numbers_are_accepted_as_outer_settings():
    import numpy as np

    sync = _sync(outer_lr=np.float32(0.5), outer_momentum=np.float64(0.5))
    assert (sync.outer_lr, sync.outer_momentum) == (0.5, 0.5)


def test_parameters_instead_of_named_parameters_are_refused():
    for parameters in (_model().parameters(), torch.nn.Linear(5, 2).parameters(), list(_model().parameters())):
        with pytest.raises(dr.ConfigError, match=r"item 0 is a Parameter: pass model.named_parameters\(\), not model.parameters\(\)"):
            dr.UpdateSync(parameters, transport=SoloTransport())
    with pytest.raises(dr.ConfigError, match=r"item 0 is a str: pass a mapping's .items\(\)"):
        dr.UpdateSync(dict(_model().named_parameters()), transport=SoloTransport())
    with pytest.raises(dr.ConfigError, match=r"yields, got Parameter$"):
        dr.UpdateSync(torch.nn.Parameter(torch.zeros(3)), transport=SoloTransport())
    with pytest.raises(dr.ConfigError, match="yields, got int$"):
        check_named_tensors(3)
    with pytest.raises(dr.ConfigError, match="item 1 is a tuple"):
        check_named_tensors([("a", torch.zeros(2)), ("b", torch.zeros(2), "extra")])
    assert check_named_tensors(iter([("a", torch.zeros(2))]))[0][0] == "a"  # a generator is listed once


def test_tied_weights_listed_twice_are_refused():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            self.head = torch.nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    with pytest.raises(dr.ConfigError, match="'emb.weight' and 'head.weight' are the same tensor"):
        dr.UpdateSync(model.named_parameters(remove_duplicate=False), transport=SoloTransport())
    sync = dr.UpdateSync(model.named_parameters(), transport=SoloTransport())  # listed once: fine
    assert [name for name, _ in sync.named_parameters] == ["emb.weight"]


def test_overlap_docstring_says_what_a_checkpoint_keeps():
    """A checkpoint does not make overlapped ranks identical (finish() does): saving leaves
    each rank's own parameters, and the module documentation says so."""
    model = _model()
    sync = _sync(model, overlap=True)
    _train(model, sync, 3)
    before = [p.detach().clone() for p in model.parameters()]
    sync.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not all(torch.equal(p, sync.anchors[n]) for n, p in model.named_parameters())
    doc = " ".join(dr.optim.__doc__.split())
    assert "or any checkpoint" not in doc
    assert "saves each rank's own parameters" in doc


# --- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved, loaded, match", [
    ({"outer_lr": 0.5, "outer_momentum": 0.5}, {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
     "outer_lr: saved 0.5, here 0.7; outer_momentum: saved 0.5, here 0.9; nesterov: saved False, here True"),
    ({"outer_lr": 0.5}, {"outer_lr": 0.7}, "outer_lr: saved 0.5, here 0.7"),
    ({"keep_unsent": True}, {"overlap": True}, "keep_unsent: saved True, here False; overlap: saved False, here True"),
    ({"overlap": True}, {"keep_unsent": True, "unsent_scale": 1.5},
     "keep_unsent: saved False, here True; unsent_scale: saved 1.0, here 1.5; overlap: saved True, here False"),
    ({"keep_unsent": True, "unsent_scale": 1.5}, {"keep_unsent": True}, "unsent_scale: saved 1.5, here 1.0"),
    ({"local_steps": 2}, {"local_steps": 4}, "local_steps: saved 2, here 4"),
])
def test_state_saved_with_other_settings_is_refused(saved, loaded, match):
    state = _trained_state(**saved)
    model = _model()
    sync = _sync(model, **loaded)
    anchors = {name: a.clone() for name, a in sync.anchors.items()}
    with pytest.raises(dr.ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        sync.load_state_dict(state)
    assert sync.local_step == 0 and sync.exchanges == 0 and sync._pending is None
    assert all(torch.equal(a, anchors[n]) for n, a in sync.anchors.items())
    if sync._outer is not None:  # the configured outer step stays
        group = sync._outer.param_groups[0]
        assert (group["lr"], group["momentum"], group["nesterov"]) == (sync.outer_lr, sync.outer_momentum, sync.nesterov)


def test_state_without_recorded_settings_is_checked_against_its_outer_optimizer():
    state = _trained_state(outer_lr=0.5, outer_momentum=0.5)
    del state["settings"], state["finished"]
    with pytest.raises(dr.ConfigError, match="outer_lr: saved 0.5, here 0.7"):
        _sync(outer_lr=0.7, outer_momentum=0.5).load_state_dict(state)
    sync = _sync(outer_lr=0.5, outer_momentum=0.5)
    sync.load_state_dict(state)
    assert sync.local_step == 3


def test_state_of_another_shape_or_dtype_is_refused():
    narrow = _model(out=1)
    sync = _sync(_model())
    with pytest.raises(ValueError, match=r"anchors\['2.weight'\] has shape \(1, 30\) and dtype torch.float32; "
                                         r"this model needs shape \(2, 30\) and dtype torch.float32"):
        sync.load_state_dict(_sync(narrow).state_dict())  # (1, 30) and (1,) would broadcast into (2, 30) and (2,)
    state = _trained_state()
    with pytest.raises(ValueError, match=r"'0.weight'\] has shape \(30, 20\) and dtype torch.float32; .*torch.float64"):
        _sync(_model(dtype=torch.float64)).load_state_dict(state)
    other = _trained_state(overlap=True)
    other["pending"]["2.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"pending\['2.bias'\] has shape \(5,\)"):
        _sync(overlap=True).load_state_dict(other)


def test_failed_load_leaves_the_synchroniser_as_it_was():
    state = _trained_state(local_steps=2, outer_lr=0.5, outer_momentum=0.5)
    model = _model()
    sync = _sync(model, local_steps=2, outer_lr=0.5, outer_momentum=0.5)
    _train(model, sync, 1)
    before = (sync.local_step, sync.exchanges, sync.engine.state_dict()["memory"]["residuals"],
              {name: a.clone() for name, a in sync.anchors.items()})

    def unchanged() -> bool:
        residuals = sync.engine.state_dict()["memory"]["residuals"]
        return (sync.local_step, sync.exchanges) == before[:2] and residuals.keys() == before[2].keys() \
            and all(torch.equal(residuals[n], before[2][n]) for n in residuals) \
            and all(torch.equal(a, before[3][n]) for n, a in sync.anchors.items())

    with pytest.raises(ValueError, match="not a deepreduce engine state dict"):
        sync.load_state_dict({**state, "engine": {"format": 99}})
    assert unchanged()
    # The outer optimizer's state is loaded after the engine's: the engine's is put back.
    broken_outer = {**state, "outer": {**state["outer"], "param_groups": []}}
    with pytest.raises(ValueError):
        sync.load_state_dict(broken_outer)
    assert unchanged()
    with pytest.raises(ValueError, match="UpdateSync state dict: missing local_step, engine, anchors, base, outer"):
        sync.load_state_dict({"format": 1})
    with pytest.raises(ValueError, match="missing anchors"):
        sync.load_state_dict({key: value for key, value in state.items() if key != "anchors"})
    with pytest.raises(ValueError, match="local_step must be a non-negative int"):
        sync.load_state_dict({**state, "local_step": "3"})
    assert unchanged()
    sync.load_state_dict(state)  # the intact state still loads
    assert sync.local_step == 3 and sync.exchanges == 1


# --- finish() ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"local_steps": 3}, {"overlap": True}, {"keep_unsent": True}],
                         ids=["mid-round", "overlap", "keep_unsent"])
def test_second_finish_does_nothing_and_finish_after_more_steps_works(options):
    model = _model()
    sync = _sync(model, **options)
    _train(model, sync, 4)
    sync.finish()
    first = (sync.exchanges, sync.stats()["sent_bytes"], [p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, sync.anchors[n]) for n, p in model.named_parameters())
    sync.finish()
    assert (sync.exchanges, sync.stats()["sent_bytes"]) == first[:2]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), first[2]))
    # A checkpoint taken after finish() resumes finished.
    twin_model = _model()
    twin = _sync(twin_model, **options)
    twin.load_state_dict(sync.state_dict())
    twin.finish()
    assert twin.exchanges == first[0]
    # More steps, then finish() again: the new progress is exchanged.
    _train(model, sync, 2, seed=2)
    sync.finish()
    assert sync.stats()["sent_bytes"] > first[1]
    assert all(torch.equal(p, sync.anchors[n]) for n, p in model.named_parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), first[2]))


# --- LocalAdamW ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("group, match", [
    ({"world_size": 0}, "param group 0: world_size must be a positive int, got 0"),
    ({"world_size": -3}, "param group 0: world_size must be a positive int, got -3"),
    ({"world_size": 2.0}, "param group 0: world_size must be a positive int, got 2.0"),
    ({"lr": -1.0}, "param group 0: lr must be a finite number >= 0, got -1.0"),
    ({"lr": "1e-3"}, "param group 0: lr must be a finite number >= 0, got '1e-3'"),
    ({"eps": float("nan")}, "param group 0: eps must be a finite number >= 0, got nan"),
    ({"weight_decay": -0.1}, "param group 0: weight_decay must be a finite number >= 0, got -0.1"),
    ({"betas": 0.9}, r"param group 0: betas must be two numbers in \[0, 1\), got 0.9"),
    ({"betas": (0.9,)}, r"param group 0: betas must be two numbers in \[0, 1\), got \(0.9,\)"),
    ({"betas": (0.9, "0.99")}, r"param group 0: betas must be two numbers in \[0, 1\)"),
])
def test_local_adamw_checks_each_parameter_group(group, match):
    with pytest.raises(dr.ConfigError, match=match):
        dr.LocalAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], **group}], world_size=2)
    optimizer = dr.LocalAdamW([torch.nn.Parameter(torch.zeros(3))], world_size=2)
    with pytest.raises(dr.ConfigError, match=match.replace("group 0", "group 1")):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], **group})
    assert len(optimizer.param_groups) == 1


def test_local_adamw_constructor_refuses_non_numbers_and_fills_group_defaults():
    for options, match in [({"betas": 0.9}, "betas must be two numbers"), ({"lr": None}, "lr must be a finite number"),
                           ({"lr": float("inf")}, "lr must be a finite number")]:
        with pytest.raises(dr.ConfigError, match=match):
            dr.LocalAdamW([torch.nn.Parameter(torch.zeros(3))], **options)
    optimizer = dr.LocalAdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-2, world_size=4)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": [0.8, 0.9], "world_size": None})
    group = optimizer.param_groups[1]
    assert group["betas"] == (0.8, 0.9) and group["world_size"] == 1 and group["lr"] == 1e-2


def test_half_precision_parameters_keep_the_fraction_of_a_step_the_average_moved_them_by():
    """The anchors of bf16 parameters are fp32: an averaged update of half a bf16 step must
    accumulate there. (Measured from the anchors instead of the parameters as set, every
    exchange also sent the anchor's rounding and wiped that fraction out.) The outer step's
    learning rate of 0.5 halves a one-rank run's update, as a second rank that stood still
    would."""
    weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    sync = dr.UpdateSync([("w", weight)], "topk:1/raw/raw", min_numel=0, transport=SoloTransport(), outer_lr=0.5)
    ulp = 2.0 ** -7  # of bf16 at 1.0
    for _ in range(8):
        with torch.no_grad():
            weight.add_(ulp)
        sync.step()
    sync.finish()
    assert torch.equal(sync.anchors["w"], torch.full((8,), 1 + 4 * ulp))
    assert torch.equal(weight.detach(), torch.full((8,), 1 + 4 * ulp, dtype=torch.bfloat16))


def test_a_mid_run_finish_does_not_shift_the_density_schedule():
    """The schedule is read at the optimizer step an exchange follows, also after a
    ``finish()`` that exchanged a partial round."""
    read = []

    def schedule(step: int) -> float:
        read.append(step)
        return 1.0

    model = _model()
    sync = _sync(model, local_steps=2, density_schedule=schedule)
    _train(model, sync, 3)  # exchanges after optimizer steps 1 (0-based)
    sync.finish()  # a partial round: after step 2
    read.clear()
    _train(model, sync, 5)  # local steps 4-8: exchanges after steps 3, 5 and 7
    assert read == [3, 5, 7]


def test_a_state_with_residuals_of_another_model_is_refused():
    model = _model()
    sync = _sync(model)
    _train(model, sync, 2)
    state = sync.state_dict()
    assert set(state["engine"]["memory"]["residuals"]) == {name for name, _ in model.named_parameters()}
    wrong_size = {**state, "engine": {**state["engine"], "memory": {
        **state["engine"]["memory"], "residuals": {**state["engine"]["memory"]["residuals"], "0.weight": torch.zeros(7)}}}}
    with pytest.raises(ValueError, match=r"the residual of '0.weight' holds 7 elements; the parameter has 600"):
        sync.load_state_dict(wrong_size)
    foreign = {**state, "engine": {**state["engine"], "memory": {
        **state["engine"]["memory"], "residuals": {"head.weight": torch.zeros(4)}}}}
    with pytest.raises(ValueError, match=r"a residual for 'head.weight', which is not one of this model's parameters"):
        sync.load_state_dict(foreign)
    sync.load_state_dict(state)  # the real one still loads


# --- two ranks -----------------------------------------------------------------------------------------

CASES = ("shape", "order", "extra_param", "frozen_one_rank", "frozen_everywhere")


@pytest.mark.slow
def test_ranks_with_other_parameters_get_a_config_error(tmp_path):
    """Two gloo ranks: parameters that differ in shape, order, number or frozen state raise
    the agreement check's ConfigError on both ranks before the broadcast (not a gloo error
    or a hang), and frozen parameters are broadcast."""
    from launching import gloo_run

    gloo_run(2, __file__, str(tmp_path), timeout=120)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for case in CASES[:-1]:
            assert results[case].startswith("ConfigError: deepreduce: ranks disagree"), (rank, case, results[case])
        assert "rank 0 has ['0.weight', [64, 20], 'torch.float32'], rank 1 has ['0.weight', [32, 20]" in results["shape"]
        assert "frozen: rank 0=[], rank 1=[['0.bias', [64], 'torch.float32']]" in results["frozen_one_rank"]
        assert results["frozen_everywhere"] == "frozen parameters identical"


def _worker(out_dir: str) -> None:
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    from deepreduce.cli import exit_distributed_process
    from deepreduce.comm.torch_dist import close_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # a mismatch fails fast, not in 30 min
    rank = dist.get_rank()

    def net(hidden: int = 64) -> torch.nn.Module:
        torch.manual_seed(rank)  # different on every rank: the broadcast makes them alike
        return torch.nn.Sequential(torch.nn.Linear(20, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))

    results = {}
    for case in CASES:
        model = net(32 if case == "shape" and rank == 1 else 64)
        named = list(model.named_parameters())
        if case == "order" and rank == 1:
            named = named[::-1]
        if case == "extra_param" and rank == 1:
            named.append(("extra.weight", torch.nn.Parameter(torch.zeros(4, 4))))
        if case == "frozen_one_rank" and rank == 1:
            model[0].bias.requires_grad_(False)
        if case == "frozen_everywhere":
            model[0].requires_grad_(False)
        try:
            dr.UpdateSync(named, "topk:0.1/eliasfano/raw")
        except dr.ConfigError as error:
            results[case] = f"ConfigError: {error}"
            continue
        gathered = [None, None]
        dist.all_gather_object(gathered, [p.detach() for p in model.parameters()])
        same = all(torch.equal(a, b) for a, b in zip(*gathered))
        results[case] = "frozen parameters identical" if same else "parameters differ"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    # Wait for both ranks before leaving, and skip the interpreter's teardown of gloo's
    # threads, which can abort a run that succeeded.
    close_process_group()
    exit_distributed_process(0)


if __name__ == "__main__":
    _worker(sys.argv[1])
