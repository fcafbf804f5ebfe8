"""Training methods and schedules for N:M sparse training, and the schedule state kept in buffers.

A run of ``total_steps`` optimizer steps has up to three phases: a dense warm-up (first
``warmup * total_steps`` steps, forward and backward dense), the sparse phase (the method's own
rule), and a final fine-tune (last ``finetune * total_steps`` steps: the target N:M mask is frozen
at the phase's first step and pruned weights get no gradient). Masks are recomputed from the
current weights every ``update_interval`` steps of the sparse phase and at every phase or stage
change.

Methods (``W`` latent weight, ``E = nm_mask(W)``, ``Ē = 1 - E``; see :mod:`nmgraph.masking`):

=============  ===============================================================================
``ste``        forward ``E*W``; backward dense ``dL/dW := dL/dW~``.
``sr-ste``     as STE, backward ``dL/dW~ + lambda_w * Ē*W`` (Zhou et al. 2021).
``mdgf-*``     forward ``W*(E + beta(t)*Ē)``, ``beta = max(1 - alpha*t, 0)`` (linear) or
               ``exp(-alpha*t)`` (exp); backward pass-through (Bambhaniya et al. 2023).
``sdgf-step``  binary masks ``(M-1):M, M/2:M, M/4:M, ... N:M`` over equal frames of the sparse phase.
``sdgf-geo``   constant density, shrinking groups ``8N:8M, 4N:4M, 2N:2M, N:M`` (a layer whose
               reduction size a group would not tile uses the largest group that does).
``topkast``    forward ``N:M``; gradient only to the larger ``N_b:M`` set, plus the exploration
               penalty ``lambda_x / density * W`` on the weights of that set outside the forward set.
``fixed``      the mask is computed once from a saliency when the sparse phase starts, then held;
               pruned weights get no gradient (the ASP recipe).
=============  ===============================================================================

Every schedule quantity is a pure function of the step counter (:func:`plan_step`); the counter and
the masks live in buffers of :class:`SparsityState`, so restoring a ``state_dict`` resumes exactly.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
from torch import nn

from nmgraph.errors import PatternError, PlanError
from nmgraph.masking import MaskState, nm_mask_fast
from nmgraph.pattern import MAX_M, Pattern

__all__ = [
    "MDGF",
    "SDGF",
    "SRSTE",
    "STE",
    "Fixed",
    "MethodConfig",
    "Phase",
    "Schedule",
    "SparsityState",
    "StepPlan",
    "TopKAST",
    "TrainingConfig",
    "method_from_name",
    "plan_step",
]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    FINETUNE = "finetune"


def _check_float(owner: str, field_name: str, value: object, *, low: float, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{owner}.{field_name} must be a finite number, got {value!r}.")
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{low}, {'inf' if high is None else high}{hi}"
        raise PlanError(f"{owner}.{field_name} must be in {rng}, got {value!r}.")


@dataclass(frozen=True)
class STE:
    """Straight-through estimator: forward ``E*W``, dense gradient to every weight."""

    name: ClassVar[str] = "ste"


@dataclass(frozen=True)
class SRSTE:
    """Sparse-refined STE: the STE gradient plus ``lambda_w * Ē*W`` (decay on pruned weights)."""

    lambda_w: float = 2e-4
    name: ClassVar[str] = "sr-ste"

    def __post_init__(self) -> None:
        _check_float("SRSTE", "lambda_w", self.lambda_w, low=0.0)


@dataclass(frozen=True)
class MDGF:
    """Decaying soft mask ``E + beta(t)*Ē`` with pass-through gradient.

    ``fraction``: part of the sparse phase over which ``beta`` goes from 1 to ``end_beta`` (linear:
    to 0); needs ``Schedule.total_steps``. ``alpha``: the per-step rate directly (then ``fraction``
    must be ``None``). With neither, ``fraction=1.0``.

    >>> MDGF("linear", fraction=0.5).alpha_for(sparse_steps=100)
    0.02
    >>> round(MDGF("exp", alpha=0.1).beta(10, sparse_steps=None), 6)
    0.367879
    """

    decay: str = "exp"
    fraction: float | None = None
    alpha: float | None = None
    end_beta: float = 1e-3

    DECAYS: ClassVar[tuple[str, ...]] = ("linear", "exp")

    def __post_init__(self) -> None:
        if self.decay not in self.DECAYS:
            raise PlanError(f"MDGF.decay must be one of {self.DECAYS}, got {self.decay!r}.")
        if self.fraction is not None and self.alpha is not None:
            raise PlanError(
                "MDGF.fraction and MDGF.alpha are two ways to set the same decay rate; pass one."
            )
        if self.fraction is not None:
            _check_float("MDGF", "fraction", self.fraction, low=0.0, high=1.0, low_open=True)
        if self.alpha is not None:
            _check_float("MDGF", "alpha", self.alpha, low=0.0, low_open=True)
        _check_float("MDGF", "end_beta", self.end_beta, low=0.0, high=1.0, low_open=True, high_open=True)

    @property
    def name(self) -> str:
        return f"mdgf-{self.decay}"

    @property
    def needs_total_steps(self) -> bool:
        return self.alpha is None

    def alpha_for(self, sparse_steps: int | None) -> float:
        """The per-step ``alpha`` for a sparse phase of ``sparse_steps`` steps."""
        if self.alpha is not None:
            return self.alpha
        if not sparse_steps:
            raise PlanError("MDGF with a fraction needs Schedule.total_steps; pass total_steps= or alpha=.")
        span = (1.0 if self.fraction is None else self.fraction) * sparse_steps
        if self.decay == "linear":
            return 1.0 / span
        return -math.log(self.end_beta) / span

    def beta(self, t: int, sparse_steps: int | None) -> float:
        """``beta`` after ``t`` steps of the sparse phase."""
        alpha = self.alpha_for(sparse_steps)
        if self.decay == "linear":
            return max(1.0 - alpha * t, 0.0)
        return math.exp(-alpha * t)


@dataclass(frozen=True)
class SDGF:
    """Stepped binary masks over equal frames of the sparse phase (``kind`` "step" or "geo").

    >>> [str(p) for p in SDGF("step").stages(Pattern(1, 16))]
    ['15:16', '8:16', '4:16', '2:16', '1:16']
    >>> [str(p) for p in SDGF("geo").stages(Pattern(2, 4))]
    ['16:32', '8:16', '4:8', '2:4']
    """

    kind: str = "step"

    KINDS: ClassVar[tuple[str, ...]] = ("step", "geo")
    GEO_FACTORS: ClassVar[tuple[int, ...]] = (8, 4, 2, 1)

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise PlanError(f"SDGF.kind must be one of {self.KINDS}, got {self.kind!r}.")

    @property
    def name(self) -> str:
        return f"sdgf-{self.kind}"

    def stages(self, pattern: Pattern) -> tuple[Pattern, ...]:
        """The stage patterns, last one ``pattern`` itself."""
        if self.kind == "geo":
            return tuple(
                Pattern(f * pattern.n, f * pattern.m) for f in self.GEO_FACTORS if f * pattern.m <= MAX_M
            )
        ns: list[int] = []
        for n in [pattern.m - 1] + [pattern.m >> k for k in range(1, pattern.m.bit_length())]:
            if n > pattern.n and (not ns or n < ns[-1]):
                ns.append(n)
        ns.append(pattern.n)
        return tuple(Pattern(n, pattern.m) for n in ns)


@dataclass(frozen=True)
class TopKAST:
    """N:M Top-KAST: forward ``N:M``, gradient to the ``n_backward:M`` set (default ``min(2N, M-1)``).

    The weights in the backward set but outside the forward set get the exploration penalty
    ``lambda_x * W``, divided by the forward density when ``scale_by_density`` (Top-KAST's ``1/D``).

    >>> str(TopKAST().backward_pattern(Pattern(1, 8)))
    '2:8'
    """

    n_backward: int | None = None
    lambda_x: float = 2e-4
    scale_by_density: bool = True
    name: ClassVar[str] = "topkast"

    def __post_init__(self) -> None:
        if self.n_backward is not None and (isinstance(self.n_backward, bool) or not isinstance(self.n_backward, int)):
            raise PlanError(f"TopKAST.n_backward must be an int or None, got {self.n_backward!r}.")
        _check_float("TopKAST", "lambda_x", self.lambda_x, low=0.0)

    def backward_pattern(self, pattern: Pattern) -> Pattern:
        nb = min(2 * pattern.n, pattern.m - 1) if self.n_backward is None else self.n_backward
        if not pattern.n < nb < pattern.m:
            raise PatternError(
                f"TopKAST.n_backward={nb} for pattern {pattern}: need N < n_backward < M "
                f"({pattern.n} < n_backward < {pattern.m}). Top-KAST needs a pattern with N <= M-2."
            )
        return Pattern(nb, pattern.m)

    def penalty(self, pattern: Pattern) -> float:
        return self.lambda_x / pattern.density if self.scale_by_density else self.lambda_x


@dataclass(frozen=True)
class Fixed:
    """The mask is computed once, when the sparse phase starts, from a saliency; then held."""

    name: ClassVar[str] = "fixed"


MethodConfig = Union[STE, SRSTE, MDGF, SDGF, TopKAST, Fixed]  # noqa: UP007 (isinstance-friendly)

_METHODS = {
    "ste": STE,
    "sr-ste": SRSTE,
    "mdgf-linear": lambda: MDGF("linear"),
    "mdgf-exp": lambda: MDGF("exp"),
    "sdgf-step": lambda: SDGF("step"),
    "sdgf-geo": lambda: SDGF("geo"),
    "topkast": TopKAST,
    "fixed": Fixed,
}
METHOD_NAMES = tuple(_METHODS)
_METHOD_TYPES = (STE, SRSTE, MDGF, SDGF, TopKAST, Fixed)


def method_from_name(method: str | MethodConfig) -> MethodConfig:
    """The default config of a method name (a config passes through).

    >>> method_from_name("mdgf-linear")
    MDGF(decay='linear', fraction=None, alpha=None, end_beta=0.001)
    """
    if isinstance(method, _METHOD_TYPES):
        return method
    if isinstance(method, str) and method.lower() in _METHODS:
        return _METHODS[method.lower()]()
    raise PlanError(
        f"Unknown training method {method!r}: use one of {', '.join(METHOD_NAMES)} or a method config "
        "(nmgraph.schedule.STE(), SRSTE(lambda_w=...), MDGF(...), SDGF(...), TopKAST(...), Fixed())."
    )


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
        _check_float("Schedule", "warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        _check_float("Schedule", "finetune", self.finetune, low=0.0, high=1.0, high_open=True)
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
    method: MethodConfig
    schedule: Schedule = Schedule()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise PlanError(f"TrainingConfig.pattern must be a Pattern, got {self.pattern!r}.")
        if not isinstance(self.method, _METHOD_TYPES):
            raise PlanError(
                f"TrainingConfig.method must be a method config ({', '.join(t.__name__ for t in _METHOD_TYPES)}), "
                f"got {self.method!r}; nmgraph.schedule.method_from_name() turns a name into one."
            )
        needs_steps = isinstance(self.method, SDGF) or (
            isinstance(self.method, MDGF) and self.method.needs_total_steps
        )
        if needs_steps and self.schedule.total_steps is None:
            raise PlanError(
                f"Method {self.method.name!r} schedules over the sparse phase: pass total_steps= "
                "(the number of optimizer steps)"
                + (" or MDGF(alpha=...) for a per-step rate." if isinstance(self.method, MDGF) else ".")
            )
        if isinstance(self.method, TopKAST):
            self.method.backward_pattern(self.pattern)

    @property
    def penalty(self) -> float:
        """The ``lam`` constant of the mask op."""
        if isinstance(self.method, SRSTE):
            return self.method.lambda_w
        if isinstance(self.method, TopKAST):
            return self.method.penalty(self.pattern)
        return 0.0

    @property
    def soft(self) -> bool:
        """Whether the mask op takes ``beta`` (MDGF only)."""
        return isinstance(self.method, MDGF)

    @property
    def uses_grad_mask(self) -> bool:
        return isinstance(self.method, (TopKAST, Fixed)) or self.schedule.finetune_steps > 0

    def stages(self) -> tuple[Pattern, ...]:
        if isinstance(self.method, SDGF):
            return self.method.stages(self.pattern)
        return (self.pattern,)

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
    if phase is Phase.SPARSE and not isinstance(config.method, Fixed):
        update = entry or (step - s.warmup_steps) % s.update_interval == 0
    elif phase is Phase.DENSE:
        update = entry or step % s.update_interval == 0
    else:
        update = entry
    return StepPlan(step, phase, stage, pattern, beta, update, entry)


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
        cfg = self.config
        target = cfg.pattern
        method = cfg.method
        if plan.phase is Phase.DENSE:
            st.mask.fill_(True)
            st.hard.copy_(nm_mask_fast(w, target, axis=st.axis))
            if st.grad_mask is not None and plan.entry:
                st.grad_mask.fill_(True)
            st.pattern.copy_(torch.tensor([target.m, target.m]))
            return
        if plan.phase is Phase.FINETUNE:
            if not isinstance(method, Fixed):  # fixed keeps the mask it chose in the sparse phase
                st.hard.copy_(nm_mask_fast(w, target, axis=st.axis))
            st.mask.copy_(st.hard)
            st.grad_mask.copy_(st.hard)
            st.pattern.copy_(torch.tensor([target.n, target.m]))
            return
        if isinstance(method, SDGF):
            lp = self._layer_stage(st, plan.pattern)
            e = nm_mask_fast(w, lp, axis=st.axis)
            st.mask.copy_(e)
            st.hard.copy_(e if lp == target else nm_mask_fast(w, target, axis=st.axis))
            st.pattern.copy_(torch.tensor([lp.n, lp.m]))
        elif isinstance(method, Fixed):
            e = nm_mask_fast(w, target, score, axis=st.axis)
            st.mask.copy_(e)
            st.hard.copy_(e)
            st.grad_mask.copy_(e)
            st.pattern.copy_(torch.tensor([target.n, target.m]))
        else:
            e = nm_mask_fast(w, target, axis=st.axis)
            st.mask.copy_(e)
            st.hard.copy_(e)
            if isinstance(method, TopKAST):
                st.grad_mask.copy_(nm_mask_fast(w, method.backward_pattern(target), axis=st.axis))
            elif st.grad_mask is not None and plan.entry:
                st.grad_mask.fill_(True)
            st.pattern.copy_(torch.tensor([target.n, target.m]))

    @staticmethod
    def _layer_stage(st: MaskState, pattern: Pattern) -> Pattern:
        """The stage pattern for this layer: the same density with the largest group that tiles it."""
        if st.fits(pattern):
            return pattern
        target = st.target
        f = pattern.m // target.m
        while f > 1 and not st.fits(Pattern(f * target.n, f * target.m)):
            f //= 2
        return Pattern(f * target.n, f * target.m) if f > 1 else target
