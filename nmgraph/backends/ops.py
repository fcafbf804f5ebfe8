"""What the backends' graph ops (``torch.ops.nmgraph.*``) share.

Every backend defines its own custom op in its own file, with the argument layout
``op(x, *buffers, bias, *constants)``: ``x @ W^T + bias`` with ``W`` given by the backend's
buffers. :func:`register_frozen_linear` gives such an op its fake (meta) implementation, so graphs
that call it trace under ``torch.compile`` and ``torch.export``, and its autograd formula: the
compressed weight is frozen, so backward gives gradients for ``x`` and ``bias`` only (enough for
training adapters on top, or for compiling a graph whose biases still require grad).

The ops are registered when their backend module is imported (``import nmgraph`` does it): cheap,
and needed before loading a saved exported program that calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nmgraph.errors import ShapeError

__all__ = ["check_x", "register_frozen_linear"]

#: ``dense_weight(buffers, constants) -> [out_features, in_features]`` of one op call.
DenseWeight = Callable[[Sequence[Any], Sequence[Any]], torch.Tensor]
#: ``shape(constants) -> (out_features, in_features)``.
Shape = Callable[[Sequence[Any]], tuple[int, int]]


def check_x(x: torch.Tensor, in_features: int, op: str) -> None:
    """:class:`ShapeError` unless ``x`` is ``[..., in_features]``."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ShapeError(
            f"nmgraph::{op}: x has shape {tuple(x.shape)} but the weight takes {in_features} input "
            f"features; x must be [..., {in_features}]."
        )


def register_frozen_linear(op: Any, *, n_buffers: int, shape: Shape, dense_weight: DenseWeight) -> None:
    """Registers the fake implementation and the autograd formula of a frozen-weight linear op.

    ``op`` is the ``torch.library.custom_op`` object with arguments ``(x, *buffers, bias, *constants)``
    where ``n_buffers`` tensors hold the weight; ``shape`` reads ``(out, in)`` from the constants;
    ``dense_weight`` rebuilds the dense ``[out, in]`` weight (used by backward only).
    """
    name = str(op._name)

    def fake(x, *rest):
        out_features, in_features = shape(rest[n_buffers + 1:])
        torch._check(
            x.shape[-1] == in_features,
            lambda: f"{name}: x has shape {tuple(x.shape)}, expected [..., {in_features}]",
        )
        return x.new_empty((*x.shape[:-1], out_features))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t for t in inputs[1:1 + n_buffers] if isinstance(t, torch.Tensor)])
        ctx.none_buffers = tuple(t is None for t in inputs[1:1 + n_buffers])
        ctx.constants = tuple(inputs[n_buffers + 2:])
        ctx.has_bias = inputs[n_buffers + 1] is not None

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        buffers = [None if none else next(saved) for none in ctx.none_buffers]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dense_weight(buffers, ctx.constants).to(grad.dtype)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[n_buffers + 1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return (grad_x, *([None] * n_buffers), grad_bias, *([None] * len(ctx.constants)))

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
