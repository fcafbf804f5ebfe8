"""Triton N:M sparse GEMM: ``y = x @ W^T + b`` with ``W`` stored as :class:`~nmgraph.compress.CompressedNM`.

The kernel never materialises the dense weight in memory. Each program loads, per K step, the kept
values and the index bit planes of a ``[BLOCK_N, GROUPS]`` tile of groups for each of the ``n`` kept
slots, rebuilds the dense ``[BLOCK_N, GROUPS * m]`` weight tile in registers (slot ``s`` of group
``g`` lands on column ``g * m + index``: compare the unpacked index with ``arange(m)`` and sum the
``n`` slots; at most one slot hits a column, so the sum is exact in any dtype) and feeds it to
``tl.dot`` with an fp32 accumulator. Its advantage is the bytes it reads: 2:4 fp16 moves 0.5625 of
the dense weight, 1:4 about 0.31, so it wins where the GEMM is memory-bound (small M).

Two launch paths share the kernel:

* small M (``M <= SMALL_M``, decode): ``BLOCK_M = 16`` and split-K (grid axis 1) so the weight
  read is spread over enough programs to fill the GPU; partial sums meet in an fp32 buffer with
  ``tl.atomic_add`` and are cast to the activation dtype at the end;
* large M: the grouped ("super-grouping") tile order of Triton's matmul tutorial, no split.

Patterns: any ``n:m`` the compressed format holds. ``m`` that is not a power of two is padded to the
next one inside the tile (padded columns are masked), ``n`` needs no padding (static loop).

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slow, exact); tests use that. There the
autotuner is bypassed and a fixed config is used (``config=`` overrides it anywhere).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from nmgraph.backends.base import Backend, GraphCall
from nmgraph.backends.dense import compressed_shape, decompress_linear
from nmgraph.backends.ops import check_x, register_frozen_linear
from nmgraph.compress import CompressedNM
from nmgraph.errors import BackendUnavailableError, ShapeError, UnsupportedError

__all__ = ["SMALL_M", "SUPPORTED_DTYPES", "TritonBackend", "is_available", "nm_linear", "nm_linear_triton",
           "unavailable_reason"]

log = logging.getLogger(__name__)

#: Rows of ``x`` up to which the split-K (decode) path is used.
SMALL_M = 64
#: Activation / weight dtypes the kernel accepts (accumulation is always fp32).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_META_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K")
_INSTALL_HINT = "pip install nmgraph[triton]"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _import_triton():
    try:
        import triton
    except ImportError as e:
        raise BackendUnavailableError(
            f"The nmgraph Triton backend needs the triton package ({e}). Install it with "
            f"`{_INSTALL_HINT}`, or use backend='dense'."
        ) from None
    return triton


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton kernel cannot run on ``device`` (``None`` when it can)."""
    try:
        _import_triton()
    except BackendUnavailableError as e:
        return str(e)
    dev = torch.device(device) if device is not None else None
    if _interpreting():
        return None
    if dev is None or dev.type != "cuda":
        where = "no device given" if dev is None else f"device {dev}"
        return (
            f"Triton kernels need a CUDA device ({where}); set TRITON_INTERPRET=1 to run them "
            "(slowly) on the CPU for testing."
        )
    if not torch.cuda.is_available():
        return "torch.cuda is not available in this process."
    return None


def is_available(device: torch.device | str | None = None) -> bool:
    return unavailable_reason(device) is None


# --------------------------------------------------------------------------------------------
# Autotune configs (functions, as in Triton's matmul tutorial)
# --------------------------------------------------------------------------------------------


def _config(triton, meta: Mapping[str, int], num_warps: int = 4, num_stages: int = 3):
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def small_m_configs() -> list[dict[str, int]]:
    """Decode-size tiles: one 16-row M tile, split-K so the weight read fills the GPU.

    Tiles are ones that compile for sm_90 without register spills (checked with ``cuobjdump
    --dump-resource-usage`` on the compiled kernel).
    """
    tiles = ((32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8))
    return [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split_k,
             "num_warps": warps, "num_stages": 4}
            for bn, bk, warps in tiles for split_k in (1, 4, 8, 16)]


def large_m_configs() -> list[dict[str, int]]:
    """Compute-bound tiles in the tutorial's grouped order, no split (spill-free on sm_90)."""
    tiles = ((128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4),
             (128, 128, 64, 8, 3))
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1,
             "num_warps": warps, "num_stages": stages} for bm, bn, bk, warps, stages in tiles]


