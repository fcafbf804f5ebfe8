"""Gather GEMV for decode (``M = 1`` or ``2`` rows of ``x``): ``y = x @ W^T + b`` on CUDA cores.

The weight is a :class:`~nmgraph.backends.kernels.repack.PackedNM`; no dense tile is ever built.
Each thread owns one 16-byte vector of kept values of a row (8 fp16/bf16 or 4 fp32 entries, ``VEC``)
and, for every row of its tile, multiplies each kept value by the activation it belongs to,
``x[(j // n) * m + idx_j]``, accumulating in fp32:

* **fast path** (``n`` a power of two dividing ``VEC``, ``m`` a power of two up to 16: 2:4, 1:4, 2:8,
  1:8, 4:8, 1:16, ...): the ``VEC * m / n`` activations under the thread's groups are loaded with
  16-byte loads (shared by all rows of the tile), converted to fp32 once, and each entry *selects* its
  activation from registers with a binary tree of ``fsel`` over the bits of its index. The bit of entry
  ``e`` is one logical op against a constant mask on the index word (``PackedNM.words``). Leaves an
  entry's slot can never reach (kept indices are sorted: slot ``s`` of ``n`` lies in
  ``[s, s + m - n]``) are pruned at compile time, so 2:4 needs two selects per entry, not three.
* **general path** (any other ``n:m`` the format holds: 3:8, 2:6, 1:3, 1:32, ...): the index is
  assembled from its bits and the activation is loaded from L1 (``x`` is a few KB and stays cached).

One kernel launch per call: the bias is fused, the result is stored in the activation dtype, the
K reduction of a row stays inside one program (split over the program's threads along K and reduced
across them once, at the end), so there is no fp32 buffer, no zero-fill and no cast kernel. Rows of ``x``
beyond two are a second grid axis (pairs of rows): correct for any ``M``, but each pair reads the
whole weight again, so this kernel serves ``M <= 2``; use :mod:`~nmgraph.backends.kernels.nm_mma`
above that.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slow, exact); tests use that.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from nmgraph.backends.kernels._common import check_call, import_triton, interpreting
from nmgraph.backends.kernels.repack import CHUNK, PackedNM
from nmgraph.errors import UnsupportedError

__all__ = ["GemvConfig", "default_config", "gemv_fast_path", "nm_gemv"]

#: Largest ``m`` served by the select (fast) path.
FAST_MAX_M = 16
#: Streaming multiprocessors assumed when sizing the grid without a device (H100 SXM / H200).
DEFAULT_SMS = 132


@dataclass(frozen=True)
class GemvConfig:
    """Meta-parameters of :func:`nm_gemv` (all powers of two).

    ``block_n``: rows of the weight per program; ``block_e``: kept entries per row and loop step (a
    multiple of 32, so a step covers whole index words). A thread owns one 16-byte vector of a row
    per step: ``block_e / VEC`` threads run along K, the other ``32 * num_warps * VEC / block_e`` lanes
    and warps along rows, and ``block_n`` must be a multiple of that. ``num_warps``; ``num_stages``
    (Triton's software pipelining; the loads of this loop are not pipelined by Triton 3.9, so
    latency is hidden by running several programs per SM).
    """

    block_n: int = 16
    block_e: int = 256
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_e", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise UnsupportedError(f"GemvConfig.{name}={v!r} must be a positive power of two.")
        if self.block_e < CHUNK:
            raise UnsupportedError(f"GemvConfig.block_e={self.block_e} must be >= {CHUNK} (one index word).")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise UnsupportedError(f"GemvConfig.num_stages={self.num_stages!r} must be an int >= 1.")

    def check(self, vec: int) -> None:
        """Raises if the tile does not fit the thread layout for ``vec`` entries per 16-byte vector."""
        threads_k = self.block_e // vec
        if self.block_e < vec or threads_k > 32 * self.num_warps:
            raise UnsupportedError(
                f"GemvConfig(block_e={self.block_e}) needs between {vec} and {32 * self.num_warps * vec} "
                f"kept entries per step for {vec} entries per thread and num_warps={self.num_warps}."
            )
        rows_per_rep = 32 * self.num_warps // threads_k
        if self.block_n % rows_per_rep:
            raise UnsupportedError(
                f"GemvConfig(block_n={self.block_n}) must be a multiple of {rows_per_rep} (the rows that "
                f"32 * num_warps threads cover with block_e={self.block_e})."
            )


def gemv_fast_path(n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``n:m`` in ``dtype`` takes the select path (else the general gather path)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return n & (n - 1) == 0 and vec % n == 0 and m & (m - 1) == 0 and m <= FAST_MAX_M


def default_config(n_out: int, k: int, dtype: torch.dtype, *, sms: int = DEFAULT_SMS) -> GemvConfig:
    """Tiles for a call, chosen with ``benchmarks/kernel_static.py`` (estimates, no GPU yet).

    Each thread owns a 16-byte vector of 2 or 4 rows per step. The grid should fit on the GPU in one
    round (programs that start together find the memory pipe empty, so every extra round costs one
    more DRAM latency) with as many programs per SM as possible (they hide each other's latency):

    * ``N <= 14 * sms * 4`` (7392 on 132 SMs): 4 rows, 2 warps, 2 rows per thread (~70 registers, 14
      programs per SM);
    * ``N <= 4 * sms * 32`` (16896): 32 rows, 4 warps, 4 rows per thread (~125 registers, 4 per SM);
    * larger: 64 rows, 4 warps.

    ``k`` does not change the choice (the K loop runs inside a program). Under the interpreter the
    tiles are small.
    """
    del k
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    if interpreting():
        return GemvConfig(block_n=64 // vec, block_e=64, num_warps=1, num_stages=1)
    if n_out <= 14 * sms * 4:
        return GemvConfig(block_n=4, block_e=32 * vec, num_warps=2)
    if n_out <= 4 * sms * 32:
        return GemvConfig(block_n=32, block_e=16 * vec, num_warps=4)
    return GemvConfig(block_n=64, block_e=8 * vec, num_warps=4)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Imports (once per interpreter mode) the jitted kernel; triton is only imported here."""
    del interpret  # part of the cache key only: triton.jit reads TRITON_INTERPRET when it decorates
    triton = import_triton()
    from nmgraph.backends.kernels import _gemv_jit

    return SimpleNamespace(kernel=_gemv_jit.nm_gemv_kernel, cdiv=triton.cdiv)


def nm_gemv(
    x: torch.Tensor,
    weight: PackedNM,
    bias: torch.Tensor | None = None,
    *,
    config: GemvConfig | Mapping[str, int] | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x`` of shape ``[..., K]``, one kernel launch; made for ``M <= 2`` rows.

    ``weight`` is a :class:`PackedNM` (``repack(compress(w, pattern))``), any ``n:m``; ``x``,
    ``weight.values`` and ``bias`` share one dtype (fp16, bf16 or fp32); accumulation is fp32 and the
    result has ``x``'s dtype. Any number of rows works (a grid axis over pairs of rows, each pair
    reading the whole weight), but past two rows :func:`~nmgraph.backends.kernels.nm_mma.nm_mma` is
    the kernel to use. ``x`` with a non-unit stride along K is copied first (one extra kernel).
    ``config``: a :class:`GemvConfig` (or a mapping of its fields); default :func:`default_config`.
    Inference only (no autograd).
    """
    m_rows, k = check_call("nm_gemv", x, weight, bias)
    cfg = _as_config(config) if config is not None else default_config(weight.rows, k, x.dtype)
    n_out = weight.rows
    lead = x.shape[:-1]
    out = torch.empty((m_rows, n_out), dtype=x.dtype, device=x.device)
    if m_rows == 0 or n_out == 0:
        return out.view(*lead, n_out)
    x2 = x.reshape(m_rows, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    vec = 16 // x.element_size()
    cfg.check(vec)
    fast = gemv_fast_path(weight.n, weight.m, x.dtype)
    m_per_prog = 1 if m_rows == 1 else 2
    ns = _kernels(interpreting())
    grid = (ns.cdiv(n_out, cfg.block_n), ns.cdiv(m_rows, m_per_prog))
    extra = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    ns.kernel[grid](
        x2, weight.values, weight.words, bias if bias is not None else weight.values, out,
        m_rows, n_out, k, weight.kept, weight.kept_pad,
        x2.stride(0), out.stride(0),
        NM_N=weight.n, NM_M=weight.m, BITS=weight.bits, VEC=vec,
        M_ROWS=m_per_prog, FAST=fast, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_E=cfg.block_e, NUM_WARPS=cfg.num_warps, **extra,
    )
    return out.view(*lead, n_out)


def _as_config(config: GemvConfig | Mapping[str, int]) -> GemvConfig:
    if isinstance(config, GemvConfig):
        return config
    if not isinstance(config, Mapping):
        raise UnsupportedError(f"nm_gemv(config=...) takes a GemvConfig or a mapping, got {type(config).__name__}.")
    unknown = set(config) - set(GemvConfig.__dataclass_fields__)
    if unknown:
        raise UnsupportedError(
            f"nm_gemv(config=...) has unknown fields {sorted(unknown)}; valid: "
            f"{sorted(GemvConfig.__dataclass_fields__)}."
        )
    return GemvConfig(**{k: int(v) for k, v in config.items()})
