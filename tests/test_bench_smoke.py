"""Smoke tests of the bandwidth and convergence benchmarks (tiny configurations, ~1 minute)."""

from __future__ import annotations

import json

import pytest

from deepreduce.apps.bench import bandwidth, convergence
from deepreduce.apps.netns import netns_unavailable_reason

NETNS_REASON = netns_unavailable_reason()


@pytest.mark.skipif(NETNS_REASON is not None, reason=f"network namespaces unavailable: {NETNS_REASON}")
def test_bandwidth_benchmark_quick_run(tmp_path):
    assert bandwidth.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results" / "bandwidth.json").read_text())
    by_config = {r["config"]: r for r in rows}
    assert set(by_config) == {"noop", "dense", "topk:0.01/eliasfano/fp16"}
    for row in rows:
        assert {"config", "nodes", "link", "step_time_s", "comm_time_s", "bytes_per_step"} <= set(row)
        assert row["nodes"] == 2 and row["link"] == "unshaped"
        assert row["params_agree"] == (row["config"] != "noop")  # noop never communicates
    # The wire counter sees the traffic: dense moves the whole model, top-1 % far less, noop nothing.
    assert by_config["noop"]["bytes_per_step"] < 0.05 * by_config["dense"]["bytes_per_step"]
    assert by_config["topk:0.01/eliasfano/fp16"]["bytes_per_step"] < 0.5 * by_config["dense"]["bytes_per_step"]
    assert "## Bandwidth" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "results" / "bandwidth.png").stat().st_size > 1000


def test_convergence_benchmark_quick_run(tmp_path):
    assert convergence.main(["--quick", "--steps", "10", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results" / "convergence.json").read_text())
    assert [r["config"] for r in rows] == ["dense", "topk:0.05/eliasfano/fp16"]
    for row in rows:
        assert row["steps"] == 10 and row["final_val_loss"] > 0 and row["curve"]
    assert rows[1]["bytes_per_step"] < rows[0]["bytes_per_step"]
    assert rows[0]["time_to_target_s"] is not None  # dense reaches its own final loss + 2 %
    assert "## Convergence" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "results" / "convergence.png").stat().st_size > 1000


def test_convergence_rows_merge_with_stored_runs_of_the_same_settings():
    def row(config, link="loopback", args=("--steps", "400")):
        return {"config": config, "link": link, "train_args": list(args)}

    stored = [row("dense"), row("fp16"), row("powersgd", args=("--steps", "10")), row("fp16", link="100mbit")]
    merged = convergence.merge_rows(stored, [row("topk:0.1/eliasfano/fp16"), row("fp16")])
    # Kept: stored dense (same link and settings); replaced: fp16; dropped: other settings or link.
    assert [r["config"] for r in merged] == ["dense", "fp16", "topk:0.1/eliasfano/fp16"]
    assert merged[1] is not stored[1]
