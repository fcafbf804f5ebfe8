"""Compressed N:M storage.

Layout (what the Triton kernel reads). A weight is viewed as a matrix ``[rows, K]`` with ``K`` its
reduction axis (Linear: ``[out, in]``; conv: rows are ``(out, *kernel)`` in the NHWC order):

* ``values``: ``[rows, K * n / m]``, the kept entries of each row in order of position, same dtype
  as the weight. Kept entry ``j`` of a row belongs to group ``j // n``.
* ``indices``: ``[bits, rows, ceil(K * n / m / 8)]`` uint8 *bit planes*: bit ``b`` of the in-group
  index of kept entry ``j`` is bit ``j % 8`` of ``indices[b, row, j // 8]``, with
  ``bits = ceil(log2 m)``. Bit planes store exactly ``bits`` bits per kept entry for every ``m``
  (3, 5, 6 or 7-bit indices included) and a kernel decodes entry ``j`` with loads at ``j // 8`` that
  run along K like the values, so both streams are read coalesced.

``nbytes`` counts what is stored: for 2:4 fp16, ``K/2 * 2`` bytes of values plus ``K/2 * 2 / 8``
bytes of indices per row, 0.5625 of dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nmgraph.errors import SerializationError, ShapeError
from nmgraph.pattern import Pattern, PatternLike, group_view, is_nm, nm_mask, ungroup_view

__all__ = ["CompressedNM", "compress"]



def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


@dataclass(frozen=True, eq=False)
class CompressedNM:
    """An N:M weight as kept values plus bit-packed in-group indices (see module docstring)."""

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, ...]
    n: int
    m: int
    axis: int = 1

    def __post_init__(self) -> None:
        p = Pattern(self.n, self.m)
        rows, k = _rows_k(self.shape, self.axis)
        kept = k // p.m * p.n
        if tuple(self.values.shape) != (rows, kept):
            raise SerializationError(
                f"CompressedNM.values has shape {tuple(self.values.shape)}; a {p} weight of shape "
                f"{self.shape} needs {(rows, kept)}."
            )
        want = (p.index_bits, rows, math.ceil(kept / 8))
        if tuple(self.indices.shape) != want or self.indices.dtype != torch.uint8:
            raise SerializationError(
                f"CompressedNM.indices is {self.indices.dtype} {tuple(self.indices.shape)}; a {p} "
                f"weight of shape {self.shape} needs torch.uint8 {want}."
            )

    @property
    def pattern(self) -> Pattern:
        return Pattern(self.n, self.m)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (values + index bit planes)."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.values.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def unpack_indices(self) -> torch.Tensor:
        """In-group index of every kept value, ``[rows, K*n/m]`` int64."""
        bits = self.indices.unsqueeze(-1).bitwise_and(_bit_weights(self.indices.device)) != 0
        bits = bits.flatten(-2)[..., : self.values.shape[1]].long()  # [planes, rows, kept]
        weights = (2 ** torch.arange(bits.shape[0], device=bits.device)).view(-1, 1, 1)
        return (bits * weights).sum(0)

    def to_dense(self) -> torch.Tensor:
        """Exact dense weight of the original shape (pruned entries are zero)."""
        rows, k = _rows_k(self.shape, self.axis)
        idx = self.unpack_indices().view(rows, k // self.m, self.n)
        dense = torch.zeros(rows, k // self.m, self.m, dtype=self.values.dtype, device=self.device)
        dense.scatter_(-1, idx, self.values.view(rows, k // self.m, self.n))
        return ungroup_view(dense, self.shape, self.axis).contiguous()

    def to(self, *args, **kwargs) -> CompressedNM:
        """Moves values (device and dtype) and indices (device only)."""
        values = self.values.to(*args, **kwargs)
        return CompressedNM(values, self.indices.to(values.device), self.shape, self.n, self.m, self.axis)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Plain tensors only, so ``torch.load(..., weights_only=True)`` reads it back."""
        meta = torch.tensor([self.n, self.m, self.axis, *self.shape], dtype=torch.int64)
        return {f"{prefix}values": self.values, f"{prefix}indices": self.indices, f"{prefix}meta": meta}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> CompressedNM:
        try:
            values, indices, meta = (state[f"{prefix}{k}"] for k in ("values", "indices", "meta"))
        except KeyError as e:
            raise SerializationError(
                f"Compressed weight {prefix!r} is missing tensor {e.args[0]!r}; the file is "
                "incomplete or was written by another tool."
            ) from None
        n, m, axis, *shape = (int(v) for v in meta.tolist())
        return cls(values, indices, tuple(shape), n, m, axis)


def _rows_k(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    axis = axis % len(shape)
    k = shape[axis]
    return math.prod(shape) // k, k


def compress(weight: torch.Tensor, pattern: PatternLike, *, axis: int = 1) -> CompressedNM:
    """Compresses a weight that already is N:M along ``axis``.

    A weight with more than ``n`` nonzeros in some group raises :class:`ShapeError`; prune it first
    (``weight * nm_mask(weight, pattern)``). Groups with fewer nonzeros store explicit zeros.

    >>> w = torch.tensor([[0.0, 3.0, 0.0, -1.0, 5.0, 0.0, 0.0, 2.0]])
    >>> c = compress(w, "2:4")
    >>> c.values
    tensor([[ 3., -1.,  5.,  2.]])
    >>> torch.equal(c.to_dense(), w)
    True
    """
    p = Pattern.parse(pattern)
    weight = weight.detach()
    if not is_nm(weight, p, axis=axis):
        raise ShapeError(
            f"Weight of shape {tuple(weight.shape)} is not {p} along axis {axis}: some group of "
            f"{p.m} has more than {p.n} nonzeros. Prune it first with weight * nm_mask(weight, "
            f"'{p}')."
        )
    # Keep the nonzeros; where a group has fewer, nm_mask on (w != 0) picks zeros by the tie rule.
    keep = nm_mask(weight, p, score=(weight != 0).to(torch.float32), axis=axis)
    groups = group_view(weight, p.m, axis)
    keep_g = group_view(keep, p.m, axis)
    rows, g = groups.shape[:2]
    pos = torch.arange(p.m, device=weight.device)
    # Kept positions of each group in ascending order: dropped positions sort after kept ones.
    key = torch.where(keep_g, pos, pos + p.m)
    idx_g = torch.topk(key, p.n, dim=-1, largest=False, sorted=True).indices
    values = torch.gather(groups, -1, idx_g).reshape(rows, g * p.n).contiguous()
    idx = idx_g.reshape(rows, g * p.n)
    kept = idx.shape[1]
    planes = torch.stack([(idx >> b) & 1 for b in range(p.index_bits)]).to(torch.uint8)
    pad = (-kept) % 8
    if pad:
        planes = torch.nn.functional.pad(planes, (0, pad))
    planes = planes.view(p.index_bits, rows, -1, 8)
    packed = (planes * _bit_weights(weight.device)).sum(-1, dtype=torch.int32).to(torch.uint8)
    axis = axis % weight.dim()
    return CompressedNM(values, packed.contiguous(), tuple(weight.shape), p.n, p.m, axis)


