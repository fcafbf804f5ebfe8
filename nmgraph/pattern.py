"""N:M patterns and masks.

An N:M pattern keeps ``n`` of every ``m`` consecutive weights along the reduction axis of the
consuming GEMM. For a Linear weight ``[out, in]`` the groups run along ``in`` (dim 1). For a ConvNd
weight ``[out, in/groups, *kernel]`` they run along the input channels at each ``(out, *kernel)``
position: the NHWC convention that TensorRT and cuSPARSELt use. Other layouts pass ``axis=`` (GPT-2's
``Conv1D`` stores ``[in, out]``, so its reduction axis is 0).

Tie rule: scores are ordered with a stable sort, so among equal scores the element with the *higher*
index inside its group is kept. This makes masks deterministic for any input, constant tensors
included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nmgraph.errors import ArgumentError, PatternError, ShapeError

__all__ = ["MAX_M", "Pattern", "PatternLike", "group_view", "is_nm", "kept_magnitude", "nm_mask", "ungroup_view"]

MAX_M = 128


@dataclass(frozen=True)
class Pattern:
    """An N:M sparsity pattern: ``n`` kept of every ``m`` consecutive weights.

    >>> Pattern.parse("2:4")
    Pattern(n=2, m=4)
    >>> Pattern.parse((1, 8)).density
    0.125
    >>> str(Pattern(2, 4))
    '2:4'
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        for field_name in ("n", "m"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PatternError(
                    f"Pattern.{field_name} must be an int, got {value!r} ({type(value).__name__})."
                )
        if not 0 < self.n < self.m:
            raise PatternError(
                f"Pattern {self.n}:{self.m} is invalid: need 0 < N < M "
                f"(N={self.n}, M={self.m}). Use e.g. '2:4' or '1:8'."
            )
        if self.m > MAX_M:
            raise PatternError(
                f"Pattern {self.n}:{self.m} is invalid: M={self.m} exceeds the maximum group size "
                f"{MAX_M}."
            )

    @classmethod
    def parse(cls, value: PatternLike) -> Pattern:
        """Accepts ``"N:M"``, ``(N, M)`` or a :class:`Pattern`."""
        if isinstance(value, Pattern):
            return value
        if isinstance(value, str):
            parts = value.strip().split(":")
            if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
                raise PatternError(
                    f"Cannot parse pattern {value!r}: expected 'N:M' with two positive integers, "
                    "e.g. '2:4'."
                )
            return cls(int(parts[0]), int(parts[1]))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        raise PatternError(
            f"Cannot parse pattern {value!r} ({type(value).__name__}): pass 'N:M', (N, M) or a "
            "Pattern."
        )

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def index_bits(self) -> int:
        """Bits needed for one in-group index: ``ceil(log2 m)``."""
        return max(1, math.ceil(math.log2(self.m)))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


PatternLike = "Pattern | str | tuple[int, int]"


def _normalise_axis(weight: torch.Tensor, axis: int) -> int:
    if weight.dim() < 2:
        raise ShapeError(
            f"N:M patterns apply to weights with at least 2 dims; got shape {tuple(weight.shape)}."
        )
    if not -weight.dim() <= axis < weight.dim():
        raise ShapeError(f"axis={axis} is out of range for a weight of shape {tuple(weight.shape)}.")
    return axis % weight.dim()


def group_view(t: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """View ``t`` as ``[rows, K // m, m]`` with ``K = t.shape[axis]`` (the NHWC row order).

    Rows are every other index of ``t`` in order (e.g. ``(out, *kernel)`` for a conv weight).
    Raises :class:`ShapeError` if ``K`` is not divisible by ``m``.
    """
    axis = _normalise_axis(t, axis)
    k = t.shape[axis]
    if k % m:
        raise ShapeError(
            f"Reduction dim {axis} of shape {tuple(t.shape)} has size {k}, not divisible by M={m}. "
            "Leave this weight dense, pick a pattern whose M divides it, or pad the layer."
        )
    moved = t.movedim(axis, -1)
    return moved.reshape(-1, k // m, m)


def ungroup_view(g: torch.Tensor, shape: torch.Size | tuple[int, ...], axis: int = 1) -> torch.Tensor:
    """Inverse of :func:`group_view`: back to ``shape`` with groups along ``axis``."""
    shape = tuple(shape)
    axis = axis % len(shape)
    moved_shape = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    return g.reshape(moved_shape).movedim(-1, axis)


def nm_mask(
    weight: torch.Tensor,
    pattern: PatternLike,
    score: torch.Tensor | None = None,
    *,
    axis: int = 1,
) -> torch.Tensor:
    """Boolean mask keeping exactly ``n`` of every ``m`` consecutive entries along ``axis``.

    ``score`` (same shape as ``weight``, default ``|weight|``, computed in float64 for integer
    weights so that ``-128`` in int8 is the largest magnitude) decides which entries are kept: the
    ``n`` largest per group; ties keep the higher index. Meta, bool and complex tensors raise
    :class:`~nmgraph.errors.ArgumentError`.

    >>> w = torch.tensor([[1.0, -4.0, 3.0, 2.0]])
    >>> nm_mask(w, "2:4")
    tensor([[False,  True,  True, False]])
    """
    p = Pattern.parse(pattern)
    _check_values(weight, "weight")
    if score is None:
        score = _magnitude(weight)
    elif not isinstance(score, torch.Tensor):
        raise ArgumentError(f"nm_mask(score=...) must be a tensor of the weight's shape, got {type(score).__name__}.")
    elif score.shape != weight.shape:
        raise ShapeError(
            f"score has shape {tuple(score.shape)} but the weight has shape {tuple(weight.shape)}; "
            "pass a score tensor of the weight's shape."
        )
    _check_values(score, "score")
    score = score.detach()
    if not score.is_floating_point():
        score = score.to(torch.float64)  # integer scores: exact up to 2**53, no overflow
    elif score.dtype != torch.float64:
        score = score.float()
    groups = group_view(score, p.m, axis)
    if torch.isnan(groups).any():
        raise ShapeError(
            f"score for a weight of shape {tuple(weight.shape)} contains NaN; masks are undefined. "
            "Check the weight or saliency for NaNs before pruning."
        )
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., p.m - p.n :], True)
    return ungroup_view(keep, weight.shape, axis).contiguous()


def _check_values(t: object, what: str) -> None:
    """A tensor with values to rank: not on the meta device, not bool."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"nm_mask({what}=...) must be a torch.Tensor, got {type(t).__name__}.")
    if t.device.type == "meta":
        raise ArgumentError(
            f"nm_mask({what}=...) is on the meta device: it has a shape but no values, and an N:M mask "
            "depends on the values. Materialize the weights first (e.g. model.to_empty(device='cpu') and "
            "load the checkpoint)."
        )
    if t.dtype == torch.bool:
        raise ArgumentError(
            f"nm_mask({what}=...) is a bool tensor: an N:M mask keeps the largest magnitudes, and bools "
            "have none to rank. Pass the weight (floating point or integer), or a score tensor."
        )
    if t.is_complex():
        raise ArgumentError(f"nm_mask({what}=...) is complex ({t.dtype}); pass a real score, e.g. score=w.abs().")


def _magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``|w|``, widened first for integer dtypes (``abs(-128)`` overflows in int8)."""
    w = weight.detach()
    return w.abs() if w.is_floating_point() else w.to(torch.float64).abs()


def is_nm(weight: torch.Tensor, pattern: PatternLike, *, axis: int = 1) -> bool:
    """True if every group of ``m`` along ``axis`` has at most ``n`` nonzeros.

    >>> is_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), "2:4")
    True
    """
    p = Pattern.parse(pattern)
    groups = group_view(weight.detach(), p.m, axis)
    return bool(((groups != 0).sum(-1) <= p.n).all())


def kept_magnitude(weight: torch.Tensor, pattern: PatternLike, axis: int = 1) -> float:
    """Fraction of ``sum |w|`` that N:M magnitude pruning along ``axis`` keeps (1.0 for an all-zero weight).

    >>> kept_magnitude(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "2:4")
    0.7
    """
    w = weight.detach().float().abs()
    total = float(w.sum())
    return float((w * nm_mask(w, pattern, axis=axis)).sum()) / total if total else 1.0
