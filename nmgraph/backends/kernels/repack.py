"""Kernel-friendly storage of an N:M weight: the same values and in-group positions as
:class:`~nmgraph.compress.CompressedNM`, laid out for 16-byte loads and 32-bit index words.

:class:`CompressedNM` stays the file format. Its ``indices`` are a combination code (the rank of each
group's kept set, several groups per byte chunk), the smallest to store but decoded with divisions or
a table. The kernels in this package read :class:`PackedNM` instead, built once per layer at lowering
time by :func:`repack`:

* ``values``: ``[rows, kept_pad]`` in the weight's dtype, the kept entries of each row in order of
  position (entry ``j`` belongs to group ``j // n``), zero-padded to ``kept_pad``, a multiple of
  :data:`CHUNK` (32). Every row therefore starts 64-byte aligned (fp16) and a thread can read 8 fp16 /
  4 fp32 kept values with one 16-byte load.
* ``words``: ``[rows, kept_pad // 32 * bits]`` ``int32``, ``bits = ceil(log2 m)``. Each chunk of 32
  kept entries of a row has ``bits`` consecutive words; word ``t`` of chunk ``c`` holds bit ``t`` of
  the in-group index of entry ``32 * c + e`` at bit ``e``. That is exactly ``bits`` bits per kept
  entry in 32-bit words for every ``m`` (2:4: 2 words per 16 groups, 8 groups per word on average;
  1:4: 2 words per 32 groups; 1:8 / 2:8 / 4:8: 3 words per 32 entries, no waste for 3-bit indices)
  and every tile of the kernels is a power of two. A kernel reads the bit of entry ``e`` with one
  logical op against a constant mask (``word & (1 << e)``), never a variable shift.

Padding (entries ``kept .. kept_pad - 1``) holds value 0 with index 0; it only exists when a row's
kept count is not a multiple of 32 (ragged K) and is the only byte :class:`PackedNM` adds. The round
trip :meth:`PackedNM.to_compressed` gives back the same ``values`` and ``indices`` tensors bit for bit.

>>> import torch
>>> from nmgraph import compress, nm_mask
>>> w = torch.randn(8, 64)
>>> c = compress(w * nm_mask(w, "2:4"), "2:4")
>>> p = repack(c)
>>> p.values.shape, p.words.shape, p.words.dtype
(torch.Size([8, 32]), torch.Size([8, 2]), torch.int32)
>>> back = p.to_compressed()
>>> torch.equal(back.values, c.values) and torch.equal(back.indices, c.indices)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nmgraph.compress import CompressedNM, index_code
from nmgraph.errors import SerializationError, ShapeError, UnsupportedError
from nmgraph.pattern import Pattern

__all__ = ["CHUNK", "PackedNM", "repack"]

#: Kept entries per index word (one bit of each entry per word).
CHUNK = 32


@dataclass(frozen=True, eq=False)
class PackedNM:
    """A 2-D N:M weight as padded kept values plus 32-bit index words (see module docstring).

    ``shape``, ``n``, ``m`` and ``axis`` are those of the :class:`CompressedNM` it came from; ``kept``
    is the unpadded number of kept entries per row (``K // m * n``).
    """

    values: torch.Tensor
    words: torch.Tensor
    shape: tuple[int, ...]
    n: int
    m: int
    axis: int = 1

    def __post_init__(self) -> None:
        p = Pattern(self.n, self.m)
        if len(self.shape) != 2:
            raise ShapeError(f"PackedNM holds 2-D weights, got shape {self.shape}.")
        rows, kept_pad = self.rows, self.kept_pad
        if tuple(self.values.shape) != (rows, kept_pad) or not self.values.is_contiguous():
            raise SerializationError(
                f"PackedNM.values has shape {tuple(self.values.shape)} (contiguous: "
                f"{self.values.is_contiguous()}); a {p} weight of shape {self.shape} needs a contiguous "
                f"{(rows, kept_pad)}."
            )
        want = (rows, kept_pad // CHUNK * p.index_bits)
        if tuple(self.words.shape) != want or self.words.dtype != torch.int32 or not self.words.is_contiguous():
            raise SerializationError(
                f"PackedNM.words is {self.words.dtype} {tuple(self.words.shape)}; a {p} weight of shape "
                f"{self.shape} needs contiguous torch.int32 {want}."
            )
        if self.words.device != self.values.device:
            raise SerializationError(
                f"PackedNM.values is on {self.values.device} but words on {self.words.device}."
            )

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def pattern(self) -> Pattern:
        return Pattern(self.n, self.m)

    @property
    def bits(self) -> int:
        """Index bits per kept entry (``ceil(log2 m)``); also index words per chunk of 32 entries."""
        return self.pattern.index_bits

    @property
    def rows(self) -> int:
        """Output features ``N`` (rows of the ``[N, K]`` view)."""
        return math.prod(self.shape) // self.k

    @property
    def k(self) -> int:
        """Reduction length ``K``."""
        return self.shape[self.axis % 2]

    @property
    def kept(self) -> int:
        """Kept entries per row, without padding."""
        return self.k // self.m * self.n

    @property
    def kept_pad(self) -> int:
        return _round_up(self.kept, CHUNK)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes stored (values and index words, padding included)."""
        return self.values.numel() * self.values.element_size() + self.words.numel() * 4

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.values.element_size()

    # ---- conversions ---------------------------------------------------------------------------
    def unpack_indices(self) -> torch.Tensor:
        """In-group index of every kept entry, ``[rows, kept]`` int64 (padding dropped)."""
        w = self.words.view(self.rows, -1, self.bits).to(torch.int64) & 0xFFFFFFFF  # [rows, C, bits]
        e = torch.arange(CHUNK, device=w.device)
        bit = (w.unsqueeze(-1) >> e) & 1  # [rows, C, bits, 32]
        weights = (2 ** torch.arange(self.bits, device=w.device)).view(1, 1, -1, 1)
        idx = (bit * weights).sum(2)  # [rows, C, 32]
        return idx.reshape(self.rows, -1)[:, : self.kept]

    def to_compressed(self) -> CompressedNM:
        """The :class:`CompressedNM` this was packed from, bit for bit (values and indices)."""
        kept = self.kept
        indices = index_code(self.pattern).encode(self.unpack_indices())
        values = self.values[:, :kept].contiguous()
        return CompressedNM(values, indices.contiguous(), self.shape, self.n, self.m, self.axis)

    def linear_dense(self) -> torch.Tensor:
        """The dense ``[rows, K]`` weight (``[out_features, in_features]``, pruned entries zero).

        Tensor ops on ``values`` and ``words`` only (no host reads), so it also runs on fake tensors
        (the backward of the Triton graph op) and inside a CUDA graph.
        """
        rows, groups = self.rows, self.k // self.m
        idx = self.unpack_indices().view(rows, groups, self.n)
        dense = self.values.new_zeros(rows, groups, self.m)
        dense.scatter_(-1, idx, self.values[:, : self.kept].reshape(rows, groups, self.n))
        return dense.view(rows, self.k)

    def to_dense(self) -> torch.Tensor:
        """The dense weight of the original shape (pruned entries zero)."""
        dense = self.linear_dense()
        return dense if self.axis % 2 == 1 else dense.t().contiguous()

    def to(self, *args, **kwargs) -> PackedNM:
        """Moves values (device and dtype) and words (device only)."""
        values = self.values.to(*args, **kwargs).contiguous()
        return PackedNM(values, self.words.to(values.device), self.shape, self.n, self.m, self.axis)


def _round_up(v: int, to: int) -> int:
    return (v + to - 1) // to * to


def repack(weight: CompressedNM) -> PackedNM:
    """Repacks a 2-D :class:`CompressedNM` into :class:`PackedNM` (exact; see module docstring).

    Runs once per layer (at lowering time), on the weight's device.
    """
    if not isinstance(weight, CompressedNM):
        raise UnsupportedError(
            f"repack needs a CompressedNM (nmgraph.compress(w, pattern)), got {type(weight).__name__}."
        )
    if len(weight.shape) != 2:
        raise ShapeError(
            f"repack: the N:M kernels take 2-D (linear) weights; got shape {weight.shape}. Reshape a "
            "pointwise conv weight to [out, in] first."
        )
    p = weight.pattern
    rows, kept = weight.values.shape
    kept_pad = _round_up(kept, CHUNK)
    values = weight.values
    idx = weight.unpack_indices()  # [rows, kept] int64, strictly increasing in each group (a combination code)
    if kept_pad != kept:
        values = torch.nn.functional.pad(values, (0, kept_pad - kept))
        idx = torch.nn.functional.pad(idx, (0, kept_pad - kept))
    e = torch.arange(CHUNK, device=idx.device)
    chunks = idx.view(rows, -1, 1, CHUNK)  # [rows, C, 1, 32]
    t = torch.arange(p.index_bits, device=idx.device).view(1, 1, -1, 1)
    words = (((chunks >> t) & 1) << e).sum(-1)  # [rows, C, bits], in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return PackedNM(values.contiguous(), words.reshape(rows, -1).contiguous(), tuple(weight.shape),
                    weight.n, weight.m, weight.axis)
