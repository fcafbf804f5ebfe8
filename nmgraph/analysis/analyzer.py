"""``analyze``: which weights can be N:M, and which channels must be permuted together.

:func:`analyze` is pure: it reads a captured graph and returns a :class:`~nmgraph.analysis.plan.SparsityPlan`.

Eligibility (:mod:`nmgraph.analysis.eligibility`). A weight is eligible when every use of it is the
weight operand of a GEMM-like op (the one table :data:`~nmgraph.analysis.aten_ops.GEMM_WEIGHTS`) and
all uses agree on the reduction axis. Everything else is reported in ``plan.skipped`` with its reason.

Coupling (:mod:`nmgraph.analysis.flow`, :mod:`nmgraph.analysis.rules`). Channels are tracked as
spaces of tensors; a union-find joins spaces that must be permuted identically, each op's rule coming
from one table keyed by ``OpOverload`` (an op missing from it is a barrier with the op named as the
reason). Concat and split along a channel axis segment a space into the spaces of their parts. A class
is a :class:`~nmgraph.analysis.plan.PermutationGroup` when no barrier touches it
(:mod:`nmgraph.analysis.groups`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from nmgraph.analysis.eligibility import find_layers
from nmgraph.analysis.flow import Flow
from nmgraph.analysis.groups import collect_groups
from nmgraph.analysis.nodes import attr_value, data_dependent, mutates, op_name, shape_of
from nmgraph.analysis.plan import LayerInfo, Skip, SparsityPlan
from nmgraph.analysis.rules import Rule, output_barrier, rule_of, rule_table
from nmgraph.errors import UnsupportedError
from nmgraph.graph import graph_record
from nmgraph.pattern import Pattern, PatternLike

__all__ = ["analyze"]

log = logging.getLogger(__name__)


def _check_outputs(gm: fx.GraphModule) -> None:
    """A graph whose output holds no graph value (a forward returning ``None``) computes nothing a
    pass could keep equal: nothing it does reaches the caller, and dead-code elimination drops it."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None or not any(isinstance(a, fx.Node) for a in pytree.tree_leaves(out.args)):
        raise UnsupportedError(
            f"analyze(): the graph of {type(gm).__name__} returns no tensor (its forward returned "
            f"{out.args[0] if out is not None and len(out.args) == 1 else None!r}), so none of its layers "
            "reaches an output and nothing could be verified or pruned meaningfully. Make forward() return "
            "its output tensor(s)."
        )


def analyze(
    gm: fx.GraphModule,
    pattern: PatternLike = "2:4",
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dense_head: bool = True,
    rules: Mapping[Any, Rule] | None = None,
) -> SparsityPlan:
    """Finds the N:M-eligible weights and the permutation groups of a captured graph.

    ``exclude``: name patterns (fnmatch, matched against parameter and module names) kept dense.
    ``include``: patterns that override the default of leaving the output head dense.
    ``dense_head``: keep GEMMs whose result reaches the model output through single-input ops
    only (lm_head, classifier) dense, as N:M training recipes do. ``rules``: channel-flow rules for
    ops nmgraph's table lacks (custom ops), ``{op: rule}`` (see :mod:`nmgraph.analysis.rules`).
    Pure: ``gm`` is not modified.

    >>> import torch, nmgraph
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = nmgraph.capture(m, (torch.randn(2, 8),))
    >>> plan = analyze(gm, "2:4")
    >>> [(layer.name, layer.group is not None) for layer in plan.layers]
    [('0.weight', False)]
    >>> plan.skipped[0].reason.startswith("output head")
    True
    >>> [(g.size, sorted(m.name for m in g.members)) for g in plan.groups]
    [(16, ['0.bias', '0.weight', '2.weight'])]
    """
    if isinstance(gm, torch.export.ExportedProgram):
        raise UnsupportedError(
            "analyze() needs a captured graph, got a torch.export.ExportedProgram: pass "
            "nmgraph.capture(model, example_inputs) (its parameters are the model's own, so what the passes "
            "change reaches the model), or at least ep.module()."
        )
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError(
            f"analyze() needs a captured graph, got {type(gm).__name__}; call nmgraph.capture(model, "
            "example_inputs) first and analyze the GraphModule it returns."
        )
    _refuse_module_calls(gm)
    _check_outputs(gm)
    p = Pattern.parse(pattern)
    table = rule_table(rules)
    found = find_layers(gm, p, include, exclude, dense_head)
    graph = gm.graph

    # ---- channel flow
    flow = Flow(gm)
    unknown: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            output_barrier(flow, node)
            continue
        if not node.users and not mutates(node):
            continue  # dead code (a value nothing reads) constrains no channel
        if any(data_dependent(n) for n in (node, *node.all_input_nodes)):
            _barrier_inputs(flow, node, f"{node.name}: {op_name(node)} on a tensor whose shape depends on "
                                        "tensor values (data-dependent size)")
            continue
        rule = rule_of(node, table)
        if rule is None:
            what = op_name(node)
            unknown[what] = unknown.get(what, 0) + 1
            _barrier_inputs(flow, node, f"{node.name}: {what} is not in nmgraph's op table")
            continue
        rule(flow, node)
    flow.finish_slices()
    if unknown:
        log.info("ops outside the table (barriers): %s", unknown)

    # ---- parameters that appear under several get_attr nodes (tied) join on each axis
    by_tensor: dict[tuple[str, int], int] = {}
    tensors = {**dict(gm.named_buffers(remove_duplicate=False)), **dict(gm.named_parameters(remove_duplicate=False))}
    for s in list(flow.spaces):
        if s.node.op != "get_attr" or len(s.axes) != 1:
            continue
        t = tensors.get(s.node.target)
        if t is None:
            continue
        key = (found.canonical.get(id(t), s.node.target), s.axes[0])
        if key in by_tensor:
            flow.union(by_tensor[key], s.index, "tied parameter")
        else:
            by_tensor[key] = s.index

    groups, barriers, layer_group = collect_groups(flow, tensors, found.canonical, found.nodes, found.layers)
    layers = [LayerInfo(i.name, i.shape, i.axis, i.op, i.node, i.module, layer_group.get(i.name))
              for i in found.layers]
    readable = _Readable(graph)
    skipped = tuple(Skip(s.name, readable(s.reason)) for s in found.skipped)
    barriers = tuple(dict.fromkeys(Skip(readable(b.name), readable(b.reason)) for b in barriers))
    plan = SparsityPlan(p, tuple(layers), skipped, tuple(groups), barriers)
    log.info("analyze: %d eligible, %d dense, %d groups", len(layers), len(found.skipped), len(groups))
    return plan


