"""Capture a model as an FX graph.

``torch.export.export(..., strict=False).module()`` first: it handles HF transformers and most
models, keeps parameters as ``get_attr`` nodes under their fully-qualified names, and records
``nn_module_stack`` metadata that the analysis uses. After capture the graph's parameters and buffers
are re-bound to the model's own tensor objects, so an optimizer built on the model trains the graph
and vice versa.

What capture does so that a model is taken as it is called:

* **Inputs as the model is called.** ``example_inputs`` may be a tensor, a tuple of positional
  inputs, a dict of keyword inputs (a tokenizer's ``BatchEncoding`` included) or an ``(args,
  kwargs)`` pair.
* **No cache object in the outputs.** A transformers model whose config says ``use_cache=True``
  (every causal LM by default) would return a ``DynamicCache``, which ``torch.export`` cannot
  flatten. Capture turns the config's ``use_cache`` off while it traces (and back on after), unless
  the caller passed ``use_cache`` explicitly. The graph computes the same logits; the model is
  untouched.
* **Dynamic batch and sequence axes.** Axis 0 of every input that shares the first input's batch
  size is one dynamic ``batch`` dimension; axis 1 of every 2-D integer input (token ids, attention
  masks, token type and position ids) sharing the first one's length is a dynamic ``seq``
  dimension. When torch specializes an axis (the model branches on its size), capture retries with
  the batch axis only, then static, and warns with a :class:`~nmgraph.errors.CaptureWarning` that
  says which axis stayed static and why. A static axis then refuses other sizes with a
  :class:`~nmgraph.errors.ShapeError` that says how to capture instead. An example batch of 1 is
  traced as a batch of 2 (the same rows twice) because torch cannot make a size-1 axis dynamic.
* **A loud fallback.** When ``torch.export`` fails, ``torch.fx.symbolic_trace`` is tried and a
  :class:`~nmgraph.errors.CaptureWarning` carries the export error: such a graph calls layers as
  modules, which :func:`nmgraph.analyze` refuses (naming the weights it cannot read), so nothing is
  ever silently left dense.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree

from nmgraph.errors import CaptureError, CaptureWarning, ShapeError, UnsupportedError
from nmgraph.graph import GraphRecord, graph_record, set_attr, set_graph_record

__all__ = [
    "InputAxes",
    "batch_dynamic_shapes",
    "capture",
    "input_names",
    "no_cache",
    "set_eval",
    "split_inputs",
]

log = logging.getLogger(__name__)

_METHODS = ("auto", "export", "symbolic_trace")


@dataclass(frozen=True)
class InputAxes:
    """The dynamic axes of one captured input: its name (``input_ids``, ``args[0]``), its example
    shape, and ``{axis: dimension name}`` for the axes that accept any size."""

    name: str
    shape: tuple[int, ...]
    dynamic: Mapping[int, str]


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Any,
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    method: str = "auto",
) -> fx.GraphModule:
    """Returns ``model`` as a :class:`torch.fx.GraphModule` sharing the model's parameters.

    ``example_inputs``: a tensor, a tuple of positional inputs, a dict of keyword inputs or an
    ``(args, kwargs)`` pair; ``kwargs`` adds keyword inputs. ``dynamic`` (default) makes the batch
    axis (and the sequence axis of token inputs) dynamic where the model allows it; ``dynamic=False``
    captures static shapes; ``dynamic_shapes`` passes torch.export's own spec instead. ``method`` is
    ``"auto"`` (export, then symbolic_trace with a :class:`CaptureWarning`), ``"export"`` or
    ``"symbolic_trace"``. Raises :class:`CaptureError` with every attempt's message if none succeeds.

    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> gm = capture(m, (torch.randn(3, 8),))
    >>> gm(torch.randn(5, 8)).shape  # another batch size
    torch.Size([5, 4])
    >>> gm.get_parameter("0.weight") is m[0].weight
    True
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture() needs a torch.nn.Module, got {type(model).__name__}. Wrap functions in a "
            "Module."
        )
    if method not in _METHODS:
        raise CaptureError(f"capture(method={method!r}) is not one of {', '.join(map(repr, _METHODS))}.")
    if isinstance(model, fx.GraphModule) and method == "auto" and graph_record(model) is not None:
        return model
    lazy = [n for n, p in model.named_parameters() if torch.nn.parameter.is_lazy(p)]
    if lazy:
        raise CaptureError(
            f"{type(model).__name__} has uninitialized lazy parameters ({', '.join(lazy[:4])}"
            f"{', ...' if len(lazy) > 4 else ''}): run the model once on an example batch so they get "
            "their shapes, then capture it."
        )
    args, kw = split_inputs(example_inputs)
    if kwargs:
        kw.update(kwargs)
    failures: list[str] = []
    notes: list[str] = []
    if method in ("auto", "export"):
        with no_cache(model, kw) as cache_off:
            if cache_off:
                notes.append("traced with use_cache=False (a cache object cannot be a graph output); the "
                             "model's config is unchanged")
            gm, axes = _export(model, args, kw, dynamic, dynamic_shapes, failures, notes)
        if gm is not None:
            return _finish(gm, model, "export", args, kw, axes, notes)
    if method in ("auto", "symbolic_trace"):
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:
            failures.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_lines(e)}")
            log.debug("symbolic_trace failed", exc_info=True)
        else:
            if failures:
                export_error = failures[-1].removeprefix("torch.export (non-strict): ")
                notes.append(f"torch.export failed: {export_error}")
                warnings.warn(CaptureWarning(
                    f"capture({type(model).__name__}): torch.export failed, so the graph comes from "
                    f"torch.fx.symbolic_trace, whose layers are call_module nodes that nmgraph.analyze "
                    f"cannot read (it will refuse the graph).\n  torch.export: {export_error}\nFix the export error "
                    "(example inputs exactly as the model is called: the right shapes, kwargs= for "
                    "keyword inputs) or pass method='symbolic_trace' to ask for this graph."
                ), stacklevel=2)
            return _finish(gm, model, "symbolic_trace", args, kw, (), notes)
    raise CaptureError(
        f"Could not capture {type(model).__name__} as an FX graph.\n"
        + "\n".join(f"  - {f}" for f in failures)
        + "\nTry: pass example inputs exactly as the model is called (a dict or kwargs= for keyword "
        "inputs); for HF models pass use_cache=False and return_dict=False-friendly inputs; pass "
        "dynamic_shapes= if the model branches on sizes; or move data-dependent Python control "
        "flow out of forward()."
    )


