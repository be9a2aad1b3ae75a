"""The bandwidth benchmark's cost model against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from deepreduce.apps.bench.bandwidth import CostConstants, predict_step, powersgd_elements, split_config, unavailable

C = CostConstants(link_Bps=1e7, intra_Bps=1e9, latency_s=1e-4, index_bytes=1.5, value_bytes=2.0, select_s=1e-9,
                  decode_s=2e-9, powersgd_s=0.1, powersgd_elements=400_000, collectives=5)
NUMEL = 25_000_000  # k = 250 000 at 1 %


def predict(scheme: str, ranks: int = 16, node_size: int = 4, density: float = 0.01, c: CostConstants = C) -> dict:
    return predict_step(scheme, numel=NUMEL, ranks=ranks, node_size=node_size, density=density, c=c)


@pytest.mark.parametrize("scheme, step_s, inter_bytes", [
    # 2*15/16 * 1e8 B = 1.875e8 B over 10 MB/s = 18.75 s, + 2*15 messages * 5 buckets * 0.1 ms
    ("dense", 18.765, 1.875e8 / 4),
    # 2*15/16 * 1.6e6 B = 3e6 B: 0.3 s, + 6*15*5*0.1 ms = 0.045 s, + 0.1 s of PowerSGD compute
    ("powersgd", 0.445, 3e6 / 4),
    # 15 payloads of 250 000 * 3.5 B: 1.3125 s, + 0.015 s; top-k of 25 M at 1 ns + decode of 15 * 250 000 at 2 ns
    ("allgather", 1.3125 + 0.015 + 0.025 + 0.0075, 1.3125e7 / 4),
    # inside the node 2*3/4 * 1e8 B at 1 GB/s = 0.15 s + 0.003 s; between nodes the node's 4 rings carry
    # 4 * 3 payloads of 62 500 * 3.5 B = 2.625e6 B: 0.2625 s + 0.003 s; top-k of 6.25 M + decode of 3 * 62 500
    ("hierarchical", 0.153 + 0.2655 + 0.00625 + 0.000375, 3 * 218_750),
    # 250 000 indices * 1.5 B once + 2*15/16 * 250 000 * 2 B: 1.3125e6 B: 0.13125 s + 3*15*5*0.1 ms; top-k + 250 000 adds
    ("shared_index", 0.13125 + 0.0225 + 0.025 + 0.0005, 1.3125e6 / 4),
    # inside the node as hierarchical; between nodes each of the node's 4 rings moves 62 500 indices * 1.5 B
    # + 2*3/4 * 62 500 * 2 B = 281 250 B: 1.125e6 B over the link, 0.1125 s + 3*3*5*0.1 ms; top-k of 6.25 M
    # + 62 500 adds
    ("hierarchical_shared_index", 0.153 + 0.1125 + 0.0045 + 0.00625 + 0.000125, 281_250),
])
def test_sixteen_ranks_in_four_nodes(scheme, step_s, inter_bytes):
    got = predict(scheme)
    assert got["step_s"] == pytest.approx(step_s, rel=1e-9)
    assert got["inter_node_bytes"] == pytest.approx(inter_bytes, rel=1e-9)


def test_one_node_has_no_inter_node_traffic():
    # 8 ranks in one node: the ring runs at the node's rate, 2*7/8 * 1e8 B at 1 GB/s + 2*7*5*0.1 ms
    assert predict("dense", ranks=8, node_size=8)["step_s"] == pytest.approx(0.182)
    hier = predict("hierarchical", ranks=8, node_size=8)
    assert hier["inter_node_bytes"] == 0 and hier["step_s"] == pytest.approx(0.182 + 25e6 / 8 * 1e-9)


def test_shared_cores_and_the_dense_fallback():
    shared = CostConstants(**{**C.__dict__, "cores": 4})  # 16 ranks on 4 cores: compute x 4
    assert predict("allgather", c=shared)["codec_s"] == pytest.approx(4 * 0.0325)
    # at 50 % the all-gather (16 * 4.375e7 B) would exceed 2 * 1e8 B: dense allreduce plus the top-k
    assert predict("allgather", density=0.5)["step_s"] == pytest.approx(18.765 + 0.025)
    with pytest.raises(ValueError, match="multiple of node_size"):
        predict("dense", ranks=10, node_size=4)
    with pytest.raises(ValueError, match="scheme must be one of"):
        predict("tree")


def test_shared_index_between_nodes_keeps_inter_node_bytes_nearly_flat():
    # per rank: k/L (p_index + 2 (N-1)/N p_value): from 2 to 64 nodes of 8 only the allreduce's
    # 2 (N-1)/N grows (1 -> 1.97), where the hierarchical all-gather's (N-1) grows 63x
    two = predict("hierarchical_shared_index", ranks=16, node_size=8)["inter_node_bytes"]
    many = predict("hierarchical_shared_index", ranks=512, node_size=8)["inter_node_bytes"]
    assert many / two == pytest.approx((1.5 + 2 * 2 * 63 / 64) / (1.5 + 2 * 2 * 1 / 2), rel=1e-9)
    gather = [predict("hierarchical", ranks=w, node_size=8)["inter_node_bytes"] for w in (16, 512)]
    assert gather[1] / gather[0] == pytest.approx(63, rel=1e-9)


def test_hierarchical_cuts_inter_node_bytes_by_the_node_size():
    flat = predict("allgather", ranks=128, node_size=8)["inter_node_bytes"]
    hier = predict("hierarchical", ranks=128, node_size=8)["inter_node_bytes"]
    # flat: (W-1) k p / L per rank; hierarchical: (N-1) (k/L) p; so (W-1) / (N-1) = 127 / 15, about L
    assert flat / hier == pytest.approx(127 / 15, rel=1e-9)
    # at 256 ranks the flat all-gather (256 * 875 000 B) would move more than an allreduce: it goes dense
    assert predict("allgather", ranks=256, node_size=8)["inter_node_bytes"] == predict("dense", ranks=256, node_size=8)["inter_node_bytes"]


def test_powersgd_elements_follow_the_hook_rule():
    # 64x576 (worth compressing at rank 4): (64 + 576) * 4; 3x3 matrix: whole; bias: whole
    assert powersgd_elements([torch.Size([64, 64, 3, 3]), torch.Size([3, 3]), torch.Size([64])]) == 640 * 4 + 9 + 64


def test_bench_configs_name_a_scheme_after_an_at_sign():
    assert split_config("topk:0.01/eliasfano/fp16@hierarchical") == ("topk:0.01/eliasfano/fp16", "hierarchical")
    assert split_config("dense") == ("dense", None)
    assert unavailable("topk:0.01/eliasfano/fp16@hierarchical") is None
    assert "no scheme 'tree'" in unavailable("topk:0.01/eliasfano/fp16@tree")
    assert "built-in hook" in unavailable("powersgd@hierarchical")


def _synthetic_topology(truth: dict, cores: float) -> list[dict]:
    """Topology-benchmark rows whose step times and hook counters the model produces from
    ``truth`` (CostConstants fields): 2 and 4 nodes of 2, two links."""
    from deepreduce.apps.bench.bandwidth import MODEL_CONFIGS, constants_for

    numel, rows = truth["numel"], []
    for nodes in (2, 4):
        for link in ("100mbit", "1gbit"):
            noop = 0.05 * nodes
            rows.append({"config": "noop", "nodes": nodes, "procs_per_node": 2, "link": link, "step_time_s": noop})
            for config, scheme in MODEL_CONFIGS.items():
                W = 2 * nodes
                c = constants_for(truth, link, cores=cores, compute_s=noop)
                row = {"config": config, "nodes": nodes, "procs_per_node": 2, "link": link,
                       "step_time_s": predict_step(scheme, numel=numel, ranks=W, node_size=2, density=0.01, c=c)["step_s"]}
                if scheme == "allgather":
                    crowd, kept = W / cores, 0.01 * numel
                    row["hook_stats"] = {"steps": 1, "numel": numel, "kept": kept, "compressed_buckets": truth["collectives"],
                                         "compress_s": truth["select_s"] * numel * crowd,
                                         "decompress_s": truth["decode_s"] * kept * (W - 1) * crowd,
                                         "payload_bytes": kept * (truth["index_bytes"] + 2.0)}
                rows.append(row)
    return rows


def test_constants_fitted_from_two_nodes_predict_four():
    from deepreduce.apps.bench.bandwidth import constants_for, fit_constants, resnet_shapes

    numel = sum(int(s.numel()) for s in resnet_shapes(False))
    truth = {"link_efficiency": {"100mbit": 0.9, "1gbit": 0.95}, "intra_Bps": 4e8, "latency_s": 0.0, "index_bytes": 1.25,
             "value_bytes": 2.0, "select_s": 5e-9, "decode_s": 8e-8, "powersgd_s": 0.25,
             "powersgd_elements": powersgd_elements(resnet_shapes(False)), "numel": numel, "collectives": 5}
    rows = _synthetic_topology(truth, cores=2.0)
    fit = fit_constants(rows, 2.0, 0.0, 1.5e9, fit_nodes=2)
    for name in ("select_s", "decode_s", "index_bytes", "powersgd_s", "intra_Bps"):
        assert fit[name] == pytest.approx(truth[name], rel=1e-6), name
    assert fit["link_efficiency"] == pytest.approx(truth["link_efficiency"], rel=1e-9)
    assert fit["probe_Bps"] == 1.5e9 and fit["collectives"] == 5
    # only the 2-node rows set t_psgd and B_node: slowing the 4-node PowerSGD rows changes nothing
    slower = [dict(r, step_time_s=r["step_time_s"] * 2) if r["nodes"] == 4 and r["config"] == "powersgd" else r for r in rows]
    assert fit_constants(slower, 2.0, 0.0, 1.5e9, fit_nodes=2)["powersgd_s"] == pytest.approx(0.25, rel=1e-6)
    four = constants_for(fit, "100mbit", cores=2.0, compute_s=0.2)
    assert predict_step("hierarchical", numel=numel, ranks=8, node_size=2, density=0.01, c=four)["step_s"] == pytest.approx(
        next(r["step_time_s"] for r in rows if r["nodes"] == 4 and r["link"] == "100mbit"
             and r["config"] == "topk:0.01/eliasfano/fp16@hierarchical"), rel=1e-6)


def test_loopback_bytes_share_the_cores():
    # 16 ranks on 4 cores: the intra-node reduce-scatter + all-gather's copies take 4x as long
    shared = CostConstants(**{**C.__dict__, "cores": 4})
    assert predict("hierarchical", c=shared)["intra_s"] == pytest.approx(4 * 0.15 + 0.003)
    assert predict("hierarchical")["intra_s"] == pytest.approx(0.15 + 0.003)
