"""Which weights can be N:M: every use is the weight operand of a GEMM-like op, along one reduction axis.

A use is read through the one GEMM-weight table (:data:`~nmgraph.analysis.aten_ops.GEMM_WEIGHTS`),
looking through casts (``W.to(x.dtype)``), ``x @ W.T`` (a Linear with ``W`` stored ``[out, in]``)
and MoE experts read by a grouped GEMM. Every weight that is not eligible is reported with its reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from nmgraph.analysis.aten_ops import (
    CAST_OPS,
    GEMM_WEIGHTS,
    METADATA_OPS,
    RNN_WEIGHTS,
    WEIGHT_NORM_OPS,
    gemm_weight,
    is_grouped_mm,
)
from nmgraph.analysis.nodes import (
    attr_value,
    conv_groups,
    linear_of_transposed,
    module_of,
    op_name,
    rnn_call,
    shape_of,
    transposed_weight,
    val_of,
)
from nmgraph.analysis.plan import LayerInfo, Skip
from nmgraph.errors import ArgumentError, PlanError
from nmgraph.pattern import Pattern

__all__ = ["Eligibility", "WeightUse", "check_name_patterns", "find_layers", "gemm_uses", "gemm_weight_axes", "matches", "module_gemm_axes",
           "weight_use"]

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightUse:
    """One read of a weight: the GEMM node, its reduction axis (``None``: not a GEMM weight, with
    ``why_not``) and the kind of GEMM (``GemmWeight.kind`` or ``"grouped_mm"``)."""

    node: fx.Node
    axis: int | None
    op: str
    why_not: str | None = None


def weight_use(node: fx.Node, w: fx.Node) -> WeightUse:
    """How ``node`` uses parameter ``w``: as a GEMM weight with a reduction axis, or not."""
    if transposed_weight(node, batched=True) is w:  # MoE experts W [E, out, in] in a grouped GEMM
        users = list(node.users)
        if len(users) == 1 and is_grouped_mm(users[0].target) and users[0].args[1] is node:
            return WeightUse(users[0], 2, "grouped_mm")
    if is_grouped_mm(node.target) and node.args[1] is w and len(shape_of(w)) == 3 and node.args[0] is not w:
        return WeightUse(node, 1, "grouped_mm")  # experts stored [E, in, out]
    if transposed_weight(node) is w and len(node.users) == 1:  # x @ W.T: W [out, in] reduces along axis 1
        user = next(iter(node.users))
        if linear_of_transposed(user) is w:
            return WeightUse(user, 1, GEMM_WEIGHTS[user.target].kind)
    rnn = rnn_call(node)
    if rnn is not None:
        return _rnn_use(node, w, rnn)
    if node.op == "call_function" and node.target in WEIGHT_NORM_OPS and len(node.args) > 1 and node.args[1] is w:
        return WeightUse(node, None, op_name(node), f"magnitude g of weight_norm ({node.name}): a per-row scale, "
                                                    "not a GEMM weight")
    if node.op == "call_function" and node.target in WEIGHT_NORM_OPS and node.args and node.args[0] is w:
        return WeightUse(node, None, op_name(node), (
            f"direction v of weight_norm ({node.name}): its GEMM reads g * v / ||v||, computed at run time; "
            "remove the weight norm (torch.nn.utils.parametrize.remove_parametrizations or "
            "torch.nn.utils.remove_weight_norm) to make the weight eligible"))
    spec = gemm_weight(node.target) if node.op == "call_function" else None
    if spec is None:
        return WeightUse(node, None, op_name(node), f"used by {op_name(node)} ({node.name}), not a matmul or conv")
    name = spec.kind
    if len(node.args) <= spec.weight_arg or node.args[spec.weight_arg] is not w or any(
        a is w for i, a in enumerate(node.args) if i != spec.weight_arg
    ):
        return WeightUse(node, None, name, f"used as an activation operand of {node.name} ({op_name(node)})")
    shape = shape_of(w)
    if len(shape) < 2:
        return WeightUse(node, None, name, f"1-D operand of {node.name}")
    if name == "conv":
        transposed = node.target is aten.convolution.default and bool(node.args[6])
        if transposed:
            return WeightUse(node, None, name, f"transposed convolution ({node.name}); reduction runs along dim 0")
    if name in ("mm", "matmul") and len(shape) != 2:
        return WeightUse(node, None, name, f"batched matmul weight of shape {list(shape)} ({node.name})")
    return WeightUse(node, spec.axis, name)


def _rnn_use(node: fx.Node, w: fx.Node, rnn) -> WeightUse:
    """``w`` read by a recurrent op: its input-to-hidden and hidden-to-hidden weights reduce along axis 1."""
    roles = [role for op, role in rnn.weights() if op is w]
    kind = rnn.spec.kind
    if rnn.problem:
        return WeightUse(node, None, kind, f"read by {node.name} ({op_name(node)}): {rnn.problem}")
    if not roles or any(r not in ("w_ih", "w_hh") for r in roles) or node.args[0] is w:
        return WeightUse(node, None, kind, f"used by {node.name} ({op_name(node)}) as "
                                           f"{roles[0] if roles else 'an operand'}, not as a GEMM weight")
    if rnn.spec.why_dense:
        return WeightUse(node, None, kind, f"{roles[0]} of {node.name}, {rnn.spec.why_dense}")
    return WeightUse(node, 1, kind)


def gemm_uses(w: fx.Node) -> list[WeightUse]:
    """Every use of parameter node ``w``, looking through casts (``W.to(x.dtype)``) and skipping
    metadata-only reads (``_assert_tensor_metadata``, ``sym_size``)."""
    uses: list[WeightUse] = []
    for u in w.users:
        if u.op == "call_function" and u.target in METADATA_OPS:
            continue
        if u.op == "call_function" and u.target in CAST_OPS and u.args[0] is w and \
                shape_of(u) == shape_of(w):
            uses.extend(gemm_uses(u))
            continue
        uses.append(weight_use(u, w))
    return uses


def _head_paths(graph: fx.Graph, gemms: set[fx.Node]) -> tuple[nx.DiGraph, fx.Node]:
    """Dataflow edges that pass through single-input ops (and never into another GEMM or conv).

    A GEMM with a path to the output in this graph is an output head: its result *is* the model
    output up to unary ops (lm_head, classifier).
    """
    g = nx.DiGraph()
    out = next(n for n in graph.nodes if n.op == "output")
    for n in graph.nodes:
        for u in n.users:
            if u.op == "output":
                g.add_edge(n, u)
                continue
            if u in gemms:
                continue
            tensor_inputs = [a for a in u.all_input_nodes if val_of(a) is not None and a.op != "get_attr"]
            if len(tensor_inputs) <= 1:
                g.add_edge(n, u)
    return g, out


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first fnmatch pattern that ``name`` (or a name under it) matches, else ``None``."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"{p}.*") or name == p:
            return p
    return None


def _param_nodes(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[int, str], dict[str, list[fx.Node]]]:
    """Parameters by name, the canonical (first) name of each tensor, and the get_attr nodes of each."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for name, t in params.items():
        canonical.setdefault(id(t), name)
    nodes: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in params:
            nodes.setdefault(canonical[id(params[n.target])], []).append(n)
    return params, canonical, nodes


