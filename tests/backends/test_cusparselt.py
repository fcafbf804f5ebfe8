"""cuSPARSELt/CUTLASS 2:4 backend: applicability rules (CPU) and results (GPU only)."""

import pytest
import torch
import torch.nn.functional as F

from nmgraph import Pattern, compress, is_nm, nm_mask
from nmgraph.backends.cusparselt import (
    MIN_CAPABILITY,
    SEMI_STRUCTURED_LIMITS,
    CuSparseLtBackend,
    fits_2_4,
    from_parts,
    parts,
    resolve_kernel,
)
from nmgraph.errors import BackendUnavailableError, UnsupportedError

PATTERNS = ["1:2", "2:4", "1:4", "3:4", "2:8", "1:8", "4:8", "3:8", "1:16", "2:16", "3:6", "1:3"]


def _weight(n_out, k, pattern, dtype=torch.float16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    return compress((w * nm_mask(w, pattern)).to(dtype).to(device), pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fits_2_4_agrees_with_the_weights(pattern):
    p = Pattern.parse(pattern)
    k = 24 * p.m  # a multiple of 4 and of m
    if fits_2_4(p.n, p.m):
        for seed in range(20):  # random n:m weights are all 2:4
            w = _weight(8, k, p, torch.float32, seed).to_dense()
            assert is_nm(w, "2:4")
    else:
        # a worst case: the n kept entries of each group packed into its first positions
        w = torch.zeros(2, k)
        w.view(2, -1, p.m)[..., : p.n] = 1.0
        assert is_nm(w, p) and not is_nm(w, "2:4")


def test_limits_table_is_consistent():
    for (kernel, dtype), lim in SEMI_STRUCTURED_LIMITS.items():
        assert (lim.kernel, lim.dtype) == (kernel, dtype)
        assert min(lim.weight_rows, lim.weight_cols, lim.input_rows, lim.input_cols) >= 4
    assert {k for k, _ in SEMI_STRUCTURED_LIMITS} == {"cusparselt", "cutlass"}
    assert {d for _, d in SEMI_STRUCTURED_LIMITS} == {torch.float16, torch.bfloat16, torch.int8}


def test_cpu_is_not_a_device_for_it():
    reason = CuSparseLtBackend().device_reason(torch.device("cpu"))
    assert "CUDA devices only (got cpu)" in reason


def test_layer_reasons_cusparselt():
    be = CuSparseLtBackend(kernel="cusparselt")
    assert be.layer_reason(_weight(32, 64, "2:4"), torch.float16) is None
    assert be.layer_reason(_weight(32, 64, "1:8", torch.bfloat16), torch.bfloat16) is None
    assert "not torch.float32" in be.layer_reason(_weight(32, 64, "2:4", torch.float32), torch.float32)
    assert "not 2:4-compatible" in be.layer_reason(_weight(32, 64, "4:8"), torch.float16)
    assert "out_features a multiple of 16" in be.layer_reason(_weight(24, 64, "2:4"), torch.float16)
    assert "this weight is [32, 40]" in be.layer_reason(_weight(32, 40, "2:4"), torch.float16)
    assert "weight values are torch.float16" in be.layer_reason(_weight(32, 64, "2:4"), torch.bfloat16)


def test_layer_reasons_cutlass_use_their_own_row_of_the_table():
    be = CuSparseLtBackend(kernel="cutlass")
    assert be.layer_reason(_weight(32, 64, "2:4"), torch.float16) is None
    lim = SEMI_STRUCTURED_LIMITS[("cutlass", torch.float16)]
    reason = be.layer_reason(_weight(32, 32, "2:4"), torch.float16)
    assert f"in_features a multiple of {lim.weight_cols}" in reason


def test_kernel_names():
    assert resolve_kernel("cutlass") == "cutlass"
    assert resolve_kernel("auto") in ("cusparselt", "cutlass")
    with pytest.raises(UnsupportedError, match="Unknown semi-structured kernel 'bogus'"):
        CuSparseLtBackend(kernel="bogus")


def test_prepare_on_cpu_raises():
    with pytest.raises(BackendUnavailableError, match="CUDA devices only"):
        CuSparseLtBackend().prepare(_weight(32, 64, "2:4"))


def _gpu_ok():
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= MIN_CAPABILITY


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_dense_on_gpu(dtype):
    if not _gpu_ok():
        pytest.skip("needs sparse tensor cores")
    be = CuSparseLtBackend()
    c = _weight(128, 256, "2:4", dtype, device="cuda")
    assert be.unavailable_reason(c, dtype, torch.device("cuda")) is None
    x = torch.randn(2, 5, 256, device="cuda").to(dtype)
    b = torch.randn(128, device="cuda").to(dtype)
    y = be.run(x, be.prepare(c), b)
    ref = F.linear(x.double(), c.to_dense().double(), b.double())
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    # the plain tensors rebuild the same weight (what lowered graphs store as buffers)
    packed, meta = parts(be.prepare(c))
    rebuilt = from_parts(resolve_kernel(), (128, 256), packed, meta)
    torch.testing.assert_close(F.linear(x.reshape(-1, 256), rebuilt, b).view_as(y), y)
