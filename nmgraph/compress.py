"""Compressed N:M storage.

Layout. A weight is viewed as a matrix ``[rows, K]`` with ``K`` its reduction axis (Linear:
``[out, in]``; conv: rows are ``(out, *kernel)`` in the NHWC order), ``G = K / m`` groups per row:

* ``values``: ``[rows, G * n]``, the kept entries of each row in order of position, same dtype as
  the weight. Kept entry ``j`` of a row belongs to group ``j // n``.
* ``indices``: ``[rows, chunks * chunk_bytes]`` ``uint8``, which entries each group keeps, as a
  *combination code* (:class:`IndexCode`). The kept set of a group is one of ``C = C(m, n)``
  combinations (6 for 2:4); its rank ``r = sum_i C(p_i, i + 1)`` over the kept positions
  ``p_0 < p_1 < ...`` (the combinatorial number system) lies in ``[0, C)``. A chunk of
  ``chunk_bytes`` little-endian bytes holds the ranks of ``g`` consecutive groups of a row in mixed
  radix, ``sum_j r_j * C**j`` (``C**g <= 2**(8 * chunk_bytes)``); each row has ``ceil(G / g)``
  chunks, the last one padded with rank-0 groups. :func:`index_code` picks, per pattern, the chunk
  width (1 to 8 bytes) that stores the fewest bits per group, the narrowest among equals: 2:4 puts 3
  groups in a byte (``6**3 = 216 <= 256``: 2.67 bits per group, against the 4 bits of two 2-bit
  positions), 1:4 4 groups in a byte (2 bits), 4:8 9 groups in 7 bytes (6.22 bits; ``log2 70`` is
  6.13). A pattern with ``C(m, n) >= 2**63`` (only ``m >= 67``) stores each group's ``m``-bit keep
  mask instead, in ``ceil(m / 8)`` bytes.

``nbytes`` counts what is stored: for 2:4 in fp16/bf16, ``G * 2 * 2`` bytes of values plus
``ceil(G / 3)`` bytes of indices per row, 0.5417 of dense (:func:`compressed_nbytes` gives the same
number from the shape alone). Format version 2 of the checkpoint stored indices as bit planes
(``ceil(log2 m)`` bits per kept entry); :meth:`CompressedNM.from_bit_planes` still reads those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from nmgraph.errors import SerializationError, ShapeError
from nmgraph.pattern import Pattern, PatternLike, group_view, is_nm, nm_mask, ungroup_view

__all__ = ["CompressedNM", "IndexCode", "ModelSummary", "compress", "compressed_nbytes", "index_code", "model_summary"]

#: Widest chunk of a combination code, in bytes; a chunk's value stays below ``2**63`` (an int64).
MAX_CHUNK_BYTES = 8
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class IndexCode:
    """How the kept set of every group of an ``n:m`` weight is stored (see the module docstring).

    ``kind`` is ``"rank"`` (``groups_per_chunk`` combination ranks in mixed radix per
    ``chunk_bytes``-byte chunk) or ``"mask"`` (one ``m``-bit keep mask in ``chunk_bytes`` bytes per
    group, for patterns with ``C(m, n) >= 2**63``).

    >>> code = index_code("2:4")
    >>> code.combinations, code.groups_per_chunk, code.chunk_bytes, round(code.bits_per_group, 3)
    (6, 3, 1, 2.667)
    """

    n: int
    m: int
    kind: str
    groups_per_chunk: int
    chunk_bytes: int

    def __post_init__(self) -> None:
        Pattern(self.n, self.m)
        if self.kind not in ("rank", "mask"):
            raise ValueError(f"IndexCode.kind must be 'rank' or 'mask', got {self.kind!r}.")
        if self.kind == "rank" and not (self.combinations ** self.groups_per_chunk <= 2 ** (8 * self.chunk_bytes)
                                        and self.combinations ** self.groups_per_chunk <= _INT64_MAX + 1):
            raise ValueError(f"IndexCode: {self.groups_per_chunk} ranks of {self.combinations} do not fit in "
                             f"{self.chunk_bytes} bytes.")

    @property
    def combinations(self) -> int:
        """``C(m, n)``: the kept sets a group can have."""
        return math.comb(self.m, self.n)

    @property
    def bits_per_group(self) -> float:
        return 8 * self.chunk_bytes / self.groups_per_chunk

    def row_bytes(self, groups: int) -> int:
        """Index bytes of a row of ``groups`` groups (the last chunk padded)."""
        return math.ceil(groups / self.groups_per_chunk) * self.chunk_bytes

    def _binomials(self, device: torch.device) -> torch.Tensor:
        """``[m, n + 1]`` int64 table of ``C(c, k)``, clamped to ``2**63 - 1`` (never reached by a
        valid rank, and still nondecreasing in ``c`` for :func:`torch.searchsorted`)."""
        rows = [[min(math.comb(c, k), _INT64_MAX) for k in range(self.n + 1)] for c in range(self.m)]
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def encode(self, positions: torch.Tensor) -> torch.Tensor:
        """``uint8 [rows, row_bytes(G)]`` from the kept positions ``[rows, G * n]`` (int, ascending
        within each group)."""
        rows, kept = positions.shape
        groups = kept // self.n
        pos = positions.to(torch.int64).view(rows, groups, self.n)
        if self.kind == "mask":
            mask = torch.zeros(rows, groups, self.chunk_bytes * 8, dtype=torch.int64, device=pos.device)
            mask.scatter_(-1, pos, 1)
            return _pack_bits(mask.view(rows, groups * self.chunk_bytes, 8))
        table = self._binomials(pos.device).flatten()
        k = torch.arange(1, self.n + 1, device=pos.device)
        ranks = table[pos * (self.n + 1) + k].sum(-1)  # [rows, G], each in [0, C)
        g = self.groups_per_chunk
        chunks = math.ceil(groups / g)
        ranks = torch.nn.functional.pad(ranks, (0, chunks * g - groups)).view(rows, chunks, g)
        powers = torch.tensor([self.combinations**j for j in range(g)], dtype=torch.int64, device=pos.device)
        value = (ranks * powers).sum(-1, keepdim=True)  # [rows, chunks, 1] < C**g <= 2**63
        shifts = torch.arange(0, 8 * self.chunk_bytes, 8, device=pos.device)
        return ((value >> shifts) & 0xFF).to(torch.uint8).view(rows, chunks * self.chunk_bytes)

    def ranks(self, indices: torch.Tensor, groups: int) -> torch.Tensor:
        """The combination rank of every group, ``[rows, groups]`` int64 (``kind="rank"`` only)."""
        rows = indices.shape[0]
        g = self.groups_per_chunk
        chunk = indices.reshape(rows, -1, self.chunk_bytes).to(torch.int64)
        shifts = torch.arange(0, 8 * self.chunk_bytes, 8, device=indices.device)
        value = (chunk << shifts).sum(-1, keepdim=True)  # [rows, chunks, 1]
        powers = torch.tensor([self.combinations**j for j in range(g)], dtype=torch.int64, device=indices.device)
        return ((value // powers) % self.combinations).view(rows, -1)[:, :groups]

    def decode(self, indices: torch.Tensor, groups: int) -> torch.Tensor:
        """The kept positions ``[rows, groups * n]`` int64 (ascending in each group) of ``indices``.

        Tensor ops on ``indices`` only (no host reads), so it also runs on fake tensors."""
        rows = indices.shape[0]
        if self.kind == "mask":
            bits = _unpack_bits(indices).view(rows, groups, self.chunk_bytes * 8)[..., : self.m]
            pos = torch.arange(self.m, device=indices.device)
            key = torch.where(bits.bool(), pos, pos + self.m)
            kept = torch.topk(key, self.n, dim=-1, largest=False, sorted=True).indices
            return kept.reshape(rows, groups * self.n)
        g = self.groups_per_chunk
        if self.chunk_bytes == 1:  # one gather from a table of the 256 byte values
            table = self._unrank(self.ranks(torch.arange(256, device=indices.device).view(256, 1), g))
            pos = table.view(256, g * self.n)[indices.to(torch.int64)]  # [rows, chunks, g * n]
            return pos.view(rows, -1)[:, : groups * self.n]
        return self._unrank(self.ranks(indices, groups)).view(rows, groups * self.n)

    def _unrank(self, ranks: torch.Tensor) -> torch.Tensor:
        """Kept positions ``[..., n]`` (ascending) of combination ranks ``[...]`` (greedy colex
        unranking, largest position first)."""
        r = ranks.reshape(-1).contiguous()
        table = self._binomials(ranks.device)
        out = []
        for k in range(self.n, 0, -1):
            col = table[:, k].contiguous()
            c = torch.searchsorted(col, r, right=True) - 1
            r = r - col[c]
            out.append(c)
        return torch.stack(out[::-1], -1).view(*ranks.shape, self.n)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` of 0/1 -> ``uint8 [...]`` (bit ``i`` of the byte is element ``i``)."""
    weights = 2 ** torch.arange(8, device=bits.device, dtype=torch.int64)
    return (bits.to(torch.int64) * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., B]`` -> ``int64 [..., B * 8]`` (element ``8 b + i`` is bit ``i`` of byte ``b``)."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64)
    return ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1).flatten(-2)


