"""Smoke test of the codec benchmark (seconds): it runs, and writes the table, JSON and plot."""

from __future__ import annotations

import json

import pytest
import torch

from deepreduce.apps.bench import codecs as bench_codecs
from deepreduce.apps.bench import profile
from deepreduce.apps.bench import update_results_section

FIELDS = {"model", "density", "index", "value", "bits_per_element", "entropy_ratio", "rel_error",
          "compress_mb_s", "decompress_mb_s", "topk_s"}


def test_codec_benchmark_quick_run(tmp_path):
    assert bench_codecs.main(["--quick", "--out", str(tmp_path), "--only", "raw/raw", "eliasfano/fp16", "zstd/raw"]) == 0
    rows = json.loads((tmp_path / "results" / "codecs.json").read_text())
    assert {(r["index"], r["value"]) for r in rows} == {("raw", "raw"), ("eliasfano", "fp16"), ("zstd", "raw")}
    for row in rows:
        assert FIELDS <= set(row)
        assert row["compress_mb_s"] > 0 and row["decompress_mb_s"] > 0
    raw = next(r for r in rows if r["index"] == "raw")
    ef = next(r for r in rows if r["index"] == "eliasfano")
    assert 64 <= raw["bits_per_element"] < 70  # int32 + fp32, plus the header
    assert ef["bits_per_element"] < 0.5 * raw["bits_per_element"]
    assert raw["rel_error"] == 0 and 0 < ef["rel_error"] < 1e-3
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- codecs:begin -->" in text and "eliasfano" in text
    assert (tmp_path / "results" / "codec_bits.png").stat().st_size > 1000


def test_committed_results_have_distinct_headings_and_no_noop_speedup():
    """Every heading of benchmarks/RESULTS.md names one section, and the bandwidth table
    claims no speed-up for ``noop`` (it communicates nothing)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert len(headings) == len(set(headings)), sorted(h for h in headings if headings.count(h) > 1)
    noop_rows = [line for line in text.splitlines() if line.split("|")[3:4] == [" noop "]]
    assert noop_rows and all(line.endswith("(reference) |") for line in noop_rows)


def test_results_sections_are_replaced_not_duplicated(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_results_section(path, "codecs", "first")
    update_results_section(path, "other", "kept")
    update_results_section(path, "codecs", "second")
    text = path.read_text()
    assert text.count("<!-- codecs:begin -->") == 1 and "second" in text and "first" not in text and "kept" in text


def test_steady_state_mode_quick_run(tmp_path):
    """Codec sizes measured inside a short error-feedback run: every codec has a fresh and a
    steady figure and a ratio to the entropy bound (which a clustered set may beat: the
    bound is for a set drawn at random); fixed-width codecs cost the same either way."""
    assert bench_codecs.main(["--steady", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results" / "codecs_steady.json").read_text())
    kinds = {(r["kind"], r["codec"]) for r in rows}
    assert {("index", "eliasfano"), ("index", "zstd"), ("value", "fp16"), ("value", "uniform:bits=2")} == kinds - {("index", "raw")}
    for r in rows:
        assert r["fresh_bits"] > 0 and r["steady_bits"] > 0
        if r["kind"] == "index":
            assert r["steady_over_bound"] == r["steady_bits"] / r["bound_bits"] > 0.5
    by = {(r["kind"], r["codec"]): r for r in rows}
    assert 32 <= by[("index", "raw")]["steady_bits"] < 32.1  # int32 indices and a 1-byte parameter
    assert by[("value", "fp16")]["fresh_bits"] == by[("value", "fp16")]["steady_bits"]
    assert "<!-- codecs-steady:begin -->" in (tmp_path / "RESULTS.md").read_text()


def test_profile_mode_quick_run(tmp_path):
    assert bench_codecs.main(["--profile", "--quick", "--out", str(tmp_path), "--profile-specs", "topk:0.01/eliasfano/fp16"]) == 0
    bucket, layout = json.loads((tmp_path / "results" / "profile.json").read_text())
    assert (bucket["layout"], bucket["tensors"], layout["layout"], layout["tensors"]) == ("bucket", 1, "resnet50", 5)
    for row in (bucket, layout):
        assert row["size_exchanges"] == 0 and row["phases"]["select"] > 0 and row["phases"]["decode"] > 0
        assert isinstance(row["page_faults"], (int, float)) and row["page_faults"] >= 0
    assert "<!-- profile:begin -->" in (tmp_path / "RESULTS.md").read_text()
    assert "| page faults per step |" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.skipif(profile.minor_page_faults() is None, reason="the OS reports no page faults")
def test_profile_counts_the_fresh_pages_of_a_step():
    # A step that allocates (and hands back) 64 MB of fresh memory faults thousands of pages in.
    before = profile.minor_page_faults()
    torch.ones(16 << 20).sum()
    assert profile.minor_page_faults() - before > 1000