# --- export with dynamic axes ----------------------------------------------------------------------


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes: Any,
            failures: list[str], notes: list[str]) -> tuple[fx.GraphModule | None, tuple[InputAxes, ...]]:
    """Tries the dynamic specs from widest to static; returns the graph and its inputs' dynamic axes.

    A spec torch refuses with suggested fixes (a sequence axis bounded by the position table) is
    refined with them once or twice before fewer axes are tried.
    """
    names = input_names(model, args, kwargs)
    if dynamic_shapes is not None:
        attempts = [("the given dynamic_shapes", dynamic_shapes, None)]
    elif not dynamic:
        attempts = [("static shapes", None, None)]
    else:
        attempts = _dynamic_attempts(model, args, kwargs, names, notes)
    static_reasons: list[str] = []
    i = 0
    while True:
        label, spec, axes = attempts[i]
        trace_args, trace_kwargs = _traced_inputs(args, kwargs, axes)
        widened = trace_args is not args or trace_kwargs is not kwargs
        error: Exception | None = None
        for _ in range(3):
            try:
                ep = torch.export.export(model, trace_args, trace_kwargs, strict=False, dynamic_shapes=spec)
                error = None
                break
            except Exception as e:
                log.debug("torch.export with %s failed", label, exc_info=True)
                error = e
                refined = _refined(e, spec) if spec is not None else None
                if refined is None:
                    break
                spec = refined
        if error is None:
            captured = _captured_axes(ep, names, args, kwargs)
            if widened and not any(a.dynamic.get(0) == "batch" for a in captured):
                error = CaptureError("the batch axis was specialized while tracing a batch of 1 as 2")
            else:
                gm = ep.module()
                break
        if i == len(attempts) - 1:
            failures.append(f"torch.export (non-strict): {type(error).__name__}: {_first_lines(error)}")
            return None, ()
        static_reasons.append(f"{label}: {_first_lines(error, 3)}")
        # a refused dimension: try fewer dynamic axes; anything else: only the static attempt is left
        i = i + 1 if _is_shape_error(error) else len(attempts) - 1
    if dynamic and dynamic_shapes is None and attempts[0][2] is not None:
        wanted = [f"{a.name} axis {ax} ({d})" for a in attempts[0][2] for ax, d in a.dynamic.items()]
        got = {f"{a.name} axis {ax} ({d})" for a in captured for ax, d in a.dynamic.items()}
        static = [w for w in wanted if w not in got]
        if static:
            why = " | ".join(static_reasons) or "its suggested fixes for the dynamic spec made it a constant"
            msg = (f"capture({type(model).__name__}): kept {', '.join(static)} static; torch.export specialized "
                   f"it ({why}). Calls with other sizes on those axes raise ShapeError; pass "
                   "dynamic_shapes= to say which axes may vary, or train the model itself with "
                   "nmgraph.prepare(..., inplace=True).")
            notes.append(msg)
            warnings.warn(CaptureWarning(msg), stacklevel=3)
    return gm, captured


