"""Smoke tests of the bandwidth and convergence benchmarks (tiny configurations, ~1 minute)."""

from __future__ import annotations

import json

import pytest

from deepreduce.apps.bench import bandwidth, convergence, soak
from deepreduce.apps.netns import netns_unavailable_reason

NETNS_REASON = netns_unavailable_reason()


@pytest.mark.slow
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
    # noop only times the compute: no speed-up is claimed for it.
    assert by_config["noop"]["speedup_vs_dense"] is None and by_config["dense"]["speedup_vs_dense"] == 1.0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Bandwidth" in text and "| noop | " in text and "(reference) |" in text
    # the section says what was trained: the small --quick layout, not ResNet-50's
    assert "Model: the --quick layout, 5 small tensors" in text and "ResNet-50" not in text
    assert all(row["quick"] for row in rows)
    assert (tmp_path / "results" / "bandwidth.png").stat().st_size > 1000


@pytest.mark.parametrize("bench, argv, message", [
    ("bandwidth", ["--links", "100xyz"], "--links: rate '100xyz': expected a number and a unit"),
    ("bandwidth", ["--links", "0mbit"], "--links: rate '0mbit' must be positive"),
    ("bandwidth", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("bandwidth", ["--nodes", "0"], "--nodes must be >= 1, got 0"),
    ("soak", ["--nodes", "0"], "--nodes must be >= 1, got 0"),
    ("soak", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("soak", ["--stall", "0"], "--stall must be > 0, got 0.0"),
    ("soak", ["--rate", "fast"], "--rate: rate 'fast': expected a number and a unit"),
    ("convergence", ["--link", "fast"], "--link: rate 'fast': expected a number and a unit"),
    ("convergence", ["--quick", "--rows", "fp16"], "--quick runs the rows 'dense' and 'update H=4' only"),
])
def test_bench_options_are_checked_before_anything_runs(bench, argv, message, tmp_path, capsys):
    """Zero used to mean the default, and a bad rate failed inside the run with a traceback."""
    module = {"bandwidth": bandwidth, "soak": soak, "convergence": convergence}[bench]
    with pytest.raises(SystemExit) as stopped:
        module.main([*argv, "--out", str(tmp_path)])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(NETNS_REASON is not None, reason=f"network namespaces unavailable: {NETNS_REASON}")
def test_bandwidth_refuses_when_no_configuration_can_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bandwidth.main(["--configs", "bogus", "topk:0.01/eliasfano/fp16@nosuchscheme", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "no configuration left to run: bogus: unknown sparsifier 'bogus'" in err and "no scheme 'nosuchscheme'" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(NETNS_REASON is not None, reason=f"network namespaces unavailable: {NETNS_REASON}")
def test_soak_quick_run_rides_out_a_flap_and_a_rate_change(tmp_path):
    assert soak.main(["--quick", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "results" / "soak.json").read_text())
    (run,) = stored["runs"]
    assert run["config"] == "update" and run["nodes"] == 2 and run["steps"] == run["steps_planned"] == 30
    assert run["exit_codes"] == [0, 0] and run["hang"] is None and not run["chaos_errors"]
    kinds = [e["kind"] for e in run["events"]]
    assert kinds[:2] == ["flap", "rate"]
    flap = run["events"][0]
    assert flap["duration_s"] >= 1.5 and 5 <= flap["step"] < 30
    # The flap stalled the run for at least as long as the link was down.
    assert run["max_step_s"] >= 1.0
    assert run["bitwise_identical"] and None not in run["digests"]
    # ... and the faults changed nothing: the fault-free run ends with the same parameters.
    assert run["reference"]["digests"] == run["digests"] and run["reference"]["events"] == []
    assert run["wire_bytes_per_step_per_rank"] > 0 and 0 < run["bytes_per_step"] < run["dense_bytes_per_step"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Soak" in text and "Lost: nothing" in text


def test_soak_checkpoint_digest_is_bitwise(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "step": 1}, tmp_path / "rank0.pt")
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(2.0))  # one ulp
    torch.save({"model": model.state_dict(), "step": 1}, tmp_path / "rank1.pt")
    torch.save({"model": model.state_dict(), "step": 2}, tmp_path / "rank2.pt")
    digests = [soak.model_digest(tmp_path / f"rank{r}.pt") for r in range(3)]
    assert digests[0] != digests[1] and digests[1] == digests[2]
    assert soak.model_digest(tmp_path / "missing.pt") is None
    assert soak.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0 and soak.percentile([1.0, 9.0], 0.95) == 9.0


@pytest.mark.slow
def test_convergence_benchmark_quick_run(tmp_path):
    assert convergence.main(["--quick", "--steps", "20", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "results" / "convergence.json").read_text())
    runs = stored["runs"]
    assert [r["row"] for r in runs] == ["dense", "update H=4"]
    for run in runs:
        assert run["steps"] == 20 and run["final"] > 0 and [p["step"] for p in run["curve"]] == [5, 10, 15, 20]
    assert runs[1]["bytes_per_step"] < 0.5 * runs[0]["bytes_per_step"]
    dense, update = stored["summary"]
    assert dense["gap"] == 0 and dense["steps_to_target"] == 20 and update["target"] == dense["final"]
    assert "### lm, adamw" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "results" / "convergence.png").stat().st_size > 1000
    # a second call reuses the stored runs: nothing is trained again
    before = (tmp_path / "results" / "convergence.json").read_text()
    assert convergence.main(["--quick", "--steps", "20", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results" / "convergence.json").read_text())["runs"] == json.loads(before)["runs"]


@pytest.mark.slow
def test_convergence_benchmark_longer_runs_reach_the_dense_target(tmp_path):
    # The rows train 30 steps against dense's 20: the target is dense's 20-step value, and the
    # main section and summary stay untouched.
    assert convergence.main(["--quick", "--steps", "30", "--target-steps", "20", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "results" / "convergence.json").read_text())
    steps = {r["row"]: r["steps"] for r in stored["runs"]}
    assert steps == {"dense": 20, "update H=4": 30}
    dense, update = stored["summary_longer"]
    assert "summary" not in stored
    assert dense["steps_to_target"] == 20 and update["target"] == dense["final"]
    longer_run = next(r for r in stored["runs"] if r["row"] == "update H=4")
    assert [p["step"] for p in longer_run["curve"]][-1] == 30
    assert update["gap"] == pytest.approx((longer_run["final"] - dense["final"]) / dense["final"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "longer runs to dense's final metric" in text and "Dense trains 20 steps" in text
    with pytest.raises(SystemExit):
        convergence.main(["--quick", "--steps", "20", "--target-steps", "30", "--out", str(tmp_path)])


def test_convergence_retime_refuses_rows_that_are_not_selected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convergence.main(["--rows", "dense", "--retime", "update H=4", "--out", str(tmp_path)])
    assert "--retime names rows that are not selected: update H=4" in capsys.readouterr().err


def test_time_to_target_counts_warm_up_and_compressed_steps_apart():
    curve = [{"step": 50, "value": 3.0}, {"step": 100, "value": 2.5}, {"step": 150, "value": 2.4}]
    assert convergence.reached(curve, 2.5, higher=False) == 100
    assert convergence.reached(curve, 2.0, higher=False) is None
    assert convergence.reached([{"step": 5, "value": 0.4}, {"step": 9, "value": 0.6}], 0.5, higher=True) == 9
    assert convergence.seconds_to(100, {"warm_step_s": 2.0, "step_s": 0.1}) == 10 * 2.0 + 90 * 0.1
    ramp = {"warm_step_s": 1.0, "step_s": 0.1, "warm_times": [2.0, 1.0, 0.5]}  # a density ramp, step by step
    assert convergence.seconds_to(2, ramp) == 3.0 and convergence.seconds_to(5, ramp) == 3.5 + 2 * 0.1
    assert convergence.warm_steps(["--local-steps", "16"]) == 16
    assert convergence.warm_steps(["--density-warmup", "300"]) == 310