def _barrier_inputs(flow: Flow, node: fx.Node, reason: str) -> None:
    """A node no rule can read: every channel space of its inputs, and every axis of a weight it reads
    directly, is a barrier."""
    for a in node.all_input_nodes:
        for s in flow.spaces_of(a):
            flow.barrier(s.index, reason)
        if a.op == "get_attr" and attr_value(a) is not None:
            for ax in range(len(shape_of(a))):
                flow.barrier(flow.at(a, (ax,)), reason)


class _Readable:
    """Rewrites the FX node names in a reason (``slice_2: slices channel axis 2``, ``through
    linear_7``) as what the op is and where in the model it runs (``slice in
    model.layers.0.self_attn: ...``), so user text never shows graph-internal names."""

    _CONTEXT = re.compile(r"(?P<pre>^(?=[A-Za-z0-9_]+(?::| is ))|\(|through |at |of |and |, )"
                          r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?=$|[):,\[ ])")

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = {n.name: n for n in graph.nodes}

    def describe(self, node: fx.Node) -> str:
        if node.op == "get_attr":
            return str(node.target)
        if node.op == "placeholder":
            return f"input {node.target}"
        if node.op == "output":
            return "the model output"
        what = op_name(node).removeprefix("aten.").split(".")[0]
        stack = node.meta.get("nn_module_stack") or {}
        where = ""
        if stack:
            path = list(stack.values())[-1]
            path = path[0] if isinstance(path, tuple) else str(path)
            where = str(path).replace("L['self'].", "").replace("L__self__.", "")
        return f"{what} in {where}" if where and where not in ("", "L['self']") else f"{what} at the model's top level"

    def __call__(self, text: str) -> str:
        def sub(m: re.Match) -> str:
            node = self.nodes.get(m.group("name"))
            if node is not None and node.op == "output":
                node = None  # "output" in prose is the model output already
            return m.group("pre") + (self.describe(node) if node is not None else m.group("name"))

        return self._CONTEXT.sub(sub, text)


def _refuse_module_calls(gm: fx.GraphModule) -> None:
    """Raises :class:`UnsupportedError` naming the weights of layers the graph calls as modules.

    Such layers (``call_module`` nodes, as ``torch.fx.symbolic_trace`` leaves ``nn.Linear``) hide their
    weights from the analysis; a plan without them would silently leave them dense.
    """
    hidden: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        sub = gm.get_submodule(str(node.target))
        hidden += [f"{node.target}.{n}" for n, w in sub.named_parameters() if w.dim() >= 2]
    if not hidden:
        return
    rec = graph_record(gm)
    why = next((n for n in (rec.notes if rec is not None else ()) if n.startswith("torch.export failed")), None)
    names = ", ".join(hidden[:8]) + (f" and {len(hidden) - 8} more" if len(hidden) > 8 else "")
    raise UnsupportedError(
        f"analyze() cannot read {len(hidden)} weights of layers this graph calls as modules (call_module "
        f"nodes): {names}. Such a graph comes from torch.fx.symbolic_trace"
        + (f", used because {why}" if why else "")
        + ". Capture with torch.export instead: nmgraph.capture(model, example_inputs) with the inputs "
        "exactly as the model is called (shapes, a dict or kwargs= for keyword inputs)."
    )
