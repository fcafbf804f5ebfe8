"""Gather GEMV (M = 1 .. 2, any M by row pairs): results against float64, launcher errors.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (``make test`` sets it before triton is
imported), so shapes stay small.
"""

import os

import pytest
import torch

from nmgraph import compress, nm_mask
from nmgraph.backends.kernels.nm_gemv import GemvConfig, default_config, gemv_fast_path, nm_gemv
from nmgraph.backends.kernels.repack import repack
from nmgraph.errors import ShapeError, UnsupportedError

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="no CUDA device: run with TRITON_INTERPRET=1 (as `make test` does)"
)
# (rtol, atol) against the float64 product of the same (rounded) inputs; the result is rounded once
# to the output dtype (bf16: within one ulp, the interpreter truncates).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2**-7, 4e-3)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
PATTERNS = ["2:4", "1:4", "2:8", "1:8", "4:8", "3:8", "1:16", "2:6", "1:3"]


def _weight(n_out, k, pattern, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    w = (w * nm_mask(w, pattern)).to(dtype)
    return w.to(DEVICE), repack(compress(w, pattern)).to(DEVICE)


def _inputs(m_rows, k, n_out, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m_rows, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n_out, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, b


def _check(y, x, w, b, dtype):
    ref = x.double() @ w.double().T
    if b is not None:
        ref = ref + b.double()
    assert y.dtype == dtype and y.shape == ref.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_float64_reference(pattern, dtype):
    m = int(pattern.split(":")[1])
    seed = 10 * PATTERNS.index(pattern) + DTYPES.index(dtype)
    # Ragged: N not a multiple of the row tile, K whose kept count leaves a partial last step.
    # M = 1 and 2 are the GEMV's sizes; M = 3 exercises the grid axis over pairs of rows (each
    # (pattern, dtype) runs M = 1 and one of 2 / 3).
    for i, (m_rows, n_out, groups) in enumerate(((1, 9, 21), ((2, 6, 13), (3, 5, 8))[seed % 2])):
        k = groups * m
        w, p = _weight(n_out, k, pattern, dtype, seed + 100 * i)
        x, b = _inputs(m_rows, k, n_out, dtype, seed + 100 * i, bias=(i + seed) % 2 == 0)
        _check(nm_gemv(x, p, b), x, w, b, dtype)


def test_fast_path_coverage():
    assert gemv_fast_path(2, 4, torch.float16) and gemv_fast_path(1, 16, torch.float32)
    assert gemv_fast_path(4, 8, torch.bfloat16) and not gemv_fast_path(8, 16, torch.float32)
    assert not gemv_fast_path(3, 8, torch.float16) and not gemv_fast_path(2, 6, torch.float16)


@needs_kernel
def test_lead_dims_strided_x_and_explicit_config():
    w, p = _weight(12, 64, "2:4", torch.float16, 7)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(8)).to(torch.float16).to(DEVICE).t()
    assert x.stride(1) != 1  # a transposed view: the launcher copies it
    _check(nm_gemv(x, p), x, w, None, torch.float16)
    x3 = x.reshape(1, 2, 64)
    y = nm_gemv(x3, p, config=GemvConfig(block_n=8, block_e=32, num_warps=1))
    assert y.shape == (1, 2, 12)
    _check(y.reshape(2, 12), x, w, None, torch.float16)
    y2 = nm_gemv(x, p, config={"block_n": 4, "block_e": 64, "num_warps": 1})
    torch.testing.assert_close(y2.double(), y.reshape(2, 12).double(), rtol=2e-3, atol=2e-3)
    assert nm_gemv(torch.empty(0, 64, dtype=torch.float16, device=DEVICE), p).shape == (0, 12)


def test_default_config_fits_the_thread_layout():
    for n_out in (1, 4096, 7392, 11008, 14336, 32000):
        for dtype in DTYPES:
            cfg = default_config(n_out, 4096, dtype)
            cfg.check(16 // torch.empty((), dtype=dtype).element_size())


def test_errors():
    w, p = _weight(8, 32, "2:4", torch.float16, 1)
    x = torch.randn(1, 32, dtype=torch.float16, device=DEVICE)
    with pytest.raises(UnsupportedError, match="PackedNM"):
        nm_gemv(x, compress(w.cpu(), "2:4"))
    with pytest.raises(ShapeError, match=r"x must be \[\.\.\., 32\]"):
        nm_gemv(x[:, :16], p)
    with pytest.raises(UnsupportedError, match="cast one of them"):
        nm_gemv(x.float(), p)
    with pytest.raises(UnsupportedError, match="not supported"):
        nm_gemv(x.to(torch.int32), p)
    with pytest.raises(ShapeError, match="bias has shape"):
        nm_gemv(x, p, torch.zeros(7, dtype=torch.float16, device=DEVICE))
    with pytest.raises(UnsupportedError, match="cast the bias"):
        nm_gemv(x, p, torch.zeros(8, dtype=torch.float32, device=DEVICE))
    with pytest.raises(UnsupportedError, match="power of two"):
        GemvConfig(block_n=3)
    with pytest.raises(UnsupportedError, match="multiple of"):
        GemvConfig(block_n=4, block_e=32, num_warps=4).check(8)
    with pytest.raises(UnsupportedError, match="unknown fields"):
        nm_gemv(x, p, config={"block_k": 64})
