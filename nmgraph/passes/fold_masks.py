"""Fold mask nodes into their weights: every masked weight becomes exactly N:M, no mask node remains.

For each mask node ``W~ = nmgraph.masked_weight(W, ..., hard, ...)`` the pass multiplies the weight
in place by its hard N:M mask (``W <- W * hard``), points every user of ``W~`` back at ``W`` and
removes the node. In hard mode (evaluation) the mask node computes ``W * hard``, so each consumer
sees the same tensor before and after the fold, bit for bit: the folded graph's output equals the
prepared graph's hard-mask forward. When no mask node is left, the mask state submodule is
removed too.

The fold writes into the weight tensors themselves (the model's own Parameters, shared through
capture), so the model outside the graph becomes N:M as well. Every mask node is checked (pattern,
weight read directly, hard mask N:M) before the first weight is written, so a bad mask raises with
nothing folded; :func:`nmgraph.convert` also undoes the writes if the call fails later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from nmgraph.errors import PlanError, UnsupportedError, VerificationError
from nmgraph.graph import fetch_attr
from nmgraph.masking import MASK_OP, MaskState, SparsityState
from nmgraph.passes.insert_masks import MaskNodeInfo
from nmgraph.passes.runner import PassResult
from nmgraph.pattern import Pattern, is_nm

__all__ = ["FoldMasksConfig", "fold_masks", "mask_nodes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldMasksConfig:
    """``pattern``: if given, every mask must target it. ``verify``: check each folded weight is N:M."""

    pattern: Pattern | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        if self.pattern is not None and not isinstance(self.pattern, Pattern):
            raise PlanError(f"FoldMasksConfig.pattern must be a Pattern or None, got {self.pattern!r}.")


def mask_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The mask nodes of ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MASK_OP]



def _describe(gm: fx.GraphModule, node: fx.Node) -> MaskNodeInfo:
    info = node.meta.get("nmgraph")
    if isinstance(info, MaskNodeInfo):
        return info
    hard = node.args[2]
    if isinstance(hard, fx.Node) and hard.op == "get_attr":
        owner = fetch_attr(gm, hard.target.rpartition(".")[0])
        weight = node.args[0]
        if isinstance(owner, MaskState) and isinstance(weight, fx.Node) and weight.op == "get_attr":
            return MaskNodeInfo(weight.target, hard.target.rpartition(".")[0], owner.axis, owner.target)
    raise UnsupportedError(
        f"Cannot fold mask node {node.format_node()}: it carries no nmgraph metadata and its mask is "
        "not a buffer of an nmgraph MaskState. Fold the prepared graph itself: nmgraph.convert(prepared) "
        "before exporting or re-capturing it."
    )


def fold_masks(gm: fx.GraphModule, config: FoldMasksConfig | None = None) -> PassResult:
    """Folds every mask node of ``gm`` into its weight (in place); see the module docstring.

    Raises :class:`PlanError` if a mask targets another pattern than ``config.pattern``,
    :class:`UnsupportedError` if a mask node's weight is not a ``get_attr`` of the graph, and
    :class:`VerificationError` if a folded weight is not N:M.
    """
    config = config or FoldMasksConfig()
    graph = gm.graph
    result = PassResult(gm)
    folded: dict[str, Pattern] = {}
    axes: dict[str, int] = {}
    states: set[str] = set()
    # 1. check every mask node before any weight changes (a bad second mask must not leave the first folded)
    rewrites: list[tuple[fx.Node, fx.Node]] = []
    writes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in mask_nodes(gm):
        info = _describe(gm, node)
        wnode, hnode = node.args[0], node.args[2]
        if not (isinstance(wnode, fx.Node) and wnode.op == "get_attr"):
            raise UnsupportedError(
                f"Cannot fold mask node {node.format_node()} of weight {info.weight!r}: its weight input is "
                "not a get_attr of the graph. Capture with nmgraph.capture() so weights are attributes."
            )
        if config.pattern is not None and info.pattern != config.pattern:
            raise PlanError(
                f"Mask of {info.weight!r} (node {node.name}) targets {info.pattern}, but convert was asked "
                f"for {config.pattern}. Pass pattern={str(info.pattern)!r} (or None) to fold it."
            )
        weight = fetch_attr(gm, wnode.target)
        hard = fetch_attr(gm, hnode.target)
        if wnode.target not in writes:
            if config.verify and not is_nm(weight.detach() * hard, info.pattern, axis=info.axis):
                raise VerificationError(
                    f"Weight {info.weight!r} (node {node.name}) folded with its mask is not {info.pattern} along "
                    f"axis {info.axis}: its hard mask buffer {hnode.target!r} is not an N:M mask. Was it "
                    "overwritten? Reload the prepared model's state_dict. Nothing was folded."
                )
            writes[wnode.target] = (weight, hard)
            folded[wnode.target] = info.pattern
            axes[wnode.target] = info.axis
        rewrites.append((node, wnode))
    # 2. write the weights, 3. rewrite the graph
    with torch.no_grad():
        for weight, hard in writes.values():
            weight.mul_(hard)
    for node, wnode in rewrites:
        node.replace_all_uses_with(wnode)
        attr_args = [a for a in node.args if isinstance(a, fx.Node) and a is not wnode]
        graph.erase_node(node)
        for a in attr_args:
            if a.op == "get_attr" and not a.users:
                states.add(a.target.split(".")[0])
                graph.erase_node(a)
        result.changed_nodes.append(node.name)
    removed = []
    still_read = {n.target.split(".")[0] for n in graph.nodes if n.op == "get_attr"}
    for root in sorted(states - still_read):
        if isinstance(getattr(gm, root, None), (SparsityState, torch.nn.Module)):
            gm.delete_submodule(root)
            removed.append(root)
    result.info.update(folded=list(folded), axes=axes, patterns=folded, removed_state=removed)
    log.info("folded %d mask nodes into %d weights", len(result.changed_nodes), len(folded))
    return result
