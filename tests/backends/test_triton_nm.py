"""The Triton backend and its graph op: one kernel per call chosen from the rows of x (GEMV, tensor-core
kernel, dense outside the kernels' rows), results against float64, no host sync on the call path,
the op's fake and backward.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (``make test`` sets it before triton is
imported), so shapes stay small; the kernels themselves are tested in ``tests/backends/kernels/``.
"""

import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nmgraph import compress, nm_mask
from nmgraph.backends.kernels import _common as kernels_common
from nmgraph.backends.kernels.repack import PackedNM
from nmgraph.errors import BackendUnavailableError, ShapeError, UnsupportedError

pytest.importorskip("triton")

from nmgraph.backends import triton_nm
from nmgraph.backends.triton_nm import TritonBackend, TritonWeight, kernel_path

# the launcher modules (the package re-exports their functions under the same names)
gemv_module = importlib.import_module("nmgraph.backends.kernels.nm_gemv")
mma_module = importlib.import_module("nmgraph.backends.kernels.nm_mma")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="no CUDA device: run with TRITON_INTERPRET=1 (as `make test` does)"
)
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2**-7, 4e-3)}
OP = torch.ops.nmgraph.nm_linear_triton


def _layer(n_out, k, pattern, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    w = (w * nm_mask(w, pattern)).to(dtype).to(DEVICE)
    b = torch.randn(n_out, generator=g).to(dtype).to(DEVICE)
    return w, compress(w, pattern), b


def _x(rows, k, dtype, seed):
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _check(y, x, w, b):
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


@pytest.fixture
def launches(monkeypatch):
    """Records which launcher each call of the backend reaches (the launchers still run)."""
    seen = []
    for name, module in (("gemv", gemv_module), ("mma", mma_module)):
        real = getattr(module, f"nm_{name}")

        def spy(*args, real=real, name=name, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(triton_nm, f"nm_{name}", spy)
    return seen


@needs_kernel
def test_rows_choose_the_kernel_and_every_path_matches_float64(launches):
    w, c, b = _layer(70, 128, "2:4", torch.float16, seed=1)
    be = TritonBackend()
    prepared = be.prepare(c)
    assert isinstance(prepared, TritonWeight) and prepared.semaphores is not None
    for rows, path in ((1, "gemv"), (2, "gemv"), (5, "mma"), (65, "dense")):
        launches.clear()
        x = _x(rows, 128, torch.float16, seed=rows)
        _check(be.run(x, prepared, b), x, w, b)
        assert launches == ([] if path == "dense" else [path]), rows
        assert not prepared.semaphores.any()  # split-K left them zero


@needs_kernel
def test_generic_pattern_runs_the_gemv_then_the_dense_weight(launches):
    w, c, b = _layer(24, 64, "2:8", torch.float32, seed=2)
    packed = TritonBackend().prepare(c).packed
    assert TritonBackend().prepare(c).semaphores is None  # no tensor-core path: no semaphores
    x2, x3 = _x(2, 64, torch.float32, 3), _x(3, 64, torch.float32, 4)
    _check(triton_nm.triton_linear(x2, packed, b), x2, w, b)
    assert launches == ["gemv"]
    _check(triton_nm.triton_linear(x3, packed, b), x3, w, b)  # decompressed for this call
    dense = torch.full_like(w, 0.5)  # a given dense weight is what runs outside the kernels' rows
    torch.testing.assert_close(triton_nm.triton_linear(x3, packed, b, dense=dense), F.linear(x3, dense, b))
    assert launches == ["gemv"]


def test_row_ranges_and_reasons():
    _, c24, _ = _layer(64, 64, "2:4", torch.float16, seed=5)
    _, c28, _ = _layer(64, 64, "2:8", torch.float16, seed=5)
    be = TritonBackend()
    assert [be.rows_reason(c24, torch.float16, r) for r in (1, 2, 4, 64)] == [None] * 4
    assert "prefill size" in be.rows_reason(c24, torch.float16, 128)
    assert be.rows_reason(c28, torch.float16, 2) is None
    assert "no fast expansion for 2:8 float16" in be.rows_reason(c28, torch.float16, 4)
    assert "no fast expansion for 2:4 float32" in be.rows_reason(c24.to(dtype=torch.float32), torch.float32, 4)
    assert [kernel_path(r, 1, 4, torch.bfloat16) for r in (1, 3, 64, 65)] == ["gemv", "mma", "mma", "dense"]
    assert be.layer_reason(c24, torch.float16) is None
    assert "float32" in be.layer_reason(c24, torch.float32)
    assert "not one of" in be.layer_reason(c24, torch.float64)


def test_lower_gives_the_op_its_buffers():
    _, c, _ = _layer(64, 128, "1:4", torch.bfloat16, seed=6)
    be = TritonBackend()
    prepared = be.prepare(c)
    call = be.lower(c, prepared)
    assert call.op is OP.default
    assert [s for s, _ in call.buffers] == ["nm_values", "nm_words", "nm_semaphores", "nm_dense"]
    assert call.buffers[0][1] is prepared.packed.values and call.buffers[2][1] is prepared.semaphores
    assert call.buffers[3][1] is None and call.dense_slot == 3
    assert call.args == (1, 4, 64, 128)


class _FakeKernel:
    """Stands in for a jitted kernel: records launches, runs nothing."""

    def __init__(self, launched):
        self.launched = launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(grid)

        return launch


def test_the_op_does_no_host_sync_and_launches_one_kernel_per_call(monkeypatch):
    # What a CUDA graph needs from the call path: no device-to-host read, no synchronisation, no
    # fill kernel, and exactly one launch. Checked on the host code by making every such call raise
    # and replacing the kernels with a recorder.
    launched = []
    import triton

    fake = SimpleNamespace(kernel=_FakeKernel(launched), cdiv=triton.cdiv)
    monkeypatch.setattr(gemv_module, "_kernels", lambda interpret: fake)
    monkeypatch.setattr(mma_module, "_kernels", lambda interpret: fake)
    monkeypatch.setattr(kernels_common, "unavailable_reason", lambda device: None)  # no device needed
    w, c, b = _layer(128, 256, "2:4", torch.float16, seed=7)
    prepared = TritonBackend().prepare(c)
    packed = prepared.packed

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} on the call path")

        return fail

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero", "zero_",
                 "fill_"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    for name in ("zeros", "ones", "full", "zeros_like", "tensor"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden("torch.cuda.synchronize"))
    for rows in (1, 2, 3, 16, 64):
        launched.clear()
        x = torch.empty(rows, 256, dtype=torch.float16)
        y = OP(x, packed.values, packed.words, prepared.semaphores, None, b, 2, 4, 128, 256)
        assert y.shape == (rows, 128) and len(launched) == 1, rows
    launched.clear()
    OP(torch.empty(100, 256, dtype=torch.float16), packed.values, packed.words, prepared.semaphores, w, b,
       2, 4, 128, 256)
    assert launched == []  # outside the kernels' rows: F.linear with the dense weight, no Triton kernel


def test_op_fake_shapes_backward_and_errors():
    w, c, _ = _layer(64, 64, "2:4", torch.float16, seed=8)
    prepared = TritonBackend().prepare(c)
    p = prepared.packed
    with torch._subclasses.FakeTensorMode() as mode:
        fx_ = mode.from_tensor(torch.randn(2, 5, 64, dtype=torch.float16))
        out = OP(fx_, mode.from_tensor(p.values), mode.from_tensor(p.words), None, None, None, 2, 4, 64, 64)
        assert out.shape == (2, 5, 64) and out.dtype == torch.float16
    with pytest.raises(ShapeError, match=r"x must be \[\.\.\., 64\]"):
        OP(torch.randn(3, 32, dtype=torch.float16), p.values, p.words, None, None, None, 2, 4, 64, 64)
    with pytest.raises(UnsupportedError, match=r"dense weight has shape \(64, 32\)"):
        OP(torch.randn(3, 64, dtype=torch.float16), p.values, p.words, None, w[:, :32], None, 2, 4, 64, 64)
    # backward: the frozen weight is rebuilt from the packed tensors (or the dense slot)
    x = torch.randn(70, 64, dtype=torch.float32, requires_grad=True)
    w32, c32, b32 = _layer(64, 64, "2:4", torch.float32, seed=9)
    p32 = TritonBackend().prepare(c32).packed
    bias = b32.clone().requires_grad_(True)
    OP(x, p32.values, p32.words, None, None, bias, 2, 4, 64, 64).square().sum().backward()
    x_ref, b_ref = x.detach().clone().requires_grad_(True), b32.clone().requires_grad_(True)
    F.linear(x_ref, w32, b_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b_ref.grad, rtol=1e-4, atol=1e-4)


def test_packed_linear_dense_is_exact():
    for pattern, axis in (("2:4", 1), ("3:8", 0), ("1:3", 1)):
        g = torch.Generator().manual_seed(len(pattern))
        w = torch.randn(12, 48, generator=g) if axis else torch.randn(48, 12, generator=g)
        w = w * nm_mask(w, pattern, axis=axis)
        p = TritonBackend().prepare(compress(w, pattern, axis=axis)).packed
        assert isinstance(p, PackedNM) and torch.equal(p.to_dense(), w)
        assert torch.equal(p.linear_dense(), w if axis else w.t())


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert "pip install nmgraph[triton]" in TritonBackend().device_reason(torch.device(DEVICE))
    _, c, _ = _layer(64, 64, "2:4", torch.float16, seed=10)
    p = TritonBackend().prepare(c).packed
    with pytest.raises(BackendUnavailableError, match=r"pip install nmgraph\[triton\]"):
        triton_nm.triton_linear(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), p)


@pytest.mark.skipif(CUDA, reason="checks the message on a CPU without the interpreter")
def test_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in TritonBackend().device_reason(torch.device("cpu"))


@pytest.mark.gpu
def test_paths_on_gpu():
    for dtype in (torch.float16, torch.bfloat16):
        w, c, b = _layer(4096, 4096, "2:4", dtype, seed=11)
        prepared = TritonBackend().prepare(c)
        for rows in (1, 2, 16, 64, 300):
            x = _x(rows, 4096, dtype, seed=rows)
            _check(TritonBackend().run(x, prepared, b), x, w, b)
