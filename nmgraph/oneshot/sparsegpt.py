"""SparseGPT for N:M patterns (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot", ICML 2023, arXiv:2301.00774).

For one layer ``Y = X W^T`` with calibration inputs ``X [tokens, K]``, SparseGPT looks for a pruned
``W'`` that keeps ``||X W^T - X W'^T||^2`` small. Its Hessian is ``H = X^T X`` (the paper's ``2 X X^T``
up to a factor that changes nothing below). Pruning weight ``(r, q)`` and compensating with the
remaining weights of row ``r`` is the Optimal Brain Surgeon step: the update is
``delta = -(w_rq / [H^-1]_qq) * H^-1[q, :]`` and its cost ``w_rq^2 / [H^-1]_qq``. SparseGPT makes this
tractable for every row at once by visiting the columns left to right: after column ``q`` is done it
is never changed again, so the inverse Hessian that matters for column ``q`` is the one of the
columns ``q..K-1``; row ``q`` of the upper Cholesky factor ``U`` of ``H^-1`` (``U^T U = H^-1``) holds
it scaled: ``U[q, q:] = (H_{q:,q:})^-1[0, :] / sqrt((H_{q:,q:})^-1[0, 0])``. So pruning column ``q``
updates the columns right of it by ``-(w_q - w'_q) / U_qq * U[q, q:]``.

What this module implements, following the paper and its reference code:

* dead inputs (``H_jj == 0``: the feature never fires on the calibration set) get ``H_jj = 1`` and
  their weights are set to 0, as in the paper's code;
* dampening: ``lambda = percdamp * mean(diag H)`` (default 1 %) added to the diagonal;
* ``H^-1`` by Cholesky, then its upper Cholesky factor, in float32, retried in float64 and then with
  ten times the dampening (up to three times) when a factorisation fails;
* columns in blocks of ``blocksize`` (default 128, rounded down to a multiple of ``m``) with *lazy
  batch* updates: inside a block every column's error updates only the block, and the rest of the
  matrix gets one ``Err @ U[block, rest]`` product per block; the same trick one level down inside a
  block (a group of ``m`` columns updates its own columns one by one and the rest of the block with
  one product), which gives the same result as updating every column right away;
* the N:M mask of each group of ``m`` columns is chosen when the group's first column is reached,
  from the current (already updated) weights, by the OBS saliency ``w^2 / U_jj^2``: the ``n`` largest
  are kept (ties keep the higher index, :func:`nmgraph.nm_mask`'s rule); exactly N:M at the end.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from nmgraph.errors import ShapeError, VerificationError
from nmgraph.pattern import Pattern, is_nm

__all__ = ["SparseGPTResult", "hessian_inverse_diag", "inverse_cholesky", "obs_saliency", "obs_update",
           "sparsegpt_prune"]

log = logging.getLogger(__name__)

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01
DAMP_RETRIES = 3  # each retry multiplies the dampening by 10


@dataclass(frozen=True)
class SparseGPTResult:
    """The pruned weight (float32 ``[rows, K]``), its kept mask and how the inverse was obtained.

    ``dead``: inputs that never fired (their weights were zeroed); ``damp``: the absolute dampening
    added to ``diag H``; ``precision``: the dtype the Cholesky factors were computed in; ``obs_loss``:
    the sum over pruned weights of the OBS costs ``(w - w')^2 / U_jj^2`` as they were pruned (the
    paper's error estimate, ``||X W^T - X W'^T||^2`` up to the factor of ``H``); ``inv_diag``:
    ``diag((H + damp I)^-1)`` (0 at dead inputs), the ``[H^-1]_jj`` of the order-free OBS saliency;
    ``retried``: the factorisation needed float64 or more dampening than asked; ``sq_error``:
    ``||X W^T - X W'^T||^2`` exactly, from ``obs_loss`` (see the code).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    dead: int
    damp: float
    precision: torch.dtype
    obs_loss: float
    inv_diag: torch.Tensor
    retried: bool = False
    sq_error: float = 0.0


