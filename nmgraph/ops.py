"""nmgraph's custom operators (``torch.ops.nmgraph.*``), what lowered graphs call.

* ``nmgraph::nm_linear(x, values, indices, bias, n, m, out_features, in_features, backend)``:
  ``x @ W^T + bias`` with ``W`` given as the two tensors of a :class:`~nmgraph.compress.CompressedNM`
  of shape ``[out_features, in_features]`` (values ``[out, in*n/m]``, uint8 index bit planes).
  ``backend`` is ``"triton"`` (the N:M kernel), ``"dense"`` (decompress, then ``F.linear``:
  exact everywhere, for CPUs and tests) or ``"cusparselt"`` (compresses for the 2:4 kernels on
  every call: a fallback; lowered graphs use ``semi_structured_linear`` with the weight packed once).
* ``nmgraph::semi_structured_linear(x, packed, meta, bias, out_features, in_features, kernel)``:
  ``x @ W^T + bias`` on PyTorch's 2:4 kernels with the weight already packed
  (:func:`nmgraph.backends.cusparselt.parts`); ``kernel`` is ``"cusparselt"`` or ``"cutlass"``.

Both have fake (meta) implementations, so graphs that call them trace under ``torch.compile`` and
``torch.export``. Importing this module registers the operators (cheap; needed before loading a
saved exported program that uses them). The compressed weights are frozen: backward gives
gradients for ``x`` and ``bias`` only (enough for training adapters on top, or for compiling a
graph whose biases still require grad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmgraph.compress import CompressedNM
from nmgraph.errors import ShapeError, UnsupportedError

__all__ = ["OP_BACKENDS", "nm_linear", "semi_structured_linear"]

#: Values of the ``backend`` argument of ``nmgraph::nm_linear``.
OP_BACKENDS = ("triton", "dense", "cusparselt")


def _compressed(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, out_features: int,
                in_features: int) -> CompressedNM:
    return CompressedNM(values, indices, (out_features, in_features), n, m, 1)


def _check_x(x: torch.Tensor, in_features: int, op: str) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ShapeError(
            f"nmgraph::{op}: x has shape {tuple(x.shape)} but the weight takes {in_features} input "
            f"features; x must be [..., {in_features}]."
        )


@torch.library.custom_op("nmgraph::nm_linear", mutates_args=())
def nm_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    out_features: int,
    in_features: int,
    backend: str,
) -> torch.Tensor:
    _check_x(x, in_features, "nm_linear")
    weight = _compressed(values, indices, n, m, out_features, in_features)
    if backend == "triton":
        from nmgraph.backends.triton_nm import nm_linear as triton_nm_linear

        return triton_nm_linear(x, weight, bias)
    if backend == "dense":
        from nmgraph.backends.dense import decompress_linear

        return F.linear(x, decompress_linear(values, indices, n, m), bias)
    if backend == "cusparselt":
        from nmgraph.backends.cusparselt import CuSparseLtBackend

        b = CuSparseLtBackend()
        return b.run(x, b.prepare(weight), bias)
    raise UnsupportedError(
        f"nmgraph::nm_linear: unknown backend {backend!r}; use one of {', '.join(OP_BACKENDS)} "
        "(lowering resolves 'auto' to one of them)."
    )


@nm_linear.register_fake
def _nm_linear_fake(x, values, indices, bias, n, m, out_features, in_features, backend):
    if backend not in OP_BACKENDS:
        raise UnsupportedError(f"nmgraph::nm_linear: unknown backend {backend!r}; use one of {OP_BACKENDS}.")
    torch._check(
        x.shape[-1] == in_features,
        lambda: f"nmgraph::nm_linear: x has shape {tuple(x.shape)}, expected [..., {in_features}]",
    )
    return x.new_empty((*x.shape[:-1], out_features))


def _nm_linear_setup(ctx, inputs, output):
    _x, values, indices, bias, n, m, out_features, in_features, _backend = inputs
    ctx.save_for_backward(values, indices)
    ctx.pattern = (n, m, out_features, in_features)
    ctx.has_bias = bias is not None


def _nm_linear_backward(ctx, grad):
    from nmgraph.backends.dense import decompress_linear

    values, indices = ctx.saved_tensors
    n, m = ctx.pattern[:2]
    weight = decompress_linear(values, indices, n, m)
    grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None, None, None, None, None


nm_linear.register_autograd(_nm_linear_backward, setup_context=_nm_linear_setup)


@torch.library.custom_op("nmgraph::semi_structured_linear", mutates_args=())
def semi_structured_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    meta: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    kernel: str,
) -> torch.Tensor:
    from nmgraph.backends.cusparselt import from_parts

    _check_x(x, in_features, "semi_structured_linear")
    weight = from_parts(kernel, (out_features, in_features), packed, meta)
    lead = x.shape[:-1]
    y = F.linear(x.reshape(-1, in_features), weight, bias)
    return y.reshape(*lead, out_features)


@semi_structured_linear.register_fake
def _semi_structured_linear_fake(x, packed, meta, bias, out_features, in_features, kernel):
    torch._check(
        x.shape[-1] == in_features,
        lambda: f"nmgraph::semi_structured_linear: x has shape {tuple(x.shape)}, expected [..., {in_features}]",
    )
    return x.new_empty((*x.shape[:-1], out_features))


def _semi_structured_setup(ctx, inputs, output):
    _x, packed, meta, bias, out_features, in_features, kernel = inputs
    ctx.save_for_backward(packed, meta)
    ctx.spec = (kernel, (out_features, in_features))
    ctx.has_bias = bias is not None


def _semi_structured_backward(ctx, grad):
    from nmgraph.backends.cusparselt import from_parts

    packed, meta = ctx.saved_tensors
    kernel, shape = ctx.spec
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = from_parts(kernel, shape, packed, meta).to_dense()
        grad_x = grad @ weight.to(grad.dtype)
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None, None, None


semi_structured_linear.register_autograd(_semi_structured_backward, setup_context=_semi_structured_setup)
