"""The shared-index scheme (a rotating leader's indices, one allreduce of the values):
its configuration errors, leader rule, index message and fp16 scale in process, and
training through the DDP hook on 3 and 4 gloo ranks (tests/workers/shared_index.py)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

import deepreduce as dr
from deepreduce.engine import Engine, Segment
from deepreduce.engine.shared_index import _fp16_shift, leader_of, pack_message, read_message, select_indices
from helpers import SoloTransport
from launching import gloo_run, mpirun, needs_mpi, worker

# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec, match", [
    ("topk:0.01/eliasfano/qsgd", "value codec 'qsgd' has no element-wise sum. Use one of: raw, fp16, bf16"),
    ("topk:0.01/eliasfano/uniform:bits=2", "value codec 'uniform' has no element-wise sum"),
    ("topk:0.01/eliasfano/polyfit", "value codec 'polyfit' has no element-wise sum"),
    ("topk:0.01/bloom:fpr=1e-3,policy=p2/fp16", "index codec 'bloom' is lossy. Use a lossless one"),
])
def test_codecs_without_a_dense_sum_are_refused_at_construction(spec, match):
    with pytest.raises(dr.ConfigError, match=match):
        dr.DeepReduceState(None, spec, scheme="shared_index")
    dr.DeepReduceState(None, spec, scheme="allgather")  # the all-gather scheme takes them


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(dr.ConfigError, match=r"scheme must be one of \('allgather', 'shared_index'"):
        Engine(SoloTransport(), dr.Compressor(), scheme="ring")


def test_scheme_is_part_of_the_agreed_configuration():
    state = dr.DeepReduceState(None, "topk:0.01/eliasfano/fp16", scheme="shared_index")
    assert state.describe()["scheme"] == "shared_index" and state.scheme == "shared_index"
    assert dr.DeepReduceState(None).describe()["scheme"] == "allgather"


# --- leader, message, scale ------------------------------------------------------------------


def test_leader_rotates_with_the_step_from_the_bucket_key():
    # As documented: (step + key) mod W, a name counting as its CRC-32.
    assert [leader_of(step, 0, 3) for step in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [leader_of(5, key, 4) for key in range(4)] == [1, 2, 3, 0]
    assert leader_of(7, "float32@cpu", 5) == (7 + zlib.crc32(b"float32@cpu")) % 5
    # Over W consecutive steps every rank leads every bucket once.
    for key in (0, 3, "bias"):
        assert sorted(leader_of(step, key, 4) for step in range(10, 14)) == [0, 1, 2, 3]


def test_index_message_round_trip_and_corruption():
    compressor = dr.Compressor.from_spec("topk:0.05/eliasfano/fp16")
    segments = [Segment("w", 0, 4000), Segment("v", 4000, 1000)]
    grads = [torch.randn(4000), torch.randn(1000)]
    chosen = [select_indices(compressor, g, 9, seg.name) for g, seg in zip(grads, segments)]
    for (indices, _, _), g in zip(chosen, grads):
        assert torch.equal(indices, torch.topk(g.abs(), indices.numel()).indices.sort().values)
    message = pack_message(9, [(i.numel(), data, params) for i, data, params in chosen], torch.device("cpu"))
    got = read_message(message, segments, compressor, torch.float32, 9, leader=2)
    assert all(torch.equal(a, b) for a, b in zip(got, (i for i, _, _ in chosen)))
    with pytest.raises(dr.DecodeError, match="index message from rank 2: made at step 9, this rank is at step 10"):
        read_message(message, segments, compressor, torch.float32, 10, leader=2)
    corrupted = message.clone()
    corrupted[-1] ^= 1
    with pytest.raises(dr.DecodeError, match="index message from rank 2: checksum mismatch"):
        read_message(corrupted, segments, compressor, torch.float32, 9, leader=2)
    with pytest.raises(dr.DecodeError, match="index message from rank 2: carries 2 entries, expected 3"):
        read_message(message, segments + [Segment("u", 5000, 2000)], compressor, torch.float32, 9, leader=2)
    with pytest.raises(dr.DecodeError, match="cannot hold the 24-byte header"):
        read_message(message[:10], segments, compressor, torch.float32, 9, leader=2)


@pytest.mark.parametrize("world, average", [(1, True), (3, True), (4, False), (7, False)])
def test_fp16_scale_keeps_every_partial_sum_below_fp16_overflow(world, average):
    # Ranks' largest |value| 2^(e-1) <= m < 2^e: the shared shift puts any sum below 2^15.
    for exponents in ([3], [-20, -5, 2], [40, 41]):
        fields = [e + 256 for e in exponents] + [0]
        shift = _fp16_shift(fields, world, average)
        largest = 2.0 ** max(exponents) * (1 - 2**-11)
        total = largest * 2.0**shift * (1 if average else world)
        assert 2.0**12 <= total < 2.0**15
    assert _fp16_shift([0, 0], 3, True) == 0  # all-zero buckets: no scale


@pytest.mark.parametrize("value", ["raw", "fp16", "bf16"])
def test_one_rank_sends_exactly_what_its_residual_leaves_out(value):
    """Error feedback keeps the rest: the averaged bucket plus the residual is the
    gradient, exactly (the fp16/bf16 rounding is in the residual, not lost)."""
    engine = Engine(SoloTransport(), dr.Compressor.from_spec(f"topk:0.1/eliasfano/{value}"), scheme="shared_index",
                    min_numel=64)
    segments = [Segment("a", 0, 1000), Segment("small", 1000, 10), Segment("b", 1010, 990)]
    grad = torch.randn(2000) * torch.logspace(-6, 2, 2000)
    out = engine.reduce(grad.clone(), segments).wait()
    for seg in (segments[0], segments[2]):
        part = out.narrow(0, seg.offset, seg.numel)
        assert int((part != 0).sum()) == seg.numel // 10
        assert torch.equal(part + engine.memory.residual(seg.name), grad.narrow(0, seg.offset, seg.numel))
    assert torch.equal(out[1000:1010], grad[1000:1010])  # small segments travel dense
    stats = engine.stats()
    assert stats["compressed_buckets"] == 1 and stats["kept"] == 100 + 99 + 10


def test_leader_goes_dense_when_indices_and_values_cost_more_than_the_bucket():
    # 700 int32 indices broadcast + 700 fp32 values allreduced (twice over the wire) > 2 x 4000 bytes.
    engine = Engine(SoloTransport(), dr.Compressor.from_spec("topk:0.7/raw/raw"), scheme="shared_index", min_numel=64)
    grad = torch.randn(1000)
    out = engine.reduce(grad.clone()).wait()
    assert torch.equal(out, grad) and not bool(engine.memory.residual(0).any())
    stats = engine.stats()
    assert stats["dense_fallbacks"] == 1 and stats["compressed_buckets"] == 0 and stats["sent_bytes"] == 4000


def test_nonfinite_bucket_goes_dense_and_keeps_the_residual():
    engine = Engine(SoloTransport(), dr.Compressor.from_spec("topk:0.1/eliasfano/fp16"), scheme="shared_index",
                    min_numel=64)
    engine.reduce(torch.randn(1000)).wait()
    engine.end_step()
    residual = engine.memory.residual(0).clone()
    grad = torch.randn(1000)
    grad[17] = float("nan")
    out = engine.reduce(grad.clone()).wait()
    assert torch.isnan(out[17]) and torch.equal(out[:17], grad[:17])
    assert torch.equal(engine.memory.residual(0), residual)
    assert engine.stats()["nonfinite_buckets"] == 1


# --- 3 and 4 ranks through the DDP hook ------------------------------------------------------


def launch(tmp_path_factory, world: int, checks: str) -> list[dict]:
    out = tmp_path_factory.mktemp(f"shared{world}")
    gloo_run(world, worker("shared_index"), str(out), checks, timeout=900)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, done in enumerate(ranks):
        for name, entry in done.items():
            assert "error" not in entry, f"rank {rank}, check {name}:\n{entry['error']}"
    return ranks


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(tmp_path_factory, 3, "train,node_broadcast,equals_allreduce,nonfinite,resume,nonfinite_raise,mismatch")


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(tmp_path_factory, 4, "train_short,node_broadcast,nonfinite")


@pytest.mark.slow
@pytest.mark.parametrize("world", ["three", "four"])
def test_parameters_stay_bitwise_identical_and_leaders_rotate(world, request):
    ranks = request.getfixturevalue(world)
    size = len(ranks)
    train = "train" if "train" in ranks[0] else "train_short"
    assert len(ranks[0][train]) == (4 if train == "train" else 2)
    for name, first in ranks[0][train].items():
        assert all(r[train][name]["digest"] == first["digest"] for r in ranks), name
        assert first["digest"] != first["initial"], name
        assert first["losses"][-1] < first["losses"][0], name
        stats = first["stats"]
        assert stats["compressed_buckets"] > 0 and stats["dense_fallbacks"] == 0, (name, stats)
        # Every index broadcast came from the documented leader; each rank led.
        roots = first["roots"]
        assert roots and all(root == leader_of(step, key, size) for step, key, root in roots), name
        assert {root for _, _, root in roots} == set(range(size))
        assert all(r[train][name]["roots"] == roots for r in ranks)


@pytest.mark.slow
def test_index_message_is_relayed_per_node_where_nodes_divide_the_world(three, four):
    """torchrun's variables as for nodes of 2: at 4 ranks the leader's message crosses
    once per node (never through the world's broadcast) and training ends where the plain
    broadcast's does; at 3 ranks (no whole nodes) the plain broadcast carries it."""
    for ranks, relayed in ((four, True), (three, False)):
        size = len(ranks)
        for name, run in ranks[0]["node_broadcast"].items():
            plain = ranks[0]["train_short" if relayed else "train"][name]
            assert all(r["node_broadcast"][name]["digest"] == plain["digest"] for r in ranks), (size, name)
            assert all(r["node_broadcast"][name]["node_size"] == (2 if relayed else None) for r in ranks), (size, name)
            assert run["stats"]["compressed_buckets"] == plain["stats"]["compressed_buckets"] > 0, (size, name)
            assert (run["roots"] == []) if relayed else (run["roots"] == plain["roots"]), (size, name)


@pytest.mark.slow
def test_bytes_per_rank_do_not_grow_with_world_size(three, four):
    for name, at4 in four[0]["train_short"].items():
        s3, s4 = three[0]["train"][name]["stats"]["steady"], at4["stats"]["steady"]
        assert abs(s4["sent_bytes_per_step"] / s3["sent_bytes_per_step"] - 1) < 0.05, name


@pytest.mark.slow
def test_ratio_one_lossless_equals_dense_allreduce(three):
    for rank in three:
        got = rank["equals_allreduce"]
        assert got["stats"]["compressed_buckets"] > 0 and got["stats"]["dense_fallbacks"] == 0
        assert got["grad_diff"] <= 1e-6 * got["grad_scale"]
        assert got["param_diff"] < 1e-6
    assert len({rank["equals_allreduce"]["digest"] for rank in three}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("world", ["three", "four"])
def test_nonfinite_gradients_take_the_dense_path_on_every_rank(world, request):
    ranks = request.getfixturevalue(world)
    reference = ranks[0]["nonfinite"]["allreduce"]
    for name, run in ranks[0]["nonfinite"].items():
        assert all(r["nonfinite"][name]["digest"] == run["digest"] for r in ranks), name
        assert run["skipped"] == reference["skipped"] == [4, 9, 12], name
        if name != "allreduce":
            assert run["residuals_finite"], name
            assert run["stats"]["nonfinite_buckets"] >= 3 and run["stats"]["compressed_buckets"] > 0, name


@pytest.mark.slow
def test_nonfinite_raise_names_rank_bucket_and_step_everywhere(three):
    for rank in three:
        got = rank["nonfinite_raise"]
        assert got["raised"] and got["step"] == 4
        assert "NonFiniteError" in got["message"] and "step 4: the gradient of rank 1 is not finite" in got["message"]


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(three):
    digests = {(r["resume"]["uninterrupted"], r["resume"]["resumed"]) for r in three}
    assert len(digests) == 1
    whole, resumed = digests.pop()
    assert whole == resumed
    assert three[0]["resume"]["residuals"] > 0


@pytest.mark.slow
def test_mixed_schemes_fail_the_agreement_check_on_every_rank(three):
    for rank in three:
        got = rank["mismatch"]
        assert got["raised"] and "ConfigError" in got["message"]
        assert "scheme: rank 0='shared_index', rank 1='allgather'" in got["message"]


# --- front ends ------------------------------------------------------------------------------


def test_front_ends_pass_the_scheme_through():
    from deepreduce.apps.comm_hooks import make_hook
    from deepreduce.apps.train import _check_args, parse_args
    from deepreduce.horovod import DistributedOptimizer

    model = torch.nn.Linear(40, 30)
    sync = dr.UpdateSync(model.named_parameters(), "topk:0.05/eliasfano/fp16", transport=SoloTransport(),
                         broadcast=False, scheme="shared_index")
    assert sync.engine.scheme == "shared_index" and sync.config["scheme"] == "shared_index"
    state, *_ = make_hook("topk:0.05/eliasfano/bf16", scheme="shared_index")
    assert state.scheme == "shared_index"
    with pytest.raises(dr.ConfigError, match="scheme apply to deepreduce compressors, not to 'powersgd'"):
        make_hook("powersgd", scheme="shared_index")
    args = parse_args(["--compression", "topk:0.01/eliasfano/fp16", "--scheme", "shared_index"])
    assert args.scheme == "shared_index"
    with pytest.raises(SystemExit, match="--scheme shared_index needs a compressor spec for --compression, not 'dense'"):
        _check_args(parse_args(["--scheme", "shared_index"]))
    optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                     dr.Compressor.from_spec("topk:0.05/eliasfano/fp16"), transport=SoloTransport(),
                                     min_numel=8, scheme="shared_index")
    model(torch.randn(4, 40)).square().sum().backward()
    optimizer.step()  # one rank: the averaged gradient is the top 5 % of each tensor's
    assert int((model.weight.grad != 0).sum()) == 60 and optimizer._deepreduce.engine.scheme == "shared_index"


@pytest.mark.slow
@needs_mpi
def test_distributed_optimizer_over_mpi_with_shared_indices():
    """The Horovod optimizer's logic on 3 MPI ranks: the broadcast and the value allreduce
    carried by mpi4py keep the ranks identical."""
    proc = mpirun(3, worker("optimizer_mpi"), "shared_index")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["digests"]) == 3 and len(set(result["digests"])) == 1
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["stats"]["broadcast_bytes"] > 0 and result["stats"]["dense_fallbacks"] == 0
