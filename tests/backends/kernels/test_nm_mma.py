"""Swap-AB tensor-core kernel (M = 3 .. 64, any M by tiles of 64): results against float64, the
in-launch split-K reduction, launcher errors.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (``make test`` sets it before triton is
imported), so shapes stay small.
"""

import os

import pytest
import torch

from nmgraph import compress, nm_mask
from nmgraph.backends.kernels.nm_mma import (
    MmaConfig,
    default_config,
    m_bucket,
    mma_fast_path,
    mma_semaphores,
    nm_mma,
)
from nmgraph.backends.kernels.repack import repack
from nmgraph.errors import ShapeError, UnsupportedError

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="no CUDA device: run with TRITON_INTERPRET=1 (as `make test` does)"
)
# (rtol, atol) against the float64 product of the same (rounded) inputs; fp16/bf16 tiles are exact in
# the MMA, the result is rounded once (bf16: within one ulp, the interpreter truncates).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2**-7, 4e-3)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
PATTERNS = ["2:4", "1:4", "2:8", "1:8", "4:8", "3:8", "1:16", "2:6", "1:3"]
# (M, N, groups of m along K): ragged N and K (partial last K tile), one M per bucket and beyond.
SHAPES = [(3, 70, 37), (17, 40, 21), (64, 24, 16), (300, 20, 9)]


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
    # Each (pattern, dtype) runs two of the shapes, so every M appears for every pattern overall.
    for i in range(2):
        m_rows, n_out, groups = SHAPES[(seed + i) % len(SHAPES)]
        k = groups * m
        w, p = _weight(n_out, k, pattern, dtype, seed + 100 * i)
        x, b = _inputs(m_rows, k, n_out, dtype, seed + 100 * i, bias=i == 0)
        sem = mma_semaphores(n_out, DEVICE, max_m_tiles=-(-m_rows // 64)) if i == 0 else None
        _check(nm_mma(x, p, b, semaphores=sem), x, w, b, dtype)
        if sem is not None:
            assert not sem.any()  # the last split of every tile put its semaphore back to zero


@needs_kernel
@pytest.mark.parametrize("pattern", ["2:4", "2:8"])
def test_split_k_reduction_in_one_launch(pattern):
    m = int(pattern.split(":")[1])
    w, p = _weight(130, 40 * m + 3 * m, pattern, torch.float16, 5)
    x, b = _inputs(5, w.shape[1], 130, torch.float16, 5, bias=True)
    sem = mma_semaphores(130, DEVICE)
    k_tiles = -(-w.shape[1] // (128 if pattern == "1:4" else 64))
    for split in (1, 3, k_tiles):  # uneven split; one tile per split
        cfg = MmaConfig(block_n=64, block_m=16, split_k=split)
        _check(nm_mma(x, p, b, config=cfg, semaphores=sem), x, w, b, torch.float16)
        assert not sem.any()
    # The same semaphores serve the next call (they are left at zero).
    _check(nm_mma(x, p, b, config=MmaConfig(split_k=2), semaphores=sem), x, w, b, torch.float16)


@needs_kernel
def test_lead_dims_strided_x_and_m1():
    w, p = _weight(64, 128, "2:4", torch.bfloat16, 9)
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEVICE).t()
    y = nm_mma(x.reshape(2, 3, 128), p)
    assert y.shape == (2, 3, 64)
    _check(y.reshape(6, 64), x, w, None, torch.bfloat16)
    _check(nm_mma(x[:1], p), x[:1], w, None, torch.bfloat16)  # M = 1 works (the GEMV is faster)
    assert nm_mma(x[:0], p).shape == (0, 64)


def test_buckets_and_defaults():
    assert [m_bucket(m) for m in (1, 3, 16, 17, 32, 33, 64, 300)] == [16, 16, 16, 32, 32, 64, 64, 64]
    assert mma_fast_path(2, 4, torch.float16) and mma_fast_path(1, 4, torch.bfloat16)
    assert not mma_fast_path(2, 4, torch.float32) and not mma_fast_path(2, 8, torch.float16)
    cfg = default_config(4096, 4096, 16, 2, 4, torch.float16, split_ok=False)
    assert cfg.split_k == 1 and cfg.block_m == 16
    cfg = default_config(4096, 4096, 16, 2, 4, torch.float16)
    assert cfg.split_k >= 1


@needs_kernel
def test_default_call_with_small_semaphores_does_not_split():
    # 300 rows of x make 5 tiles of 64; semaphores sized for M <= 64 cover only one: no split.
    w, p = _weight(64, 256, "2:4", torch.float16, 4)
    x, _ = _inputs(300, 256, 64, torch.float16, 4, bias=False)
    sem = mma_semaphores(64, DEVICE)
    _check(nm_mma(x, p, semaphores=sem), x, w, None, torch.float16)
    assert not sem.any()


def test_errors():
    _, p = _weight(64, 64, "2:4", torch.float16, 1)
    x = torch.randn(4, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(UnsupportedError, match="needs semaphores"):
        nm_mma(x, p, config=MmaConfig(split_k=2))
    with pytest.raises(ShapeError, match="semaphores must be int32"):
        nm_mma(x, p, config=MmaConfig(split_k=2), semaphores=torch.zeros(4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(UnsupportedError, match="block_k=32 is not supported"):
        nm_mma(x, p, config=MmaConfig(block_k=32))
    with pytest.raises(UnsupportedError, match="multiple of 64"):
        nm_mma(x, p, config=MmaConfig(block_n=32))
    with pytest.raises(UnsupportedError, match="power of two"):
        MmaConfig(block_n=48)
    with pytest.raises(ShapeError, match=r"x must be \[\.\.\., 64\]"):
        nm_mma(x[:, :32], p)
    with pytest.raises(UnsupportedError, match="unknown fields"):
        nm_mma(x, p, config={"block_e": 64})
