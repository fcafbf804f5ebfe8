"""The mask op that prepared graphs route every eligible weight through, and its per-layer state.

One custom op, ``torch.ops.nmgraph.masked_weight``, implements every training method (the method
only decides which tensors and constants reach it; see :mod:`nmgraph.schedule`). With ``W`` the
dense latent weight, ``E`` the forward mask (``mask``), ``H`` the target hard N:M mask (``hard``),
``beta`` the soft-mask factor (``None`` = 0), ``G`` the gradient mask (``None`` = all ones) and
``lam`` a penalty weight:

* training forward: ``W~ = W * (E + beta * (1 - E))`` (``W * E`` when ``beta`` is ``None``);
* training backward: ``dL/dW = G * dL/dW~ + lam * (G * (1 - E)) * W``;
* hard mode (evaluation): forward ``W~ = W * H``, backward ``dL/dW = H * dL/dW~``.

STE is ``(E, beta=None, G=None, lam=0)``; SR-STE adds ``lam = lambda_w``; MDGF passes ``beta``;
Top-KAST passes the larger backward set as ``G`` with the exploration penalty as ``lam``; ``fixed``
and the final fine-tune pass ``G = E``. The backward is a straight-through estimator by design:
it is not the true derivative of the forward except in hard mode and where ``G = E`` and ``beta``
is ``None``.

The op is registered with a fake (meta) implementation and an autograd formula, so graphs that
contain it run in eager mode, under ``torch.compile`` and through ``torch.export``. Registering it
when this module is imported is the only import-time work here and is cheap.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from nmgraph.errors import ShapeError
from nmgraph.pattern import MAX_M, Pattern, group_view, nm_mask, ungroup_view

__all__ = ["MASK_OP", "PAIRWISE_MAX_M", "MaskState", "masked_weight", "nm_mask_fast"]

log = logging.getLogger(__name__)


def _check_inputs(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hard: torch.Tensor,
    beta: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
) -> None:
    for name, t in (("mask", mask), ("hard", hard), ("grad_mask", grad_mask)):
        if t is None:
            continue
        if t.dtype != torch.bool or t.shape != weight.shape:
            raise ShapeError(
                f"nmgraph.masked_weight: {name} must be a bool tensor of the weight's shape "
                f"{tuple(weight.shape)}, got {t.dtype} {tuple(t.shape)}. Mask buffers come from "
                "nmgraph.prepare(); reload them from a state_dict of the same prepared model."
            )
    if beta is not None and beta.dim() != 0:
        raise ShapeError(f"nmgraph.masked_weight: beta must be a 0-dim tensor, got shape {tuple(beta.shape)}.")


@torch.library.custom_op("nmgraph::masked_weight", mutates_args=())
def masked_weight(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hard: torch.Tensor,
    beta: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    lam: float,
    hard_mode: bool,
) -> torch.Tensor:
    """The masked weight seen by the consuming op (see the module docstring for the formulas).

    >>> w = torch.tensor([[1.0, -4.0, 3.0, 2.0]])
    >>> e = torch.tensor([[False, True, True, False]])
    >>> masked_weight(w, e, e, None, None, 0.0, False)
    tensor([[ 0., -4.,  3.,  0.]])
    >>> masked_weight(w, e, e, torch.tensor(0.5), None, 0.0, False)
    tensor([[ 0.5000, -4.0000,  3.0000,  1.0000]])
    """
    _check_inputs(weight, mask, hard, beta, grad_mask)
    if hard_mode:
        return weight * hard
    if beta is None:
        return weight * mask
    return torch.where(mask, weight, weight * beta.to(weight.dtype))


@masked_weight.register_fake
def _masked_weight_fake(weight, mask, hard, beta, grad_mask, lam, hard_mode):
    _check_inputs(weight, mask, hard, beta, grad_mask)
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    weight, mask, hard, _beta, grad_mask, lam, hard_mode = inputs
    ctx.lam = float(lam)
    ctx.hard_mode = bool(hard_mode)
    keep_weight = (not hard_mode) and lam != 0.0
    ctx.save_for_backward(weight if keep_weight else None, mask, hard, grad_mask)


def _backward(ctx, grad):
    weight, mask, hard, grad_mask = ctx.saved_tensors
    if ctx.hard_mode:
        gw = grad * hard
    elif grad_mask is None:
        gw = grad if ctx.lam == 0.0 else torch.addcmul(grad, weight, ~mask, value=ctx.lam)
    else:
        gw = grad * grad_mask
        if ctx.lam != 0.0:
            gw.addcmul_(weight, grad_mask & ~mask, value=ctx.lam)
    return gw, None, None, None, None, None, None


masked_weight.register_autograd(_backward, setup_context=_setup_context)

MASK_OP = torch.ops.nmgraph.masked_weight.default
"""The ``OpOverload`` that identifies mask nodes in a graph."""


PAIRWISE_MAX_M = 16
"""Largest ``M`` for which :func:`nm_mask_fast` ranks by pairwise comparisons (``M(M-1)/2`` of them)."""


def _pairwise_keep(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask of ``groups [..., m]``: rank of each entry by pairwise comparison, keep rank < n.

    For ``i < j``, ``j`` outranks ``i`` when ``s_j >= s_i`` (ties go to the higher index), else
    ``i`` outranks ``j``. With no NaN this is a strict total order, so the ranks in a group are
    ``0..m-1`` and exactly ``n`` entries are kept: the same entries as the stable sort of
    :func:`nmgraph.nm_mask`.
    """
    m = groups.shape[-1]
    cols = groups.unbind(-1)
    ranks = [torch.zeros(groups.shape[:-1], dtype=torch.uint8, device=groups.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            ge = cols[j] >= cols[i]
            ranks[i] += ge
            ranks[j] += ~ge
    return torch.stack([r < n for r in ranks], dim=-1)


def _key_keep(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask by ``topk`` on distinct integer keys (float32 bits, order-preserving, + index)."""
    m = groups.shape[-1]
    bits = groups.float().contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    keys = bits * m + torch.arange(m, device=bits.device)
    idx = keys.topk(n, dim=-1, sorted=False).indices
    return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(-1, idx, True)


def nm_mask_fast(
    weight: torch.Tensor,
    pattern: Pattern | str | tuple[int, int],
    score: torch.Tensor | None = None,
    *,
    axis: int = 1,
) -> torch.Tensor:
    """Same mask as :func:`nmgraph.nm_mask` (same tie rule), without a sort: used every training step.

    For ``M <= 16`` entries are ranked by pairwise comparisons inside each group (elementwise ops
    only); for larger ``M`` by ``topk`` on integer keys built from the float32 bits and the in-group
    index. Several times faster than a sort on CPU. Unlike :func:`nmgraph.nm_mask` it does not raise
    on NaN (that check would synchronise a GPU every step): NaN scores rank lowest, so the mask is
    still exactly N:M. float64 scores use :func:`nmgraph.nm_mask`.

    >>> w = torch.tensor([[1.0, -4.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    >>> torch.equal(nm_mask_fast(w, "2:4"), nm_mask(w, "2:4"))
    True
    """
    p = Pattern.parse(pattern)
    s = weight.detach().abs() if score is None else score.detach()
    if score is not None and s.shape != weight.shape:
        raise ShapeError(
            f"score has shape {tuple(s.shape)} but the weight has shape {tuple(weight.shape)}; "
            "pass a score tensor of the weight's shape."
        )
    if s.dtype == torch.float64:
        return nm_mask(weight, p, s, axis=axis)
    s = torch.nan_to_num(s, nan=-math.inf)
    if p.m > PAIRWISE_MAX_M:
        s = s + 0.0  # -0.0 -> +0.0: both zeros become one key, as in nm_mask
    groups = group_view(s, p.m, axis)
    keep = _pairwise_keep(groups, p.n) if p.m <= PAIRWISE_MAX_M else _key_keep(groups, p.n)
    return ungroup_view(keep, weight.shape, axis).contiguous()


class MaskState(nn.Module):
    """Buffers of one masked weight: forward mask, target hard mask, gradient mask, current pattern.

    ``mask`` (bool) is the forward mask ``E`` of the current training phase, ``hard`` (bool) the
    target N:M mask used for evaluation and folded by :func:`nmgraph.convert`, ``grad_mask`` (bool or
    ``None``) the gradient mask ``G``, ``pattern`` (int64 ``[2]``) the N:M pattern that ``mask`` has
    now. ``weight_name``, ``axis`` and ``target`` are plain attributes describing the weight.
    """

    def __init__(
        self,
        weight_name: str,
        shape: tuple[int, ...],
        axis: int,
        target: Pattern,
        *,
        with_grad_mask: bool,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight_name = weight_name
        self.shape = tuple(shape)
        self.axis = axis % len(shape)
        self.target = target
        k = self.shape[self.axis]
        if k % target.m:
            raise ShapeError(
                f"Weight {weight_name!r} of shape {self.shape} has reduction dim {self.axis} of size "
                f"{k}, not divisible by M={target.m}. Exclude it from the plan or pick another pattern."
            )
        self.register_buffer("mask", torch.ones(self.shape, dtype=torch.bool, device=device))
        self.register_buffer("hard", torch.ones(self.shape, dtype=torch.bool, device=device))
        self.register_buffer(
            "grad_mask",
            torch.ones(self.shape, dtype=torch.bool, device=device) if with_grad_mask else None,
        )
        self.register_buffer(
            "pattern", torch.tensor([target.m, target.m], dtype=torch.int64, device=device)
        )

    @property
    def reduction_size(self) -> int:
        return self.shape[self.axis]

    def fits(self, pattern: Pattern) -> bool:
        """Whether groups of ``pattern.m`` tile the reduction axis (groups never straddle rows)."""
        return pattern.m <= MAX_M and self.reduction_size % pattern.m == 0

    def current_pattern(self) -> Pattern | None:
        """The pattern of ``mask`` now (``None`` while it is dense)."""
        n, m = (int(v) for v in self.pattern.tolist())
        return None if n >= m else Pattern(n, m)

    def extra_repr(self) -> str:
        return f"{self.weight_name}, shape={self.shape}, axis={self.axis}, target={self.target}"
