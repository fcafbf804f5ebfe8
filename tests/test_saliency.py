import pytest
import torch

from nmgraph import PlanError, ShapeError
from nmgraph.masking.saliency import compute_saliency, first_order, magnitude, second_order


def _setup():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(3)]
    return lin, batches


def _loss(m, b):
    return (m(b[0]) * b[1]).sum()


def _hand_grads(lin, batches):
    # L = sum((x W^T) * r)  =>  dL/dW = r^T x
    return [r.t() @ x for x, r in batches]


def test_magnitude():
    lin, _ = _setup()
    s = magnitude(lin, ["weight"])
    assert torch.equal(s["weight"], lin.weight.detach().abs())


def test_first_order_is_mean_abs_w_times_g():
    lin, batches = _setup()
    w = lin.weight.detach()
    hand = torch.stack([(w * g).abs() for g in _hand_grads(lin, batches)]).mean(0)
    got = first_order(lin, ["weight"], batches, _loss)["weight"]
    torch.testing.assert_close(got, hand, rtol=1e-6, atol=1e-7)
    assert lin.weight.grad is None  # .grad untouched


def test_second_order_is_w2_times_diag_fisher():
    lin, batches = _setup()
    w = lin.weight.detach()
    fisher = torch.stack([g.square() for g in _hand_grads(lin, batches)]).mean(0)
    got = second_order(lin, ["weight"], batches, _loss)["weight"]
    torch.testing.assert_close(got, w.square() * fisher, rtol=1e-6, atol=1e-7)
    via = compute_saliency(lin, ["weight"], "second-order", batches=batches, loss_fn=_loss)["weight"]
    assert torch.equal(via, got)


def test_errors():
    lin, batches = _setup()
    with pytest.raises(PlanError, match="has no parameter 'bias'"):
        magnitude(lin, ["bias"])
    with pytest.raises(PlanError, match="needs at least one batch"):
        first_order(lin, ["weight"], [], _loss)
    with pytest.raises(ShapeError, match=r"must return a scalar tensor, got \(5, 4\)"):
        first_order(lin, ["weight"], batches, lambda m, b: m(b[0]))
    with pytest.raises(PlanError, match="Unknown saliency kind 'taylor'"):
        compute_saliency(lin, ["weight"], "taylor")
    with pytest.raises(PlanError, match="needs batches= and loss_fn="):
        compute_saliency(lin, ["weight"], "first-order")
