"""Triton N:M GEMM: results against a float64 torch reference, launch paths, launcher errors.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (``make test`` sets it; it must be set
before triton is imported), so shapes stay small.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from nmgraph import compress, nm_mask
from nmgraph.compress import CompressedNM
from nmgraph.errors import BackendUnavailableError, ShapeError, UnsupportedError

pytest.importorskip("triton")

from nmgraph.backends import triton_nm
from nmgraph.backends.triton_nm import SMALL_M, TritonBackend, nm_linear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (rtol, atol) against the float64 product of the same (rounded) inputs. fp16/bf16 outputs are
# rounded once to the output dtype (bf16: within one ulp, the interpreter truncates).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2 ** -7, 1e-3)}


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tests that launch the kernel: on a GPU, or on the CPU under the interpreter.
needs_kernel = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="no CUDA device: run with TRITON_INTERPRET=1 (as `make test` does)"
)


def _weight(n_out, k, pattern, dtype, seed, axis=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g) if axis == 1 else torch.randn(k, n_out, generator=g)
    w = w * nm_mask(w, pattern, axis=axis)
    return compress(w.to(dtype).to(DEVICE), pattern, axis=axis)


def _inputs(m_rows, k, n_out, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m_rows, k, generator=g).to(dtype).to(DEVICE)
    b = (torch.randn(n_out, generator=g).to(dtype).to(DEVICE)) if bias else None
    return x, b


def _reference(x, c, b):
    w = c.to_dense().double()
    if c.axis == 0:
        w = w.t()
    return F.linear(x.double(), w, None if b is None else b.double())


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


PATTERNS = ["2:4", "1:4", "2:8", "1:8"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): ragged M (1, 3, 17) and N (24, 40) on the split-K path, and M > SMALL_M (large-M path).
SHAPES = [(1, 24, 64), (3, 40, 128), (17, 24, 64), (SMALL_M + 7, 40, 64)]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_float64_reference(pattern, dtype):
    for i, (m_rows, n_out, k) in enumerate(SHAPES):
        seed = 100 * PATTERNS.index(pattern) + 10 * DTYPES.index(dtype) + i
        c = _weight(n_out, k, pattern, dtype, seed)
        x, b = _inputs(m_rows, k, n_out, dtype, seed, bias=i % 2 == 0)
        _check(nm_linear(x, c, b), _reference(x, c, b), dtype)


@needs_kernel
@pytest.mark.parametrize("pattern", ["1:2", "4:8", "1:16", "3:6", "3:8", "1:128"])
def test_other_patterns(pattern):
    # Any n:m the compressed format holds, including m that is not a power of two (3:6) and
    # n that is not (3:8), and a group wider than one K step (1:128).
    m = int(pattern.split(":")[1])
    for m_rows in (2, SMALL_M + 1):
        c = _weight(24, 2 * m if m >= 64 else 8 * m, pattern, torch.float32, seed=m_rows)
        x, b = _inputs(m_rows, c.shape[1], 24, torch.float32, seed=m_rows, bias=True)
        _check(nm_linear(x, c, b), _reference(x, c, b), torch.float32)


@needs_kernel
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_split_k_sums_to_the_same_result(split_k):
    c = _weight(40, 256, "2:4", torch.float32, seed=3)
    x, b = _inputs(5, 256, 40, torch.float32, seed=3, bias=True)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": split_k}
    _check(nm_linear(x, c, b, config=cfg), _reference(x, c, b), torch.float32)


@needs_kernel
def test_large_m_grouped_order_with_ragged_tiles():
    # GROUP_M=2 over 5 M tiles and 2 N tiles of 16: exercises the tile swizzle and edge masks.
    c = _weight(24, 64, "2:4", torch.float16, seed=4)
    x, b = _inputs(70, 64, 24, torch.float16, seed=4, bias=True)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": 1}
    _check(nm_linear(x, c, b, config=cfg), _reference(x, c, b), torch.float16)


@needs_kernel
def test_leading_dims_and_non_contiguous_input():
    c = _weight(24, 64, "2:4", torch.float32, seed=5)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 64, 3, generator=g).to(DEVICE)
    x = base.transpose(1, 2)  # [2, 3, 64], last dim strided
    assert not x.is_contiguous()
    y = nm_linear(x, c)
    assert y.shape == (2, 3, 24)
    _check(y, _reference(x.reshape(-1, 64), c, None).view(2, 3, 24), torch.float32)
    # a column slice: row stride != K
    wide = torch.randn(4, 128, generator=g).to(DEVICE)
    _check(nm_linear(wide[:, ::2], c), _reference(wide[:, ::2], c, None), torch.float32)


@needs_kernel
def test_in_out_weight_compressed_along_axis_0():
    # GPT-2 Conv1D stores [in, out]; y = x @ W, same kernel, no transpose.
    c = _weight(40, 64, "2:4", torch.float32, seed=6, axis=0)
    assert c.shape == (64, 40) and c.axis == 0
    x, b = _inputs(3, 64, 40, torch.float32, seed=6, bias=True)
    y = nm_linear(x, c, b)
    torch.testing.assert_close(y.double(), x.double() @ c.to_dense().double() + b.double(), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_empty_input():
    c = _weight(24, 64, "2:4", torch.float32, seed=7)
    y = nm_linear(torch.randn(0, 64, device=DEVICE), c)
    assert y.shape == (0, 24)


@needs_kernel
def test_backend_object_matches_launcher():
    c = _weight(24, 64, "2:4", torch.float16, seed=8)
    x, b = _inputs(3, 64, 24, torch.float16, seed=8, bias=True)
    be = TritonBackend()
    assert be.device_reason(torch.device(DEVICE)) is None
    assert be.layer_reason(c, torch.float16) is None
    assert "float32" in be.layer_reason(c, torch.float32)
    assert "not one of" in be.layer_reason(c, torch.float64)
    _check(be.run(x, be.prepare(c), b), _reference(x, c, b), torch.float16)


# ------------------------------------------------------------------ errors


def test_wrong_k_names_the_shapes():
    c = _weight(24, 64, "2:4", torch.float32, seed=9)
    with pytest.raises(ShapeError, match=r"x has shape \(3, 32\).*K=64.*\[\.\.\., 64\]"):
        nm_linear(torch.randn(3, 32, device=DEVICE), c)


def test_dtype_mismatch_and_unsupported_dtype():
    c = _weight(24, 64, "2:4", torch.float16, seed=10)
    with pytest.raises(UnsupportedError, match=r"x is torch.float32 but the compressed weight values are torch.float16"):
        nm_linear(torch.randn(2, 64, device=DEVICE), c)
    c64 = _weight(24, 64, "2:4", torch.float64, seed=10)
    with pytest.raises(UnsupportedError, match=r"torch.float64 is not supported"):
        nm_linear(torch.randn(2, 64, dtype=torch.float64, device=DEVICE), c64)


def test_bias_errors():
    c = _weight(24, 64, "2:4", torch.float32, seed=11)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ShapeError, match=r"bias has shape \(23,\), expected \(24,\)"):
        nm_linear(x, c, torch.randn(23, device=DEVICE))
    with pytest.raises(UnsupportedError, match="cast the bias"):
        nm_linear(x, c, torch.randn(24, device=DEVICE).half())


def test_weight_must_be_compressed_2d():
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(UnsupportedError, match="CompressedNM"):
        nm_linear(x, torch.randn(24, 64, device=DEVICE))
    w = torch.randn(8, 64, 3, 3)
    conv = compress(w * nm_mask(w, "2:4"), "2:4")
    with pytest.raises(ShapeError, match="2-D compressed weight"):
        nm_linear(x, conv)


def test_config_validation():
    c = _weight(24, 64, "2:4", torch.float32, seed=12)
    x = torch.randn(SMALL_M + 1, 64, device=DEVICE)
    with pytest.raises(UnsupportedError, match="missing SPLIT_K"):
        nm_linear(x, c, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1})
    with pytest.raises(UnsupportedError, match="only used on the small-M path"):
        nm_linear(x, c, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, "SPLIT_K": 2})
    with pytest.raises(UnsupportedError, match="BLOCK_N=24 must be a power of two"):
        nm_linear(x, c, config={"BLOCK_M": 16, "BLOCK_N": 24, "BLOCK_K": 16, "GROUP_M": 1, "SPLIT_K": 1})


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    c = _weight(24, 64, "2:4", torch.float32, seed=13)
    with pytest.raises(BackendUnavailableError, match=r"pip install nmgraph\[triton\]"):
        nm_linear(torch.randn(2, 64, device=DEVICE), c)
    assert "pip install nmgraph[triton]" in TritonBackend().device_reason(torch.device(DEVICE))


@pytest.mark.skipif(CUDA, reason="checks the message on a CPU without the interpreter")
def test_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = _weight(24, 64, "2:4", torch.float32, seed=14)
    with pytest.raises(BackendUnavailableError, match=r"need a CUDA device.*TRITON_INTERPRET=1"):
        nm_linear(torch.randn(2, 64), c)


def test_device_mismatch():
    c = _weight(24, 64, "2:4", torch.float32, seed=15)
    moved = CompressedNM(c.values.to("meta"), c.indices, c.shape, c.n, c.m, c.axis)
    with pytest.raises(UnsupportedError, match="different devices"):
        nm_linear(torch.randn(2, 64, device=DEVICE), moved)


# ------------------------------------------------------------------ configs


def test_config_sets_follow_the_two_paths():
    small, large = triton_nm.small_m_configs(), triton_nm.large_m_configs()
    assert {c["BLOCK_M"] for c in small} == {16}
    assert {c["SPLIT_K"] for c in small} == {1, 4, 8, 16}
    assert {c["SPLIT_K"] for c in large} == {1}
    assert min(c["BLOCK_M"] for c in large) > SMALL_M // 2
    for cfg in small + large:
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0


def test_prune_drops_splits_without_a_full_k_step():
    triton = pytest.importorskip("triton")
    configs = [triton.Config({"BLOCK_K": 64, "SPLIT_K": s}) for s in (1, 4, 16)]
    # K=256 with 2:4 is 64 groups; a 64-wide K step holds 16 groups -> at most 4 splits.
    kept = triton_nm._prune_configs(configs, {"K": 256}, NM_M=4)
    assert [c.kwargs["SPLIT_K"] for c in kept] == [1, 4]


@pytest.mark.gpu
def test_autotuned_paths_on_gpu():
    for m_rows, (n_out, k) in ((1, (256, 512)), (16, (384, 256)), (300, (256, 512))):
        for dtype in (torch.float16, torch.bfloat16):
            c = _weight(n_out, k, "2:4", dtype, seed=m_rows)
            x, b = _inputs(m_rows, k, n_out, dtype, seed=m_rows, bias=True)
            _check(nm_linear(x, c, b), _reference(x, c, b), dtype)
