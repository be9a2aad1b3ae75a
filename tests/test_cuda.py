"""The same codecs, sparsifiers and comm hook on a CUDA device (skipped without one).

What must hold on the GPU: payloads stay on the device; a payload decodes to the same
index set on the GPU and on the CPU (receivers replay Bloom policies, so their random
choices must not depend on the device); where the pipeline is deterministic, the GPU
payload is byte-identical to the CPU one; and DDP training with the hook over NCCL or
gloo keeps parameters bitwise identical across ranks."""

from __future__ import annotations

import pytest
import torch

import deepreduce as dr
from deepreduce.codecs import INDEX_CODECS, VALUE_CODECS

from helpers import bits
from test_hook_dist import launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
INDEX_SPECS = ([n for n in dr.index_codecs() if n != "bloom" and INDEX_CODECS.lookup(n).general]
               + [f"bloom:policy={p}" for p in ("p0", "leftmost", "random", "p2")])
# Decoding evaluates curves (polyfit, dexp) or scales levels (qsgd) in floating point: GPU
# kernels may fuse multiply-adds, so those values agree to rounding, not bit for bit.
EXACT_VALUE = ["raw", "fp16", "bf16", "zstd"]
ROUNDED_VALUE = [n for n in dr.value_codecs() if n not in EXACT_VALUE]


def distinct_magnitudes(numel: int, seed: int) -> torch.Tensor:
    """Random signs and a random order of distinct magnitudes: top-k has no ties on any device."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.linspace(1e-4, 1.0, numel, dtype=torch.float64)[torch.randperm(numel, generator=gen)]
    sign = torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    return (magnitude * sign).float()


def spec(index: str, value: str, ratio: float = 0.02) -> str:
    return f"topk:{ratio}/{index}/{value}"


@pytest.mark.parametrize("value", ["raw", "uniform:bits=1", "uniform:bits=3", "uniform:bits=2,scale=bf16"])
def test_cyclic_strided_payload_decodes_alike_on_gpu_and_cpu(value):
    x = distinct_magnitudes(60_000, seed=6).to(CUDA)
    result = dr.Compressor.from_spec(f"cyclic:0.1/strided/{value}").compress_detailed(x, step=7)
    on_gpu, on_cpu = dr.decode(result.payload), dr.decode(result.payload.cpu())
    assert torch.equal(on_gpu.indices, result.sent.indices) and torch.equal(on_cpu.indices, result.sent.indices.cpu())
    assert float((on_cpu.values - on_gpu.values.cpu()).abs().max()) <= 1e-6 * float(on_gpu.values.abs().max())


@pytest.mark.parametrize("value", EXACT_VALUE + ROUNDED_VALUE)
@pytest.mark.parametrize("index", INDEX_SPECS)
def test_payload_decodes_alike_on_gpu_and_cpu(index, value):
    x = distinct_magnitudes(60_000, seed=1).to(CUDA)
    result = dr.Compressor.from_spec(spec(index, value), seed=7).compress_detailed(x, step=3, key=1)
    assert result.payload.is_cuda and result.payload.dtype == torch.uint8
    on_gpu = dr.decode(result.payload)
    on_cpu = dr.decode(result.payload.cpu())
    assert on_gpu.indices.is_cuda and on_gpu.values.is_cuda
    # The receivers' set is the sender's, on either device.
    assert torch.equal(on_gpu.indices, result.sent.indices)
    assert torch.equal(on_cpu.indices, result.sent.indices.cpu())
    # Values are read at the decoded positions (no misalignment, also for Bloom's false positives).
    assert torch.equal(bits(on_gpu.values), bits(result.sent.values))
    if value in EXACT_VALUE:
        assert torch.equal(bits(on_cpu.values), bits(on_gpu.values.cpu()))
        if VALUE_CODECS.lookup(value).lossless:
            assert torch.equal(on_gpu.values, x[on_gpu.indices])
    else:
        scale = float(on_gpu.values.abs().max())
        assert float((on_cpu.values - on_gpu.values.cpu()).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("value", EXACT_VALUE)
@pytest.mark.parametrize("index", INDEX_SPECS)
def test_deterministic_pipelines_give_the_cpu_payload_byte_for_byte(index, value):
    x = distinct_magnitudes(60_000, seed=2)
    c = dr.Compressor.from_spec(spec(index, value), seed=5)
    assert torch.equal(c.compress(x.to(CUDA), step=4).cpu(), c.compress(x, step=4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_on_gpu(dtype):
    x = distinct_magnitudes(30_000, seed=3).to(CUDA, dtype)
    result = dr.Compressor.from_spec(spec("eliasfano", "raw", 0.05)).compress_detailed(x, step=0)
    decoded = dr.decode(result.payload)
    assert decoded.values.dtype == dtype and torch.equal(bits(decoded.values), bits(x[decoded.indices]))


@pytest.mark.parametrize("name", dr.sparsifiers())
def test_sparsifiers_select_on_gpu(name):
    x = distinct_magnitudes(200_000, seed=4)
    params = {"t": 0.99} if name == "threshold" else {}
    k = round(0.01 * x.numel())
    on_gpu = dr.sparsify(x.to(CUDA), 0.01, name, **params)
    indices = on_gpu.indices
    assert indices.is_cuda and indices.dtype == torch.int64
    assert bool((indices[1:] > indices[:-1]).all()) and int(indices[0]) >= 0 and int(indices[-1]) < x.numel()
    assert torch.equal(on_gpu.values, x.to(CUDA)[indices])
    if name in ("topk", "mstopk"):
        assert indices.numel() == k
        if name == "topk":  # exact: the same set as on the CPU
            assert torch.equal(indices.cpu(), dr.sparsify(x, 0.01, "topk").indices)
    if name == "threshold":
        assert torch.equal(indices.cpu(), torch.nonzero(x.abs() >= 0.99).reshape(-1))


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_ddp_hook_on_gpu(backend, tmp_path_factory):
    """DDP on the GPU: every rank ends with the same parameters, for every spec and for
    fp16/bf16 buckets; lossless at ratio 1 equals the built-in allreduce. NCCL allows one
    rank per GPU (one rank on a single-GPU machine); gloo runs two ranks on CUDA tensors
    (it all-gathers through host memory)."""
    nproc = min(torch.cuda.device_count(), 4) if backend == "nccl" else 2
    ranks = launch(tmp_path_factory, nproc, "specs,dtypes,equals_allreduce", "--backend", backend, "--device", "cuda")
    specs = ranks[0]["specs"]
    assert specs, "no spec trained"
    for name, entry in specs.items():
        assert len({r["specs"][name]["digest"] for r in ranks}) == 1, name
        assert entry["digest"] != entry["initial"] and entry["stats"]["compressed_buckets"] > 0, name
    for dtype in ("torch.float16", "torch.bfloat16"):
        assert len({r["dtypes"][dtype]["digest"] for r in ranks}) == 1
    for rank in ranks:
        for entry in rank["equals_allreduce"].values():
            assert entry["grad_diff"] <= 1e-6 * entry["grad_scale"] and entry["param_diff"] <= 1e-6, entry
