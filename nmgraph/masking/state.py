"""The schedule state of a prepared graph, kept in buffers so ``state_dict`` resumes a run exactly."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from nmgraph.errors import PlanError
from nmgraph.masking.layer_state import MaskState
from nmgraph.masking.schedule import Phase, StepPlan, TrainingConfig, plan_step
from nmgraph.masking.select import nm_mask_fast

__all__ = ["STATE_NAME", "SparsityState"]

log = logging.getLogger(__name__)

#: The child module that holds a prepared model's (or graph's) masks and schedule state.
STATE_NAME = "nmgraph_sparsity"


class SparsityState(nn.Module):
    """Schedule state of a prepared graph: step counter, current pattern, beta, one MaskState per weight.

    Buffers: ``step`` (int64), ``pattern`` (int64 ``[2]``, the nominal pattern of the current stage;
    ``M:M`` while dense), ``beta`` (float32, MDGF only) and each child's masks. ``config`` is a
    plain attribute (it is not state: rebuild the prepared model with the same config, then load a
    state_dict).
    """

    def __init__(self, config: TrainingConfig, layers: Sequence[tuple[str, MaskState]]) -> None:
        super().__init__()
        self.config = config
        device = layers[0][1].mask.device if layers else None
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer(
            "pattern", torch.tensor([config.pattern.m, config.pattern.m], dtype=torch.int64, device=device)
        )
        self.register_buffer(
            "beta", torch.ones((), dtype=torch.float32, device=device) if config.soft else None
        )
        for child, state in layers:
            self.add_module(child, state)

    def layers(self) -> Iterator[tuple[str, MaskState]]:
        for name, mod in self.named_children():
            if isinstance(mod, MaskState):
                yield name, mod

    @property
    def current_step(self) -> int:
        return int(self.step)

    def current_plan(self) -> StepPlan:
        return plan_step(self.config, self.current_step)

    def advance(self, weights: Mapping[str, torch.Tensor]) -> StepPlan:
        """Counts one optimizer step and brings the masks to the new step's schedule."""
        self.step.add_(1)
        return self.refresh(weights)

    @torch.no_grad()
    def refresh(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        force: bool = False,
        scores: Mapping[str, torch.Tensor] | None = None,
    ) -> StepPlan:
        """Sets beta and (when due, or ``force``) the masks for the current step from ``weights``.

        ``weights`` maps weight names to tensors; ``scores`` (weight name -> saliency) is used by
        ``fixed`` when its mask is computed. ``force`` recomputes every mask as if the current
        phase had just started (``prepare`` uses it once; for ``fixed`` it chooses the mask again).
        """
        plan = self.current_plan()
        if force:
            plan = StepPlan(plan.step, plan.phase, plan.stage, plan.pattern, plan.beta, True, True)
        if self.beta is not None and plan.beta is not None:
            self.beta.fill_(plan.beta)
        if not plan.update:
            return plan
        m = self.config.pattern.m
        nominal = (m, m) if plan.pattern is None else (plan.pattern.n, plan.pattern.m)
        self.pattern.copy_(torch.tensor(nominal, dtype=torch.int64))
        for _, st in self.layers():
            w = weights.get(st.weight_name)
            if w is None:
                raise PlanError(
                    f"No weight {st.weight_name!r} to update its mask from; the prepared graph lost it. "
                    "Re-run nmgraph.prepare() on the model."
                )
            self._update_layer(st, w, plan, None if scores is None else scores.get(st.weight_name))
        log.debug("masks updated at step %d (%s, stage %d)", plan.step, plan.phase.value, plan.stage)
        return plan

    def _update_layer(self, st: MaskState, w: torch.Tensor, plan: StepPlan, score: torch.Tensor | None) -> None:
        target = self.config.pattern
        method = self.config.method
        if plan.phase is Phase.DENSE:
            st.mask.fill_(True)
            st.hard.copy_(nm_mask_fast(w, target, axis=st.axis))
            if st.grad_mask is not None and plan.entry:
                st.grad_mask.fill_(True)
            st.pattern.copy_(torch.tensor([target.m, target.m]))
            return
        if plan.phase is Phase.FINETUNE:
            if not method.keeps_mask_in_finetune:
                st.hard.copy_(nm_mask_fast(w, target, axis=st.axis))
            st.mask.copy_(st.hard)
            st.grad_mask.copy_(st.hard)
            st.pattern.copy_(torch.tensor([target.n, target.m]))
            return
        method.update(st, w, plan.pattern, target, score, plan.entry)
