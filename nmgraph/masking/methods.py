"""Training methods: one class each, carrying everything the schedule and the mask op need from it.

A method says which penalty ``lam`` the mask op applies (:meth:`Method.penalty`), whether it uses a
soft mask and how its factor decays (:attr:`Method.soft`, :meth:`Method.beta`), whether it needs a
gradient mask (:attr:`Method.grad_mask`), its stage patterns (:meth:`Method.stages`), how it sets a
layer's masks in the sparse phase (:meth:`Method.update`) and what it needs from the schedule
(:meth:`Method.validate`). With ``W`` the latent weight, ``E = nm_mask(W)`` and ``Ē = 1 - E``:

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

A new method is one subclass of :class:`Method` plus one line in :data:`METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from nmgraph.errors import PatternError, PlanError
from nmgraph.masking.layer_state import MaskState
from nmgraph.masking.select import nm_mask_fast
from nmgraph.pattern import MAX_M, Pattern

__all__ = [
    "MDGF",
    "METHODS",
    "METHOD_NAMES",
    "SDGF",
    "SRSTE",
    "STE",
    "Fixed",
    "Method",
    "MethodConfig",
    "TopKAST",
    "method_from_name",
]


def check_float(owner: str, field_name: str, value: object, *, low: float, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raises :class:`PlanError` naming ``owner.field_name`` unless ``value`` is a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{owner}.{field_name} must be a finite number, got {value!r}.")
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{low}, {'inf' if high is None else high}{hi}"
        raise PlanError(f"{owner}.{field_name} must be in {rng}, got {value!r}.")


def _set(st: MaskState, mask: torch.Tensor, hard: torch.Tensor, pattern: Pattern) -> None:
    st.mask.copy_(mask)
    st.hard.copy_(hard)
    st.pattern.copy_(torch.tensor([pattern.n, pattern.m]))


@dataclass(frozen=True)
class Method:
    """Base of a training method (a frozen dataclass of its hyper-parameters).

    Class attributes: ``soft`` (the mask op takes ``beta``), ``grad_mask`` (the layer needs a gradient
    mask buffer), ``periodic`` (masks are recomputed every ``update_interval`` steps of the sparse
    phase; otherwise only when it starts), ``scored`` (the mask may be chosen from a saliency score),
    ``keeps_mask_in_finetune`` (the fine-tune keeps the sparse phase's mask instead of recomputing it).
    """

    soft: ClassVar[bool] = False
    grad_mask: ClassVar[bool] = False
    periodic: ClassVar[bool] = True
    scored: ClassVar[bool] = False
    keeps_mask_in_finetune: ClassVar[bool] = False

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def needs_total_steps(self) -> bool:
        """Whether the method schedules over the sparse phase (then ``Schedule.total_steps`` is required)."""
        return False

    def penalty(self, pattern: Pattern) -> float:
        """The ``lam`` constant of the mask op."""
        return 0.0

    def beta(self, t: int, sparse_steps: int | None) -> float | None:
        """The soft-mask factor after ``t`` steps of the sparse phase (``None``: no soft mask)."""
        return None

    def stages(self, pattern: Pattern) -> tuple[Pattern, ...]:
        """The stage patterns of the sparse phase, the last one ``pattern`` itself."""
        return (pattern,)

    def validate(self, pattern: Pattern, total_steps: int | None) -> None:
        """Raises a typed error if the method cannot train ``pattern`` with this schedule."""
        if self.needs_total_steps and total_steps is None:
            raise PlanError(
                f"Method {self.name!r} schedules over the sparse phase: pass total_steps= (the number of "
                "optimizer steps)."
            )

    def update(self, st: MaskState, w: torch.Tensor, stage: Pattern, target: Pattern,
               score: torch.Tensor | None, entry: bool) -> None:
        """Sets ``st``'s masks for a step of the sparse phase (``stage``: the stage pattern; ``entry``:
        the phase or stage starts at this step)."""
        e = nm_mask_fast(w, target, axis=st.axis)
        _set(st, e, e, target)
        if st.grad_mask is not None and entry:
            st.grad_mask.fill_(True)


@dataclass(frozen=True)
class STE(Method):
    """Straight-through estimator: forward ``E*W``, dense gradient to every weight."""

    name: ClassVar[str] = "ste"


@dataclass(frozen=True)
class SRSTE(Method):
    """Sparse-refined STE: the STE gradient plus ``lambda_w * Ē*W`` (decay on pruned weights)."""

    lambda_w: float = 2e-4
    name: ClassVar[str] = "sr-ste"

    def __post_init__(self) -> None:
        check_float("SRSTE", "lambda_w", self.lambda_w, low=0.0)

    def penalty(self, pattern: Pattern) -> float:
        return self.lambda_w


@dataclass(frozen=True)
class MDGF(Method):
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
    soft: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.decay not in self.DECAYS:
            raise PlanError(f"MDGF.decay must be one of {self.DECAYS}, got {self.decay!r}.")
        if self.fraction is not None and self.alpha is not None:
            raise PlanError(
                "MDGF.fraction and MDGF.alpha are two ways to set the same decay rate; pass one."
            )
        if self.fraction is not None:
            check_float("MDGF", "fraction", self.fraction, low=0.0, high=1.0, low_open=True)
        if self.alpha is not None:
            check_float("MDGF", "alpha", self.alpha, low=0.0, low_open=True)
        check_float("MDGF", "end_beta", self.end_beta, low=0.0, high=1.0, low_open=True, high_open=True)

    @property
    def name(self) -> str:
        return f"mdgf-{self.decay}"

    @property
    def needs_total_steps(self) -> bool:
        return self.alpha is None

    def validate(self, pattern: Pattern, total_steps: int | None) -> None:
        if self.needs_total_steps and total_steps is None:
            raise PlanError(
                f"Method {self.name!r} schedules over the sparse phase: pass total_steps= (the number of "
                "optimizer steps) or MDGF(alpha=...) for a per-step rate."
            )

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
class SDGF(Method):
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

    @property
    def needs_total_steps(self) -> bool:
        return True

    def stages(self, pattern: Pattern) -> tuple[Pattern, ...]:
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

    def update(self, st: MaskState, w: torch.Tensor, stage: Pattern, target: Pattern,
               score: torch.Tensor | None, entry: bool) -> None:
        lp = self.layer_stage(st, stage)
        e = nm_mask_fast(w, lp, axis=st.axis)
        _set(st, e, e if lp == target else nm_mask_fast(w, target, axis=st.axis), lp)

    @staticmethod
    def layer_stage(st: MaskState, pattern: Pattern) -> Pattern:
        """The stage pattern for this layer: the same density with the largest group that tiles it."""
        if st.fits(pattern):
            return pattern
        target = st.target
        f = pattern.m // target.m
        while f > 1 and not st.fits(Pattern(f * target.n, f * target.m)):
            f //= 2
        return Pattern(f * target.n, f * target.m) if f > 1 else target


@dataclass(frozen=True)
class TopKAST(Method):
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
    grad_mask: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.n_backward is not None and (isinstance(self.n_backward, bool) or not isinstance(self.n_backward, int)):
            raise PlanError(f"TopKAST.n_backward must be an int or None, got {self.n_backward!r}.")
        check_float("TopKAST", "lambda_x", self.lambda_x, low=0.0)

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

    def validate(self, pattern: Pattern, total_steps: int | None) -> None:
        self.backward_pattern(pattern)

    def update(self, st: MaskState, w: torch.Tensor, stage: Pattern, target: Pattern,
               score: torch.Tensor | None, entry: bool) -> None:
        e = nm_mask_fast(w, target, axis=st.axis)
        _set(st, e, e, target)
        st.grad_mask.copy_(nm_mask_fast(w, self.backward_pattern(target), axis=st.axis))


@dataclass(frozen=True)
class Fixed(Method):
    """The mask is computed once, when the sparse phase starts, from a saliency; then held."""

    name: ClassVar[str] = "fixed"
    grad_mask: ClassVar[bool] = True
    periodic: ClassVar[bool] = False
    scored: ClassVar[bool] = True
    keeps_mask_in_finetune: ClassVar[bool] = True

    def update(self, st: MaskState, w: torch.Tensor, stage: Pattern, target: Pattern,
               score: torch.Tensor | None, entry: bool) -> None:
        e = nm_mask_fast(w, target, score, axis=st.axis)
        _set(st, e, e, target)
        st.grad_mask.copy_(e)


#: Name -> default config of each method. A new method adds one line here.
METHODS: dict[str, Callable[[], Method]] = {
    "ste": STE,
    "sr-ste": SRSTE,
    "mdgf-linear": lambda: MDGF("linear"),
    "mdgf-exp": lambda: MDGF("exp"),
    "sdgf-step": lambda: SDGF("step"),
    "sdgf-geo": lambda: SDGF("geo"),
    "topkast": TopKAST,
    "fixed": Fixed,
}
METHOD_NAMES = tuple(METHODS)

#: Any method config (kept for annotations).
MethodConfig = Method


def method_from_name(method: str | Method | Any) -> Method:
    """The default config of a method name (a config passes through).

    >>> method_from_name("mdgf-linear")
    MDGF(decay='linear', fraction=None, alpha=None, end_beta=0.001)
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method.lower() in METHODS:
        return METHODS[method.lower()]()
    raise PlanError(
        f"Unknown training method {method!r}: use one of {', '.join(METHOD_NAMES)} or a method config "
        "(nmgraph.masking.STE(), SRSTE(lambda_w=...), MDGF(...), SDGF(...), TopKAST(...), Fixed())."
    )
