"""Compressor: spec strings, parameter routing, what is sent vs. what is decoded, the CLI listing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import deepreduce as dr
from deepreduce.errors import ConfigError

from helpers import bits


def test_compress_decompress_round_trip_on_a_real_gradient(real_gradients):
    g = real_gradients["transformer"]
    c = dr.Compressor(ratio=0.01, sparsifier="topk", index="eliasfano", value="raw")
    payload = c.compress(g)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    sg = c.decompress(payload)
    reference = dr.sparsify(g, 0.01, "topk")
    assert torch.equal(sg.indices, reference.indices)
    assert torch.equal(sg.values, reference.values)
    dense = sg.to_dense()
    assert dense.shape == g.shape and torch.equal(dense[sg.indices], g[sg.indices])


@pytest.mark.parametrize("value", dr.value_codecs())
def test_sent_is_exactly_what_receivers_decode(real_gradients, value):
    g = real_gradients["resnet18"][:500_000]
    result = dr.Compressor(0.01, "topk", "eliasfano", value).compress_detailed(g, step=3, key=1)
    decoded = dr.decode(result.payload)
    assert torch.equal(decoded.indices, result.sent.indices)
    assert torch.equal(bits(decoded.values), bits(result.sent.values))
    assert result.selected == decoded.k  # eliasfano is lossless: the selection travels unchanged


@pytest.mark.parametrize(
    "spec",
    [
        "topk:0.01/eliasfano/fp16",
        "threshold:0.5,t=0.001/rle/raw",
        "mstopk:0.001,rounds=4/zstd:level=9/zstd:level=1",
        "dgc:0.1,tolerance=0.2/raw/bf16",
        "randomk:0.05/eliasfano/raw",
    ],
)
def test_spec_round_trips(spec):
    c = dr.Compressor.from_spec(spec)
    assert dr.Compressor.from_spec(c.spec).spec == c.spec
    assert c.spec == spec


def test_spec_defaults_and_keyword_routing():
    assert dr.Compressor.from_spec("topk:0.01").spec == "topk:0.01/eliasfano/fp16"
    c = dr.Compressor(0.02, "topk", "zstd", "zstd", level=7)  # `level` reaches both zstd codecs
    assert c.spec == "topk:0.02/zstd:level=7/zstd:level=7"
    c = dr.Compressor(0.02, "topk", "zstd", "zstd", index_options={"level": 5})
    assert c.spec == "topk:0.02/zstd:level=5/zstd"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 2.0}, r"ratio must be in \[0, 1\]"),
        ({"ratio": "lots"}, "ratio must be a number"),
        ({"index": "bogus"}, "unknown index codec 'bogus'"),
        ({"value": "bogus"}, "unknown value codec 'bogus'"),
        ({"sparsifier": "bogus"}, "unknown sparsifier 'bogus'"),
        ({"index": "zstd", "level": 99}, r"must be in \[1, 22\]"),
        ({"index": "zstd", "level": "high"}, "must be int"),
        ({"colour": "red"}, "unknown option 'colour'"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_bad_configuration_is_reported(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dr.Compressor(**kwargs)


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty"),
    ("topk:0.01/eliasfano/fp16/extra", "at most 3"),
    ("topk:0.01,0.02", "one ratio"),
    ("topk:abc", "not a number"),
    ("topk:0.01/zstd:3", "key=value"),
    (":0.01", "empty sparsifier"),
    ("topk:0.01/eliasfano/uniform:bits=1,bits=2", "value codec 'uniform' gives 'bits' twice"),
])
def test_bad_specs_are_reported(spec, message):
    with pytest.raises(ConfigError, match=message):
        dr.Compressor.from_spec(spec)


def test_bad_tensors_are_reported():
    c = dr.Compressor()
    with pytest.raises(TypeError, match="got torch.int64"):
        c.compress(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        c.compress([1.0, 2.0])


def test_seed_step_and_bucket_give_independent_streams():
    x = torch.randn(20_000)
    a = dr.Compressor(0.01, "randomk", "eliasfano", "raw", seed=1)
    b = dr.Compressor(0.01, "randomk", "eliasfano", "raw", seed=2)
    same = dr.Compressor(0.01, "randomk", "eliasfano", "raw", seed=1)
    ia = a.decompress(a.compress(x, step=5, key=0)).indices
    assert torch.equal(ia, same.decompress(same.compress(x, step=5, key=0)).indices)
    assert not torch.equal(ia, b.decompress(b.compress(x, step=5, key=0)).indices)
    assert not torch.equal(ia, a.decompress(a.compress(x, step=6, key=0)).indices)
    assert not torch.equal(ia, a.decompress(a.compress(x, step=5, key=1)).indices)
    # Without an explicit step each bucket counts its own calls.
    auto = dr.Compressor(0.01, "randomk", "eliasfano", "raw", seed=1)
    first = auto.compress(x)
    assert torch.equal(first, a.compress(x, step=0))
    assert not torch.equal(auto.compress(x), first)


def test_fingerprint_tracks_spec_and_seed():
    base = dr.Compressor.from_spec("topk:0.01/eliasfano/fp16")
    assert base.fingerprint == dr.Compressor(0.01, "topk", "eliasfano", "fp16").fingerprint
    assert base.fingerprint != dr.Compressor.from_spec("topk:0.01/eliasfano/bf16").fingerprint
    assert base.fingerprint != dr.Compressor.from_spec("topk:0.01/eliasfano/fp16", seed=1).fingerprint


def test_header_describes_the_payload():
    c = dr.Compressor.from_spec("mstopk:0.1/rle/bf16")
    header = dr.read_header(c.compress(torch.randn(1000, dtype=torch.float16)))
    assert (header.sparsifier, header.index_codec, header.value_codec) == ("mstopk", "rle", "bf16")
    assert header.numel == 1000 and header.k == 100 and header.dtype == torch.float16


def test_cli_lists_every_component():
    out = subprocess.run([sys.executable, "-m", "deepreduce", "codecs"], capture_output=True, text=True, check=True).stdout
    for name in dr.sparsifiers() + dr.index_codecs() + dr.value_codecs():
        assert f"  {name} " in out
    assert "index codecs:" in out and "value codecs:" in out
    bad = subprocess.run([sys.executable, "-m", "deepreduce", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_a_payload_decodes_from_bytes_numpy_and_a_strided_view():
    """Where the payload's bytes sit does not matter: a strided tensor view (payloads
    laid side by side), bytes, a numpy array and an unaligned slice decode alike."""
    c = dr.Compressor(ratio=0.01, sparsifier="topk", index="eliasfano", value="fp16")
    payload = c.compress(torch.randn(10_000, generator=torch.Generator().manual_seed(0)))
    expected = dr.decode(payload)
    strided = torch.stack([payload, torch.zeros_like(payload)], dim=1)[:, 0]
    unaligned = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])[3:]
    assert not strided.is_contiguous() and unaligned.storage_offset() == 3
    for held in (strided, bytes(payload.numpy()), payload.numpy(), unaligned):
        got = dr.decode(held)
        assert torch.equal(got.indices, expected.indices) and torch.equal(got.values, expected.values)