def _refined(e: Exception, spec: Any) -> Any:
    """``spec`` with torch.export's suggested fixes applied; ``None`` when there are none."""
    msg = getattr(e, "msg", None) or str(e)
    if "Suggested fixes" not in msg:
        return None
    try:
        refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(msg, spec)
    except Exception:  # a message torch's own parser cannot read: try fewer axes instead
        log.debug("cannot apply torch.export's suggested fixes", exc_info=True)
        return None
    return None if refined == spec else refined


def _captured_axes(ep: Any, names: list[str], args: tuple, kwargs: dict) -> tuple[InputAxes, ...]:
    """The dynamic axes the exported program really has, read from its input placeholders."""
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    leaves = _tensor_leaves(args, kwargs, names)
    if len(vals) != len(leaves):
        return tuple(InputAxes(n, tuple(t.shape), {}) for n, t in leaves)
    out = []
    for (name, t), v in zip(leaves, vals):
        dyn = {}
        for ax, size in enumerate(v.shape):
            if isinstance(size, torch.SymInt):
                dyn[ax] = "batch" if ax == 0 else ("seq" if ax == 1 else f"dim{ax}")
        out.append(InputAxes(name, tuple(t.shape), dyn))
    return tuple(out)


def _dynamic_attempts(model: torch.nn.Module, args: tuple, kwargs: dict, names: list[str],
                      notes: list[str]) -> list[tuple[str, Any, tuple[InputAxes, ...] | None]]:
    """``[(label, dynamic_shapes, axes)]``: batch and sequence, batch only, static."""
    leaves = _tensor_leaves(args, kwargs, names)
    if not leaves:
        return [("static shapes", None, None)]
    batch_size = next((t.shape[0] for _, t in leaves if t.dim() >= 1), None)
    tokens = [(n, t) for n, t in leaves if t.dim() == 2 and not t.is_floating_point() and not t.is_complex()]
    seq_len = tokens[0][1].shape[1] if tokens else None
    if seq_len == 1:
        notes.append("the sequence axis is static: the example sequence has length 1 (torch.export cannot "
                     "make a size-1 axis dynamic); capture with a longer example")
        seq_len = None
    levels = [("dynamic batch and sequence", True), ("dynamic batch", False)] if seq_len else [
        ("dynamic batch", False)]
    attempts: list[tuple[str, Any, tuple[InputAxes, ...] | None]] = []
    for label, with_seq in levels:
        axes = []
        for name, t in leaves:
            dyn: dict[int, str] = {}
            if batch_size is not None and t.dim() >= 1 and t.shape[0] == batch_size:
                dyn[0] = "batch"
            if with_seq and (name, t) in [(n, x) for n, x in tokens] and t.shape[1] == seq_len:
                dyn[1] = "seq"
            axes.append(InputAxes(name, tuple(t.shape), dyn))
        if not any(a.dynamic for a in axes):
            continue
        attempts.append((label, _spec_for(model, args, kwargs, names, axes), tuple(axes)))
    attempts.append(("static shapes", None, None))
    return attempts


def _spec_for(model: torch.nn.Module, args: tuple, kwargs: dict, names: list[str],
              axes: Sequence[InputAxes]) -> Any:
    """torch.export's ``dynamic_shapes`` for ``axes`` (shared ``Dim`` objects per dimension name)."""
    dims = {"batch": torch.export.Dim("batch", min=1), "seq": torch.export.Dim("seq", min=1)}
    by_name = {a.name: {ax: dims[d] for ax, d in a.dynamic.items()} or None for a in axes}
    leaf_names = iter(names)

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return by_name.get(next(leaf_names))
        return None

    flat_args = [_pytree.tree_map(spec, a) for a in args]
    flat_kwargs = {k: _pytree.tree_map(spec, v) for k, v in kwargs.items()}
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*flat_args, **flat_kwargs)
    except (TypeError, ValueError):
        return tuple(flat_args) if not kwargs else None
    # keyed by the forward's parameter names (a *args parameter takes the tuple of its inputs)
    return dict(bound.arguments)


