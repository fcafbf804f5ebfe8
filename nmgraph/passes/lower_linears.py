"""Lowering: replace linear GEMMs whose weights are N:M with nmgraph's sparse operators.

Why the rewrite is valid. A weight that is already N:M along its reduction axis (what
``nmgraph.convert`` leaves) is losslessly stored as a :class:`~nmgraph.compress.CompressedNM`:
``compress(w).to_dense() == w`` exactly. ``aten.linear(x, W, b)`` computes ``x @ W^T + b`` and
``aten.addmm(b, x, W)`` with an ``[in, out]`` weight (GPT-2's ``Conv1D``, reduction axis 0) computes
``x @ W + b = x @ (W^T)^T + b``; ``nmgraph::nm_linear(x, values, indices, b, ...)`` computes the
same product from the compressed tensors of the ``[out, in]`` matrix. An ``[in, out]`` weight
compressed along axis 0 has exactly the compressed layout of its ``[out, in]`` transpose (rows are
output features, kept values run along ``in``), so the "transpose" costs nothing at lowering time.
The result differs from the dense graph only by floating-point summation order.

What it does, per eligible node: compress the weight, choose a backend (``"auto"``: the
:class:`~nmgraph.backends.dispatch.Dispatcher` measures dense and the sparse kernels for the
node's input shape bucket, read from ``node.meta["val"]``), register the compressed tensors as
buffers on the weight's owning module (``<leaf>_nm_values`` / ``<leaf>_nm_indices``, or
``<leaf>_nm_packed`` / ``<leaf>_nm_meta`` for cuSPARSELt), and replace the node with a call of
the custom op carrying the old node's metadata (``val``, ``nn_module_stack``, ``stack_trace``, ...).
A dense weight no longer read by the graph is dropped from the graph module (the user's model
keeps its own). Where dense is chosen (always on a CPU with ``"auto"``) the folded dense
``aten.linear`` stays, and that is reported as a skip with the dispatcher's reason, as is every
other layer left alone (not N:M, weight computed in the graph, consumed by another op, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from nmgraph.backends import default_registry
from nmgraph.backends.dispatch import Decision, Dispatcher, DispatchKey, DispatchReport, device_name, m_bucket
from nmgraph.compress import CompressedNM, compress
from nmgraph.errors import BackendUnavailableError, PatternError, StrictModeError, UnsupportedError
from nmgraph.passes.runner import PassResult
from nmgraph.pattern import Pattern, PatternLike, is_nm
from nmgraph.analysis.plan import Skip

__all__ = ["LOWERING_BACKENDS", "LinearLowering", "LowerLinearsConfig", "lower_linears"]

log = logging.getLogger(__name__)

#: ``backend`` values: "auto" measures per layer; "eager" keeps every folded dense aten op.
LOWERING_BACKENDS = ("auto", "triton", "cusparselt", "dense", "eager")

_aten = torch.ops.aten
# Linear ops that lower, with (activation arg, weight arg, bias arg, weight reduction axis).
_LINEAR_OPS: dict[Any, tuple[int, int, int | None, int]] = {
    _aten.linear.default: (0, 1, 2, 1),
    _aten.addmm.default: (1, 2, 0, 0),
}


@dataclass(frozen=True)
class LowerLinearsConfig:
    """What :func:`lower_linears` lowers and how.

    ``weights``: parameter qualified name -> reduction axis of the weights to lower (``None``:
    every ``aten.linear``/``aten.addmm`` weight of the graph that is N:M). ``pattern``: the N:M
    pattern the weights follow. ``backend``: one of :data:`LOWERING_BACKENDS`. ``dispatcher``:
    used by ``"auto"`` (default: a new :class:`Dispatcher`). ``rows_hint``: input rows assumed
    for dispatch when a node has no shape metadata. ``drop_dense``: remove dense weights the
    graph no longer reads. ``strict``: raise :class:`StrictModeError` instead of skipping.
    """

    weights: Mapping[str, int] | None = None
    pattern: PatternLike = "2:4"
    backend: str = "auto"
    dispatcher: Dispatcher | None = None
    rows_hint: int = 1
    drop_dense: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        try:
            Pattern.parse(self.pattern)
        except PatternError as e:
            raise PatternError(f"LowerLinearsConfig.pattern: {e}") from None
        if self.backend not in LOWERING_BACKENDS:
            raise UnsupportedError(
                f"LowerLinearsConfig.backend={self.backend!r} is not one of {', '.join(LOWERING_BACKENDS)}."
            )
        if self.weights is not None:
            for name, axis in self.weights.items():
                if not isinstance(name, str) or isinstance(axis, bool) or axis not in (0, 1, -1, -2):
                    raise UnsupportedError(
                        f"LowerLinearsConfig.weights[{name!r}] = {axis!r}: keys are parameter names, values "
                        "the reduction axis of a 2-D weight (1 for Linear [out, in], 0 for [in, out])."
                    )
        if isinstance(self.rows_hint, bool) or not isinstance(self.rows_hint, int) or self.rows_hint < 1:
            raise UnsupportedError(f"LowerLinearsConfig.rows_hint={self.rows_hint!r} must be an int >= 1.")


@dataclass(frozen=True)
class LinearLowering:
    """``node.meta["nmgraph"]`` of a lowered node: which weight, pattern and backend it runs."""

    weight: str
    pattern: str
    backend: str
    axis: int
    reason: str = ""


@dataclass
class _Buffers:
    args: tuple[str, ...]
    kernel: str | None = None


@dataclass
class _State:
    cfg: LowerLinearsConfig
    pattern: Pattern
    dispatcher: Dispatcher | None
    skipped: list[Skip] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    buffers: dict[tuple[str, str], _Buffers] = field(default_factory=dict)
    seen_weights: set[str] = field(default_factory=set)


def lower_linears(gm: fx.GraphModule, config: LowerLinearsConfig | Mapping[str, Any] | None = None) -> PassResult:
    """Replaces eligible ``aten.linear``/``aten.addmm`` nodes with ``nmgraph::nm_linear`` (in place).

    ``x @ W.T`` of a listed 2-D parameter (``matmul``/``mm`` of its transpose) is first rewritten
    to ``aten.linear(x, W)``, which computes the same, and then lowered like one.

    See the module docstring. Returns a :class:`PassResult` whose ``info`` holds ``"decisions"``
    (a :class:`DispatchReport`), ``"backends"`` (lowered node -> backend) and ``"dropped"``
    (dense weights removed from ``gm``).
    """
    import nmgraph.ops  # noqa: F401  (registers torch.ops.nmgraph.*)

    cfg = _as_config(config)
    pattern = Pattern.parse(cfg.pattern)
    dispatcher = cfg.dispatcher if cfg.dispatcher is not None else (Dispatcher() if cfg.backend == "auto" else None)
    st = _State(cfg, pattern, dispatcher)
    backends: dict[str, str] = {}
    rewritten = _rewrite_transposed_linears(gm, cfg)

    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        spec = _LINEAR_OPS.get(node.target)
        if spec is None:
            _skip_other_consumers(node, st)
            continue
        new = _lower_node(gm, node, spec, st)
        if new is not None:
            backends[new.name] = new.meta["nmgraph"].backend

    if cfg.weights is not None:
        for name in cfg.weights:
            if name not in st.seen_weights and not any(s.name == name for s in st.skipped):
                st.skipped.append(Skip(name, "not read by any aten.linear or aten.addmm node of the graph"))

    dropped: list[str] = []
    if st.changed or rewritten:
        if st.changed and cfg.drop_dense:
            dropped = _drop_unused_weights(gm, {name for name, _ in st.buffers})
        gm.graph.lint()
        gm.recompile()
    if cfg.strict and st.skipped:
        raise StrictModeError(
            "lower_linears(strict=True): these layers would stay dense:\n"
            + "\n".join(f"  - {s.name}: {s.reason}" for s in st.skipped)
            + "\nFix the reasons above, or pass strict=False to keep them dense."
        )
    report = DispatchReport(tuple(st.decisions))
    log.info("lower_linears: lowered %d nodes, skipped %d", len(st.changed), len(st.skipped))
    return PassResult(gm, changed_nodes=st.changed, skipped=st.skipped,
                      info={"decisions": report, "backends": backends, "dropped": dropped})


def _as_config(config: Any) -> LowerLinearsConfig:
    if config is None:
        return LowerLinearsConfig()
    if isinstance(config, LowerLinearsConfig):
        return config
    if isinstance(config, Mapping):
        return LowerLinearsConfig(**config)
    raise UnsupportedError(
        f"lower_linears(config=...) takes a LowerLinearsConfig or a dict of its fields, got {type(config).__name__}."
    )


def _rewrite_transposed_linears(gm: fx.GraphModule, cfg: LowerLinearsConfig) -> int:
    """Rewrites every ``x @ W.T`` of a listed 2-D parameter (``matmul``/``mm`` of its transpose:
    Falcon's Linear) into ``aten.linear(x, W)``, the same computation, so it lowers like any Linear;
    transposes left unread are erased. Returns how many it rewrote."""
    from nmgraph.analysis.nodes import linear_of_transposed

    count = 0
    for node in list(gm.graph.nodes):
        w = linear_of_transposed(node)
        if w is None or (cfg.weights is not None and w.target not in cfg.weights):
            continue
        transposed = node.args[1]
        node.target = _aten.linear.default
        node.args = (node.args[0], w)
        if not transposed.users:
            gm.graph.erase_node(transposed)
        count += 1
    return count


def _skip_other_consumers(node: fx.Node, st: _State) -> None:
    """A listed weight read by an op that does not lower is reported once per node."""
    if st.cfg.weights is None:
        return
    for arg in node.all_input_nodes:
        if arg.op == "get_attr" and arg.target in st.cfg.weights:
            st.seen_weights.add(arg.target)
            st.skipped.append(Skip(
                arg.target,
                f"read by {node.format_node()}: only aten.linear and aten.addmm lower to nmgraph::nm_linear; "
                "this use stays dense",
            ))


def _lower_node(gm: fx.GraphModule, node: fx.Node, spec: tuple[int, int, int | None, int],
                st: _State) -> fx.Node | None:
    cfg, pattern = st.cfg, st.pattern
    x_i, w_i, b_i, axis = spec
    args = list(node.args)
    x = args[x_i]
    w = args[w_i] if len(args) > w_i else node.kwargs.get("weight")
    bias = args[b_i] if b_i is not None and len(args) > b_i else node.kwargs.get("bias")
    where = node.format_node()

    if not isinstance(w, fx.Node) or w.op != "get_attr":
        from nmgraph.analysis.nodes import weight_source

        src = weight_source(w)
        if isinstance(src, fx.Node) and src.op == "get_attr" and (cfg.weights is None or src.target in cfg.weights):
            st.seen_weights.add(src.target)
            st.skipped.append(Skip(src.target, f"{where}: the weight is read through {w.format_node()}; only a "
                                               "parameter read directly lowers, so this layer runs densely"))
            return None
        if cfg.weights is None:  # with an explicit list, only listed parameters are considered
            what = "a constant" if not isinstance(w, fx.Node) else f"computed by {w.format_node()}"
            st.skipped.append(Skip(node.name, f"weight is not a parameter or buffer of the graph module ({what}); "
                                              "nothing to compress at lowering time"))
        return None
    name = w.target
    if cfg.weights is not None and name not in cfg.weights:
        return None
    st.seen_weights.add(name)
    if node.target is _aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        st.skipped.append(Skip(name, f"{where}: addmm with beta/alpha other than 1 is not lowered"))
        return None
    if not isinstance(x, fx.Node):
        st.skipped.append(Skip(name, f"{where}: the activation is not a graph value"))
        return None
    weight = _fetch(gm, name)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        st.skipped.append(Skip(name, f"{where}: weight is not a 2-D tensor"))
        return None
    if cfg.weights is not None and cfg.weights[name] % 2 != axis:
        st.skipped.append(Skip(name, f"listed with reduction axis {cfg.weights[name]} but {node.target} reduces "
                                     f"over axis {axis} of its weight"))
        return None
    k = weight.shape[axis]
    if k % pattern.m:
        st.skipped.append(Skip(name, f"in_features={k} is not divisible by M={pattern.m} of {pattern}"))
        return None
    if not is_nm(weight, pattern, axis=axis):
        st.skipped.append(Skip(name, f"not {pattern}: some group of {pattern.m} along axis {axis} has more than "
                                     f"{pattern.n} nonzeros; prune/convert it first (nmgraph.convert)"))
        return None
    x_val = x.meta.get("val")
    dtype = x_val.dtype if isinstance(x_val, torch.Tensor) else weight.dtype
    if dtype != weight.dtype:
        st.skipped.append(Skip(name, f"activations are {dtype} but the weight is {weight.dtype}"))
        return None
    rows, rows_note = _rows(x_val, cfg.rows_hint)
    bias_t = _fetch(gm, bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
    if isinstance(bias, fx.Node) and bias_t is None:  # a computed bias: same shape for timing
        bias_t = torch.zeros(weight.shape[1 - axis], dtype=weight.dtype, device=weight.device)

    compressed = compress(weight.detach(), pattern, axis=axis)
    backend, reason = _choose(name, compressed, rows, rows_note, dtype, weight.device, bias_t, st)
    if backend is None:
        st.skipped.append(Skip(name, f"{node.name} keeps its folded dense weight: {reason}"))
        return None

    out_f, in_f = compressed.values.shape[0], k
    bufs = _register_buffers(gm, name, compressed, backend, st)
    with gm.graph.inserting_before(node):
        attrs = []
        for qual in bufs.args:
            a = gm.graph.get_attr(qual) if qual else None
            if a is not None:
                _attr_meta(a, _fetch(gm, qual), x_val)
            attrs.append(a)
        if backend == "cusparselt":
            target = torch.ops.nmgraph.semi_structured_linear.default
            op_args = (x, attrs[0], attrs[1], bias, out_f, in_f, bufs.kernel)
        else:
            target = torch.ops.nmgraph.nm_linear.default
            op_args = (x, attrs[0], attrs[1], bias, pattern.n, pattern.m, out_f, in_f, backend)
        new = gm.graph.call_function(target, op_args)
    new.meta = dict(node.meta)
    new.meta["nmgraph"] = LinearLowering(weight=name, pattern=str(pattern), backend=backend, axis=axis, reason=reason)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if not w.users:
        gm.graph.erase_node(w)
    st.changed.append(new.name)
    return new


def _choose(name: str, weight: CompressedNM, rows: int, rows_note: str, dtype: torch.dtype,
            device: torch.device, bias: torch.Tensor | None, st: _State) -> tuple[str | None, str]:
    """The op backend for this layer, or ``None`` to keep the dense aten op (with the reason)."""
    cfg = st.cfg
    if cfg.backend == "eager":
        return None, "backend='eager' runs every layer dense"
    if cfg.backend == "auto":
        d = st.dispatcher.decide(name, weight, rows=rows, dtype=dtype, device=device, bias=bias)
        st.decisions.append(d)
        return (None if d.backend == "dense" else d.backend), d.reason + rows_note
    registry = st.dispatcher.registry if st.dispatcher is not None else default_registry()
    backend = registry.get(cfg.backend) if cfg.backend != "dense" else None
    if backend is not None:
        reason = backend.device_reason(device)
        if reason is not None:
            raise BackendUnavailableError(
                f"lower_linears(backend={cfg.backend!r}) cannot lower {name}: {reason}. Use backend='auto' "
                "(measures and falls back to dense) or 'dense'."
            )
        reason = backend.layer_reason(weight, dtype)
        if reason is not None:
            return None, f"backend={cfg.backend!r} cannot take this layer: {reason}"
    key = DispatchKey(device_name(device), str(dtype).removeprefix("torch."), m_bucket(rows),
                      int(weight.values.shape[0]), int(weight.shape[weight.axis]), str(weight.pattern),
                      bias is not None)
    st.decisions.append(Decision(name, key, cfg.backend, f"backend={cfg.backend!r} requested", source="forced"))
    return cfg.backend, f"backend={cfg.backend!r} requested"


def _register_buffers(gm: fx.GraphModule, name: str, compressed: CompressedNM, backend: str,
                      st: _State) -> _Buffers:
    """Compressed tensors as buffers of the weight's owning module (once per weight and format)."""
    fmt = "semi" if backend == "cusparselt" else "nm"
    cached = st.buffers.get((name, fmt))
    if cached is not None:
        return cached
    owner_name, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    prefix = f"{owner_name}." if owner_name else ""
    if fmt == "semi":
        from nmgraph.backends.cusparselt import CuSparseLtBackend, parts, resolve_kernel

        be = CuSparseLtBackend()
        packed, meta = parts(be.prepare(compressed))
        owner.register_buffer(f"{leaf}_nm_packed", packed)
        args = (f"{prefix}{leaf}_nm_packed", "")
        if meta is not None:
            owner.register_buffer(f"{leaf}_nm_meta", meta)
            args = (args[0], f"{prefix}{leaf}_nm_meta")
        bufs = _Buffers(args, kernel=resolve_kernel(be.kernel))
    else:
        owner.register_buffer(f"{leaf}_nm_values", compressed.values)
        owner.register_buffer(f"{leaf}_nm_indices", compressed.indices)
        bufs = _Buffers((f"{prefix}{leaf}_nm_values", f"{prefix}{leaf}_nm_indices"))
    st.buffers[(name, fmt)] = bufs
    return bufs


def _drop_unused_weights(gm: fx.GraphModule, names: set[str]) -> list[str]:
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = []
    for name in sorted(names - still_read):
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
        else:
            continue
        dropped.append(name)
    return dropped


def _fetch(gm: fx.GraphModule, qualname: str) -> Any:
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _rows(x_val: Any, hint: int) -> tuple[int, str]:
    """Rows of the activation (product of its leading dims) from the node's ``val``."""
    if not isinstance(x_val, torch.Tensor):
        return hint, f" (no shape metadata on the input: assumed {hint} rows)"
    rows = 1
    for s in x_val.shape[:-1]:
        if isinstance(s, int):
            rows *= s
            continue
        hinted = getattr(getattr(s, "node", None), "hint", None)
        if hinted is None:
            return hint, f" (dynamic input shape: assumed {hint} rows)"
        rows *= int(hinted)
    return max(rows, 1), ""


def _attr_meta(node: fx.Node, tensor: torch.Tensor, like: Any) -> None:
    """``val``/``tensor_meta`` for an inserted get_attr node, in the graph's fake mode if it has one."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    mode = detect_fake_mode([like]) if isinstance(like, torch.Tensor) else None
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    node.meta["tensor_meta"] = _extract_tensor_metadata(tensor)

