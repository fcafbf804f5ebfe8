import pytest
import torch

import nmgraph
from nmgraph import ShapeError
from nmgraph.masking import MASK_OP, MaskState, nm_mask_fast
from nmgraph.pattern import Pattern

LAM = 2e-4


def _setup(seed=0, shape=(6, 16), pattern="2:4"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    e = nmgraph.nm_mask(w, pattern)
    x = torch.randn(5, shape[1], generator=g, dtype=torch.float64)
    r = torch.randn(5, shape[0], generator=g, dtype=torch.float64)
    return w, e, x, r


def _grad(w, args, x, r):
    """dL/dW through the op for L = sum((x @ W~^T) * r); returns (W~, dL/dW)."""
    w = w.clone().requires_grad_(True)
    wt = MASK_OP(w, *args)
    ((x @ wt.t()) * r).sum().backward()
    return wt.detach(), w.grad


# dL/dW~ for L = sum((x @ W~^T) * r) is r^T x, whatever W~ is.
def _upstream(x, r):
    return r.t() @ x


def test_ste_forward_masks_and_backward_is_dense():
    w, e, x, r = _setup()
    wt, gw = _grad(w, (e, e, None, None, 0.0, False), x, r)
    assert torch.equal(wt, w * e)
    torch.testing.assert_close(gw, _upstream(x, r), rtol=0, atol=1e-12)


def test_srste_backward_adds_decay_on_pruned_weights_only():
    w, e, x, r = _setup(1)
    _, gw = _grad(w, (e, e, None, None, LAM, False), x, r)
    hand = _upstream(x, r) + LAM * (~e).double() * w
    torch.testing.assert_close(gw, hand, rtol=0, atol=1e-12)
    # on kept weights the gradient is exactly the STE one
    torch.testing.assert_close(gw[e], _upstream(x, r)[e], rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.37, 0.0])
def test_mdgf_soft_forward_and_pass_through_backward(beta):
    w, e, x, r = _setup(2)
    b = torch.tensor(beta, dtype=torch.float64)
    wt, gw = _grad(w, (e, e, b, None, 0.0, False), x, r)
    torch.testing.assert_close(wt, w * (e.double() + beta * (~e).double()), rtol=0, atol=0)
    torch.testing.assert_close(gw, _upstream(x, r), rtol=0, atol=1e-12)


def test_topkast_gradient_only_in_backward_set_with_exploration_penalty():
    w, e, x, r = _setup(3)
    eb = nmgraph.nm_mask(w, "3:4")
    assert bool((eb | ~e).all())  # forward set inside backward set
    lam = 8e-4
    wt, gw = _grad(w, (e, e, None, eb, lam, False), x, r)
    assert torch.equal(wt, w * e)
    hand = eb * _upstream(x, r) + lam * (eb & ~e).double() * w
    torch.testing.assert_close(gw, hand, rtol=0, atol=1e-12)
    assert torch.count_nonzero(gw[~eb]) == 0


def test_fixed_mask_gradient_is_masked():
    w, e, x, r = _setup(4)
    _, gw = _grad(w, (e, e, None, e, 0.0, False), x, r)
    torch.testing.assert_close(gw, e * _upstream(x, r), rtol=0, atol=1e-12)


def test_hard_mode_uses_hard_mask_and_true_gradient():
    w, e, x, r = _setup(5)
    soft_mask = torch.ones_like(e)  # e.g. dense warm-up or an SDGF stage mask
    b = torch.tensor(0.5, dtype=torch.float64)
    wt, gw = _grad(w, (soft_mask, e, b, None, LAM, True), x, r)
    assert torch.equal(wt, w * e)
    torch.testing.assert_close(gw, e * _upstream(x, r), rtol=0, atol=1e-12)


def test_gradient_matches_finite_differences_in_hard_mode():
    w, e, x, r = _setup(6, shape=(3, 8))
    args = (e, e, None, None, 0.0, True)
    assert torch.autograd.gradcheck(lambda t: ((x @ MASK_OP(t, *args).t()) * r).sum(),
                                    (w.clone().requires_grad_(True),))


def test_opcheck_fake_and_autograd_registration():
    w, e, _, _ = _setup(7)
    w = w.float().requires_grad_(True)
    eb = nmgraph.nm_mask(w, "3:4")
    for args in [
        (e, e, None, None, 0.0, False),
        (e, e, torch.tensor(0.3), None, 0.0, False),
        (e, e, None, eb, 1e-3, False),
        (torch.ones_like(e), e, None, None, 0.0, True),
    ]:
        torch.library.opcheck(MASK_OP, (w, *args))