def _damped(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ShapeError(f"SparseGPT needs a square Hessian [K, K], got {tuple(hessian.shape)}.")
    if not percdamp >= 0:
        raise ShapeError(f"percdamp must be >= 0, got {percdamp!r}.")
    h = hessian.detach().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    damp = float(percdamp) * float(diag.mean())
    return h, dead, damp


def inverse_cholesky(
    hessian: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP, *, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.dtype, bool]:
    """``(U, dead, damp, precision, retried)``: ``U`` the upper Cholesky factor of ``(H + damp I)^-1``.

    Dead inputs (``H_jj == 0``) get ``H_jj = 1``. Factorisations that fail in ``dtype`` are retried in
    float64, then with ten times the dampening (``DAMP_RETRIES`` times); a Hessian that still fails
    raises :class:`VerificationError` (it holds NaN or inf).
    """
    h, dead, damp = _damped(hessian, percdamp)
    if not bool(torch.isfinite(h).all()):
        raise VerificationError("the layer's Hessian X^T X holds NaN or inf: its calibration inputs are not "
                                "finite. Check the calibration data and the model's activations.")
    attempts = _attempts(h, damp, dtype)
    for precision, d in attempts:
        a = h.to(precision)
        a.diagonal().add_(d)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            continue
        inv = torch.cholesky_inverse(chol)
        u, info = torch.linalg.cholesky_ex(inv, upper=True)
        if int(info) != 0 or not bool(torch.isfinite(u).all()):
            continue
        retried = (precision, d) != attempts[0]
        if retried:
            log.info("SparseGPT: Cholesky succeeded in %s with dampening %.3g (asked %s, %.3g)", precision, d,
                     dtype, damp)
        return u, dead, d, precision, retried
    raise VerificationError(
        f"the layer's Hessian ({tuple(h.shape)}) is not positive definite even in float64 with dampening "
        f"{attempts[-1][1]:.3g}; pass a larger percdamp or more calibration samples.")


def _attempts(h: torch.Tensor, damp: float, dtype: torch.dtype) -> list[tuple[torch.dtype, float]]:
    """(precision, dampening) to try in order: as asked, float64, then ten times more each time."""
    base = damp if damp > 0 else 1e-8 * float(h.diagonal().abs().mean() + 1)
    attempts = [(dtype, damp)]
    if dtype != torch.float64:
        attempts.append((torch.float64, damp))
    return attempts + [(torch.float64, base * 10 ** (i + 1)) for i in range(DAMP_RETRIES)]


def hessian_inverse_diag(hessian: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> torch.Tensor:
    """``diag((H + damp I)^-1)`` in float32, 0 at dead inputs (their weights are zeroed anyway).

    This is the ``[H^-1]_jj`` of the OBS saliency ``w^2 / [H^-1]_jj^2`` that scores a permutation for
    SparseGPT: unlike ``U_jj`` it does not depend on the column order.
    """
    h, dead, damp = _damped(hessian, percdamp)
    if not bool(torch.isfinite(h).all()):
        raise VerificationError("the layer's Hessian X^T X holds NaN or inf: its calibration inputs are not "
                                "finite. Check the calibration data and the model's activations.")
    for precision, d in _attempts(h, damp, torch.float32):
        a = h.to(precision)
        a.diagonal().add_(d)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol).diagonal().float()
            if bool(torch.isfinite(inv).all()):
                inv[dead] = 0
                return inv
    raise VerificationError(f"the layer's Hessian ({tuple(h.shape)}) is not positive definite even in float64 "
                            "with added dampening; pass a larger percdamp or more calibration samples.")


def _inv_diag(u: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    d = u.pow(2).sum(0).float()  # diag(U^T U) = diag(H^-1)
    d[dead] = 0
    return d


def obs_saliency(weight: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
    """``w^2 / d^2`` for ``W [..., K]`` and ``d [K]`` (0 where ``d == 0``: dead inputs cost nothing)."""
    d2 = inv_diag.float().pow(2)
    safe = torch.where(d2 > 0, d2, torch.ones_like(d2))
    return torch.where(d2 > 0, weight.detach().float().pow(2) / safe, torch.zeros((), dtype=torch.float32))


def obs_update(weight: torch.Tensor, u: torch.Tensor, col: int, new_value: torch.Tensor) -> torch.Tensor:
    """One OBS step: column ``col`` of ``W [rows, K]`` set to ``new_value``; columns right of it compensate.

    ``u`` is the upper Cholesky factor of ``H^-1`` restricted to the columns not yet fixed; returns the
    updated weight (a new tensor). With ``u`` from the full ``H^-1`` and ``col == 0`` this is the closed
    form ``W[:, j] -= (w - w') * [H^-1]_{0j} / [H^-1]_{00}``.
    """
    w = weight.clone()
    err = (w[:, col] - new_value) / u[col, col]
    w[:, col:] -= err.unsqueeze(1) * u[col, col:].unsqueeze(0)
    w[:, col] = new_value
    return w


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """One intra-op CPU thread for the column sweep: thousands of small ops, for which waking a second
    thread costs more than it saves (measured 4x faster on the shared 2-core machine); the per-block
    update, one large matmul, runs with torch's setting."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    dtype: torch.dtype = torch.float32,
) -> SparseGPTResult:
    """Prunes ``W [rows, K]`` to N:M along ``K`` with SparseGPT's reconstruction (module docstring).

    ``hessian`` is ``X^T X`` of the layer's calibration inputs ``X [tokens, K]`` (any positive scale).
    ``dtype`` is the precision of the column sweep (float32 by default; float64 for references).
    The result's weight is exactly N:M (checked).
    """
    p = Pattern.parse(pattern)
    if weight.dim() != 2:
        raise ShapeError(f"sparsegpt_prune needs a 2-D weight [rows, K], got {tuple(weight.shape)}.")
    rows, k = weight.shape
    if hessian.shape != (k, k):
        raise ShapeError(f"Hessian of shape {tuple(hessian.shape)} does not match the weight's K={k}.")
    if k % p.m:
        raise ShapeError(f"K={k} is not divisible by M={p.m} for pattern {p}.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ShapeError(f"blocksize must be a positive int, got {blocksize!r}.")
    bs = max(p.m, blocksize // p.m * p.m)
    u, dead, damp, precision, retried = inverse_cholesky(hessian, percdamp, dtype=dtype)
    u = u.to(dtype)
    w = weight.detach().to(dtype).clone()
    w[:, dead] = 0
    keep = torch.zeros(rows, k, dtype=torch.bool, device=w.device)
    obs_loss = torch.zeros((), dtype=torch.float64, device=w.device)
    n_prune = p.m - p.n
    start = w.clone()  # W0, for the exact error below
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        d1_sq = d1.pow(2).unsqueeze(0)
        err1 = torch.zeros_like(w1)
        keep1 = torch.zeros_like(w1, dtype=torch.bool)
        with _one_thread(w.device):
            for g1 in range(0, i2 - i1, p.m):  # one group of m columns at a time
                g2 = g1 + p.m
                sal = w1[:, g1:g2].pow(2) / d1_sq[:, g1:g2]
                order = torch.argsort(sal, dim=1, stable=True)  # ascending; ties: higher index kept
                keep1[:, g1:g2].scatter_(1, order[:, n_prune:], True)
                for i in range(g1, g2):
                    kept = keep1[:, i]
                    e = w1[:, i].masked_fill(kept, 0).div_(d1[i])  # (w - w') / U_ii: w' = w if kept, else 0
                    w1[:, i:g2].addr_(e, u1[i, i:g2], alpha=-1)  # OBS update of the group's columns
                    w1[:, i].masked_fill_(~kept, 0)
                    err1[:, i] = e
                if g2 < i2 - i1:  # the same updates for the rest of the block, as one product
                    w1[:, g2:].addmm_(err1[:, g1:g2], u1[g1:g2, g2:], alpha=-1)
        obs_loss += err1.double().pow(2).sum()
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        if i2 < k:
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)  # lazy batch update of the rest
    w = w * keep  # exact zeros (the sweep wrote them already; this guards against -0.0 and rounding)
    w0_sq = float(start.sub_(w).pow_(2).sum(dtype=torch.float64))  # ||W0 - W'||^2
    if not is_nm(w, p, axis=1):
        raise VerificationError(f"SparseGPT produced a weight that is not {p}; this is a bug, please report it.")
    # Sequential OBS makes the summed costs exactly tr(D H_damped D^T) with D = W0 - W' (W0: dead
    # columns zeroed, which H does not see); removing the dampening gives the true ||X W0^T - X W'^T||^2.
    sq_error = max(float(obs_loss) - damp * w0_sq, 0.0)
    return SparseGPTResult(w.float() if dtype != torch.float64 else w, keep, int(dead.sum()), damp, precision,
                           float(obs_loss), _inv_diag(u, dead), retried, sq_error)
