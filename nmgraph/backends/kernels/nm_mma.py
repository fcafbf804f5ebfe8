"""Swap-AB tensor-core N:M GEMM for ``M = 3 .. 64`` rows of ``x`` (any ``M`` works).

``y = x @ W^T + b`` computed as ``acc^T[BLOCK_N, BLOCK_M] = W_tile[BLOCK_N, BLOCK_K] @ x^T[BLOCK_K,
BLOCK_M]``: the weight is the 64-row operand (wgmma's ``M``), so no transpose of the weight tile is
needed and Triton picks wgmma on sm_90 with the weight fragment expanded in registers from
:class:`~nmgraph.backends.kernels.repack.PackedNM`. ``BLOCK_M`` follows the bucket of ``M`` (16, 32
or 64), so ``M = 17 .. 64`` expands the weight once, not once per 16 rows. See
:mod:`nmgraph.backends.kernels._mma_jit` for the permuted-K expansion of 2:4 and 1:4.

One kernel launch per call. When the output tiles alone cannot fill the GPU (``N = 4096`` gives 64
tiles of 64 rows), K is split across programs and reduced *in the same launch*: each split writes an
fp32 partial to a workspace (allocated with ``torch.empty``, no fill kernel) and the last split to
arrive at the tile's semaphore sums the partials, adds the bias, casts and stores, then resets the
semaphore. The semaphores are a small int32 tensor of zeros owned by the caller
(:func:`mma_semaphores`, made once per layer); without them the kernel runs unsplit.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slow, exact); tests use that.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from nmgraph.backends.kernels._common import check_call, import_triton, interpreting
from nmgraph.backends.kernels.repack import PackedNM
from nmgraph.errors import ShapeError, UnsupportedError

__all__ = ["MmaConfig", "default_config", "m_bucket", "mma_fast_path", "mma_semaphores", "nm_mma"]

#: Patterns with the permuted-K register expansion (fp16 / bf16); others use the generic expansion.
FAST_PATTERNS = ((2, 4), (1, 4))
#: Streaming multiprocessors assumed when sizing split-K without a device (H100 SXM / H200).
DEFAULT_SMS = 132


@dataclass(frozen=True)
class MmaConfig:
    """Meta-parameters of :func:`nm_mma`.

    ``block_n``: weight rows per program (a multiple of 64 on the fast path); ``block_m``: rows of
    ``x`` per program (``None``: :func:`m_bucket`); ``block_k``: dense K per step (``None``: 64 for
    2:4, 128 for 1:4, so one step reads one 32-entry index chunk per row; generic path: ``2 m``
    rounded to a power of two, at least 64); ``split_k``: programs sharing one output tile along K
    (needs ``semaphores``); ``num_warps`` (4 on the fast path: one warpgroup); ``num_stages``.
    """

    block_n: int = 64
    block_m: int | None = None
    block_k: int | None = None
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_m", "block_k", "num_warps"):
            v = getattr(self, name)
            if v is None and name in ("block_m", "block_k"):
                continue
            if not isinstance(v, int) or (v < 16 and name != "num_warps") or v < 1 or v & (v - 1):
                raise UnsupportedError(f"MmaConfig.{name}={v!r} must be a power of two (>= 16 for tiles).")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise UnsupportedError(f"MmaConfig.split_k={self.split_k!r} must be an int >= 1.")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise UnsupportedError(f"MmaConfig.num_stages={self.num_stages!r} must be an int >= 1.")


def mma_fast_path(n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``n:m`` in ``dtype`` uses the permuted-K register expansion."""
    return (n, m) in FAST_PATTERNS and dtype in (torch.float16, torch.bfloat16)


def m_bucket(m_rows: int) -> int:
    """``BLOCK_M`` for ``m_rows`` rows: 16, 32 or 64 (larger ``M`` loops over tiles of 64)."""
    return 16 if m_rows <= 16 else 32 if m_rows <= 32 else 64


def _block_k(n: int, m: int, dtype: torch.dtype) -> int:
    if mma_fast_path(n, m, dtype):
        return 64 if n == 2 else 128
    mp2 = 1 << (m - 1).bit_length()
    return max(64, 2 * mp2)


