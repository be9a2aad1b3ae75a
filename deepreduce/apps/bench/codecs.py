"""Codec benchmark: bits per kept element, distance to the entropy bound, error and speed.

Gradients come from one backward pass of real models on real data (the Python
standard library's source text): a ResNet-50-layout CNN and a byte-level transformer.
For each density and codec combination the whole flat gradient is compressed as one
bucket, decoded, and compared with the exact top-k selection.

    deepreduce bench codecs                 # full run, writes benchmarks/RESULTS.md + results/codecs.json
    deepreduce bench codecs --quick         # smoke test: tiny models, one density
    deepreduce bench codecs --device cuda   # the same on a GPU: its own section, results/codecs_cuda.json
    deepreduce bench codecs --profile       # CPU time per phase of one compressed 25.6 M-element bucket
    deepreduce bench codecs --steady        # sizes inside error-feedback training (steps 20-100) vs fresh gradients
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ... import Compressor, decode, index_codecs, sparsify, value_codecs, wire
from ..data import stdlib_corpus
from ..models import ByteTransformer, resnet
from ...sparsifiers import target_k
from .steady import log2_binomial, render_steady, steady_codecs, summary
from . import output_dir, reproduce_command, make_console, machine_facts, markdown_table, median_time, update_results_section, write_json

# Index codecs are compared with raw values, value codecs with eliasfano indices, and a
# few combinations that matter in practice are added. Entries whose codecs are not
# registered are skipped.
COMBINATIONS = [
    "raw/raw",
    "rle/raw",
    "zstd/raw",
    "eliasfano/raw",
    "bloom:policy=p0/raw",
    "bloom:policy=leftmost/raw",
    "bloom:policy=random/raw",
    "bloom:policy=p2/raw",
    "eliasfano/zstd",
    "eliasfano/bf16",
    "eliasfano/fp16",
    "eliasfano/qsgd",
    "eliasfano/polyfit",
    "eliasfano/dexp",
    "zstd/fp16",
    "zstd/qsgd",
    "bloom:policy=p2/fp16",
    "bloom:policy=p2/qsgd",
    "bloom:policy=p2/polyfit",
    "bloom:policy=p0/qsgd",
]


@dataclass
class ModelGradient:
    name: str
    gradient: torch.Tensor


def real_gradients(quick: bool, seed: int = 0, device: torch.device | str = "cpu") -> list[ModelGradient]:
    """Flat gradients of one backward pass on stdlib source text (computed on ``device``)."""
    torch.manual_seed(seed)
    corpus = stdlib_corpus(max_bytes=4 << 20)
    gen = torch.Generator().manual_seed(seed)
    models = (
        [("transformer-tiny", ByteTransformer(64, 1, 2, 64), 64, 4)]
        if quick
        else [
            ("resnet50", resnet("resnet50"), 1024, 16),
            ("transformer", ByteTransformer(256, 4, 4, 256), 256, 16),
        ]
    )
    out = []
    for name, model, seq_len, batch in models:
        x, y = corpus.batch("train", batch, seq_len, gen)
        model.to(device).loss(x.to(device), y.to(device)).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        out.append(ModelGradient(name, flat.detach()))
    return out


def available(combination: str) -> bool:
    index, value = (part.split(":")[0] for part in combination.split("/"))
    return index in index_codecs() and value in value_codecs()


def measure(model: ModelGradient, density: float, combination: str, repeats: int, topk_s: float) -> dict:
    g = model.gradient
    d = g.numel()
    r = target_k(d, density)
    compressor = Compressor.from_spec(f"topk:{density}/{combination}")
    result = compressor.compress_detailed(g, step=0)
    header = wire.read_header(result.payload)
    decoded = decode(result.payload)
    assert torch.equal(decoded.indices, result.sent.indices)

    exact = sparsify(g, density, "topk")
    true_mass = float(exact.values.double().square().sum())
    kept = torch.zeros(d, dtype=torch.bool, device=g.device)
    kept[decoded.indices] = True
    mass_kept = float(g[exact.indices][kept[exact.indices]].double().square().sum()) / true_mass if true_mass else 1.0
    reference = g[decoded.indices].double()
    norm = float(reference.norm())
    rel_error = float((decoded.values.double() - reference).norm()) / norm if norm else 0.0

    index_bits = 8 * (header.index_nbytes + len(header.index_params))
    bound = log2_binomial(d, r)
    mb = g.numel() * g.element_size() / 1e6
    compress_s = median_time(lambda: compressor.compress_detailed(g, step=0), repeats)
    decompress_s = median_time(lambda: decode(result.payload), repeats)
    return {
        "model": model.name,
        "numel": d,
        "density": density,
        "k": r,
        "index": combination.split("/")[0],
        "value": combination.split("/")[1],
        "payload_bytes": result.payload.numel(),
        "bits_per_element": 8 * result.payload.numel() / r,
        "size_vs_raw_topk": 8 * result.payload.numel() / r / 64,  # raw top-k: int32 index + fp32 value
        "index_bits_per_element": index_bits / r,
        "entropy_ratio": index_bits / bound if bound else float("nan"),
        "rel_error": rel_error,
        "mass_kept": mass_kept,
        "sent_k": decoded.k,
        "compress_mb_s": mb / compress_s,
        "decompress_mb_s": mb / decompress_s,
        "compress_s": compress_s,
        "decompress_s": decompress_s,
        "topk_s": topk_s,
    }


def speed_targets(gradient: torch.Tensor, repeats: int, numel: int = 25_600_000) -> dict:
    """Timings on a ResNet-50-sized (25.6 M) fp32 bucket at 1 % density."""
    x = gradient.repeat(math.ceil(numel / gradient.numel()))[:numel].contiguous()
    k = target_k(numel, 0.01)
    magnitude = x.abs()
    topk_s = median_time(lambda: torch.topk(x.abs(), k, sorted=False), repeats)
    compressor = Compressor(0.01, "topk", "eliasfano", "fp16")
    payload = compressor.compress(x, step=0)
    compress_s = median_time(lambda: compressor.compress(x, step=0), repeats)
    decompress_s = median_time(lambda: decode(payload), repeats)
    mstopk_s = median_time(lambda: sparsify(x, 0.01, "mstopk"), repeats)
    ours_topk_s = median_time(lambda: sparsify(x, 0.01, "topk"), repeats)
    del magnitude
    bloom = {}
    if "bloom" in index_codecs():
        for policy in ("p0", "leftmost", "random", "p2"):
            c = Compressor(0.01, "topk", "bloom", "raw", policy=policy)
            blob = c.compress(x, step=0)
            bloom[policy] = {
                "encode_s": median_time(lambda: c.compress(x, step=0), 3),
                "decode_s": median_time(lambda: decode(blob), 3),
            }
    return {
        "bloom": bloom,
        "numel": numel,
        "density": 0.01,
        "torch_topk_s": topk_s,
        "deepreduce_topk_select_s": ours_topk_s,
        "compress_s": compress_s,
        "decompress_s": decompress_s,
        "compress_plus_decompress_over_topk": (compress_s + decompress_s) / topk_s,
        "mstopk_select_s": mstopk_s,
        "mstopk_over_topk": mstopk_s / topk_s,
        "payload_bytes": payload.numel(),
    }


# Every top-k compressor pays for a top-k selection; these targets keep deepreduce's own work
# (its selection, coding and decoding) from costing much more than that unavoidable part.
SPEED_TARGETS = (
    "Targets: topk + eliasfano + fp16 compress (its own selection included) plus one decompress in at most "
    "1.5x the time of a bare `torch.topk` -- the selection any top-k method pays for, so coding may add at most "
    "half of it; mstopk selection faster than `torch.topk`."
)

# The console table's columns, explained under it (RESULTS.md says the same in prose).
CONSOLE_LEGEND = "\n".join([
    "bits/elem   payload bits per kept element, header included (raw top-k: 64)",
    "idx/bound   index bits over the entropy bound log2 C(d, k)",
    "rel.err     ||v' - g[S]|| / ||g[S]|| over the positions S that travel",
    "mass kept   share of the exact top-k's squared L2 norm at the positions that travel",
    "comp/dec    MB/s of dense input (compress includes the top-k selection)",
])


def _fmt(x: float, digits: int = 3) -> str:
    if x != x:  # NaN
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(rows: list[dict], speed: dict | None, facts: dict, command: str, plot: str = "codec_bits.png") -> str:
    header = ["model", "density", "index", "value", "bits/elem", "vs raw top-k", "index bits/elem", "index / entropy bound",
              "rel. error", "top-k L2 mass kept", "compress MB/s", "decompress MB/s", "torch.topk s"]
    table = [
        [r["model"], f"{r['density']:g}", r["index"], r["value"], _fmt(r["bits_per_element"]), _fmt(r["size_vs_raw_topk"], 2),
         _fmt(r["index_bits_per_element"]),
         _fmt(r["entropy_ratio"]), _fmt(r["rel_error"], 2), _fmt(r["mass_kept"], 4), _fmt(r["compress_mb_s"]),
         _fmt(r["decompress_mb_s"]), _fmt(r["topk_s"])]
        for r in rows
    ]
    smallest = {}
    for r in rows:
        key = (r["model"], r["density"])
        if key not in smallest or r["bits_per_element"] < smallest[key]["bits_per_element"]:
            smallest[key] = r
    lines = [
        "## Codecs",
        "",
        f"Reproduce: `{command}`. Machine: {facts['cpu_cores']} cores, torch {facts['torch']} "
        f"({facts['torch_threads']} threads), Python {facts['python']}"
        + (f"; tensors on {facts['gpu']} (CUDA)." if rows and rows[0].get("device") == "cuda" else "."),
        "",
        "Each row compresses the whole flat gradient of one backward pass (real model, real data: "
        "stdlib source text) as one bucket with exact top-k selection. *bits/elem* is the whole payload "
        "(64-byte header included) per kept element; *vs raw top-k* divides it by raw top-k's 64 (int32 index + "
        "fp32 value). *index / entropy bound* divides "
        "the index part by log2 C(d, r). *rel. error* is ||v' - g[S]|| / ||g[S]|| over the positions S "
        "that travel; *top-k L2 mass kept* is the share of the exact top-k's squared L2 norm at "
        "positions that travel (below 1 only for lossy index codecs). Compress MB/s counts the dense "
        "input and includes top-k selection; torch.topk's own time is given for reference.",
        "",
        markdown_table(header, table),
        "",
        f"![bits per kept element](results/{plot})",
        "",
        "Smallest payload per model and density: "
        + "; ".join(f"{m} @ {d:g}: {r['index']}+{r['value']} ({_fmt(r['bits_per_element'])} bits/elem)"
                    for (m, d), r in smallest.items()) + ".",
    ]
    if speed:
        on_gpu = rows and rows[0].get("device") == "cuda"
        lines += [
            "",
            f"### Speed on a ResNet-50-sized bucket{' on the GPU' if on_gpu else ''} (25.6 M fp32, 1 % density)",
            "",
            "The real ResNet-50 gradient tiled to 25.6 M elements. " + SPEED_TARGETS,
            "",
            markdown_table(
                ["torch.topk s", "deepreduce topk select s", "compress s", "decompress s", "(compress+decompress)/topk",
                 "mstopk select s", "mstopk/topk", "payload bytes"],
                [[_fmt(speed["torch_topk_s"]), _fmt(speed["deepreduce_topk_select_s"]), _fmt(speed["compress_s"]),
                  _fmt(speed["decompress_s"]), _fmt(speed["compress_plus_decompress_over_topk"]),
                  _fmt(speed["mstopk_select_s"]), _fmt(speed["mstopk_over_topk"]), f"{speed['payload_bytes']:,}"]],
            ),
        ]
        if speed.get("bloom"):
            lines += [
                "",
                "Bloom filter index (`topk:0.01/bloom:policy=P/raw`) on the same bucket: compress (selection "
                "included) and decode (queries all 25.6 M positions). Target: decode <= 1 s.",
                "",
                markdown_table(["policy", "compress s", "decode s"],
                               [[p, _fmt(t["encode_s"]), _fmt(t["decode_s"])] for p, t in speed["bloom"].items()]),
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="deepreduce bench codecs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, one density, 1 repeat (a smoke test)")
    parser.add_argument("--densities", type=float, nargs="+", default=None, help="densities (default 0.001 0.01 0.1)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median)")
    parser.add_argument("--only", nargs="+", default=None, help="combinations to run, e.g. eliasfano/fp16")
    parser.add_argument("--no-speed", action="store_true", help="skip the 25.6 M-element speed targets")
    parser.add_argument("--device", default="cpu", help="where tensors live: cpu (default) or cuda[:N]")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's benchmarks/)")
    parser.add_argument("--steady", action="store_true",
                        help="instead: bits per kept element inside an error-feedback training run (steady state) "
                             "next to the fresh gradient's, for every index and value codec")
    parser.add_argument("--steady-steps", type=int, default=None, help="training steps (default 100; --quick 6)")
    parser.add_argument("--steady-from", type=int, default=None, help="first measured step (default 20; --quick 3)")
    parser.add_argument("--steady-every", type=int, default=None, help="measure every that many steps (default 10; --quick 3)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: CPU time per phase of one compressed bucket through the engine (see --profile-*)")
    parser.add_argument("--profile-specs", nargs="+", default=PROFILE_SPECS, help="compressor specs to profile")
    parser.add_argument("--profile-numel", type=int, default=25_600_000, help="bucket elements (default: ResNet-50's 25.6 M)")
    parser.add_argument("--profile-world", type=int, default=2, help="ranks whose payloads are decoded and summed")
    parser.add_argument("--profile-layouts", nargs="+", default=["bucket", "resnet50"], choices=["bucket", "resnet50"],
                        help="bucket: one flat tensor of --profile-numel elements; resnet50: ResNet-50's 161 tensors "
                             "in one bucket, each compressed on its own (the DDP hook's default granularity)")
    parser.add_argument("--profile-baseline", type=Path, default=None,
                        help="a profile.json from an earlier run, shown side by side as 'before'")
    args = parser.parse_args(argv)
    if args.profile:
        return profile_main(args, argv)
    if args.steady:
        return steady_main(args, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    # CPU results keep their historical names; other devices get a suffix.
    suffix = "" if device.type == "cpu" else f"_{device.type}"

    densities = args.densities or ([0.01] if args.quick else [0.001, 0.01, 0.1])
    repeats = args.repeats or (1 if args.quick else 3)
    combinations = [c for c in (args.only or COMBINATIONS) if available(c)]
    skipped = [c for c in (args.only or COMBINATIONS) if not available(c)]
    # A quick run must not overwrite the committed full results.
    out = output_dir(args.out, args.quick)
    console = make_console()
    if skipped:
        console.print(f"[yellow]skipping combinations whose codecs are not registered: {', '.join(skipped)}")

    gradients = real_gradients(args.quick, device=device)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("codecs", total=len(gradients) * len(densities) * len(combinations))
        for model in gradients:
            for density in densities:
                k = target_k(model.gradient.numel(), density)
                topk_s = median_time(lambda: torch.topk(model.gradient.abs(), k, sorted=False), repeats)
                for combination in combinations:
                    progress.update(task, description=f"{model.name} {density:g} {combination}")
                    rows.append(measure(model, density, combination, repeats, topk_s))
                    progress.advance(task)
    speed = None
    if not (args.quick or args.no_speed):
        console.print("speed targets on a 25.6 M-element bucket ...")
        speed = speed_targets(gradients[0].gradient, repeats=5)

    table = Table(title="deepreduce codecs", caption=CONSOLE_LEGEND, caption_justify="left")
    for column in ("model", "density", "index", "value", "bits/elem", "idx/bound", "rel.err", "mass kept", "comp MB/s", "dec MB/s"):
        table.add_column(column, justify="right" if column not in ("model", "index", "value") else "left")
    for r in rows:
        table.add_row(r["model"], f"{r['density']:g}", r["index"], r["value"], _fmt(r["bits_per_element"]),
                      _fmt(r["entropy_ratio"]), _fmt(r["rel_error"], 2), _fmt(r["mass_kept"], 4),
                      _fmt(r["compress_mb_s"]), _fmt(r["decompress_mb_s"]))
    console.print(table)
    if speed:
        console.print(
            f"25.6 M @ 1 %: torch.topk {speed['torch_topk_s']:.3f} s; compress+decompress "
            f"{speed['compress_s'] + speed['decompress_s']:.3f} s = {speed['compress_plus_decompress_over_topk']:.2f}x topk "
            f"(target <= 1.5); mstopk {speed['mstopk_select_s']:.3f} s = {speed['mstopk_over_topk']:.2f}x topk (target < 1)"
        )

    facts = machine_facts()
    command = reproduce_command("codecs", argv)
    rows = [dict(r, device=device.type) for r in rows]
    write_json(out / "results" / f"codecs{suffix}.json", rows)
    if speed:
        write_json(out / "results" / f"codecs_speed{suffix}.json", [dict(speed, **facts)])
    update_results_section(out / "RESULTS.md", f"codecs{suffix.replace('_', '-')}",
                           render(rows, speed, facts, command, plot=f"codec_bits{suffix}.png"))
    plot_bits(rows, out / "results" / f"codec_bits{suffix}.png", console)
    console.print(f"wrote {out / 'RESULTS.md'} and {out / 'results' / f'codecs{suffix}.json'}")
    return 0


PROFILE_SPECS = ["topk:0.01/eliasfano/fp16", "topk:0.01/eliasfano/uniform:bits=4"]


def profile_main(args: argparse.Namespace, argv: list[str]) -> int:
    """``--profile``: one compressed bucket through the engine, CPU time per phase."""
    from .bandwidth import resnet_shapes
    from .profile import profile_step, render_profile

    torch.set_num_threads(1)  # CPU time of one thread is the work done, whatever the neighbours do
    console = make_console()
    steps = args.repeats or (1 if args.quick else 3)
    numel = 1_000_000 if args.quick else args.profile_numel
    results = []
    if args.profile_baseline:
        import json

        results += [dict(r, label=f"before: {r.get('label', r['spec'])}", baseline=True)
                    for r in json.loads(args.profile_baseline.read_text())]
    layouts = {"bucket": None, "resnet50": [shape.numel() for shape in resnet_shapes(args.quick)]}
    for layout in args.profile_layouts:
        for spec in args.profile_specs:
            tensors = layouts[layout]
            what = f"{numel:,} elements" if tensors is None else f"{len(tensors)} tensors of {sum(tensors):,} elements"
            console.print(f"profiling {spec} on {what}, {args.profile_world} ranks ...")
            row = profile_step(spec, numel=numel, world=args.profile_world, steps=steps, device=args.device, tensors=tensors)
            label = spec if tensors is None else f"{spec}, {len(tensors)} tensors"
            results.append(dict(row, layout=layout, label=label, commit=_git_commit()))
    table = render_profile(results)
    console.print(table)
    out = output_dir(args.out, args.quick)
    write_json(out / "results" / "profile.json", [r for r in results if not r.get("baseline")])
    facts = machine_facts()
    update_results_section(out / "RESULTS.md", "profile", "\n".join([
        "### CPU time per phase of one compressed bucket",
        "",
        f"Reproduce: `{reproduce_command('codecs', argv)}`. One {numel:,}-element fp32 bucket through the engine "
        f"(error feedback on, after a warm-up step) over a loopback transport of {args.profile_world} ranks, and "
        f"(columns naming their tensors) a bucket of ResNet-50's tensors, each compressed on its own as the DDP "
        f"hook does by default (those under 1,024 elements raw); median "
        f"over {steps} steps of the process's CPU time with one torch thread ({facts['cpu_cores']} cores, torch "
        f"{facts['torch']}). The network is not included; `size exchange` is the engine's own time around it.",
        "",
        table,
    ]))
    console.print(f"wrote {out / 'RESULTS.md'} and {out / 'results' / 'profile.json'}")
    return 0


def steady_main(args: argparse.Namespace, argv: list[str]) -> int:
    """``--steady``: codec sizes inside an error-feedback training run."""

    console = make_console()
    density = (args.densities or [0.01])[0]
    steps = args.steady_steps or (6 if args.quick else 100)
    start = args.steady_from if args.steady_from is not None else (3 if args.quick else 20)
    every = args.steady_every or (3 if args.quick else 10)
    console.print(f"training with error feedback at density {density:g}, measuring steps {start}-{steps} every {every} ...")
    rows = steady_codecs(density, steps, start, every, quick=args.quick)
    body = render_steady(rows, reproduce_command("codecs", argv))
    console.print(body)
    s = summary(rows)
    for codec, total in s["totals"].items():
        console.print(f"steady: {s['best_index']} + {codec}: {total:.2f} bits per kept element "
                      f"(target <= 12), index {s['best_index_over_bound']:.3f}x the bound (target <= 1.05)")
    out = output_dir(args.out, args.quick)
    write_json(out / "results" / "codecs_steady.json", rows)
    update_results_section(out / "RESULTS.md", "codecs-steady", body)
    console.print(f"wrote {out / 'RESULTS.md'} and {out / 'results' / 'codecs_steady.json'}")
    return 0


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def plot_bits(rows: list[dict], path: Path, console: Console) -> None:
    """Bits per kept element per codec combination and density (first model)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib not installed: no plot (pip install 'deepreduce[bench]')")
        return
    model = rows[0]["model"]
    combos = list(dict.fromkeys(f"{r['index']}+{r['value']}" for r in rows))
    densities = sorted({r["density"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(combos) + 2), 4.5))
    width = 0.8 / len(densities)
    for i, density in enumerate(densities):
        values = {f"{r['index']}+{r['value']}": r["bits_per_element"] for r in rows if r["model"] == model and r["density"] == density}
        ax.bar([j + i * width for j in range(len(combos))], [values.get(c, 0) for c in combos], width, label=f"density {density:g}")
    ax.axhline(64, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(combos))])
    ax.set_xticklabels(combos, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("bits per kept element (payload)")
    ax.set_title(f"Payload size per codec ({model} gradient; raw top-k = 64)", pad=22)
    # Above the axes: inside them the legend can cover bars.
    ax.legend(fontsize=8, ncol=len(densities), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
