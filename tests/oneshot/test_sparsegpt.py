"""SparseGPT against direct small-matrix references: the OBS closed form for one column, and the whole
blocked, lazy-update sweep against a naive column-by-column OBS with explicit inverses."""

from __future__ import annotations

import pytest
import torch

import nmgraph
from nmgraph.errors import ShapeError, VerificationError
from nmgraph.oneshot.sparsegpt import inverse_cholesky, obs_update, sparsegpt_prune
from nmgraph.oneshot.wanda import wanda_prune


def _problem(rows=12, k=32, tokens=256, seed=0, dtype=torch.float64):
    """Correlated inputs with uneven feature scales, and a weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=dtype) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g, dtype=dtype))
    x = (torch.randn(tokens, k, generator=g, dtype=dtype) @ mix + 0.3 * torch.randn(tokens, k, generator=g,
                                                                                   dtype=dtype)) * scale
    w = torch.randn(rows, k, generator=g, dtype=dtype)
    return w, x


def _naive(w, h, n, m, percdamp=0.01):
    """Column by column: choose each group's mask by w^2 / [(H_FF)^-1]_00 from the current weights, then
    apply the OBS update with the inverse of H over the columns not yet fixed, computed directly."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    keep = torch.zeros_like(w, dtype=torch.bool)
    for q in range(k):
        if q % m == 0:
            d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(q, q + m)])
            order = torch.argsort(w[:, q : q + m].pow(2) / d, dim=1, stable=True)
            keep[:, q : q + m].scatter_(1, order[:, m - n :], True)
        hinv = torch.linalg.inv(h[q:, q:])
        new = torch.where(keep[:, q], w[:, q], torch.zeros((), dtype=w.dtype))
        w[:, q:] -= ((w[:, q] - new) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        w[:, q] = new
    return w


def test_obs_update_of_one_column_is_the_closed_form():
    w, x = _problem()
    h = x.t() @ x
    u, _, damp, _, _ = inverse_cholesky(h, 0.01, dtype=torch.float64)
    hinv = torch.linalg.inv(h + damp * torch.eye(h.shape[0], dtype=h.dtype))
    got = obs_update(w, u, 0, torch.zeros(w.shape[0], dtype=w.dtype))
    want = w - (w[:, :1] / hinv[0, 0]) * hinv[0].unsqueeze(0)  # delta = -(w_q / [H^-1]_qq) H^-1[q, :]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.all(got[:, 0] == 0)


@pytest.mark.parametrize(("pattern", "blocksize"), [("2:4", 8), ("1:4", 6), ("4:8", 16), ("2:4", 128)])
def test_blocked_lazy_sweep_equals_the_naive_obs_reference(pattern, blocksize):
    w, x = _problem(seed=1)
    h = x.t() @ x
    p = nmgraph.Pattern.parse(pattern)
    got = sparsegpt_prune(w, h, p, blocksize=blocksize, dtype=torch.float64)
    want = _naive(w, h, p.n, p.m)
    torch.testing.assert_close(got.weight, want, rtol=1e-8, atol=1e-8)
    assert nmgraph.is_nm(got.weight, p) and torch.equal(got.weight != 0, got.mask & (want != 0))
    assert got.mask.sum() == w.numel() * p.n // p.m  # exactly n kept per group


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    w, x = _problem(rows=32, k=64, tokens=512, seed=2, dtype=torch.float32)
    h = x.t() @ x

    def err(new):
        return float((x @ (w - new).t()).norm() / (x @ w.t()).norm())

    sgpt = err(sparsegpt_prune(w, h, "2:4").weight)
    wanda = err(wanda_prune(w, x.pow(2).sum(0), "2:4")[0])
    magnitude = err(w * nmgraph.nm_mask(w, "2:4"))
    assert sgpt < 0.9 * wanda and wanda < magnitude, (sgpt, wanda, magnitude)


def test_dead_inputs_are_zeroed_and_the_rest_is_exact_nm():
    w, x = _problem(seed=3, dtype=torch.float32)
    x[:, [1, 5, 6]] = 0
    r = sparsegpt_prune(w, x.t() @ x, "2:4")
    assert r.dead == 3 and torch.all(r.weight[:, [1, 5, 6]] == 0) and torch.isfinite(r.weight).all()
    assert nmgraph.is_nm(r.weight, "2:4") and r.inv_diag[1] == 0


def test_a_singular_hessian_is_retried_with_more_dampening():
    w, x = _problem(k=16, tokens=4, seed=4, dtype=torch.float32)  # rank 4 < 16
    r = sparsegpt_prune(w, x.t() @ x, "2:4", percdamp=0.0)
    assert r.retried and r.damp > 0 and nmgraph.is_nm(r.weight, "2:4") and torch.isfinite(r.weight).all()


def test_bad_inputs_raise_typed_errors():
    w, x = _problem(k=16, dtype=torch.float32)
    h = x.t() @ x
    with pytest.raises(ShapeError, match="does not match the weight's K=16"):
        sparsegpt_prune(w, h[:8, :8], "2:4")
    with pytest.raises(ShapeError, match="not divisible by M=8"):
        sparsegpt_prune(w[:, :12], h[:12, :12], "2:8")
    h[0, 0] = float("nan")
    with pytest.raises(VerificationError, match="not finite"):
        sparsegpt_prune(w, h, "2:4")


def test_reported_squared_error_is_the_exact_output_error():
    w, x = _problem(seed=5)
    x[:, 2] = 0  # a dead input: zeroed in W0, invisible to H
    r = sparsegpt_prune(w, x.t() @ x, "2:4", dtype=torch.float64)
    exact = float((x @ (w - r.weight).t()).pow(2).sum())
    assert r.sq_error == pytest.approx(exact, rel=1e-9)
