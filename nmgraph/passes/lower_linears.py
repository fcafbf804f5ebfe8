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

A pointwise convolution (1x1 kernel, ``groups=1``, stride 1, no padding; dilation does nothing to a
1x1 kernel) of ``x [B, C, *S]`` with ``W [O, C, 1, ...]`` computes ``W.view(O, C) @ x[b, :, s] + bias``
at every position, so it is rewritten as ``permute(x)`` to ``[B, *S, C]`` -> the linear op on
``W.view(O, C)`` -> ``permute`` back to ``[B, O, *S]``: the same function.

Rows. The dispatcher measures the node's rows (leading dims of its input). A node whose rows are
symbolic (dynamic shapes), or every node with ``dynamic_rows=True``, also hands its op the layer's
dense weight where the backend offers a slot for it (:attr:`GraphCall.dense_slot`): the op runs it
for rows outside its kernels' range, so prefill sizes never go through a decode kernel.

What it does, per eligible node (a GEMM the one table :data:`~nmgraph.analysis.aten_ops.GEMM_WEIGHTS`
marks ``lowers``): compress the weight, choose a backend (``"auto"``: the
:class:`~nmgraph.backends.dispatch.Dispatcher` measures dense and the sparse kernels for the
node's input shape bucket, read from ``node.meta["val"]``), ask that same backend object how it
lowers (:meth:`~nmgraph.backends.base.Backend.lower`: its graph op and the tensors it reads),
register those tensors as buffers on the weight's owning module (``<leaf>_<suffix>``, e.g.
``<leaf>_nm_values``), and replace the node with a call of the backend's op carrying the old node's
metadata (``val``, ``nn_module_stack``, ``stack_trace``, ...).
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

from nmgraph.analysis.aten_ops import GEMM_WEIGHTS, GemmWeight, is_grouped_mm
from nmgraph.analysis.nodes import linear_of_transposed, pointwise_conv_reason, weight_source
from nmgraph.analysis.plan import Skip
from nmgraph.backends import Backend, BackendRegistry, backend_names, default_registry
from nmgraph.backends.dispatch import Decision, Dispatcher, DispatchKey, DispatchReport, device_name, m_bucket
from nmgraph.compress import CompressedNM, compress
from nmgraph.errors import BackendUnavailableError, PatternError, StrictModeError, UnsupportedError
from nmgraph.graph import fetch_attr, owner_of
from nmgraph.passes.runner import PassResult
from nmgraph.pattern import Pattern, PatternLike, is_nm

