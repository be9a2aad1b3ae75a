"""Codec sizes in the steady state of error-feedback training: ``deepreduce bench codecs --steady``.

A fresh gradient's top-k is clustered (whole layers stand out), which flatters codecs
that exploit runs. Under error feedback every element's residual grows until it is
sent, so after a few dozen steps the selection is spread over the tensor. This bench
trains the byte-level transformer of ``deepreduce train`` on the Python standard
library's source (one rank, gradient mode: ``compensated = g + residual``, top-k,
``residual = compensated - sent``, the sparse average applied by Adam), and at every
``--steady-every``-th step from ``--steady-from`` measures every index codec and every
value codec on the compensated gradient (steady) and on that step's raw gradient
(fresh): bits per kept element of the index part and of the value part (parameters
included, the 64-byte header not), the entropy bound ``log2 C(d, k) / k``, and the
values' relative error.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from ... import Compressor, index_codecs, value_codecs, wire
from ...engine import ErrorFeedback
from ..data import stdlib_corpus
from ..models import ByteTransformer

INDEX = ["raw", "rle", "zstd", "eliasfano", "bloom:policy=leftmost", "bloom:policy=p2"]
VALUE = ["raw", "zstd", "bf16", "fp16", "qsgd", "qsgd:bits=4", "uniform:bits=1", "uniform:bits=2", "uniform:bits=3",
         "uniform:bits=4", "polyfit", "dexp"]
QUICK_INDEX = ["raw", "zstd", "eliasfano"]  # --quick: a smoke test of the mode, not a measurement
QUICK_VALUE = ["fp16", "uniform:bits=2"]
TRAIN_SPEC_VALUE = "fp16"  # the codec of the training run itself (what the residual keeps)


def log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k): the information in a k-subset of n positions."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _registered(codec: str, kind: str) -> bool:
    name = codec.split(":")[0]
    return name in (index_codecs() if kind == "index" else value_codecs())


def _part_bits(compressor: Compressor, tensor: torch.Tensor, step: int) -> dict[str, float]:
    result = compressor.compress_detailed(tensor, step=step)
    header = wire.read_header(result.payload)
    k = max(header.k, 1)
    reference = tensor[result.sent.indices].double()
    norm = float(reference.norm())
    return {
        "index_bits": 8 * (header.index_nbytes + len(header.index_params)) / k,
        "value_bits": 8 * (header.value_nbytes + len(header.value_params)) / k,
        "k": header.k,
        "rel_error": float((result.sent.values.double() - reference).norm()) / norm if norm else 0.0,
    }


def steady_codecs(density: float = 0.01, steps: int = 100, start: int = 20, every: int = 10, quick: bool = False,
                  seed: int = 0, lr: float = 3e-3) -> list[dict[str, Any]]:
    """Rows: one per codec, with fresh and steady bits per kept element (means over the
    measured steps) and, for index codecs, the ratio to the entropy bound."""

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    corpus = stdlib_corpus(max_bytes=(1 if quick else 4) << 20)
    model = ByteTransformer(64, 1, 2, 32) if quick else ByteTransformer(128, 2, 4, 64)
    seq_len, batch = (32, 4) if quick else (64, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    train = Compressor.from_spec(f"topk:{density}/eliasfano/{TRAIN_SPEC_VALUE}", seed=seed)
    memory = ErrorFeedback()
    indexes = [c for c in (QUICK_INDEX if quick else INDEX) if _registered(c, "index")]
    values = [c for c in (QUICK_VALUE if quick else VALUE) if _registered(c, "value")]
    compressors = {("index", c): Compressor.from_spec(f"topk:{density}/{c}/raw", seed=seed) for c in indexes}
    compressors.update({("value", c): Compressor.from_spec(f"topk:{density}/eliasfano/{c}", seed=seed) for c in values})
    samples: dict[tuple[str, str, str], list[dict[str, float]]] = {key + (phase,): [] for key in compressors for phase in ("fresh", "steady")}
    bounds = []
    for step in range(steps + 1):
        x, y = corpus.batch("train", batch, seq_len, gen)
        optimizer.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        compensated = memory.compensate("model", flat)
        if step >= start and (step - start) % every == 0:
            d = flat.numel()
            for (kind, codec), compressor in compressors.items():
                for phase, tensor in (("fresh", flat), ("steady", compensated)):
                    samples[(kind, codec, phase)].append(_part_bits(compressor, tensor, step))
            k = samples[("index", indexes[0], "steady")][-1]["k"]
            bounds.append(log2_binomial(d, k) / k)
        result = train.compress_detailed(compensated, step=step)
        memory.update("model", compensated, result.sent)
        dense = result.sent.to_dense()
        offset = 0
        for p in params:
            p.grad.copy_(dense[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()
    bound = statistics.fmean(bounds)
    rows = []
    for (kind, codec), _ in compressors.items():
        part = "index_bits" if kind == "index" else "value_bits"
        fresh = statistics.fmean(s[part] for s in samples[(kind, codec, "fresh")])
        steady = statistics.fmean(s[part] for s in samples[(kind, codec, "steady")])
        rows.append({
            "kind": kind, "codec": codec, "density": density, "numel": flat.numel(),
            "steps": f"{start}-{steps} every {every}", "fresh_bits": fresh, "steady_bits": steady,
            "bound_bits": bound if kind == "index" else None,
            "steady_over_bound": steady / bound if kind == "index" else None,
            "fresh_over_bound": fresh / bound if kind == "index" else None,
            "steady_rel_error": statistics.fmean(s["rel_error"] for s in samples[(kind, codec, "steady")]),
            "lossless": kind == "value" and codec in ("raw", "zstd") or kind == "index" and not codec.startswith("bloom"),
        })
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best lossless index codec and the ``uniform`` value codecs, steady state."""
    lossless = [r for r in rows if r["kind"] == "index" and r["lossless"]]
    best = min(lossless, key=lambda r: r["steady_bits"])
    uniform = {r["codec"]: r["steady_bits"] for r in rows if r["kind"] == "value" and r["codec"].startswith("uniform")}
    low = min(uniform, key=uniform.get) if uniform else None
    return {
        "best_index": best["codec"], "best_index_bits": best["steady_bits"], "best_index_over_bound": best["steady_over_bound"],
        "bound_bits": best["bound_bits"],
        "totals": {codec: best["steady_bits"] + bits for codec, bits in uniform.items()},
        "lowest_uniform": low,
    }


