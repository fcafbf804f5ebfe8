"""Insert a mask node after every eligible weight's ``get_attr``.

For each eligible weight ``W`` the pass adds ``W~ = nmgraph.masked_weight(W, mask, hard, beta,
grad_mask, lam, hard_mode)`` right after the node that reads ``W`` and points every former user of
``W`` at ``W~``. The op's output has ``W``'s shape and dtype, so every consumer computes exactly what
it did before with ``W`` replaced by the masked weight, and nothing else in the graph changes. The
mask tensors are buffers of one :class:`nmgraph.masking.SparsityState` submodule (default name
``nmgraph_sparsity``), read through ``get_attr`` nodes, so the graph runs in eager mode, under
``torch.compile`` and through ``torch.export``, and ``state_dict`` carries the masks and schedule.

Every use of the weight is masked (a weight read twice, e.g. tied, is masked at both reads), so the
prepared graph's hard-mask forward is exactly the graph after :func:`fold_masks` folds the masks
into the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from nmgraph.analysis.plan import LayerInfo, Skip
from nmgraph.errors import PlanError, ShapeError
from nmgraph.graph import fetch_attr
from nmgraph.masking import MASK_OP, STATE_NAME, MaskState, SparsityState, TrainingConfig
from nmgraph.passes.runner import PassResult
from nmgraph.pattern import Pattern

__all__ = ["STATE_NAME", "InsertMasksConfig", "MaskNodeInfo", "insert_masks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InsertMasksConfig:
    """Which weights to mask (``layers``, usually ``plan.layers``) and how (``config``).

    ``scores`` (weight name -> saliency tensor) chooses the mask of method ``fixed``.
    """

    config: TrainingConfig
    layers: tuple[LayerInfo, ...]
    state_name: str = STATE_NAME
    scores: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, TrainingConfig):
            raise PlanError(f"InsertMasksConfig.config must be a TrainingConfig, got {type(self.config).__name__}.")
        if not self.state_name.isidentifier():
            raise PlanError(f"InsertMasksConfig.state_name must be a Python identifier, got {self.state_name!r}.")


@dataclass(frozen=True)
class MaskNodeInfo:
    """``node.meta["nmgraph"]`` of a mask node: the weight, its MaskState module, axis, target pattern."""

    weight: str
    state: str
    axis: int
    pattern: Pattern



def _child_name(weight: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() else "_" for c in weight)
    if not base or base[0].isdigit():
        base = "w_" + base
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _consumer_meta(node: fx.Node) -> dict:
    """``nn_module_stack`` and ``stack_trace`` of the first user that has them."""
    out: dict = {}
    for user in node.users:
        for key in ("nn_module_stack", "stack_trace"):
            if key not in out and user.meta.get(key) is not None:
                value = user.meta[key]
                out[key] = dict(value) if isinstance(value, dict) else value
    return out


def _set_val(node: fx.Node, value: object) -> None:
    if isinstance(value, torch.Tensor):
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        node.meta["val"] = value
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def insert_masks(gm: fx.GraphModule, config: InsertMasksConfig) -> PassResult:
    """Routes every weight of ``config.layers`` through a mask node (in place).

    Returns a :class:`PassResult` whose ``changed_nodes`` are the inserted mask nodes and whose
    ``skipped`` names every listed weight left unmasked, with the reason. Raises
    :class:`PlanError` if the graph already has mask state or a listed weight's shape differs from
    the plan.
    """
    graph = gm.graph
    if hasattr(gm, config.state_name):
        raise PlanError(
            f"The graph already has an attribute {config.state_name!r}: it was prepared before. "
            "Call nmgraph.convert() on it, or prepare the original model."
        )
    readers: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, []).append(node)
    placeholders = {n.target for n in graph.nodes if n.op == "placeholder"}
    pattern = config.config.pattern
    skipped: list[Skip] = []
    chosen: list[tuple[LayerInfo, list[fx.Node], MaskState, str]] = []
    taken: set[str] = set()
    seen: set[str] = set()
    for info in config.layers:
        if info.name in seen:
            continue
        seen.add(info.name)
        nodes = readers.get(info.name, [])
        if not nodes:
            why = ("it is a graph input (placeholder); capture with nmgraph.capture() so parameters are "
                   "get_attr nodes" if info.name in placeholders else "no get_attr node reads it in this graph")
            skipped.append(Skip(info.name, f"not masked: {why}"))
            continue
        weight = fetch_attr(gm, info.name)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            skipped.append(Skip(info.name, f"not masked: not a floating-point tensor ({type(weight).__name__})"))
            continue
        if tuple(weight.shape) != tuple(info.shape):
            raise PlanError(
                f"Weight {info.name!r} has shape {tuple(weight.shape)} but the plan says {tuple(info.shape)}: "
                "the plan was made for another graph. Re-run nmgraph.analyze() on this graph."
            )
        if any(u.op == "call_function" and u.target is MASK_OP for n in nodes for u in n.users):
            skipped.append(Skip(info.name, "not masked: it already feeds a mask node"))
            continue
        try:
            state = MaskState(info.name, info.shape, info.axis, pattern,
                              with_grad_mask=config.config.uses_grad_mask, device=weight.device)
        except ShapeError as e:
            e.add_note(f"while inserting a mask for {info.name!r} consumed by node {info.node!r}")
            raise
        chosen.append((info, nodes, state, _child_name(info.name, taken)))

    result = PassResult(gm, skipped=skipped)
    if not chosen:
        result.info.update(state=None, masked=[])
        return result

    bank = SparsityState(config.config, [(child, st) for _, _, st, child in chosen])
    gm.add_submodule(config.state_name, bank)
    weights = {info.name: fetch_attr(gm, info.name) for info, _, _, _ in chosen}
    bank.refresh(weights, force=True, scores=config.scores)

    lam = float(config.config.penalty)
    for info, nodes, st, child in chosen:
        prefix = f"{config.state_name}.{child}"
        for wnode in nodes:
            consumer = _consumer_meta(wnode)
            fake_w = wnode.meta.get("val")
            fake_mode = getattr(fake_w, "fake_mode", None)
            cursor = wnode
            attr_nodes: dict[str, fx.Node | None] = {}
            for buf, target in (
                ("mask", f"{prefix}.mask"),
                ("hard", f"{prefix}.hard"),
                ("beta", f"{config.state_name}.beta" if bank.beta is not None else None),
                ("grad_mask", f"{prefix}.grad_mask" if st.grad_mask is not None else None),
            ):
                if target is None:
                    attr_nodes[buf] = None
                    continue
                with graph.inserting_after(cursor):
                    an = graph.get_attr(target)
                if fake_mode is not None:
                    _set_val(an, fake_mode.from_tensor(fetch_attr(gm, target), static_shapes=True))
                attr_nodes[buf] = cursor = an
            args = (wnode, attr_nodes["mask"], attr_nodes["hard"], attr_nodes["beta"],
                    attr_nodes["grad_mask"], lam, False)
            with graph.inserting_after(cursor):
                mnode = graph.call_function(MASK_OP, args)
            wnode.replace_all_uses_with(mnode, delete_user_cb=lambda u, m=mnode: u is not m)
            mnode.meta.update(consumer)
            if fake_mode is not None:
                with fake_mode:
                    fake_args = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
                    _set_val(mnode, MASK_OP(*fake_args))
            mnode.meta["nmgraph"] = MaskNodeInfo(info.name, prefix, st.axis, pattern)
            result.changed_nodes.append(mnode.name)
    result.info.update(state=config.state_name, masked=[info.name for info, _, _, _ in chosen])
    log.info("inserted %d mask nodes for %d weights (%s); %d left unmasked",
             len(result.changed_nodes), len(chosen), config.config, len(skipped))
    return result
