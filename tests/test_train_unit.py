"""`deepreduce train` and `deepreduce demo` pieces that need no torchrun, the `deepreduce`
command's dispatch, and a demo smoke run."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import deepreduce as dr

from deepreduce import cli
from deepreduce.apps import comm_hooks, train
from deepreduce.apps.data import CorpusError, stdlib_classes, stdlib_packages, text_corpus
from deepreduce.errors import ConfigError


def test_learning_rate_schedule():
    args = argparse.Namespace(lr=1e-2, warmup=10, steps=110)
    assert train.learning_rate(0, args) == pytest.approx(1e-3)
    assert train.learning_rate(9, args) == pytest.approx(1e-2)
    assert train.learning_rate(10, args) == pytest.approx(1e-2)
    assert train.learning_rate(60, args) == pytest.approx(1e-2 * (0.1 + 0.45))
    assert train.learning_rate(110, args) == pytest.approx(1e-3)
    values = [train.learning_rate(s, args) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_comm_meter_merges_overlapping_intervals():
    meter = comm_hooks.CommMeter(None)
    meter._intervals = [(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.5, 3.7)]
    meter._bytes = 10
    assert meter.take() == (10, 3.0)
    assert meter.take() == (0, 0.0)


def test_bad_compression_is_a_clear_error():
    with pytest.raises(ConfigError, match="'topk:0.01/nope/fp16'.*dense, fp16, powersgd"):
        comm_hooks.make_hook("topk:0.01/nope/fp16")
    with pytest.raises(SystemExit, match="--compression 'topk:0.01/nope/fp16'.*dense, fp16, powersgd"):
        train._hook(train.build_parser().parse_args(["--compression", "topk:0.01/nope/fp16"]), torch.nn.Linear(2, 2))


def test_make_hook_takes_explicit_arguments():
    state, hook, meter, counter = comm_hooks.make_hook(
        "topk:0.01/eliasfano/fp16", seed=3, start_iter=5, min_numel=0, error_feedback=False, dense_fallback=False)
    assert callable(hook) and isinstance(meter, comm_hooks.CommMeter) and counter() == 0
    assert state.start_iter == 5
    state, hook, meter, counter = comm_hooks.make_hook("powersgd", start_iter=0, powersgd_rank=2)
    assert state.matrix_approximation_rank == 2 and state.start_powerSGD_iter == 2 and counter is None
    for name in ("dense", "fp16"):
        state, hook, meter, counter = comm_hooks.make_hook(name)
        assert state is None and counter is None


def test_scheme_options_reach_the_hook_and_bad_ones_are_clear_errors():
    state, *_ = comm_hooks.make_hook("topk:0.01/eliasfano/fp16", scheme="hierarchical", node_size=2)
    assert state.engine.scheme == "hierarchical" and state.describe()["node_size"] == 2
    with pytest.raises(ConfigError, match="scheme, node_size apply to deepreduce compressors"):
        comm_hooks.make_hook("powersgd", scheme="hierarchical", node_size=2)
    args = train.build_parser().parse_args(["--compression", "topk:0.01/eliasfano/fp16", "--scheme", "hierarchical",
                                            "--node-size", "2"])
    train._check_args(args)
    assert train._hook(args, torch.nn.Linear(2, 2))[0].engine.describe()["node_size"] == 2
    for argv, message in ((["--scheme", "hierarchical"], "--scheme hierarchical needs a compressor spec"),
                          (["--compression", "topk:0.01/eliasfano/fp16", "--node-size", "2"], "--node-size must be >= 1 and needs --scheme hierarchical"),
                          (["--compression", "topk:0.01/eliasfano/fp16", "--mode", "update", "--scheme", "hierarchical"],
                           "--scheme hierarchical needs --mode gradient")):
        with pytest.raises(SystemExit, match=message):
            train._check_args(train.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be >= 1, not 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1, not 0"),
    (["--eval-batches", "0"], "--eval-batches must be >= 1, not 0"),
    (["--stop-after", "0"], "--stop-after must be >= 1, not 0"),
    (["--d-model", "15", "--heads", "2"], r"--heads must be >= 1 and divide --d-model \(15\), not 2"),
    (["--heads", "0"], "--heads must be >= 1"),
    (["--corpus-mb", "0"], "--corpus-mb must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, not nan"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be >= 0"),
    (["--bucket-mb", "0"], "--bucket-mb must be a finite number > 0"),
    (["--metrics", "/nonexistent-dir/m.jsonl"], "--metrics /nonexistent-dir/m.jsonl: no directory /nonexistent-dir"),
    (["--checkpoint", "/proc/no-such-dir"], "--checkpoint /proc/no-such-dir: cannot create it"),
    (["--compression", "topk:0.01/eliasfano/fp16", "--nesterov"], "--nesterov need --mode update"),
    (["--optimizer", "adamw", "--adam-noise", "tracked"], "--adam-noise needs --optimizer local-adamw"),
    (["--compression", "powersgd", "--granularity", "bucket"], "--granularity bucket apply to deepreduce compressor specs"),
    (["--compression", "dense", "--no-error-feedback", "--small-compression", "cyclic:0.5/strided/fp16"],
     "--no-error-feedback, --small-compression apply to deepreduce compressor specs, not --compression dense"),
    (["--metrics", "/tmp"], "--metrics /tmp is a directory; name a file"),
    (["--warmup", "-5"], "--warmup must be >= 0, not -5"),
    (["--powersgd-rank", "2"], "--powersgd-rank applies to --compression powersgd, not 'dense'"),
    (["--compression", "powersgd", "--powersgd-rank", "0"], "--powersgd-rank must be >= 1, not 0"),
    (["--compression", "topk:0.01/eliasfano/fp16", "--small-compression", "cyclic:2/strided/fp16"],
     "--small-compression cyclic:2/strided/fp16: ratio must be in"),
])
def test_bad_numbers_and_paths_are_refused_before_training(argv, message):
    # Each would otherwise train to NaN, train nothing, or fail with a traceback (the checkpoint
    # path: after the whole run).
    with pytest.raises(SystemExit, match=message):
        train._check_args(train.build_parser().parse_args(argv))


def test_make_optimizer():
    import torch

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert type(train.make_optimizer("adam", params, 1e-3)) is torch.optim.Adam
    adamw = train.make_optimizer("adamw", params, 1e-3, weight_decay=0.1)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.1
    sgd = train.make_optimizer("sgd", params, 1e-2)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    assert train.make_optimizer("sgd", params, 1e-2, sgd_momentum=0.0).param_groups[0]["momentum"] == 0.0
    local = train.make_optimizer("local-adamw", params, 1e-3, weight_decay=0.1)
    assert type(local) is dr.LocalAdamW and local.param_groups[0]["world_size"] == 1  # no process group here
    assert local.param_groups[0]["noise"] == "moments"
    tracked = train.make_optimizer("local-adamw", params, 1e-3, adam_noise="tracked")
    assert tracked.param_groups[0]["noise"] == "tracked"
    with pytest.raises(ValueError, match="adam, adamw, local-adamw, sgd"):
        train.make_optimizer("lamb", params, 1e-3)


def test_text_corpus_folder_holds_out_whole_files(tmp_path):
    root = tmp_path / "text"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    texts = {}
    for i in range(12):
        path = root / ("sub/deeper" if i % 3 == 0 else "sub" if i % 3 == 1 else "") / f"f{i:02d}.txt"
        texts[path] = f"file {i:02d}: {'héllo wörld ' * (10 + i)}\n".encode()
        path.write_bytes(texts[path])
    (root / ".hidden" / "secret.txt").write_bytes(b"hidden " * 100)
    (root / "blob.bin").write_bytes(b"\x00\x01binary" * 100)
    (root / "empty.txt").write_bytes(b"")
    corpus = text_corpus(root, max_bytes=1 << 20)
    ordered = [texts[p] for p in sorted(texts)]  # the order text_files reads them in
    assert [p.relative_to(root).as_posix() for p in sorted(texts)][:2] == ["f02.txt", "f05.txt"]
    # Every 10th text file is held out whole: validation text never appears in training.
    assert bytes(corpus.val.numpy()) == ordered[9]
    assert bytes(corpus.train.numpy()) == b"".join(ordered[:9] + ordered[10:])
    assert b"hidden" not in bytes(corpus.train.numpy()) and b"binary" not in bytes(corpus.train.numpy())
    assert text_corpus(root, max_bytes=1 << 20).digest == corpus.digest
    # max_bytes stops reading after the file that reaches it; with fewer files than
    # val_every read, the last one is held out.
    small = text_corpus(root, max_bytes=len(ordered[0]) + len(ordered[1]))
    assert bytes(small.train.numpy()) == ordered[0] and bytes(small.val.numpy()) == ordered[1]
    # ... and no file gives more than max_bytes.
    capped = text_corpus(root, max_bytes=len(ordered[0]) + 1)
    assert bytes(capped.val.numpy()) == ordered[1][:len(ordered[0]) + 1]


def test_text_corpus_single_file_and_few_files(tmp_path):
    path = tmp_path / "one.txt"
    raw = bytes(range(32, 127)) * 20
    path.write_bytes(raw)
    corpus = text_corpus(path, max_bytes=1 << 20)
    assert bytes(corpus.train.numpy()) + bytes(corpus.val.numpy()) == raw
    assert corpus.val.numel() == len(raw) // 10
    assert text_corpus(path, max_bytes=1000).train.numel() == 900
    # A folder with fewer files than val_every holds out the last; with one file, its tail.
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"a" * 500)
    one = text_corpus(folder)
    assert one.train.numel() == 450 and one.val.numel() == 50
    (folder / "b.txt").write_bytes(b"b" * 300)
    two = text_corpus(folder)
    assert bytes(two.train.numpy()) == b"a" * 500 and bytes(two.val.numpy()) == b"b" * 300


def test_text_corpus_bad_input(tmp_path):
    with pytest.raises(CorpusError, match="no such file or folder"):
        text_corpus(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="folder has no files"):
        text_corpus(empty)
    (empty / ".dotfile").write_text("x" * 1000)
    with pytest.raises(CorpusError, match="folder has no files"):
        text_corpus(empty)
    (empty / "zero.txt").write_bytes(b"")
    (empty / "image.png").write_bytes(b"\x89PNG\x00" * 100)
    with pytest.raises(CorpusError, match="no text in its 2 file"):
        text_corpus(empty)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CorpusError, match="too little text: 9 bytes for training and 0 for validation"):
        text_corpus(short)
    short.write_text("x" * 400)
    with pytest.raises(CorpusError, match="need at least 66 in each"):
        text_corpus(short, min_split_bytes=66)
    one = tmp_path / "one-file"
    one.mkdir()
    (one / "a.txt").write_text("x" * 400)
    with pytest.raises(CorpusError, match=r"one-file \(1 text file read\): too little text: 360 bytes for training and 40"):
        text_corpus(one, min_split_bytes=66)
    args = train.build_parser().parse_args(["--data", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="deepreduce train: --data: .*missing: no such file or folder"):
        train.load_corpus(args)
    # the built-in corpus is held to the same minimum: each split needs seq_len + 2 bytes
    args = train.build_parser().parse_args(["--corpus-mb", "0.01", "--seq-len", "2000"])
    with pytest.raises(SystemExit, match=r"--corpus-mb 0.01 \(with --seq-len 2000\): the standard library's source: "
                                         r"too little text: \d+ bytes for training and \d+ for validation, need at least 2002"):
        train.load_corpus(args)


def test_a_torn_checkpoint_is_a_clear_error(tmp_path):
    torn = tmp_path / "rank0.pt"
    for content in (b"garbage", b"PK\x03\x04" + bytes(3000)):
        torn.write_bytes(content)
        with pytest.raises(SystemExit, match=f"deepreduce train: cannot read checkpoint {torn}: "):
            train.load_checkpoint(tmp_path, train.parse_args([]), None, None, None, None, "", torn)


def test_cli_version_and_help(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"deepreduce {version('deepreduce')}"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    description_column = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in rows}
    assert len(description_column) == 1, out  # every description starts in the same column
    assert re.search(r"^  bench bandwidth {2,}DDP step time", out, re.M), out  # a gap before the description
    assert cli.main(["bench", "--help"]) == 0
    assert re.search(r"^  convergence {2,}validation loss", capsys.readouterr().out, re.M)
    assert cli.main(["bench", "nope"]) == 2 and "choose one of codecs" in capsys.readouterr().err


@pytest.mark.parametrize("command", [*[[name] for name in cli.COMMANDS], *[["bench", name] for name in cli.BENCHMARKS]],
                         ids=" ".join)
def test_every_command_prints_its_help(command, capsys):
    """argparse formats help lazily: a bad help string only fails when a user asks for it."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_one_process_run_writes_metrics(tmp_path):
    """Without torchrun, `deepreduce train` runs as a world of one."""
    metrics = tmp_path / "m.jsonl"
    rc = subprocess.run(
        [sys.executable, "-m", "deepreduce", "train", "--d-model", "32", "--layers", "1", "--heads", "2",
         "--seq-len", "32", "--batch", "4", "--steps", "4", "--start-iter", "2", "--corpus-mb", "1",
         "--compression", "topk:0.1/rle/bf16", "--min-numel", "0", "--eval-every", "2", "--eval-batches", "1",
         "--metrics", str(metrics), "--quiet", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert rc.returncode == 0, rc.stderr[-3000:]
    lines = metrics.read_text().splitlines()
    assert len(lines) == 5 and '"summary"' in lines[-1] and '"world_size": 1' in lines[-1]


def test_one_process_run_on_own_data_with_sgd(tmp_path):
    """`--data FILE --optimizer sgd`: trains, and the summary names the data and optimizer."""
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog ünïcode\n" for i in range(400)),
                    encoding="utf-8")
    metrics = tmp_path / "m.jsonl"
    rc = subprocess.run(
        [sys.executable, "-m", "deepreduce", "train", "--data", str(data), "--optimizer", "sgd", "--steps", "3",
         "--weight-decay", "0.01", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
         "--batch", "4", "--start-iter", "2", "--eval-every", "3", "--eval-batches", "1",
         "--metrics", str(metrics), "--threads", "1", "--log-every", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert f"{data} corpus" in rc.stdout and "sgd" in rc.stdout
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = lines[-1]["summary"]
    assert len(lines) == 4 and summary["steps"] == 3 and summary["val_loss"] is not None
    assert summary["data"] == str(data) and summary["optimizer"] == "sgd" and summary["weight_decay"] == 0.01
    assert summary["corpus_digest"] == text_corpus(data, 16 << 20).digest


def test_bad_data_fails_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deepreduce", "train", "--data", str(tmp_path / "nope"), "--steps", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "--data:" in result.stderr and "no such file or folder" in result.stderr


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    """The demo end to end with a tiny model: three torchrun runs (dense, hook, update mode) and the table."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "deepreduce", "demo", "--steps", "6", "--out", str(tmp_path), "--",
         "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4",
         "--corpus-mb", "1", "--start-iter", "2", "--min-numel", "256", "--bucket-mb", "0.03", "--eval-batches", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "val loss" in out and "bytes/step" in out and "ratio" in out and "step time" in out
    assert "│ dense" in out and "hook topk:0.01/eliasfano/fp16" in out and "update blocktopk:0.215,block=128/blocks" in out
    for name in ("dense", "hook1", "update1"):
        assert (tmp_path / f"{name}.jsonl").exists(), name
    assert time.monotonic() - started < 240


@pytest.mark.parametrize("argv, message", [
    (["--compression", "junk"], "the hook junk run: deepreduce train: --compression 'junk': unknown sparsifier 'junk'"),
    (["--update", "topk:0.01/bogus/fp16"], "the update topk:0.01/bogus/fp16 run: .*unknown index codec 'bogus'"),
    (["--workers", "0"], "--workers and --steps must be >= 1, not 0 and 300"),
    (["--", "--lr", "-1"], "the dense run: deepreduce train: --lr must be a finite number > 0"),
])
def test_demo_refuses_bad_options_before_the_first_run(argv, message, tmp_path):
    from deepreduce.apps import demo

    with pytest.raises(SystemExit, match=message):
        demo.main(["--out", str(tmp_path), *argv])
    assert not list(tmp_path.iterdir())  # no run started


def test_demo_names_why_a_run_failed(tmp_path):
    """A run that fails once started: the worker's own error line, not torchrun's report."""
    from deepreduce.apps import demo

    with pytest.raises(SystemExit) as failed:
        demo.main(["--steps", "2", "--workers", "1", "--compression", "fp16", "--out", str(tmp_path), "--",
                   "--data", str(tmp_path / "missing")])
    assert str(failed.value).startswith("deepreduce demo: the dense run failed (exit 1):\n"
                                        f"deepreduce train: --data: {tmp_path / 'missing'}: no such file or folder\n"
                                        f"(full log: {tmp_path / 'dense.log'})"), str(failed.value)


# --- --task classify -------------------------------------------------------------------------

TINY_CLASSIFY = ["--task", "classify", "--d-model", "16", "--layers", "2", "--seq-len", "64", "--batch", "4",
                 "--corpus-mb", "1", "--eval-every", "2", "--eval-batches", "2", "--threads", "1"]


def test_stdlib_classes_hold_out_whole_files_and_sample_deterministically():
    data = stdlib_classes(8, 1 << 20)
    assert len(data.classes) == 8 and data.classes == tuple(list(stdlib_packages())[:8])
    assert set(data.train.paths).isdisjoint(data.val.paths)  # no validation file is ever trained on
    for split in (data.train, data.val):
        assert split.labels.min() == 0 and split.labels.max() == 7
        assert (split.labels[1:] >= split.labels[:-1]).all()
        assert (split.class_files[1:] > split.class_files[:-1]).all()  # every class has files in both splits
        assert all(path.split("/")[0] == data.classes[label] for path, label in zip(split.paths, split.labels.tolist()))
        assert int(split.lengths.sum()) == split.data.numel()
    assert data.train_bytes + data.val.data.numel() <= 2 << 20  # a class stops after the file that reaches its share
    assert stdlib_classes(8, 1 << 20).digest == data.digest != stdlib_classes(9, 1 << 20).digest
    x, y = data.batch("train", 64, 128, torch.Generator().manual_seed(3))
    again = data.batch("train", 64, 128, torch.Generator().manual_seed(3))
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert x.shape == (64, 128) and y.shape == (64,) and x.dtype == y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < 8 and 0 <= int(x.min()) and int(x.max()) < 256
    # A window is a slice of one file of its class (padded with zeros past a short file's end).
    val_x, val_y = data.batch("val", 16, 4096, torch.Generator().manual_seed(4))
    for window, label in zip(val_x, val_y.tolist()):
        text = bytes(window.tolist()).rstrip(b"\0")
        files = [bytes(data.val.data[s:s + n].tolist()) for s, n, l in
                 zip(data.val.starts.tolist(), data.val.lengths.tolist(), data.val.labels.tolist()) if l == label]
        assert any(text in f for f in files)


def test_classify_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--data is not supported with --task classify"):
        train.main(TINY_CLASSIFY + ["--data", str(tmp_path)])
    with pytest.raises(SystemExit, match="--classes must be >= 2, not 1"):
        train.main(TINY_CLASSIFY + ["--classes", "1"])
    with pytest.raises(SystemExit, match="--classes 500: the standard library has .* fewer than the 500 classes"):
        train.main(TINY_CLASSIFY + ["--classes", "500"])
    with pytest.raises(SystemExit, match="--classes needs --task classify"):
        train.main(["--classes", "4"])
    with pytest.raises(CorpusError, match="at least 2 classes"):
        stdlib_classes(1)


def test_task_defaults():
    lm, classify = train.parse_args([]), train.parse_args(["--task", "classify"])
    assert (lm.task, lm.seq_len, lm.classes) == ("lm", 128, None)
    assert (classify.task, classify.seq_len, classify.classes) == ("classify", 256, 16)
    assert train.parse_args(["--task", "classify", "--seq-len", "64"]).seq_len == 64
    model = train.build_model(train.parse_args(TINY_CLASSIFY + ["--classes", "5"]))
    assert model(torch.zeros(3, 64, dtype=torch.long)).shape == (3, 5)


def test_one_process_classify_run(tmp_path):
    metrics = tmp_path / "m.jsonl"
    rc = subprocess.run(
        [sys.executable, "-m", "deepreduce", "train", *TINY_CLASSIFY, "--steps", "4", "--start-iter", "2",
         "--compression", "topk:0.1/rle/bf16", "--min-numel", "0", "--optimizer", "adamw",
         "--metrics", str(metrics), "--log-every", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert "classify" in rc.stdout and "acc " in rc.stdout
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in evals)
    summary = lines[-1]["summary"]
    assert summary["task"] == "classify" and summary["val_acc"] == evals[-1]["val_acc"]
    assert len(summary["classes"]) == 16 and summary["corpus_digest"] == stdlib_classes(16, 1 << 20).digest


# --- DGC options ---------------------------------------------------------------------------


def test_dgc_options_reach_the_hook_state(monkeypatch):
    seen = {}

    class FakeState:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(comm_hooks, "DeepReduceState", FakeState)
    args = train.parse_args(["--compression", "topk:0.01/eliasfano/fp16", "--momentum-correction", "0.9",
                             "--density-warmup", "50", "--clip-norm", "2.5"])
    train._hook(args, torch.nn.Linear(2, 2))
    assert (seen["momentum"], seen["density_warmup"], seen["clip_norm"]) == (0.9, 50, 2.5)
    seen.clear()
    train._hook(train.parse_args(["--compression", "topk:0.01/eliasfano/fp16"]), torch.nn.Linear(2, 2))
    assert not {"momentum", "density_warmup", "clip_norm"} & seen.keys()  # unset: left to DeepReduceState
    with pytest.raises(ConfigError, match="momentum apply to deepreduce compressors, not to 'dense'"):
        comm_hooks.make_hook("dense", momentum=0.9)


@pytest.mark.parametrize("argv, message", [
    (["--mode", "update", "--compression", "topk:0.01/rle/fp16", "--unsent-scale", "1.5"], "needs --mode update --keep-unsent"),
    (["--compression", "topk:0.01/rle/fp16", "--unsent-scale", "1.5"], "needs --mode update --keep-unsent"),
    (["--mode", "update", "--keep-unsent", "--compression", "topk:0.01/rle/fp16", "--unsent-scale", "0"], "finite number > 0"),
    (["--mode", "update", "--keep-unsent", "--compression", "topk:0.01/rle/fp16", "--unsent-scale", "nan"], "finite number > 0"),
])
def test_unsent_scale_is_checked(argv, message):
    with pytest.raises(SystemExit, match=message):
        train._check_args(train.parse_args(argv))


def _capture_update_sync(monkeypatch) -> dict:
    """Replace train's UpdateSync by a stand-in; the returned dict fills with its keyword arguments."""
    seen: dict = {}

    class FakeSync:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(train, "UpdateSync", FakeSync)
    return seen


def test_unsent_scale_reaches_update_sync_and_the_checkpoint_mode(monkeypatch):
    seen = _capture_update_sync(monkeypatch)
    args = train.parse_args(["--compression", "topk:0.01/eliasfano/fp16", "--mode", "update", "--keep-unsent",
                             "--unsent-scale", "1.5"])
    train._check_args(args)
    train._update_sync(args, torch.nn.Linear(2, 2), None)
    assert seen["keep_unsent"] is True and seen["unsent_scale"] == 1.5
    assert train._mode_options(args)[-1] == 1.5
    assert train._mode_options(train.parse_args([]))[-1] == 1.0  # what older checkpoints get


@pytest.mark.parametrize("argv, message", [
    (["--mode", "update", "--compression", "topk:0.01/rle/fp16", "--momentum-correction", "0.9"], "need --mode gradient"),
    (["--mode", "update", "--compression", "topk:0.01/rle/fp16", "--density-warmup", "5"], "need --mode gradient"),
    (["--mode", "update", "--compression", "topk:0.01/rle/fp16", "--clip-norm", "1"], "need --mode gradient"),
    (["--compression", "powersgd", "--clip-norm", "1"], "need a compressor spec"),
    (["--compression", "topk:0.01/rle/fp16", "--momentum-correction", "1.0"], r"must be in \[0, 1\)"),
    (["--compression", "topk:0.01/rle/fp16", "--density-warmup", "-1"], "must be >= 0"),
    (["--compression", "topk:0.01/rle/fp16", "--clip-norm", "0"], "must be > 0"),
])
def test_dgc_options_are_checked(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.main(argv + ["--steps", "1"])


def test_one_process_dgc_run_and_resume_check(tmp_path):
    """SGD loses its momentum to the hook; the summary and checkpoint record the options."""
    import inspect

    from deepreduce.hooks import DeepReduceState

    if not {"density_warmup", "clip_norm"} <= inspect.signature(DeepReduceState).parameters.keys():
        pytest.skip("DeepReduceState has no density_warmup/clip_norm yet")
    common = [sys.executable, "-m", "deepreduce", "train", *TINY_CLASSIFY, "--steps", "4", "--start-iter", "1",
              "--compression", "topk:0.1/rle/bf16", "--min-numel", "0", "--optimizer", "sgd", "--lr", "0.05",
              "--momentum-correction", "0.9", "--density-warmup", "2", "--quiet"]
    metrics, checkpoint = tmp_path / "m.jsonl", tmp_path / "ckpt"
    rc = subprocess.run(common + ["--clip-norm", "1.0", "--metrics", str(metrics), "--checkpoint", str(checkpoint)],
                        capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr[-3000:]
    summary = json.loads(metrics.read_text().splitlines()[-1])["summary"]
    assert (summary["momentum_correction"], summary["density_warmup"], summary["clip_norm"]) == (0.9, 2, 1.0)
    saved = torch.load(checkpoint / "rank0.pt", weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["momentum"] == 0.0 and saved["dgc"] == [0.9, 2, 1.0]
    refused = subprocess.run(common + ["--clip-norm", "2.0", "--steps", "6", "--resume", str(checkpoint)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "checkpoint used --momentum-correction/--density-warmup/--clip-norm" in refused.stderr
    # options that change every compressed step are held to the checkpoint's too
    refused = subprocess.run(common + ["--clip-norm", "1.0", "--min-numel", "5", "--scheme", "shared_index", "--steps", "6",
                                       "--resume", str(checkpoint)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stderr[-2000:]
    assert ("this run changes options the checkpoint was trained with: --min-numel 0 -> 5; "
            "--scheme 'allgather' -> 'shared_index'") in refused.stderr, refused.stderr[-2000:]


def test_auto_resume_needs_a_checkpoint_directory(tmp_path, capsys):
    for argv in (["--auto-resume"], ["--auto-resume", "--checkpoint", str(tmp_path), "--resume", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert "--auto-resume needs --checkpoint DIR" in capsys.readouterr().err
    assert train.parse_args(["--auto-resume", "--checkpoint", str(tmp_path)]).auto_resume


def test_resumed_metrics_drop_the_records_past_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)] + [json.dumps({"summary": {"steps": 3}})]
    lines += [json.dumps({"step": s, "loss": 1.0}) for s in (4, 5)] + [json.dumps({"summary": {"steps": 5}}), '{"step": 6, "lo']
    path.write_text("\n".join(lines))
    train._drop_records_after(path, 3)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    # steps 4-5, the summary of the run that wrote them and the torn line are gone; the
    # summary of the segment that ended at the checkpoint (--stop-after) stays
    assert kept == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.0}, {"summary": {"steps": 3}}]


def test_density_follows_lr_reaches_the_update_sync_and_needs_update_mode(monkeypatch):
    seen = _capture_update_sync(monkeypatch)
    args = train.parse_args(["--compression", "topk:0.01/eliasfano/fp16", "--mode", "update", "--local-steps", "2",
                             "--start-iter", "3", "--steps", "100", "--density-follows-lr", "2"])
    train._check_args(args)
    train._update_sync(args, torch.nn.Linear(2, 2), None)
    schedule = seen["density_schedule"]
    assert seen["start_iter"] == 2 and schedule.start == 4 and schedule.power == 2.0  # 2 exchanges: 4 optimizer steps
    rates = [train.learning_rate(step, args) ** 2 for step in range(4, 100)]
    assert schedule(50) == pytest.approx(rates[46] / (sum(rates) / len(rates)))
    assert train.parse_args(["--density-follows-lr"]).density_follows_lr == 1.0
    for argv in (["--compression", "topk:0.01/eliasfano/fp16", "--density-follows-lr"],
                 ["--compression", "topk:0.01/eliasfano/fp16", "--mode", "update", "--density-follows-lr", "nan"]):
        with pytest.raises(SystemExit, match="--density-follows-lr needs --mode update and a finite POWER"):
            train._check_args(train.parse_args(argv))
    leaning_late = train.parse_args(["--compression", "topk:0.01/eliasfano/fp16", "--mode", "update", "--density-follows-lr", "-0.5"])
    train._check_args(leaning_late)
    assert leaning_late.density_follows_lr == -0.5
