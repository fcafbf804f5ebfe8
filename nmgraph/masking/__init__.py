"""Masking: the mask op of prepared graphs, the masks' state, training methods, schedules, saliency, SAD.

Read in this order: :mod:`~nmgraph.masking.op` (``nmgraph::masked_weight``, the one op every method
routes weights through), :mod:`~nmgraph.masking.select` (N:M masks fast enough for every step),
:mod:`~nmgraph.masking.layer_state` (one weight's mask buffers), :mod:`~nmgraph.masking.methods` (one
class per training method), :mod:`~nmgraph.masking.schedule` (phases and stages as pure functions of
the step), :mod:`~nmgraph.masking.state` (the schedule state in buffers),
:mod:`~nmgraph.masking.saliency` (scores for one-shot masks), :mod:`~nmgraph.masking.telemetry`
(how much the masks move) and :mod:`~nmgraph.masking.module_masks` (the same masks on the user's own
module, for ``prepare(..., inplace=True)``).
"""

from __future__ import annotations

from nmgraph.masking.layer_state import MaskState
from nmgraph.masking.methods import (
    MDGF,
    METHOD_NAMES,
    METHODS,
    SDGF,
    SRSTE,
    STE,
    Fixed,
    Method,
    MethodConfig,
    TopKAST,
    method_from_name,
)
from nmgraph.masking.module_masks import (
    MaskedWeight,
    attach_masks,
    detach_masks,
    latent_weight,
    masked_weights,
)
from nmgraph.masking.op import MASK_OP, masked_weight
from nmgraph.masking.schedule import Phase, Schedule, StepPlan, TrainingConfig, plan_step
from nmgraph.masking.select import PAIRWISE_MAX_M, nm_mask_fast
from nmgraph.masking.state import STATE_NAME, SparsityState
from nmgraph.masking.telemetry import SADTracker

__all__ = [
    "MASK_OP",
    "MDGF",
    "METHODS",
    "METHOD_NAMES",
    "PAIRWISE_MAX_M",
    "SDGF",
    "SRSTE",
    "STATE_NAME",
    "STE",
    "Fixed",
    "MaskState",
    "MaskedWeight",
    "Method",
    "MethodConfig",
    "Phase",
    "SADTracker",
    "Schedule",
    "SparsityState",
    "StepPlan",
    "TopKAST",
    "TrainingConfig",
    "attach_masks",
    "detach_masks",
    "latent_weight",
    "masked_weight",
    "masked_weights",
    "method_from_name",
    "nm_mask_fast",
    "plan_step",
]
