"""The buffers of one masked weight."""

from __future__ import annotations

import torch
from torch import nn

from nmgraph.errors import ShapeError
from nmgraph.pattern import MAX_M, Pattern

__all__ = ["MaskState"]


class MaskState(nn.Module):
    """Buffers of one masked weight: forward mask, target hard mask, gradient mask, current pattern.

    ``mask`` (bool) is the forward mask ``E`` of the current training phase, ``hard`` (bool) the
    target N:M mask used for evaluation and folded by :func:`nmgraph.convert`, ``grad_mask`` (bool or
    ``None``) the gradient mask ``G``, ``pattern`` (int64 ``[2]``) the N:M pattern that ``mask`` has
    now. ``weight_name``, ``axis`` and ``target`` are plain attributes describing the weight.
    """

    def __init__(
        self,
        weight_name: str,
        shape: tuple[int, ...],
        axis: int,
        target: Pattern,
        *,
        with_grad_mask: bool,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight_name = weight_name
        self.shape = tuple(shape)
        self.axis = axis % len(shape)
        self.target = target
        k = self.shape[self.axis]
        if k % target.m:
            raise ShapeError(
                f"Weight {weight_name!r} of shape {self.shape} has reduction dim {self.axis} of size "
                f"{k}, not divisible by M={target.m}. Exclude it from the plan or pick another pattern."
            )
        self.register_buffer("mask", torch.ones(self.shape, dtype=torch.bool, device=device))
        self.register_buffer("hard", torch.ones(self.shape, dtype=torch.bool, device=device))
        self.register_buffer(
            "grad_mask",
            torch.ones(self.shape, dtype=torch.bool, device=device) if with_grad_mask else None,
        )
        self.register_buffer(
            "pattern", torch.tensor([target.m, target.m], dtype=torch.int64, device=device)
        )

    @property
    def reduction_size(self) -> int:
        return self.shape[self.axis]

    def fits(self, pattern: Pattern) -> bool:
        """Whether groups of ``pattern.m`` tile the reduction axis (groups never straddle rows)."""
        return pattern.m <= MAX_M and self.reduction_size % pattern.m == 0

    def current_pattern(self) -> Pattern | None:
        """The pattern of ``mask`` now (``None`` while it is dense)."""
        n, m = (int(v) for v in self.pattern.tolist())
        return None if n >= m else Pattern(n, m)

    def extra_repr(self) -> str:
        return f"{self.weight_name}, shape={self.shape}, axis={self.axis}, target={self.target}"
