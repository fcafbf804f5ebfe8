"""Capture a model as an FX graph.

``torch.export.export(..., strict=False).module()`` first: it handles HF transformers and most
models, keeps parameters as ``get_attr`` nodes under their fully-qualified names, and records
``nn_module_stack`` metadata that the analysis uses. ``torch.fx.symbolic_trace`` is the fallback.
After capture the graph's parameters and buffers are re-bound to the model's own tensor objects, so an
optimizer built on the model trains the graph and vice versa.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree

from nmgraph.errors import CaptureError, UnsupportedError
from nmgraph.graph import GraphRecord, graph_record, set_attr, set_graph_record

__all__ = ["batch_dynamic_shapes", "capture", "set_eval", "split_inputs"]

log = logging.getLogger(__name__)


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Any,
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    method: str = "auto",
) -> fx.GraphModule:
    """Returns ``model`` as a :class:`torch.fx.GraphModule` sharing the model's parameters.

    ``method`` is ``"auto"`` (export, then symbolic_trace), ``"export"`` or ``"symbolic_trace"``.
    Raises :class:`CaptureError` with every attempt's message if none succeeds.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture() needs a torch.nn.Module, got {type(model).__name__}. Wrap functions in a "
            "Module."
        )
    if method not in ("auto", "export", "symbolic_trace"):
        raise CaptureError(
            f"capture(method={method!r}) is not one of 'auto', 'export', 'symbolic_trace'."
        )
    if isinstance(model, fx.GraphModule) and method == "auto" and graph_record(model) is not None:
        return model
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(kwargs or {})
    failures: list[str] = []
    if method in ("auto", "export"):
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
            gm = ep.module()
        except Exception as e:
            failures.append(f"torch.export (non-strict): {type(e).__name__}: {_first_lines(e)}")
            log.debug("torch.export failed", exc_info=True)
        else:
            return _finish(gm, model, "export", args, kwargs)
    if method in ("auto", "symbolic_trace"):
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:
            failures.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_lines(e)}")
            log.debug("symbolic_trace failed", exc_info=True)
        else:
            return _finish(gm, model, "symbolic_trace", args, kwargs)
    raise CaptureError(
        f"Could not capture {type(model).__name__} as an FX graph.\n"
        + "\n".join(f"  - {f}" for f in failures)
        + "\nTry: pass example inputs exactly as the model is called (kwargs= for keyword inputs); "
        "for HF models pass use_cache=False and return_dict=False-friendly inputs; pass "
        "dynamic_shapes= if the model branches on sizes; or move data-dependent Python control "
        "flow out of forward()."
    )


def _finish(gm: fx.GraphModule, model: torch.nn.Module, how: str, args: tuple, kwargs: dict) -> fx.GraphModule:
    _share_tensors(gm, model)
    set_graph_record(gm, GraphRecord(captured_by=how, example_args=args, example_kwargs=kwargs))
    return gm


def _first_lines(e: BaseException, n: int = 6) -> str:
    lines = str(e).strip().splitlines()
    text = "\n    ".join(lines[:n])
    return text + ("\n    ..." if len(lines) > n else "")


def _share_tensors(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """Re-binds every parameter and buffer of ``gm`` to the model's object of the same name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        own = params.get(name)
        if own is not None and own is not p and own.shape == p.shape:
            set_attr(gm, name, own, is_param=True)
    for name, b in list(gm.named_buffers(remove_duplicate=False)):
        own = buffers.get(name)
        if own is not None and own is not b and own.shape == b.shape:
            set_attr(gm, name, own, is_param=False)


def set_eval(module: torch.nn.Module) -> None:
    """``module.eval()``, also for graphs from ``torch.export`` that refuse it (the flags are set directly)."""
    try:
        module.eval()
    except NotImplementedError:
        torch.nn.Module.train(module, False)


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from example inputs given as a tensor, a tuple/list, a dict of keyword
    inputs, or an ``(args, kwargs)`` pair."""
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(
            example_inputs[1], Mapping) and isinstance(example_inputs[0], (tuple, list)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}


def batch_dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``dynamic_shapes`` for ``torch.export`` with axis 0 of every tensor input a shared dynamic batch."""
    batch = torch.export.Dim("batch", min=1)

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None

    if not kwargs:
        return tuple(_pytree.tree_map(spec, a) for a in args)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise UnsupportedError(
            f"dynamic_batch=True: cannot match the example inputs to {type(module).__name__}.forward's "
            f"parameters ({e}); pass all inputs positionally."
        ) from e
    return {k: _pytree.tree_map(spec, v) for k, v in bound.arguments.items()}