def _prune_configs(configs, named_args, **kwargs):
    """Drops split-K configs that would leave programs without a full K step."""
    k = named_args["K"]
    m = named_args.get("NM_M", kwargs.get("NM_M", 1))
    kept = [c for c in configs
            if c.kwargs["SPLIT_K"] == 1 or k // max(m, 1) >= c.kwargs["SPLIT_K"] * max(c.kwargs["BLOCK_K"] // m, 1)]
    return kept or configs[:1]


def interpreter_config(m_rows: int) -> dict[str, int]:
    """The fixed config used under ``TRITON_INTERPRET=1`` (no autotuning there)."""
    if m_rows <= SMALL_M:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "SPLIT_K": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "SPLIT_K": 1}


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """Builds (once per interpreter mode) the jitted kernel and its two autotuned launchers."""
    del interpret  # part of the cache key only: triton.jit reads TRITON_INTERPRET when it decorates
    triton = _import_triton()
    import triton.language as tl

    @triton.jit
    def nm_gemm_kernel(
        # pointers
        x_ptr, values_ptr, indices_ptr, bias_ptr, out_ptr,
        # matrix sizes: x [M, K], W [N, K] (compressed), out [M, N]; M_BUCKET (next power of two
        # of M) is only the autotuning key, so prefill lengths do not each retune
        M, N, K, M_BUCKET,
        # strides
        stride_xm, stride_xk,
        stride_vn, stride_vk,
        stride_ib, stride_in, stride_ik,
        stride_om, stride_on,
        # N:M pattern (M_POW2: next power of two >= NM_M; INDEX_BITS: bit planes)
        NM_N: tl.constexpr, NM_M: tl.constexpr, M_POW2: tl.constexpr, INDEX_BITS: tl.constexpr,
        # epilogue and numerics
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        # meta-parameters
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        # Groups of m per K step (at least one group, also when m > BLOCK_K).
        GROUPS: tl.constexpr = (BLOCK_K + M_POW2 - 1) // M_POW2
        TILE_K: tl.constexpr = GROUPS * M_POW2

        # Grouped program order (L2 reuse of W across M tiles), as in the matmul tutorial.
        pid = tl.program_id(axis=0)
        pid_k = tl.program_id(axis=1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        # This program's share of the K groups (split-K).
        n_groups = K // NM_M
        groups_per_split = tl.cdiv(tl.cdiv(n_groups, SPLIT_K), GROUPS) * GROUPS
        g_begin = pid_k * groups_per_split
        g_end = min(g_begin + groups_per_split, n_groups)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        offs_g = tl.arange(0, GROUPS)
        offs_p = tl.arange(0, M_POW2)
        # UPCAST (interpreter only): its tl.dot cannot multiply bf16, see nm_linear.
        w_dtype = tl.float32 if UPCAST else values_ptr.dtype.element_ty

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g0 in range(g_begin, g_end, GROUPS):
            grp = g0 + offs_g
            mask_g = grp < g_end
            w_mask = mask_n[:, None] & mask_g[None, :]
            # Dense [BLOCK_N, GROUPS, M_POW2] tile from the n kept slots of every group.
            w = tl.zeros((BLOCK_N, GROUPS, M_POW2), dtype=w_dtype)
            for s in tl.static_range(NM_N):
                j = grp * NM_N + s  # kept-entry index along the compressed row
                v = tl.load(values_ptr + offs_n[:, None] * stride_vn + j[None, :] * stride_vk,
                            mask=w_mask, other=0.0).to(w_dtype)
                idx = tl.zeros((BLOCK_N, GROUPS), dtype=tl.int32)
                for b in tl.static_range(INDEX_BITS):
                    plane = tl.load(indices_ptr + b * stride_ib + offs_n[:, None] * stride_in
                                    + (j // 8)[None, :] * stride_ik, mask=w_mask, other=0)
                    idx = idx | (((plane.to(tl.int32) >> (j % 8)[None, :]) & 1) << b)
                hit = idx[:, :, None] == offs_p[None, None, :]
                w += tl.where(hit, v[:, :, None], 0.0).to(w_dtype)
            w_tile = tl.reshape(w, (BLOCK_N, TILE_K))
            # Matching activation columns: group g covers columns g*m .. g*m + m - 1.
            if M_POW2 == NM_M:
                offs_k = g0 * NM_M + tl.arange(0, TILE_K)
                mask_k = offs_k < g_end * NM_M
            else:
                offs_k = tl.reshape(grp[:, None] * NM_M + offs_p[None, :], (TILE_K,))
                mask_k = tl.reshape(mask_g[:, None] & (offs_p[None, :] < NM_M), (TILE_K,))
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(w_dtype)
            acc = tl.dot(x, tl.trans(w_tile), acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            # Only the first K split adds the bias.
            first_split = (tl.zeros((BLOCK_N,), dtype=tl.int32) + pid_k) == 0
            bias = tl.load(bias_ptr + offs_n, mask=mask_n & first_split, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        out_mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)

    def autotuned(configs, reset):
        return triton.autotune(
            configs=[_config(triton, {k: c[k] for k in _META_KEYS}, c["num_warps"], c["num_stages"])
                     for c in configs],
            key=["M_BUCKET", "N", "K", "NM_N", "NM_M"],
            prune_configs_by={"early_config_prune": _prune_configs},
            reset_to_zero=reset,
        )(nm_gemm_kernel)

    return SimpleNamespace(
        kernel=nm_gemm_kernel,
        small_m=autotuned(small_m_configs(), ["out_ptr"]),
        large_m=autotuned(large_m_configs(), None),
        cdiv=triton.cdiv,
        next_power_of_2=triton.next_power_of_2,
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def nm_linear(
    x: torch.Tensor,
    weight: CompressedNM,
    bias: torch.Tensor | None = None,
    *,
    config: Mapping[str, int] | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W`` N:M-compressed, for ``x`` of shape ``[..., K]``.

    ``weight`` is a 2-D :class:`CompressedNM` whose reduction axis is ``K`` (``axis=1`` for a
    Linear ``[out, in]`` weight, ``axis=0`` for an ``[in, out]`` weight: the compressed layout is
    the same). Activations, weight values and bias share one dtype (fp16, bf16 or fp32); the
    accumulation is fp32. ``config`` forces the meta-parameters (``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K``, ``GROUP_M``, ``SPLIT_K``, optionally ``num_warps``/``num_stages``) instead of
    autotuning. fp32 inputs use exact fp32 products unless ``allow_tf32=True``.
    Inference only (no autograd).
    """
    if not isinstance(weight, CompressedNM):
        raise UnsupportedError(
            f"nm_linear needs the weight as a CompressedNM (nmgraph.compress(w, pattern)), got "
            f"{type(weight).__name__}."
        )
    if len(weight.shape) != 2:
        raise ShapeError(
            f"nm_linear needs a 2-D compressed weight, got shape {weight.shape}; conv weights go "
            "through the dense backend."
        )
    if not isinstance(x, torch.Tensor):
        raise UnsupportedError(f"nm_linear: x must be a torch.Tensor, got {type(x).__name__}.")
    n_out = weight.values.shape[0]
    k = weight.shape[weight.axis]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ShapeError(
            f"nm_linear: x has shape {tuple(x.shape)} but the {weight.pattern} weight of shape "
            f"{weight.shape} reduces over K={k} (axis {weight.axis}); x must be [..., {k}]."
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedError(
            f"nm_linear: activation dtype {x.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (cast x and the weight)."
        )
    if weight.dtype != x.dtype:
        raise UnsupportedError(
            f"nm_linear: x is {x.dtype} but the compressed weight values are {weight.dtype}; cast "
            f"one of them (e.g. weight.to({x.dtype}))."
        )
    if bias is not None:
        if tuple(bias.shape) != (n_out,):
            raise ShapeError(
                f"nm_linear: bias has shape {tuple(bias.shape)}, expected ({n_out},) for a weight "
                f"with {n_out} output features."
            )
        if bias.dtype != x.dtype:
            raise UnsupportedError(
                f"nm_linear: bias is {bias.dtype} but x is {x.dtype}; cast the bias to {x.dtype}."
            )
    devices = {x.device, weight.values.device, weight.indices.device}
    if bias is not None:
        devices.add(bias.device)
    if len(devices) != 1:
        raise UnsupportedError(
            f"nm_linear: tensors are on different devices ({', '.join(sorted(map(str, devices)))}); "
            "move x, the compressed weight and the bias to one device."
        )
    lead = x.shape[:-1]
    m_rows = math.prod(lead)
    small = m_rows <= SMALL_M
    meta = _check_config(config, small) if config is not None else None
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise BackendUnavailableError(f"nm_linear cannot run: {reason}")
    if m_rows == 0:
        return x.new_empty((*lead, n_out))

    ns = _kernels(_interpreting())
    x2 = x.reshape(m_rows, k)
    out_dtype = torch.float32 if small else x.dtype
    alloc = torch.zeros if small else torch.empty
    out = alloc((m_rows, n_out), dtype=out_dtype, device=x.device)
    values, indices = weight.values, weight.indices
    p = weight.pattern
    args = (
        x2, values, indices, bias if bias is not None else values, out,
        m_rows, n_out, k, ns.next_power_of_2(m_rows),
        x2.stride(0), x2.stride(1),
        values.stride(0), values.stride(1),
        indices.stride(0), indices.stride(1), indices.stride(2),
        out.stride(0), out.stride(1),
    )
    consts = {
        "NM_N": p.n, "NM_M": p.m, "M_POW2": ns.next_power_of_2(p.m), "INDEX_BITS": p.index_bits,
        "HAS_BIAS": bias is not None,
        "DOT_PRECISION": "tf32" if (allow_tf32 or x.dtype != torch.float32) else "ieee",
        # Triton's interpreter multiplies the raw bits of bf16 operands in tl.dot
        # (triton-lang/triton#11584): there the bf16 tiles go to tl.dot as fp32 (exact products,
        # like the bf16 MMA with fp32 accumulation it stands in for).
        "UPCAST": _interpreting() and x.dtype == torch.bfloat16,
    }
    if config is None and _interpreting():
        config = interpreter_config(m_rows)
        meta = _check_config(config, small)
    if config is not None:
        grid = (ns.cdiv(m_rows, meta["BLOCK_M"]) * ns.cdiv(n_out, meta["BLOCK_N"]), meta["SPLIT_K"])
        extra = {key: config[key] for key in ("num_warps", "num_stages") if key in config}
        if _interpreting():
            extra = {}
        ns.kernel[grid](*args, **consts, **meta, **extra)
    else:
        launcher = ns.small_m if small else ns.large_m

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (ns.cdiv(m_rows, meta["BLOCK_M"]) * ns.cdiv(n_out, meta["BLOCK_N"]), meta["SPLIT_K"])

        launcher[grid](*args, **consts)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.view(*lead, n_out)


def _check_config(config: Mapping[str, int], small: bool) -> dict[str, int]:
    missing = [key for key in _META_KEYS if key not in config]
    if missing:
        raise UnsupportedError(
            f"nm_linear(config=...) is missing {', '.join(missing)}; pass all of "
            f"{', '.join(_META_KEYS)}."
        )
    meta = {key: int(config[key]) for key in _META_KEYS}
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if meta[key] < 16 or meta[key] & (meta[key] - 1):
            raise UnsupportedError(f"nm_linear(config=...): {key}={meta[key]} must be a power of two >= 16.")
    if meta["SPLIT_K"] < 1 or meta["GROUP_M"] < 1:
        raise UnsupportedError("nm_linear(config=...): SPLIT_K and GROUP_M must be >= 1.")
    if meta["SPLIT_K"] > 1 and not small:
        raise UnsupportedError(
            f"nm_linear(config=...): SPLIT_K={meta['SPLIT_K']} is only used on the small-M path "
            f"(M <= {SMALL_M}); use SPLIT_K=1 for larger M."
        )
    return meta


class TritonBackend(Backend):
    """nmgraph's Triton N:M kernel (:func:`nm_linear`)."""

    name = "triton"

    def device_reason(self, device: torch.device) -> str | None:
        return unavailable_reason(device)

    def layer_reason(self, weight: CompressedNM, dtype: torch.dtype) -> str | None:
        if len(weight.shape) != 2:
            return f"weight of shape {weight.shape} is not a 2-D linear weight"
        if dtype not in SUPPORTED_DTYPES:
            return f"activation dtype {dtype} is not one of {', '.join(map(str, SUPPORTED_DTYPES))}"
        if weight.dtype != dtype:
            return f"weight values are {weight.dtype} but activations are {dtype}"
        return None

    def prepare(self, weight: CompressedNM) -> CompressedNM:
        return weight

    def run(self, x: torch.Tensor, prepared: CompressedNM, bias: torch.Tensor | None) -> torch.Tensor:
        return nm_linear(x, prepared, bias)

    def lower(self, weight: CompressedNM, prepared: CompressedNM) -> GraphCall:
        out_features, in_features = compressed_shape(weight)
        return GraphCall(torch.ops.nmgraph.nm_linear_triton.default,
                         (("nm_values", prepared.values), ("nm_indices", prepared.indices)),
                         (weight.n, weight.m, out_features, in_features))


@torch.library.custom_op("nmgraph::nm_linear_triton", mutates_args=())
def nm_linear_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The graph op of :class:`TritonBackend`: :func:`nm_linear` on the compressed weight's tensors."""
    check_x(x, in_features, "nm_linear_triton")
    return nm_linear(x, CompressedNM(values, indices, (out_features, in_features), n, m, 1), bias)


register_frozen_linear(
    nm_linear_triton, n_buffers=2, shape=lambda c: (c[2], c[3]),
    dense_weight=lambda b, c: decompress_linear(b[0], b[1], c[0], c[1]),
)