def _traced_inputs(args: tuple, kwargs: dict, axes: Sequence[InputAxes] | None) -> tuple[tuple, dict]:
    """The inputs to trace with: a batch of 1 becomes the same row twice (a size-1 axis cannot be
    dynamic in torch.export); the recorded example inputs stay the caller's."""
    if not axes or not any(a.dynamic.get(0) == "batch" and a.shape[0] == 1 for a in axes):
        return args, kwargs
    batched = {id(a) for a in axes if a.dynamic.get(0) == "batch"}
    it = iter(axes)

    def widen(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            a = next(it)
            if id(a) in batched:
                return torch.cat([x, x], dim=0)
        return x

    return tuple(_pytree.tree_map(widen, a) for a in args), {k: _pytree.tree_map(widen, v) for k, v in kwargs.items()}


def _is_shape_error(e: BaseException) -> bool:
    """Whether torch.export refused a dynamic dimension (a constraint violation), not the model."""
    from torch._dynamo.exc import UserError
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError, GuardOnDataDependentSymNode

    return isinstance(e, (UserError, ConstraintViolationError, GuardOnDataDependentSymNode)) or (
        "Constraints violated" in str(e))


def _tensor_leaves(args: tuple, kwargs: dict, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    leaves = [x for x in _pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    return list(zip(names, leaves))


def input_names(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> list[str]:
    """A readable name for every tensor leaf of ``(args, kwargs)``, in pytree order: the forward's
    parameter name (``input_ids``), with a key or index for nested inputs (``pixel_values[0]``)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    out: list[str] = []

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(prefix)
            return
        n = sum(isinstance(leaf, torch.Tensor) for leaf in _pytree.tree_leaves(x))
        out.extend(f"{prefix}[{i}]" for i in range(n))

    for i, a in enumerate(args):
        walk(params[i] if i < len(params) else f"args[{i}]", a)
    for k, v in kwargs.items():
        walk(k, v)
    return out


# --- the graph's record and its guard for static axes --------------------------------------------


def _finish(gm: fx.GraphModule, model: torch.nn.Module, how: str, args: tuple, kwargs: dict,
            axes: Sequence[InputAxes], notes: Sequence[str]) -> fx.GraphModule:
    _share_tensors(gm, model)
    set_graph_record(gm, GraphRecord(captured_by=how, example_args=args, example_kwargs=kwargs,
                                     inputs=tuple(axes), notes=tuple(notes)))
    if how == "export" and axes:
        gm.register_forward_pre_hook(StaticAxesGuard(tuple(axes), type(model).__name__), with_kwargs=True,
                                     prepend=True)
    for note in notes:
        log.info("capture(%s): %s", type(model).__name__, note)
    return gm


class StaticAxesGuard:
    """A forward pre-hook of a captured graph: an input whose static axis has another size raises
    :class:`ShapeError` naming the input, the axis and how to capture instead (torch's own guard
    would raise a bare ``AssertionError``)."""

    def __init__(self, inputs: tuple[InputAxes, ...], model_name: str) -> None:
        self.inputs = inputs
        self.model_name = model_name

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        leaves = [x for x in _pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if len(leaves) != len(self.inputs):
            return None  # another input structure: torch's own check explains it
        for got, want in zip(leaves, self.inputs):
            if got.dim() != len(want.shape):
                return None
            for axis, (size, expected) in enumerate(zip(got.shape, want.shape)):
                if axis in want.dynamic or size == expected:
                    continue
                kind = {0: "batch"}.get(axis, f"axis {axis}")
                raise ShapeError(
                    f"The graph of {self.model_name} was captured with {want.name} of shape "
                    f"{list(want.shape)} and its {kind} axis static; it got shape {list(got.shape)}. "
                    "Capture with example inputs that let the axis be dynamic (a batch of 2 or more, "
                    "sequences longer than 1), pass dynamic_shapes= to nmgraph.capture, or train the "
                    "model itself with nmgraph.prepare(..., inplace=True), which takes any shape."
                )
        return None


# --- helpers -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_cache(model: torch.nn.Module, kwargs: Mapping[str, Any] | None = None) -> Iterator[bool]:
    """Turns a transformers config's ``use_cache`` off for the duration (yields whether it did).

    Nothing changes when the caller passes ``use_cache`` itself or the model has no such config. The
    config (and a multimodal model's text config) gets its value back on exit, also after an error.
    """
    if kwargs and "use_cache" in kwargs:
        yield False
        return
    configs = []
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and getattr(c, "use_cache", None) is True and all(c is not o for o in configs):
            configs.append(c)
    for c in configs:
        c.use_cache = False
    try:
        yield bool(configs)
    finally:
        for c in configs:
            c.use_cache = True


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
    inputs, or an ``(args, kwargs)`` pair.

    >>> split_inputs({"input_ids": 1})
    ((), {'input_ids': 1})
    >>> split_inputs(((1,), {"mask": 2}))
    ((1,), {'mask': 2})
    """
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
