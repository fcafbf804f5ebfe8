"""The mask op that prepared graphs route every eligible weight through, and its per-layer state.

One custom op, ``torch.ops.nmgraph.masked_weight``, implements every training method (the method
only decides which tensors and constants reach it; see :mod:`nmgraph.masking.methods`). With ``W`` the
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

import torch

from nmgraph.errors import ShapeError

__all__ = ["MASK_OP", "masked_weight"]


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
