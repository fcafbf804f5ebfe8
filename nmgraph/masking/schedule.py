"""Schedules of N:M sparse training: phases, SDGF stages, soft-mask factors, mask updates.

A run of ``total_steps`` optimizer steps has up to three phases: a dense warm-up (first
``warmup * total_steps`` steps, forward and backward dense), the sparse phase (the method's own
rule, :mod:`nmgraph.masking.methods`), and a final fine-tune (last ``finetune * total_steps`` steps:
the target N:M mask is frozen at the phase's first step and pruned weights get no gradient). Masks
are recomputed from the current weights every ``update_interval`` steps of the sparse phase and at
every phase or stage change.

Every schedule quantity is a pure function of the step counter (:func:`plan_step`); the counter and
the masks live in buffers of :class:`~nmgraph.masking.state.SparsityState`, so restoring a
``state_dict`` resumes exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nmgraph.errors import PlanError
from nmgraph.masking.methods import METHOD_NAMES, Method, check_float
from nmgraph.pattern import Pattern

__all__ = ["Phase", "Schedule", "StepPlan", "TrainingConfig", "plan_step"]


class Phase(enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    FINETUNE = "finetune"


@dataclass(frozen=True)
class Schedule:
    """Phase lengths (fractions of ``total_steps``) and the mask update interval.

    >>> s = Schedule(total_steps=100, warmup=0.1, finetune=0.2)
    >>> (s.warmup_steps, s.sparse_steps, s.finetune_steps)
    (10, 70, 20)
    >>> s.phase(9), s.phase(10), s.phase(80)
    (<Phase.DENSE: 'dense'>, <Phase.SPARSE: 'sparse'>, <Phase.FINETUNE: 'finetune'>)
    """

    total_steps: int | None = None
    warmup: float = 0.0
    finetune: float = 0.0
    update_interval: int = 1

    def __post_init__(self) -> None:
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1
        ):
            raise PlanError(f"Schedule.total_steps must be a positive int or None, got {self.total_steps!r}.")
        check_float("Schedule", "warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        check_float("Schedule", "finetune", self.finetune, low=0.0, high=1.0, high_open=True)
        if isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int) or self.update_interval < 1:
            raise PlanError(f"Schedule.update_interval must be an int >= 1, got {self.update_interval!r}.")
        if (self.warmup or self.finetune) and self.total_steps is None:
            raise PlanError(
                "Schedule.warmup and Schedule.finetune are fractions of the run: pass "
                "Schedule.total_steps (the number of optimizer steps)."
            )
        if self.total_steps is not None and self.sparse_steps < 1:
            raise PlanError(
                f"Schedule leaves no sparse phase: total_steps={self.total_steps}, warmup={self.warmup}, "
                f"finetune={self.finetune} ({self.warmup_steps} + {self.finetune_steps} steps). Lower "
                "the fractions or raise total_steps."
            )

    @property
    def warmup_steps(self) -> int:
        return 0 if self.total_steps is None else round(self.warmup * self.total_steps)

    @property
    def finetune_steps(self) -> int:
        return 0 if self.total_steps is None else round(self.finetune * self.total_steps)

    @property
    def sparse_steps(self) -> int | None:
        if self.total_steps is None:
            return None
        return self.total_steps - self.warmup_steps - self.finetune_steps

    def phase(self, step: int) -> Phase:
        if step < self.warmup_steps:
            return Phase.DENSE
        if self.finetune_steps and step >= self.total_steps - self.finetune_steps:
            return Phase.FINETUNE
        return Phase.SPARSE


@dataclass(frozen=True)
class TrainingConfig:
    """Pattern, method and schedule of one prepared model, checked together."""

    pattern: Pattern
    method: Method
    schedule: Schedule = Schedule()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise PlanError(f"TrainingConfig.pattern must be a Pattern, got {self.pattern!r}.")
        if not isinstance(self.method, Method):
            raise PlanError(
                f"TrainingConfig.method must be a method config (a nmgraph.masking.Method: "
                f"{', '.join(METHOD_NAMES)}), got {self.method!r}; nmgraph.masking.method_from_name() turns "
                "a name into one."
            )
        self.method.validate(self.pattern, self.schedule.total_steps)

    @property
    def penalty(self) -> float:
        """The ``lam`` constant of the mask op."""
        return self.method.penalty(self.pattern)

    @property
    def soft(self) -> bool:
        """Whether the mask op takes ``beta``."""
        return self.method.soft

    @property
    def uses_grad_mask(self) -> bool:
        return self.method.grad_mask or self.schedule.finetune_steps > 0

    def stages(self) -> tuple[Pattern, ...]:
        return self.method.stages(self.pattern)

    def __str__(self) -> str:
        s = self.schedule
        return (f"{self.method.name} {self.pattern} (total_steps={s.total_steps}, warmup={s.warmup}, "
                f"finetune={s.finetune}, update_interval={s.update_interval})")


@dataclass(frozen=True)
class StepPlan:
    """What the schedule says for one step: phase, SDGF stage, beta, whether masks are recomputed."""

    step: int
    phase: Phase
    stage: int
    pattern: Pattern | None
    beta: float | None
    update: bool
    entry: bool


def _stage_index(config: TrainingConfig, step: int) -> int:
    stages = config.stages()
    if len(stages) == 1:
        return 0
    s = config.schedule
    t = step - s.warmup_steps
    return min(t * len(stages) // s.sparse_steps, len(stages) - 1)


def plan_step(config: TrainingConfig, step: int) -> StepPlan:
    """The schedule at optimizer step ``step`` (0 before the first step). Pure.

    >>> from nmgraph.masking.methods import SDGF
    >>> cfg = TrainingConfig(Pattern(1, 16), SDGF("step"), Schedule(total_steps=10))
    >>> [str(plan_step(cfg, i).pattern) for i in (0, 2, 4, 6, 8, 9)]
    ['15:16', '8:16', '4:16', '2:16', '1:16', '1:16']
    """
    if step < 0:
        raise PlanError(f"step must be >= 0, got {step}.")
    s = config.schedule
    phase = s.phase(step)
    stage = _stage_index(config, step) if phase is Phase.SPARSE else len(config.stages()) - 1
    if phase is Phase.DENSE:
        pattern, beta = None, 1.0
    elif phase is Phase.FINETUNE:
        pattern, beta = config.pattern, 0.0
    else:
        pattern = config.stages()[stage]
        beta = config.method.beta(step - s.warmup_steps, s.sparse_steps) if config.soft else None
    if not config.soft:
        beta = None
    if step == 0:
        entry = True
    else:
        prev_phase = s.phase(step - 1)
        prev_stage = _stage_index(config, step - 1) if prev_phase is Phase.SPARSE else -1
        entry = prev_phase is not phase or (phase is Phase.SPARSE and prev_stage != stage)
    if phase is Phase.SPARSE and config.method.periodic:
        update = entry or (step - s.warmup_steps) % s.update_interval == 0
    elif phase is Phase.DENSE:
        update = entry or step % s.update_interval == 0
    else:
        update = entry
    return StepPlan(step, phase, stage, pattern, beta, update, entry)