def _other_reads(pname: str, w: torch.Tensor, params: dict[str, torch.Tensor], uses: list[WeightUse]) -> str:
    """What else reads a weight left dense: the other names of the same tensor (a tied weight), and
    the number of nodes that read it when that is more than one (a loop unrolled in capture)."""
    aliases = [n for n, t in params.items() if t is w and n != pname]
    parts = []
    if aliases:
        parts.append(f"tied weight, also {', '.join(aliases[:3])}{' ...' if len(aliases) > 3 else ''}")
    nodes = {u.node for u in uses}
    if len(nodes) > 1:
        ok = sum(u.axis is not None for u in uses)
        parts.append(f"read by {len(nodes)} nodes" + (f", {ok} of them as a GEMM weight" if ok else ""))
    return f" ({'; '.join(parts)})" if parts else ""


@dataclass(frozen=True)
class Eligibility:
    """The eligible layers, the weights left dense, and each eligible weight's (get_attr, GEMM) nodes."""

    layers: tuple[LayerInfo, ...]
    skipped: tuple[Skip, ...]
    nodes: dict[str, tuple[fx.Node, fx.Node]]
    canonical: dict[int, str]


def _name_patterns(value: Sequence[str] | str, arg: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ArgumentError(f"analyze({arg}=...) takes a list of name patterns, got {type(value).__name__}.") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise ArgumentError(f"analyze({arg}=...) takes name patterns (strings), got {bad[0]!r}.")
    return patterns


def check_name_patterns(gm: fx.GraphModule, arg: str, patterns: Sequence[str]) -> None:
    """Each pattern of ``include=``/``exclude=`` must match a parameter or module name of ``gm``: a
    typo would otherwise keep a layer dense (or prune an output head) without a word."""
    names: set[str] = set()
    for pname, _ in gm.named_parameters(remove_duplicate=False):
        parts = pname.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for n in gm.graph.nodes:
        for path, *_ in (n.meta.get("nn_module_stack") or {}).values():
            if isinstance(path, str) and path:
                names.add(path)
    for p in patterns:
        if any(matches(name, (p,)) for name in names):
            continue
        near = difflib.get_close_matches(p, sorted(names), n=5, cutoff=0.6)
        hint = (f"did you mean {', '.join(map(repr, near))}?" if near else
                f"names look like {', '.join(map(repr, sorted(names, key=len)[:5]))}")
        raise PlanError(
            f"{arg}={p!r} matches no parameter or module name of this graph ({hint}). Patterns are fnmatch "
            "patterns matched against parameter and module names, e.g. 'encoder.layer.*.output.dense'."
        )


def find_layers(gm: fx.GraphModule, pattern: Pattern, include: Sequence[str] = (), exclude: Sequence[str] = (),
                dense_head: bool = True) -> Eligibility:
    """Every parameter of ``gm`` of 2 or more dims: eligible for ``pattern``, or skipped with a reason.

    A pattern of ``include``/``exclude`` that matches no name raises :class:`PlanError` listing near names."""
    include, exclude = _name_patterns(include, "include"), _name_patterns(exclude, "exclude")
    check_name_patterns(gm, "include", include)
    check_name_patterns(gm, "exclude", exclude)
    params, canonical, seen_tensors = _param_nodes(gm)
    gemm_nodes = {n for n in gm.graph.nodes if n.op == "call_function" and (
        n.target in GEMM_WEIGHTS or n.target in RNN_WEIGHTS)}
    head_graph, output_node = _head_paths(gm.graph, gemm_nodes)
    layers: list[LayerInfo] = []
    skipped: list[Skip] = []
    eligible_nodes: dict[str, tuple[fx.Node, fx.Node]] = {}
    for pname, nodes in seen_tensors.items():
        w = params[pname]
        if w.dim() < 2:
            continue  # biases and norm parameters: never N:M candidates, not reported as skipped
        uses = [use for n in nodes for use in gemm_uses(n)]
        bad = [u for u in uses if u.axis is None]
        if not uses:
            skipped.append(Skip(pname, "not used by the graph"))
            continue
        if bad:
            skipped.append(Skip(pname, bad[0].why_not + _other_reads(pname, w, params, uses)))
            continue
        if len({u.axis for u in uses}) > 1:
            skipped.append(Skip(pname, "used with different reduction axes: " +
                                ", ".join(f"{u.node.name}: axis {u.axis}" for u in uses)))
            continue
        use = uses[0]
        k = w.shape[use.axis]
        if use.op == "conv" and k == 1:
            kind = "depthwise convolution" if conv_groups(use.node) > 1 else "convolution with one input channel"
            skipped.append(Skip(pname, f"{kind}: reduction dim has size 1 (shape {list(w.shape)})"))
            continue
        module = module_of(use.node, pname)
        excluded = matches(pname, exclude) or matches(module, exclude)
        if excluded:
            skipped.append(Skip(pname, f"excluded by pattern {excluded!r}"))
            continue
        if k % pattern.m:
            skipped.append(Skip(pname, f"reduction dim {use.axis} of shape {list(w.shape)} is {k}, not divisible "
                                       f"by M={pattern.m}"))
            continue
        if dense_head and not (matches(pname, include) or matches(module, include)) and any(
            u.node in head_graph and nx.has_path(head_graph, u.node, output_node) for u in uses
        ):
            skipped.append(Skip(pname, "output head kept dense (its result is the model output); "
                                       f"pass include=[{module or pname!r}] to prune it"))
            continue
        layers.append(LayerInfo(pname, tuple(w.shape), use.axis, use.op, use.node.name, module))
        eligible_nodes[pname] = (nodes[0], use.node)
    skipped.extend(_non_parameter_weights(gm, params))
    return Eligibility(tuple(layers), tuple(skipped), eligible_nodes, canonical)


def _non_parameter_weights(gm: fx.GraphModule, params: dict[str, torch.Tensor]) -> list[Skip]:
    """Buffers and constant tensors that a GEMM reads as its weight: reported, never pruned silently
    nor ignored silently (they are no Parameter: an optimizer does not train them, and ``convert``
    prunes parameters only)."""
    param_ids = {id(t) for t in params.values()}
    buffer_names = {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    out: dict[str, Skip] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in params or node.target in out:
            continue
        t = attr_value(node)
        if t is None or id(t) in param_ids or t.dim() < 2:
            continue
        uses = [u for u in gemm_uses(node) if u.axis is not None]
        if not uses:
            continue
        kind = "a buffer" if node.target in buffer_names else "a constant tensor (neither parameter nor buffer)"
        out[node.target] = Skip(node.target, f"{kind} used as the weight of {uses[0].node.name}: "
                                             "nmgraph prunes parameters only; register it with "
                                             "nn.Parameter(..., requires_grad=False) to make it N:M")
    return list(out.values())


def gemm_weight_axes(gm: fx.GraphModule) -> dict[str, int]:
    """``{parameter name: reduction axis}`` for every parameter that ``gm`` reads as a GEMM weight, all
    such reads along one axis (the reading of :func:`find_layers`). Other reads do not exclude a
    weight here (a tied embedding is also an ``lm_head``): this answers how an N:M weight is stored
    and exported, not whether it may be pruned. A graph without shape metadata (``symbolic_trace``)
    raises :class:`UnsupportedError`."""
    _, _, seen = _param_nodes(gm)
    out: dict[str, int] = {}
    for pname, nodes in seen.items():
        axes = {u.axis for n in nodes for u in gemm_uses(n) if u.axis is not None}
        if len(axes) == 1:
            out[pname] = axes.pop()
    return out


def module_gemm_axes(model: torch.nn.Module) -> dict[str, int]:
    """Without a graph, the GEMM weights nmgraph can tell by module type: ``nn.Linear`` (axis 1),
    non-transposed ``ConvNd`` (axis 1, input channels) and transformers' ``Conv1D`` (axis 0, stored
    ``[in, out]``). Casts, ``x @ W.T`` and MoE experts need a graph (:func:`gemm_weight_axes`)."""
    conv1d = _hf_conv1d_class()
    found: dict[str, int] = {}
    for mname, mod in model.named_modules():
        axis = None
        if isinstance(mod, torch.nn.Linear) or (isinstance(mod, torch.nn.modules.conv._ConvNd) and not mod.transposed):
            axis = 1
        elif conv1d is not None and isinstance(mod, conv1d):
            axis = 0
        w = getattr(mod, "weight", None)
        if axis is not None and isinstance(w, torch.Tensor) and w.dim() >= 2:
            found.setdefault(f"{mname}.weight" if mname else "weight", axis)
    return found


def _hf_conv1d_class() -> type | None:
    if "transformers" not in sys.modules:
        return None  # nothing can be an instance of it
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D