def index_code(pattern: PatternLike) -> IndexCode:
    """The index code of ``pattern``: the chunk width (1 to 8 bytes) whose mixed-radix packing of
    ``C(m, n)``-ary ranks stores the fewest bits per group (ties: the narrowest chunk, so rows pad
    least).

    >>> [(str(p), index_code(p).groups_per_chunk, index_code(p).chunk_bytes) for p in ("1:4", "4:8", "2:8")]
    [('1:4', 4, 1), ('4:8', 9, 7), ('2:8', 13, 8)]
    """
    p = Pattern.parse(pattern)
    c = math.comb(p.m, p.n)
    best: tuple[float, int, int] | None = None
    for width in range(1, MAX_CHUNK_BYTES + 1):
        limit = min(2 ** (8 * width), _INT64_MAX + 1)
        g = 0
        while c ** (g + 1) <= limit:
            g += 1
        if g and (best is None or 8 * width / g < best[0] - 1e-12):
            best = (8 * width / g, g, width)
    if best is None:
        return IndexCode(p.n, p.m, "mask", 1, math.ceil(p.m / 8))
    return IndexCode(p.n, p.m, "rank", best[1], best[2])


def _rows_k(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    axis = axis % len(shape)
    k = shape[axis]
    return math.prod(shape) // k, k


def compressed_nbytes(shape: tuple[int, ...] | torch.Size, pattern: PatternLike, dtype: torch.dtype,
                      *, axis: int = 1) -> int:
    """Bytes :func:`compress` stores for an N:M weight of ``shape`` and ``dtype`` (values + indices):
    what ``compress(w, pattern, axis=axis).nbytes`` is, without building the weight.

    >>> compressed_nbytes((4096, 4096), "2:4", torch.bfloat16) / (4096 * 4096 * 2)
    0.541748046875
    """
    p = Pattern.parse(pattern)
    shape = tuple(int(s) for s in shape)
    rows, k = _rows_k(shape, axis)
    if k % p.m:
        raise ShapeError(f"Reduction dim {axis} of shape {shape} has size {k}, not divisible by M={p.m}.")
    groups = k // p.m
    elem = torch.empty((), dtype=dtype).element_size()
    return rows * groups * p.n * elem + rows * index_code(p).row_bytes(groups)


@dataclass(frozen=True, eq=False)
class CompressedNM:
    """An N:M weight as kept values plus combination-coded in-group indices (see module docstring)."""

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
        want = (rows, self.code.row_bytes(k // p.m))
        if tuple(self.indices.shape) != want or self.indices.dtype != torch.uint8:
            hint = (" (bit planes of format version 2: read them with CompressedNM.from_bit_planes)"
                    if self.indices.dim() == 3 else "")
            raise SerializationError(
                f"CompressedNM.indices is {self.indices.dtype} {tuple(self.indices.shape)}{hint}; a {p} "
                f"weight of shape {self.shape} needs torch.uint8 {want}."
            )

    @property
    def pattern(self) -> Pattern:
        return Pattern(self.n, self.m)

    @property
    def code(self) -> IndexCode:
        return index_code(self.pattern)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (values + indices)."""
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
        """In-group index of every kept value, ``[rows, K*n/m]`` int64 (ascending in each group)."""
        return self.code.decode(self.indices, self.values.shape[1] // self.n)

    def check(self) -> None:
        """Raises :class:`SerializationError` unless ``indices`` is the code :func:`compress` writes
        for some kept sets (a chunk value out of range, nonzero padding or a mask with other than
        ``n`` bits set decodes to sets that encode differently). Reads the tensors on the host."""
        code = self.code
        if not torch.equal(code.encode(self.unpack_indices()), self.indices):
            raise SerializationError(
                f"CompressedNM of shape {self.shape} ({self.pattern}) holds index bytes that no {self.pattern} "
                "weight encodes to: the data is corrupt or was written by another tool. Re-save the model."
            )

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
        """Reads :meth:`state_dict` output; indices stored as bit planes (a 3-D ``indices``, the
        layout of checkpoint format version 2) are re-encoded."""
        try:
            values, indices, meta = (state[f"{prefix}{k}"] for k in ("values", "indices", "meta"))
        except KeyError as e:
            raise SerializationError(
                f"Compressed weight {prefix!r} is missing tensor {e.args[0]!r}; the file is "
                "incomplete or was written by another tool."
            ) from None
        n, m, axis, *shape = (int(v) for v in meta.tolist())
        if indices.dim() == 3:
            return cls.from_bit_planes(values, indices, tuple(shape), n, m, axis)
        return cls(values, indices, tuple(shape), n, m, axis)

    @classmethod
    def from_bit_planes(cls, values: torch.Tensor, planes: torch.Tensor, shape: tuple[int, ...], n: int, m: int,
                        axis: int = 1) -> CompressedNM:
        """Builds a :class:`CompressedNM` from the bit-plane indices of checkpoint format version 2
        (``uint8 [ceil(log2 m), rows, ceil(kept / 8)]``: bit ``b`` of the in-group position of kept
        entry ``j`` is bit ``j % 8`` of ``planes[b, row, j // 8]``)."""
        p = Pattern(n, m)
        rows, k = _rows_k(tuple(shape), axis)
        kept = k // p.m * p.n
        want = (p.index_bits, rows, math.ceil(kept / 8))
        if tuple(planes.shape) != want or planes.dtype != torch.uint8 or tuple(values.shape) != (rows, kept):
            raise SerializationError(
                f"Bit-plane indices {planes.dtype} {tuple(planes.shape)} with values {tuple(values.shape)} do not "
                f"fit a {p} weight of shape {tuple(shape)} (needs torch.uint8 {want} and {(rows, kept)})."
            )
        bits = _unpack_bits(planes)[..., :kept]  # [planes, rows, kept]
        weights = (2 ** torch.arange(p.index_bits, device=planes.device)).view(-1, 1, 1)
        pos = (bits * weights).sum(0).view(rows, -1, p.n)
        if kept and not (bool((pos < p.m).all()) and (p.n == 1 or bool((pos.diff(dim=-1) > 0).all()))):
            raise SerializationError(
                f"Bit-plane indices of a {p} weight of shape {tuple(shape)} hold a position >= {p.m} or a group "
                "whose positions are not ascending: the data is corrupt. Re-save the model."
            )
        return cls(values, index_code(p).encode(pos.view(rows, kept)), tuple(shape), n, m, axis % len(shape))


def compress(weight: torch.Tensor, pattern: PatternLike, *, axis: int = 1) -> CompressedNM:
    """Compresses a weight that already is N:M along ``axis``.

    A weight with more than ``n`` nonzeros in some group raises :class:`ShapeError`; prune it first
    (``weight * nm_mask(weight, pattern)``). Groups with fewer nonzeros store explicit zeros.

    >>> w = torch.tensor([[0.0, 3.0, 0.0, -1.0, 5.0, 0.0, 0.0, 2.0]])
    >>> c = compress(w, "2:4")
    >>> c.values
    tensor([[ 3., -1.,  5.,  2.]])
    >>> c.unpack_indices()
    tensor([[1, 3, 0, 3]])
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
    idx_g = torch.topk(key, p.n, dim=-1, largest=False, sorted=True).values
    values = torch.gather(groups, -1, idx_g).reshape(rows, g * p.n).contiguous()
    indices = index_code(p).encode(idx_g.reshape(rows, g * p.n))
    axis = axis % weight.dim()
    return CompressedNM(values, indices.contiguous(), tuple(weight.shape), p.n, p.m, axis)


@dataclass(frozen=True)
class ModelSummary:
    """The model-level line every report starts with: how many weights are N:M, what share of the
    parameters they hold, and the bytes of all parameters dense and with the N:M weights stored as
    :func:`compress` stores them (:func:`compressed_nbytes`), in the model's dtype.

    ``nm_weights`` / ``dense_weights`` count weights (parameters of 2 or more dims, tied ones once):
    N:M, and left dense. ``planned``: the N:M weights are the ones a plan will prune (not pruned yet).
    """

    pattern: str
    nm_weights: int
    dense_weights: int
    nm_params: int
    total_params: int
    dtype: str
    bytes_dense: int
    bytes_compressed: int
    planned: bool = False

    @property
    def share(self) -> float:
        return self.nm_params / self.total_params if self.total_params else 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_compressed / self.bytes_dense if self.bytes_dense else float("nan")

    def line(self) -> str:
        verb = "can be" if self.planned else "are"
        return (f"model: {self.nm_weights} weights {verb} {self.pattern} ({self.share:.1%} of {self.total_params:,} "
                f"parameters), {self.dense_weights} stay dense; {self.dtype}: {self.bytes_dense:,} bytes dense -> "
                f"{self.bytes_compressed:,} with the {self.pattern} weights compressed ({self.ratio:.3f})")

    def __str__(self) -> str:
        return self.line()

    def to_dict(self) -> dict:
        return {**asdict(self), "share": self.share, "ratio": self.ratio}


def model_summary(model: torch.nn.Module, pattern: PatternLike, nm_weights: Mapping[str, int], *,
                  planned: bool = False) -> ModelSummary:
    """The :class:`ModelSummary` of ``model`` whose weights ``nm_weights`` (``{name: reduction axis}``)
    are (or, ``planned``, will be) N:M. Every parameter counts once (tied ones under their first name).

    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 2, bias=False))
    >>> model_summary(m, "2:4", {"0.weight": 1}).line()
    'model: 1 weights are 2:4 (80.0% of 40 parameters), 1 stay dense; float32: 160 bytes dense -> 100 with the 2:4 weights compressed (0.625)'
    """
    p = Pattern.parse(pattern)
    params = dict(model.named_parameters())  # each Parameter once, under its first name
    canon = {id(t): n for n, t in params.items()}
    every = dict(model.named_parameters(remove_duplicate=False))
    nm = {canon[id(every[n])]: axis for n, axis in nm_weights.items() if n in every}
    by_dtype: dict[torch.dtype, int] = {}
    for t in params.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel()
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32
    bytes_dense = sum(t.numel() * t.element_size() for t in params.values())
    saved = sum(t.numel() * t.element_size() - compressed_nbytes(t.shape, p, t.dtype, axis=nm[n])
                for n, t in params.items() if n in nm)
    return ModelSummary(
        pattern=str(p), nm_weights=len(nm),
        dense_weights=sum(1 for n, t in params.items() if t.dim() >= 2 and n not in nm),
        nm_params=sum(params[n].numel() for n in nm), total_params=sum(t.numel() for t in params.values()),
        dtype=str(dtype).removeprefix("torch."), bytes_dense=bytes_dense, bytes_compressed=bytes_dense - saved,
        planned=planned,
    )