def test_bad_mask_raises_shape_error_with_fix():
    w = torch.randn(4, 8)
    with pytest.raises(ShapeError, match=r"mask must be a bool tensor of the weight's shape \(4, 8\)"):
        MASK_OP(w, torch.ones(4, 8), torch.ones(4, 8, dtype=torch.bool), None, None, 0.0, False)
    with pytest.raises(ShapeError, match="beta must be a 0-dim"):
        e = torch.ones(4, 8, dtype=torch.bool)
        MASK_OP(w, e, e, torch.ones(2), None, 0.0, False)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8", "1:8", "1:16", "5:16", "1:32", "5:64"])
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_mask_fast_equals_nm_mask(pattern, axis):
    # M <= 16 ranks by pairwise comparison, larger M by topk on integer keys
    g = torch.Generator().manual_seed(sum(map(ord, pattern)) + axis)
    shape = (16, 128) if axis == 1 else (128, 16)
    w = torch.randn(shape, generator=g)
    assert torch.equal(nm_mask_fast(w, pattern, axis=axis), nmgraph.nm_mask(w, pattern, axis=axis))
    ties = torch.randint(-2, 3, shape, generator=g).float()  # many equal magnitudes
    assert torch.equal(nm_mask_fast(ties, pattern, axis=axis), nmgraph.nm_mask(ties, pattern, axis=axis))
    score = torch.randn(shape, generator=g)  # signed scores
    score[0, :4] = -0.0
    score[1, :4] = 0.0
    assert torch.equal(nm_mask_fast(w, pattern, score, axis=axis), nmgraph.nm_mask(w, pattern, score, axis=axis))


@pytest.mark.parametrize("pattern", ["2:4", "3:8", "2:32"])
def test_nm_mask_fast_is_exact_nm_with_nan_and_inf(pattern):
    p = Pattern.parse(pattern)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[0, 0] = w[1, 5] = w[2, 1] = float("nan")
    w[3, 2] = float("inf")
    w[4, :p.m] = float("nan")  # a group of only NaN
    keep = nm_mask_fast(w, p)
    assert bool((keep.view(8, -1, p.m).sum(-1) == p.n).all())
    assert not keep[0, 0] and not keep[1, 5] and not keep[2, 1] and keep[3, 2]


def test_nm_mask_fast_conv_bf16_and_float64():
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(8, 16, 3, 3, generator=g)
    assert torch.equal(nm_mask_fast(conv, "2:4"), nmgraph.nm_mask(conv, "2:4"))
    bf = torch.randn(16, 32, generator=g).bfloat16()
    assert torch.equal(nm_mask_fast(bf, "2:4"), nmgraph.nm_mask(bf, "2:4"))
    f64 = torch.randn(16, 32, generator=g, dtype=torch.float64)
    assert torch.equal(nm_mask_fast(f64, "1:8"), nmgraph.nm_mask(f64, "1:8"))
    with pytest.raises(ShapeError, match="score has shape"):
        nm_mask_fast(bf, "2:4", torch.ones(3))


def test_mask_state_buffers_and_errors():
    st = MaskState("lin.weight", (8, 32), 1, Pattern(2, 4), with_grad_mask=True)
    assert {n for n, _ in st.named_buffers()} == {"mask", "hard", "grad_mask", "pattern"}
    assert st.mask.dtype == torch.bool and st.mask.shape == (8, 32) and bool(st.mask.all())
    assert st.current_pattern() is None
    st.pattern.copy_(torch.tensor([2, 4]))
    assert st.current_pattern() == Pattern(2, 4)
    assert st.fits(Pattern(8, 16)) and st.fits(Pattern(16, 32)) and not st.fits(Pattern(32, 64))
    no_g = MaskState("x", (4, 8), -1, Pattern(1, 4), with_grad_mask=False)
    assert no_g.grad_mask is None and no_g.axis == 1 and "grad_mask" not in no_g.state_dict()
    with pytest.raises(ShapeError, match=r"'conv.weight'.*size 6, not divisible by M=4"):
        MaskState("conv.weight", (8, 6, 3, 3), 1, Pattern(2, 4), with_grad_mask=False)