__all__ = ["LinearLowering", "LowerLinearsConfig", "lower_linears", "lowering_backends"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten
#: The GEMMs that lower (from the one GEMM table): linear kernels, and convolutions when pointwise.
_LOWERING = {op: spec for op, spec in GEMM_WEIGHTS.items() if spec.lowers or spec.pointwise}


def lowering_backends() -> tuple[str, ...]:
    """``backend`` values: ``"auto"`` measures per layer; ``"eager"`` keeps every folded dense aten op;
    or a registered backend's name."""
    return ("auto", *backend_names(), "eager")


@dataclass(frozen=True)
class LowerLinearsConfig:
    """What :func:`lower_linears` lowers and how.

    ``weights``: parameter qualified name -> reduction axis of the weights to lower (``None``:
    every ``aten.linear``/``aten.addmm`` weight of the graph that is N:M). ``pattern``: the N:M
    pattern the weights follow. ``backend``: one of :func:`lowering_backends`. ``dispatcher``:
    used by ``"auto"`` (default: a new :class:`Dispatcher`). ``rows_hint``: input rows assumed
    for dispatch when a node has no shape metadata. ``drop_dense``: remove dense weights the
    graph no longer reads. ``strict``: raise :class:`StrictModeError` instead of skipping.
    ``dynamic_rows``: the graph will be called with other row counts than its shape metadata says
    (Dynamo's automatic dynamic shapes): every lowered op whose backend offers it
    (:attr:`GraphCall.dense_slot`) also gets the layer's dense weight, which it runs for rows outside
    its kernels' range. Nodes whose rows are symbolic in the metadata are treated so anyway.
    """

    weights: Mapping[str, int] | None = None
    pattern: PatternLike = "2:4"
    backend: str = "auto"
    dispatcher: Dispatcher | None = None
    rows_hint: int = 1
    drop_dense: bool = True
    strict: bool = False
    dynamic_rows: bool = False

    def __post_init__(self) -> None:
        try:
            Pattern.parse(self.pattern)
        except PatternError as e:
            raise PatternError(f"LowerLinearsConfig.pattern: {e}") from None
        if self.backend not in lowering_backends():
            raise UnsupportedError(
                f"LowerLinearsConfig.backend={self.backend!r} is not one of {', '.join(lowering_backends())}."
            )
        if self.weights is not None:
            for name, axis in self.weights.items():
                if not isinstance(name, str) or isinstance(axis, bool) or axis not in (-3, -2, -1, 0, 1, 2):
                    raise UnsupportedError(
                        f"LowerLinearsConfig.weights[{name!r}] = {axis!r}: keys are parameter names, values "
                        "the reduction axis of the weight (1 for Linear [out, in], 0 for [in, out])."
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
    #: the op also reads the dense weight, which it runs for rows outside its kernels' range
    dense_fallback: bool = False
    #: a pointwise convolution lowered as a GEMM over channels (input moved channel-last and back)
    conv: bool = False


@dataclass
class _State:
    cfg: LowerLinearsConfig
    pattern: Pattern
    dispatcher: Dispatcher | None
    registry: BackendRegistry
    skipped: list[Skip] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    buffers: dict[tuple[str, str], tuple[str | None, ...]] = field(default_factory=dict)
    calls: dict[tuple[str, str], tuple[Any, tuple, int | None]] = field(default_factory=dict)
    seen_weights: set[str] = field(default_factory=set)


def lower_linears(gm: fx.GraphModule, config: LowerLinearsConfig | Mapping[str, Any] | None = None) -> PassResult:
    """Replaces eligible ``aten.linear``/``aten.addmm`` nodes with the chosen backend's op (in place).

    ``x @ W.T`` of a listed 2-D parameter (``matmul``/``mm`` of its transpose) is first rewritten
    to ``aten.linear(x, W)``, which computes the same, and then lowered like one.

    See the module docstring. Returns a :class:`PassResult` whose ``info`` holds ``"decisions"``
    (a :class:`DispatchReport`), ``"backends"`` (lowered node -> backend) and ``"dropped"``
    (dense weights removed from ``gm``).
    """
    cfg = _as_config(config)
    pattern = Pattern.parse(cfg.pattern)
    dispatcher = cfg.dispatcher if cfg.dispatcher is not None else (Dispatcher() if cfg.backend == "auto" else None)
    registry = dispatcher.registry if dispatcher is not None else default_registry()
    st = _State(cfg, pattern, dispatcher, registry)
    backends: dict[str, str] = {}
    rewritten = _rewrite_transposed_linears(gm, cfg)

    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        spec = _LOWERING.get(node.target)
        if spec is None:
            _skip_other_consumers(node, st)
            continue
        new = _lower_node(gm, node, spec, st)
        if new is not None:
            backends[new.name] = new.meta["nmgraph"].backend

    if cfg.weights is not None:
        for name in cfg.weights:
            if name not in st.seen_weights and not any(s.name == name for s in st.skipped):
                st.skipped.append(Skip(name, f"not read by any {_lowering_ops().replace(' and ', ' or ')} node of "
                                             "the graph"))

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


def _lowering_ops() -> str:
    kinds = list(dict.fromkeys(f"aten.{s.kind}" for s in _LOWERING.values() if s.lowers))
    return ", ".join(kinds) + " and pointwise convolutions"


def _skip_other_consumers(node: fx.Node, st: _State) -> None:
    """A listed weight read by an op that does not lower is reported once per node: a GEMM of the
    table without a sparse kernel (convolutions, batched matmuls, grouped GEMMs) runs its folded
    N:M weight densely; any other op is a use that stays dense."""
    if st.cfg.weights is None:
        return
    for arg in node.all_input_nodes:
        if not (arg.op == "get_attr" and arg.target in st.cfg.weights):
            continue
        st.seen_weights.add(arg.target)
        spec = GEMM_WEIGHTS.get(node.target)
        if spec is not None or is_grouped_mm(node.target):
            kind = spec.kind if spec is not None else "grouped_mm"
            why = (f"{kind} ({node.name}): nmgraph has no sparse kernel for this op; it runs its folded "
                   f"{st.pattern} weight densely")
        else:
            why = (f"read by {node.format_node()}: only {_lowering_ops()} lower to a sparse kernel; this use "
                   "stays dense")
        st.skipped.append(Skip(arg.target, why))


def _lower_node(gm: fx.GraphModule, node: fx.Node, spec: GemmWeight, st: _State) -> fx.Node | None:
    cfg, pattern = st.cfg, st.pattern
    axis = spec.axis
    args = list(node.args)
    x = args[spec.x_arg]
    w = args[spec.weight_arg] if len(args) > spec.weight_arg else node.kwargs.get("weight")
    b_i = spec.bias_arg
    bias = args[b_i] if b_i is not None and len(args) > b_i else node.kwargs.get("bias")
    where = node.format_node()

    if not isinstance(w, fx.Node) or w.op != "get_attr":
        src = weight_source(w)
        if isinstance(src, fx.Node) and src.op == "get_attr" and (cfg.weights is None or src.target in cfg.weights):
            st.seen_weights.add(src.target)
            st.skipped.append(Skip(src.target, f"{where}: the weight is read through {w.format_node()}; only a "
                                               "parameter read directly lowers, so this layer runs densely"))
            return None
        if cfg.weights is None and not spec.pointwise:  # with an explicit list, only listed parameters count
            what = "a constant" if not isinstance(w, fx.Node) else f"computed by {w.format_node()}"
            st.skipped.append(Skip(node.name, f"weight is not a parameter or buffer of the graph module ({what}); "
                                              "nothing to compress at lowering time"))
        return None
    name = w.target
    if cfg.weights is not None and name not in cfg.weights:
        return None
    st.seen_weights.add(name)
    if spec.pointwise and (why := pointwise_conv_reason(node)) is not None:
        st.skipped.append(Skip(name, f"{spec.kind} ({node.name}): nmgraph has no sparse kernel for this convolution "
                                     f"(it has {why}; only pointwise ones, 1x1 kernel, groups=1, stride 1, no "
                                     f"padding, lower as GEMMs); it runs its folded {pattern} weight densely"))
        return None
    if node.target is _aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        st.skipped.append(Skip(name, f"{where}: addmm with beta/alpha other than 1 is not lowered"))
        return None
    if not isinstance(x, fx.Node):
        st.skipped.append(Skip(name, f"{where}: the activation is not a graph value"))
        return None
    weight = fetch_attr(gm, name)
    if not isinstance(weight, torch.Tensor) or (weight.dim() < 3 if spec.pointwise else weight.dim() != 2):
        st.skipped.append(Skip(name, f"{where}: weight is not a {'conv' if spec.pointwise else '2-D'} weight"))
        return None
    if cfg.weights is not None and cfg.weights[name] % weight.dim() != axis:
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
    # A pointwise conv is linear over channels: x [B, C, *S] moves channel-last, [B, *S, C].
    perm = None
    if spec.pointwise:
        nd = x_val.dim() if isinstance(x_val, torch.Tensor) else weight.dim()
        channel = nd - (weight.dim() - 2) - 1
        perm = [d for d in range(nd) if d != channel] + [channel]
    rows, rows_note, dynamic = _rows(x_val, cfg.rows_hint, perm)
    bias_t = fetch_attr(gm, bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
    out_features = weight.shape[1 - axis] if weight.dim() == 2 else weight.shape[0]
    if isinstance(bias, fx.Node) and bias_t is None:  # a computed bias: same shape for timing
        bias_t = torch.zeros(out_features, dtype=weight.dtype, device=weight.device)

    matrix = weight.detach().reshape(weight.shape[0], weight.shape[1]) if spec.pointwise else weight.detach()
    compressed = compress(matrix, pattern, axis=axis)
    backend, reason = _choose(name, compressed, rows, rows_note, dtype, weight.device, bias_t, st)
    if backend is None:
        st.skipped.append(Skip(name, f"{node.name} keeps its folded dense weight: {reason}"))
        return None

    quals = st.buffers.get((name, backend.name))
    if quals is None:
        call = backend.lower(compressed, backend.prepare(compressed))
        quals = _register_buffers(gm, name, call.buffers)
        st.buffers[(name, backend.name)] = quals
        st.calls[(name, backend.name)] = (call.op, call.args, call.dense_slot)
    op, const_args, dense_slot = st.calls[(name, backend.name)]
    with_dense = dense_slot is not None and (dynamic or cfg.dynamic_rows)
    with gm.graph.inserting_before(node):
        attrs = []
        for qual in quals:
            a = gm.graph.get_attr(qual) if qual else None
            if a is not None:
                _attr_meta(a, fetch_attr(gm, qual), x_val)
            attrs.append(a)
        if with_dense:
            attrs[dense_slot] = _dense_matrix(gm, w, weight, axis, spec.pointwise)
        x_in = x if perm is None else _permute(gm, x, perm)
        new = gm.graph.call_function(op, (x_in, *attrs, bias, *const_args))
        out = new if perm is None else _permute(gm, new, sorted(range(len(perm)), key=perm.__getitem__))
    new.meta = dict(node.meta)
    if perm is not None and isinstance(node.meta.get("val"), torch.Tensor):
        new.meta["val"] = node.meta["val"].permute(perm)
        out.meta = dict(node.meta)
    if with_dense:
        reason += "; the op also holds the dense weight, which it runs for rows outside its kernels' range " \
                  "(dynamic rows)"
    new.meta["nmgraph"] = LinearLowering(weight=name, pattern=str(pattern), backend=backend.name, axis=axis,
                                         reason=reason, dense_fallback=with_dense, conv=perm is not None)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    if not w.users:
        gm.graph.erase_node(w)
    st.changed.append(new.name)
    return new


def _permute(gm: fx.GraphModule, x: fx.Node, perm: list[int]) -> fx.Node:
    """``aten.permute(x, perm)``, with its ``val`` when ``x`` has one."""
    node = gm.graph.call_function(_aten.permute.default, (x, list(perm)))
    val = x.meta.get("val")
    if isinstance(val, torch.Tensor):
        node.meta["val"] = val.permute(perm)
    return node


def _dense_matrix(gm: fx.GraphModule, w: fx.Node, weight: torch.Tensor, axis: int, pointwise: bool) -> fx.Node:
    """The layer's dense weight as ``[out_features, in_features]`` (a view of the parameter ``w``)."""
    if pointwise:
        node = gm.graph.call_function(_aten.view.default, (w, [weight.shape[0], weight.shape[1]]))
    elif axis == 0:
        node = gm.graph.call_function(_aten.t.default, (w,))
    else:
        return w
    val = w.meta.get("val")
    if isinstance(val, torch.Tensor):
        node.meta["val"] = val.view(weight.shape[0], weight.shape[1]) if pointwise else val.t()
    return node


def _choose(name: str, weight: CompressedNM, rows: int, rows_note: str, dtype: torch.dtype,
            device: torch.device, bias: torch.Tensor | None, st: _State) -> tuple[Backend | None, str]:
    """The backend object for this layer (the one the dispatcher timed), or ``None`` to keep the
    dense aten op (with the reason)."""
    cfg = st.cfg
    if cfg.backend == "eager":
        return None, "backend='eager' runs every layer dense"
    if cfg.backend == "auto":
        d = st.dispatcher.decide(name, weight, rows=rows, dtype=dtype, device=device, bias=bias)
        st.decisions.append(d)
        chosen = None if d.backend == "dense" else st.registry.get(d.backend)
        return chosen, d.reason + rows_note
    backend = st.registry.get(cfg.backend)
    if backend.sparse:
        reason = backend.device_reason(device)
        if reason is not None:
            raise BackendUnavailableError(
                f"lower_linears(backend={cfg.backend!r}) cannot lower {name}: {reason}. Use backend='auto' "
                "(measures and falls back to dense) or 'dense'."
            )
        reason = backend.layer_reason(weight, dtype) or backend.rows_reason(weight, dtype, m_bucket(rows))
        if reason is not None:
            return None, f"backend={cfg.backend!r} cannot take this layer: {reason}{rows_note}"
    key = DispatchKey(device_name(device), str(dtype).removeprefix("torch."), m_bucket(rows),
                      int(weight.values.shape[0]), int(weight.shape[weight.axis]), str(weight.pattern),
                      bias is not None)
    st.decisions.append(Decision(name, key, cfg.backend, f"backend={cfg.backend!r} requested", source="forced"))
    return backend, f"backend={cfg.backend!r} requested{rows_note}"


def _register_buffers(gm: fx.GraphModule, name: str, buffers: tuple[tuple[str, Any], ...]) -> tuple[str | None, ...]:
    """The backend's tensors as buffers of the weight's owning module; their qualified names in
    argument order (``None`` for an absent tensor)."""
    owner, leaf = owner_of(gm, name)
    prefix = name[: len(name) - len(leaf)]
    quals: list[str | None] = []
    for suffix, tensor in buffers:
        if tensor is None:
            quals.append(None)
            continue
        owner.register_buffer(f"{leaf}_{suffix}", tensor)
        quals.append(f"{prefix}{leaf}_{suffix}")
    return tuple(quals)


def _drop_unused_weights(gm: fx.GraphModule, names: set[str]) -> list[str]:
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = []
    for name in sorted(names - still_read):
        owner, leaf = owner_of(gm, name)
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
        else:
            continue
        dropped.append(name)
    return dropped


def _rows(x_val: Any, hint: int, perm: list[int] | None = None) -> tuple[int, str, bool]:
    """Rows of the activation (product of its leading dims, after ``perm`` moves the channels last)
    from the node's ``val``; and whether they are dynamic (symbolic in the metadata)."""
    if not isinstance(x_val, torch.Tensor):
        return hint, f" (no shape metadata on the input: assumed {hint} rows)", False
    dims = [x_val.shape[d] for d in perm[:-1]] if perm is not None else list(x_val.shape[:-1])
    rows, dynamic = 1, False
    for s in dims:
        if isinstance(s, int):
            rows *= s
            continue
        dynamic = True
        hinted = getattr(getattr(s, "node", None), "hint", None)
        if hinted is None:
            return hint, f" (dynamic input shape: assumed {hint} rows)", True
        rows *= int(hinted)
    note = f" (dynamic input shape: measured at its example's {rows} rows)" if dynamic else ""
    return max(rows, 1), note, dynamic


def _attr_meta(node: fx.Node, tensor: torch.Tensor, like: Any) -> None:
    """``val``/``tensor_meta`` for an inserted get_attr node, in the graph's fake mode if it has one."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    mode = detect_fake_mode([like]) if isinstance(like, torch.Tensor) else None
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    node.meta["tensor_meta"] = _extract_tensor_metadata(tensor)

