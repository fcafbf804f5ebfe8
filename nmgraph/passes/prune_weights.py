"""One-shot pruning: make every eligible weight of a plan exactly N:M, in place.

Why the rewrite is valid: it changes no node. In each weight of ``plan.layers`` the entries outside
the N:M mask of its scores along its reduction axis (``|w|`` by default, or a saliency per weight)
are set to ``+0.0``, so the graph computes the pruned model; the weights are the model's own tensors
(capture shares them), so the user's module is pruned too. Nothing is written until every mask has
been computed and checked: a weight that cannot be pruned (missing, NaN weights or scores, a mask
that is not N:M) raises before any weight changes, naming the layer. The public calls that run this
pass (``convert``, ``export``, ``nmgraph.compile``) also undo the writes if the call fails later
(:mod:`nmgraph.rollback`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from nmgraph.analysis.plan import SparsityPlan
from nmgraph.errors import PlanError, VerificationError
from nmgraph.graph import fetch_attr
from nmgraph.passes.runner import PassResult
from nmgraph.pattern import is_nm, nm_mask
from nmgraph.validate import check_finite

__all__ = ["PruneWeightsConfig", "prune_weights"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneWeightsConfig:
    """The plan whose layers are pruned, and optional saliency scores (weight name -> tensor of its shape)."""

    plan: SparsityPlan
    scores: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.plan, SparsityPlan):
            raise PlanError(f"PruneWeightsConfig.plan must be a SparsityPlan, got {type(self.plan).__name__}.")
        if self.scores is not None:
            shapes = {info.name: tuple(info.shape) for info in self.plan.layers}
            for name, s in self.scores.items():
                if name not in shapes:
                    raise PlanError(f"saliency has a score for {name!r}, which is not an eligible weight of the plan.")
                if tuple(s.shape) != shapes[name]:
                    raise PlanError(
                        f"saliency score for {name!r} has shape {tuple(s.shape)}, the weight {shapes[name]}."
                    )


def prune_weights(gm: fx.GraphModule, config: PruneWeightsConfig) -> PassResult:
    """Prunes the weights of ``config.plan`` to its pattern (see the module docstring).

    No node changes (``changed_nodes`` stays empty); ``info["pruned"]`` lists the pruned weights.
    """
    plan = config.plan
    result = PassResult(gm)
    masks: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for info in plan.layers:
        w = fetch_attr(gm, info.name)
        if not isinstance(w, torch.Tensor):
            raise PlanError(f"plan layer {info.name!r} is not a parameter or buffer of this graph module; the "
                            "plan was made for another graph. Re-run nmgraph.analyze on this graph.")
        score = None if config.scores is None else config.scores.get(info.name)
        where = f"{info.name!r} (node {info.node})"
        check_finite(w, info.name, node=info.node)
        if score is not None:
            check_finite(score, info.name, what="saliency score for", node=info.node)
        mask = nm_mask(w.detach(), plan.pattern, score, axis=info.axis)
        if not is_nm(w.detach().masked_fill(~mask, 0), plan.pattern, axis=info.axis):
            raise VerificationError(f"Pruned weight {where} would not be {plan.pattern} along axis {info.axis}.")
        masks.append((info.name, w, mask))
    with torch.no_grad():
        for _, w, mask in masks:
            w.masked_fill_(~mask, 0)
    result.info["pruned"] = [name for name, _, _ in masks]
    log.info("prune_weights: %d weights pruned to %s", len(masks), plan.pattern)
    return result
