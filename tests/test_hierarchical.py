"""scheme="hierarchical": dense inside a node, compressed between nodes.

Unit tests of the slot layout and the options; multi-process runs through the DDP hook:
4 local processes as 2 nodes of 2 (node_size=2), and 2 emulated nodes x 2 processes in
network namespaces (node size from torchrun's LOCAL_WORLD_SIZE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepreduce as dr
from deepreduce.apps.netns import NetnsCluster, netns_unavailable_reason
from deepreduce.engine import Engine, Segment
from deepreduce.engine.hierarchical import HierarchicalScheme, shard_segments
from deepreduce.engine.nodes import resolve_node_size
from deepreduce.errors import ConfigError
from helpers import SoloTransport
from launching import free_port, worker_env

WORKER = Path(__file__).resolve().parent / "workers" / "hierarchical_checks.py"


# --- layout and options -------------------------------------------------------------------


def test_slots_cut_segments_and_name_the_pieces():
    segments = [Segment("a", 0, 6), Segment("b", 6, 3), Segment("c", 9, 5)]  # 14 elements, 2 slots of 7
    assert shard_segments(segments, 0, 7, "tensor") == [Segment("a", 0, 6), Segment("b[0:1]", 6, 1)]
    assert shard_segments(segments, 7, 7, "tensor") == [Segment("b[1:3]", 0, 2), Segment("c", 2, 5)]
    # 3 slots of 5: the last one holds 4 real elements (plus one of padding, never sent)
    assert shard_segments(segments, 10, 4, "tensor") == [Segment("c[1:5]", 0, 4)]
    merged = shard_segments(segments, 7, 7, "bucket")
    assert merged == [Segment(("b[1:3]", "c"), 0, 7, parts=(("b[1:3]", 2), ("c", 5)))]
    assert shard_segments(segments, 0, 6, "bucket") == [Segment("a", 0, 6)]  # one piece: its own name
    # a segment that already has parts (bucket granularity) is cut part by part
    whole = [Segment(("a", "b"), 0, 9, parts=(("a", 6), ("b", 3)))]
    assert shard_segments(whole, 5, 4, "tensor") == [Segment("a[5:6]", 0, 1), Segment("b", 1, 3)]
    assert shard_segments(segments, 14, 0, "tensor") == []


def test_node_size_from_torchrun_or_given(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_node_size(None) == 4 and resolve_node_size(2) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ConfigError, match="node_size=L, or launch with torchrun"):
        resolve_node_size(None)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="node_size must be a positive int"):
            resolve_node_size(bad)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE='two'"):
        resolve_node_size(None)


def test_engine_scheme_option_is_checked_and_described():
    c = dr.Compressor.from_spec("topk:0.01/eliasfano/fp16")
    flat = Engine(SoloTransport(), c)
    assert flat.describe()["scheme"] == "allgather" and "node_size" not in flat.describe()
    hier = Engine(SoloTransport, c, scheme="hierarchical", node_size=2)  # a transport made at the first bucket
    assert hier.describe()["scheme"] == "hierarchical" and hier.describe()["node_size"] == 2
    with pytest.raises(ConfigError, match="scheme must be one of"):
        Engine(SoloTransport(), c, scheme="tree")
    with pytest.raises(ConfigError, match="node_size applies to scheme='hierarchical'"):
        Engine(SoloTransport(), c, node_size=2)
    with pytest.raises(ConfigError, match="node_size must be a positive int"):
        dr.DeepReduceState(None, c, scheme="hierarchical", node_size=0)
    state = dr.DeepReduceState(None, c, scheme="hierarchical", node_size=2)
    assert state.describe()["node_size"] == 2
    # the scheme needs torch.distributed sub-groups: another transport is refused when given (the MPI and
    # Horovod front ends), or at the first bucket when a factory makes it
    for scheme in ("hierarchical", "hierarchical_shared_index"):
        with pytest.raises(ConfigError, match=f"scheme='{scheme}' runs over torch.distributed sub-groups.*SoloTransport"):
            Engine(SoloTransport(), c, scheme=scheme, node_size=2)
    with pytest.raises(ConfigError, match="scheme=.hierarchical. runs over torch.distributed sub-groups.*the transport is a SoloTransport"):
        hier.reduce(torch.randn(4096), key=0)


def test_scheme_pickles_without_its_groups():
    import pickle

    scheme = HierarchicalScheme(node_size=2)
    scheme.groups = object()  # stands for live process groups
    copy = pickle.loads(pickle.dumps(scheme))
    assert copy.groups is None and copy.node_size == 2


# --- 4 local processes, node_size=2 ---------------------------------------------------------------


def _read(out: Path, world: int) -> list[dict]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, checks in enumerate(ranks):
        for name, entry in checks.items():
            if not name.startswith("_"):
                assert "error" not in entry, f"rank {rank}, check {name}:\n{entry['error']}"
    return ranks


@pytest.fixture(scope="module")
def local4(tmp_path_factory):
    out = tmp_path_factory.mktemp("hier4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(WORKER), str(out),
           "--node-size", "2", "--only", "tensor", "--checks",
           "bitwise,equals_allreduce,resume,nonfinite,shared_between_nodes"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=worker_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return _read(out, 4)


def _assert_bitwise(ranks: list[dict]) -> dict:
    runs = [r["bitwise"] for r in ranks]
    (name,) = runs[0]
    entries = [run[name] for run in runs]
    assert len({e["digest"] for e in entries}) == 1, name  # bitwise identical after 50 steps
    assert entries[0]["digest"] != entries[0]["initial"]
    stats = entries[0]["stats"]
    assert stats["compressed_buckets"] > 0 and stats["steps"] == 50
    # compressed buckets count their inter-node exchange as sent, dense ones (the warm-up)
    # their allreduce over every rank; the dense node traffic apart
    assert stats["warmup_buckets"] > 0 and stats["inter_node_bytes"] == stats["sent_bytes"]
    steady = stats["steady"]
    assert 0 < steady["inter_node_bytes"] == steady["sent_bytes"]
    assert steady["intra_node_bytes"] > 10 * steady["inter_node_bytes"]
    return entries[0]


@pytest.mark.slow
def test_four_processes_as_two_nodes_stay_bitwise_identical(local4):
    entry = _assert_bitwise(local4)
    stats = entry["stats"]
    # slot pieces of parameters cut at slot boundaries keep their own residuals
    assert any("[" in key for key in entry["residual_keys"])
    # the slow link carried a top-5 % payload of half of each bucket
    assert stats["steady"]["sent_bytes_per_step"] < 0.1 * stats["dense_bytes"] / stats["steps"]


@pytest.mark.slow
def test_lossless_full_ratio_equals_allreduce(local4):
    for rank in local4:
        for spec, entry in rank["equals_allreduce"].items():
            assert entry["stats"]["compressed_buckets"] > 0 and entry["stats"]["dense_fallbacks"] == 0, spec
            assert entry["grad_diff"] <= 1e-6 * entry["grad_scale"], (spec, entry)
            assert entry["param_diff"] <= 1e-6, (spec, entry)
    for spec in local4[0]["equals_allreduce"]:
        assert len({rank["equals_allreduce"][spec]["digest"] for rank in local4}) == 1


@pytest.mark.slow
def test_resume_restores_the_residuals_of_cut_pieces(local4):
    entries = [rank["resume"] for rank in local4]
    assert all(e["same"] for e in entries)
    assert len({e["digest"] for e in entries}) == 1
    assert "w2[0:601]" in entries[0]["saved_keys"]  # w2 is cut by the slot boundary at 5101


@pytest.mark.slow
def test_nonfinite_gradient_on_one_rank_is_seen_by_every_rank(local4):
    entries = [rank["nonfinite"] for rank in local4]
    assert all(e["skipped"] == [5] for e in entries)
    assert len({e["digest"] for e in entries}) == 1
    assert all(e["stats"]["nonfinite_buckets"] == entries[0]["stats"]["nonfinite_buckets"] > 0 for e in entries)


@pytest.mark.slow
def test_shared_index_between_nodes_stays_bitwise_and_equals_allreduce(local4):
    entries = [rank["shared_between_nodes"] for rank in local4]
    assert len({e["bitwise"]["digest"] for e in entries}) == 1
    stats = entries[0]["bitwise"]["stats"]
    assert stats["compressed_buckets"] > 0 and stats["broadcast_bytes"] > 0  # index broadcasts between nodes
    assert 0 < stats["steady"]["inter_node_bytes"] < stats["steady"]["intra_node_bytes"] / 10
    for e in entries:
        exact = e["equals_allreduce"]
        assert exact["stats"]["compressed_buckets"] > 0 and exact["stats"]["dense_fallbacks"] == 0
        assert exact["grad_diff"] <= 1e-6 * exact["grad_scale"] and exact["param_diff"] <= 1e-6
    assert len({e["equals_allreduce"]["digest"] for e in entries}) == 1


def test_shared_index_between_nodes_refuses_codecs_without_a_sum():
    with pytest.raises(dr.ConfigError, match="no element-wise sum"):
        dr.DeepReduceState(None, "topk:0.01/eliasfano/qsgd", scheme="hierarchical_shared_index", node_size=2)
    with pytest.raises(dr.ConfigError, match="small_compressor"):
        dr.DeepReduceState(None, "topk:0.01/eliasfano/fp16", scheme="hierarchical_shared_index", node_size=2,
                           small_compressor="topk:1/strided/uniform:bits=8")


# --- 2 emulated nodes x 2 processes ---------------------------------------------------------------

NETNS_REASON = netns_unavailable_reason()


@pytest.mark.slow
@pytest.mark.skipif(NETNS_REASON is not None, reason=f"network namespaces unavailable: {NETNS_REASON}")
def test_two_nodes_of_two_processes_in_network_namespaces(tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 2, one per namespace, 1 Gbit/s between them;
    the node size comes from LOCAL_WORLD_SIZE. 50 steps with one top-k per slot."""
    port = free_port()
    with NetnsCluster(2, rate="1gbit", procs_per_node=2, name=f"drh{os.getpid() % 100000}") as cluster:
        env = {key: value for key, value in worker_env().items() if key in ("PYTHONPATH", "OMP_NUM_THREADS")}
        procs = [cluster.popen(node, cluster.torchrun_argv(node, [str(WORKER), str(tmp_path), "--only", "bucket",
                                                                 "--checks", "bitwise"], port=port),
                               env=env, port=port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for node in range(2)]
        codes = cluster.wait(procs, timeout=420)
        outputs = [p.stdout.read() for p in procs]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    ranks = _read(tmp_path, 4)
    assert [r["_env"]["LOCAL_WORLD_SIZE"] for r in ranks] == ["2"] * 4
    assert [r["_env"]["GROUP_RANK"] for r in ranks] == ["0", "0", "1", "1"]
    entry = _assert_bitwise(ranks)
    assert any(isinstance(key, str) and key.startswith("(") for key in entry["residual_keys"])  # one top-k per slot


def test_all_finite_sees_nan_and_both_infinities_in_every_float_dtype():
    from deepreduce.engine.messages import all_finite

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(5000).to(dtype)
        assert all_finite(x)
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[1234] = bad
            assert not all_finite(y), (dtype, bad)
    assert all_finite(torch.empty(0))