def render_steady(rows: list[dict[str, Any]], command: str) -> str:
    from . import markdown_table

    def f(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}g}"

    table = [[r["kind"], r["codec"], f(r["fresh_bits"]), f(r["steady_bits"]), f(r["fresh_over_bound"]), f(r["steady_over_bound"]),
              f(r["steady_rel_error"], 2)] for r in rows]
    s = summary(rows)
    totals = "; ".join(f"{codec}: {bits:.2f}" for codec, bits in s["totals"].items())
    first = rows[0]
    return "\n".join([
        "### Codecs in the steady state of error-feedback training",
        "",
        f"Reproduce: `{command}`. The byte-level transformer of `deepreduce train` ({first['numel']:,} parameters) "
        f"on stdlib source, one rank, gradient mode with error feedback at density {first['density']:g} (top-k over "
        f"all parameters, eliasfano/fp16 for training, Adam); measured at steps {first['steps']} on the compensated "
        "gradient (*steady*) and on the same step's raw gradient (*fresh*). Bits per kept element of the index part "
        "or of the value part (codec parameters included, the 64-byte header not); index codecs are measured with "
        "raw values, value codecs with eliasfano indices. Entropy bound log2 C(d, k)/k = "
        f"{s['bound_bits']:.2f} bits. *rel. error*: ||v' - v|| / ||v|| of the values (steady).",
        "",
        markdown_table(["part", "codec", "fresh bits/elem", "steady bits/elem", "fresh / bound", "steady / bound",
                        "rel. error"], table),
        "",
        f"Best lossless index codec in the steady state: `{s['best_index']}` at {s['best_index_bits']:.2f} bits "
        f"({s['best_index_over_bound']:.3f}x the bound). With it, index + value bits per kept element: {totals}.",
    ])