def default_config(n_out: int, k: int, m_rows: int, n: int, m: int, dtype: torch.dtype, *,
                   split_ok: bool = True, sms: int = DEFAULT_SMS) -> MmaConfig:
    """Tiles for a call: ``BLOCK_M`` by bucket; K split so the busiest SM has the least work.

    ``split_ok``: whether semaphores are available (else ``split_k = 1``). Under the interpreter the
    tiles are the smallest legal ones and K is split in two when possible (so tests cover the
    in-launch reduction).
    """
    bk = _block_k(n, m, dtype)
    fast = mma_fast_path(n, m, dtype)
    bm = m_bucket(m_rows)
    bn = 64 if fast else (32 if interpreting() else 64)
    k_tiles = max(1, math.ceil(k / bk))
    if interpreting():
        split = 2 if split_ok and k_tiles >= 2 else 1
        return MmaConfig(block_n=bn, block_m=bm, block_k=bk, split_k=split, num_warps=4, num_stages=1)
    tiles = math.ceil(n_out / bn) * math.ceil(m_rows / bm)
    split = 1
    if split_ok:
        # Splits that leave every program >= 8 K steps; among those giving >= 1.5 programs per SM (to
        # hide latency), the least work on the busiest SM (programs per SM x K steps per program);
        # ties go to the smaller split (less partial-sum traffic).
        allowed = [s for s in (1, 2, 4, 8, 16) if k_tiles // s >= 8] or [1]
        enough = [s for s in allowed if 2 * tiles * s >= 3 * sms] or [allowed[-1]]
        split = min(enough, key=lambda s: (math.ceil(tiles * s / sms) * math.ceil(k_tiles / s), s))
    return MmaConfig(block_n=bn, block_m=bm, block_k=bk, split_k=split, num_warps=4, num_stages=4)


def mma_semaphores(n_out: int, device: torch.device | str, *, block_n: int = 16, max_m_tiles: int = 1
                   ) -> torch.Tensor:
    """Zeroed int32 semaphores for split-K :func:`nm_mma` calls on a weight with ``n_out`` rows.

    Make them once per layer (this allocation is the only fill); every call leaves them zero again.
    ``max_m_tiles``: the most ``BLOCK_M`` tiles of ``x`` a split call will have (1 covers ``M <= 64``).
    Calls sharing one tensor must not run concurrently (one stream, or one CUDA graph).
    """
    return torch.zeros(math.ceil(n_out / block_n) * max_m_tiles, dtype=torch.int32, device=device)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Imports (once per interpreter mode) the jitted kernel; triton is only imported here."""
    del interpret  # part of the cache key only: triton.jit reads TRITON_INTERPRET when it decorates
    triton = import_triton()
    from nmgraph.backends.kernels import _mma_jit

    return SimpleNamespace(kernel=_mma_jit.nm_mma_kernel, cdiv=triton.cdiv)


def nm_mma(
    x: torch.Tensor,
    weight: PackedNM,
    bias: torch.Tensor | None = None,
    *,
    config: MmaConfig | Mapping[str, int] | None = None,
    semaphores: torch.Tensor | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``x @ W^T + bias`` on tensor cores for ``x`` of shape ``[..., K]``, one kernel launch.

    Made for ``M = 3 .. 64`` rows (``BLOCK_M`` = 16 / 32 / 64 by bucket); more rows loop over tiles
    of 64 in the grid (correct; prefill sizes belong to cuSPARSELt or dense). ``weight``: a
    :class:`PackedNM`, any ``n:m`` (2:4 and 1:4 in fp16/bf16 take the fast expansion); ``x``,
    ``weight.values`` and ``bias`` share one dtype; accumulation is fp32 (fp32 inputs use exact fp32
    products unless ``allow_tf32=True``); the result has ``x``'s dtype. ``semaphores``
    (:func:`mma_semaphores`) enable split-K reduced in the same launch; ``config`` a
    :class:`MmaConfig` or a mapping of its fields (default :func:`default_config`). ``x`` with a
    non-unit stride along K is copied first. Inference only (no autograd).
    """
    m_rows, k = check_call("nm_mma", x, weight, bias)
    n_out = weight.rows
    if config is None:
        # Split only when the semaphores cover every output tile of this call (64-row tiles).
        tiles = math.ceil(n_out / 64) * math.ceil(max(m_rows, 1) / m_bucket(max(m_rows, 1)))
        split_ok = semaphores is not None and semaphores.numel() >= tiles
        cfg = default_config(n_out, k, max(m_rows, 1), weight.n, weight.m, x.dtype, split_ok=split_ok)
    else:
        cfg = _as_config(config)
    fast = mma_fast_path(weight.n, weight.m, x.dtype)
    mp2 = 1 << (weight.m - 1).bit_length()
    bm = cfg.block_m or m_bucket(max(m_rows, 1))
    bk = cfg.block_k or _block_k(weight.n, weight.m, x.dtype)
    if fast:
        if bk != _block_k(weight.n, weight.m, x.dtype):
            raise UnsupportedError(
                f"nm_mma: block_k={bk} is not supported for {weight.pattern} {x.dtype}; the fast path "
                f"reads one 32-entry index chunk per step, block_k={_block_k(weight.n, weight.m, x.dtype)}."
            )
        if cfg.block_n % 64 or cfg.num_warps != 4:
            raise UnsupportedError(
                f"nm_mma: the {weight.pattern} fast path needs block_n a multiple of 64 and num_warps=4 "
                f"(one warpgroup), got block_n={cfg.block_n}, num_warps={cfg.num_warps}."
            )
    elif bk < mp2:
        raise UnsupportedError(f"nm_mma: block_k={bk} must be >= {mp2} (one group) for {weight.pattern}.")
    lead = x.shape[:-1]
    out = torch.empty((m_rows, n_out), dtype=x.dtype, device=x.device)
    if m_rows == 0 or n_out == 0:
        return out.view(*lead, n_out)
    x2 = x.reshape(m_rows, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    ns = _kernels(interpreting())
    m_tiles = ns.cdiv(m_rows, bm)
    n_tiles = ns.cdiv(n_out, cfg.block_n)
    split = cfg.split_k
    if split > 1:
        if semaphores is None:
            raise UnsupportedError(
                f"nm_mma: split_k={split} needs semaphores (nmgraph.backends.kernels.nm_mma.mma_semaphores"
                f"({n_out}, device)); pass them or use split_k=1."
            )
        if (semaphores.dtype != torch.int32 or semaphores.device != x.device
                or semaphores.numel() < n_tiles * m_tiles):
            raise ShapeError(
                f"nm_mma: semaphores must be int32 on {x.device} with at least {n_tiles * m_tiles} "
                f"elements for this call, got {semaphores.dtype} {tuple(semaphores.shape)} on "
                f"{semaphores.device}."
            )
        workspace = torch.empty((split, m_rows, n_out), dtype=torch.float32, device=x.device)
    else:
        workspace = out
        semaphores = out
    values = weight.values.view(torch.int32) if fast and weight.n == 2 else weight.values
    extra = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    ns.kernel[(n_tiles, m_tiles, split)](
        x2, values, weight.words, bias if bias is not None else weight.values, out, workspace, semaphores,
        m_rows, n_out, k, weight.kept_pad,
        x2.stride(0), out.stride(0),
        NM_N=weight.n, NM_M=weight.m, BITS=weight.bits, MP2=mp2,
        FAST=fast, HAS_BIAS=bias is not None,
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        DOT_PRECISION="tf32" if (allow_tf32 or x.dtype != torch.float32) else "ieee",
        BLOCK_N=cfg.block_n, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, **extra,
    )
    return out.view(*lead, n_out)


def _as_config(config: MmaConfig | Mapping[str, int]) -> MmaConfig:
    if isinstance(config, MmaConfig):
        return config
    if not isinstance(config, Mapping):
        raise UnsupportedError(f"nm_mma(config=...) takes an MmaConfig or a mapping, got {type(config).__name__}.")
    unknown = set(config) - set(MmaConfig.__dataclass_fields__)
    if unknown:
        raise UnsupportedError(
            f"nm_mma(config=...) has unknown fields {sorted(unknown)}; valid: "
            f"{sorted(MmaConfig.__dataclass_fields__)}."
        )
    return MmaConfig(**{k: (None if v is None else int(v)) for k, v in config.items()})
