"""Per-weight saliency scores that decide which weights an N:M mask keeps.

* ``magnitude``: ``|w|``.
* ``first-order`` (SNIP-style): ``|w * g|`` averaged over batches, ``mean_b |w * g_b|``.
* ``second-order`` (OBD-style): ``w^2 * F`` with the diagonal empirical Fisher ``F = mean_b g_b^2``.

Gradients come from :func:`torch.autograd.grad`, so ``.grad`` of the parameters is left untouched.
The scores feed :func:`nmgraph.nm_mask` (``score=``), ``nmgraph.prepare(..., method="fixed",
saliency=...)`` and ``nmgraph.convert(..., saliency=...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from nmgraph.errors import PlanError, ShapeError

__all__ = ["KINDS", "compute_saliency", "first_order", "magnitude", "second_order"]

log = logging.getLogger(__name__)

KINDS = ("magnitude", "first-order", "second-order")

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def _tensors(module: torch.nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    own = dict(module.named_parameters(remove_duplicate=False))
    out = []
    for name in names:
        if name not in own:
            raise PlanError(
                f"Saliency: {type(module).__name__} has no parameter {name!r}. Pass the module the names "
                "come from (the captured graph or the model) and parameter names such as plan.layers[i].name."
            )
        out.append(own[name])
    return out


def magnitude(module: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``|w|`` for each named parameter.

    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[-3.0, 2.0]]))
    >>> magnitude(lin, ["weight"])["weight"]
    tensor([[3., 2.]])
    """
    return {n: p.detach().abs() for n, p in zip(names, _tensors(module, names))}


def _grad_stats(
    module: torch.nn.Module, names: Sequence[str], batches: Iterable[Any], loss_fn: LossFn, kind: str
) -> dict[str, torch.Tensor]:
    params = _tensors(module, names)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for batch in batches:
        loss = loss_fn(module, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ShapeError(
                f"Saliency: loss_fn must return a scalar tensor, got "
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}."
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, p, g in zip(acc, params, grads):
            if g is None:
                continue
            if kind == "first-order":
                a.add_((p.detach().float() * g.float()).abs())
            else:
                a.add_(g.float().square())
        count += 1
    if count == 0:
        raise PlanError(f"Saliency {kind!r} needs at least one batch; got an empty iterable.")
    out = {}
    for name, a, p in zip(names, acc, params):
        a.div_(count)
        if kind == "second-order":
            a.mul_(p.detach().float().square())
        out[name] = a
    log.debug("%s saliency over %d batches for %d weights", kind, count, len(names))
    return out


def first_order(
    module: torch.nn.Module, names: Sequence[str], batches: Iterable[Any], loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """``mean_b |w * g_b|``; ``loss_fn(module, batch)`` returns the scalar loss of one batch."""
    return _grad_stats(module, names, batches, loss_fn, "first-order")


def second_order(
    module: torch.nn.Module, names: Sequence[str], batches: Iterable[Any], loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """``w^2 * mean_b g_b^2`` (OBD saliency with the diagonal empirical Fisher)."""
    return _grad_stats(module, names, batches, loss_fn, "second-order")


def compute_saliency(
    module: torch.nn.Module,
    names: Sequence[str],
    kind: str = "magnitude",
    *,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
) -> Mapping[str, torch.Tensor]:
    """Dispatches on ``kind`` in :data:`KINDS`; gradient kinds need ``batches`` and ``loss_fn``."""
    if kind == "magnitude":
        return magnitude(module, names)
    if kind not in KINDS:
        raise PlanError(f"Unknown saliency kind {kind!r}: use one of {', '.join(KINDS)}.")
    if batches is None or loss_fn is None:
        raise PlanError(f"Saliency {kind!r} needs batches= and loss_fn=(module, batch) -> scalar loss.")
    return _grad_stats(module, names, batches, loss_fn, kind)
