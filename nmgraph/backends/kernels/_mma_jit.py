"""Triton code of :mod:`nmgraph.backends.kernels.nm_mma` (imported lazily: it imports triton).

Swap-AB: ``acc^T[BLOCK_N, BLOCK_M] = dot(W_tile[BLOCK_N, BLOCK_K], x^T[BLOCK_K, BLOCK_M])`` with the
weight as the 64-row operand, expanded in registers from :class:`PackedNM` (never through shared
memory), and ``x^T`` staged in shared memory by Triton.

Fast path (2:4 and 1:4, fp16/bf16): the K axis of each tile is *permuted* so that every thread's
part of the MMA A fragment is whole N:M groups that are contiguous in memory. The MMA A fragment
(``kWidth = 2``) gives lane ``c = lane % 4`` the K pairs ``q = c + 4 j`` of its rows; the tile is
built so that pair ``j`` of lane ``c`` is half ``j % 2`` of group ``c * GT + j // 2`` (``GT`` groups
per lane). In original K order that is position ``(BLOCK_K / 4) * c + 2 j + e`` for MMA position
``k = 2 (c + 4 j) + e``; ``x^T`` is permuted the same way, so the product is unchanged (a dot product
does not depend on the order of its terms). Each lane then reads its kept values with one 16-byte
load per row and the index bits of its groups from one byte of each index word. Rows are loaded in
the order the fragment holds them (``row = 64 * (a // 2) + 16 * warp + 8 * (a % 2) + lane // 4``),
so the expanded tile needs no layout conversion.

A group becomes two 32-bit pairs of fp16 (``P0 = (d0, d1)``, ``P1 = (d2, d3)``) by bitwise selects
on the packed kept values; the conditions are sign-splat masks of the index bits (``(w << (31 -
b)) >> 31``), not compares, which keeps LLVM's SLP vectorizer from packing hundreds of compare
results into bit vectors.

Generic path (every other pattern and fp32): the dense tile ``[BLOCK_N, G, MP2]`` (``MP2`` the next
power of two of ``m``) is the sum over the ``n`` slots of ``where(idx == p, v, 0)``; padded columns
meet masked (zero) activations.
"""

import triton
import triton.language as tl

__all__ = ["nm_mma_kernel"]


@triton.jit
def _splat(w, b):
    """All-ones where bit ``b`` of ``w`` is set, else 0 (int32; ``b`` a per-register constant)."""
    return (w << (31 - b)) >> 31


@triton.jit
def _x_tile(x_ptr, offs_m, M, stride_xm, k0, K, BLOCK_K: tl.constexpr, FAST: tl.constexpr,
            NM_M: tl.constexpr, MP2: tl.constexpr, MASKED: tl.constexpr):
    """``x^T`` for the K tile starting at dense column ``k0``, [BLOCK_K, BLOCK_M], in MMA K order."""
    BM: tl.constexpr = offs_m.shape[0]
    row_ok = offs_m[:, None] < M
    if FAST:
        kk = tl.arange(0, BLOCK_K)
        cols = k0 + kk[None, :]
        if MASKED:
            xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols, mask=row_ok & (cols < K), other=0.0)
        else:
            xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols, mask=row_ok, other=0.0)
        J: tl.constexpr = BLOCK_K // 8
        xo = tl.reshape(xo, (BM, 4, J, 2))        # original column = (BLOCK_K/4) c + 2 j + e
        xo = tl.permute(xo, (2, 1, 3, 0))         # [j, c, e, m]: MMA position 8 j + 2 c + e
        return tl.reshape(xo, (BLOCK_K, BM))
    else:
        G: tl.constexpr = BLOCK_K // MP2
        g = tl.arange(0, G)
        p = tl.arange(0, MP2)
        cols = tl.reshape((k0 // NM_M + g[:, None]) * NM_M + p[None, :], (BLOCK_K,))
        ok = tl.reshape((p[None, :] < NM_M) & (g[:, None] >= 0), (BLOCK_K,))
        ok = ok & (cols < K)
        return tl.load(x_ptr + offs_m[None, :] * stride_xm + cols[:, None],
                       mask=(offs_m[None, :] < M) & ok[:, None], other=0.0)


@triton.jit
def _fast_tile(values_ptr, words_ptr, prow, c, gg, t, KEPT_PAD, WSTRIDE,
               NM_N: tl.constexpr, BLOCK_K: tl.constexpr, GT: tl.constexpr, MASKED: tl.constexpr,
               W_DTYPE: tl.constexpr):
    """Expanded weight tile ``t`` (2:4 / 1:4, 16-bit) as [BLOCK_N, BLOCK_K] in MMA K order.

    ``prow`` [A2, 2, 4, 8, 1, 1]: physical rows in fragment order; ``c`` [.., 4, 1] the lane's quarter
    of the tile; ``gg`` [.., 1, GT] its groups. One tile covers one 32-entry index chunk per row.
    """
    if NM_N == 2:
        # values as int32: one word holds the two kept fp16 of a group
        v_ptrs = values_ptr + prow * (KEPT_PAD // 2) + t * (BLOCK_K // 4) + c * GT + gg
    else:
        v_ptrs = values_ptr + prow * KEPT_PAD + t * (BLOCK_K // 4) + c * GT + gg
    w_ptrs = words_ptr + prow * WSTRIDE + t * 2
    if MASKED:
        ok = (t * (BLOCK_K // 4) + c * GT + gg) * NM_N < KEPT_PAD
        v = tl.load(v_ptrs, mask=ok, other=0)
        w_ok = (prow * 0 + t * 32) < KEPT_PAD
        w0 = tl.load(w_ptrs, mask=w_ok, other=0)
        w1 = tl.load(w_ptrs + 1, mask=w_ok, other=0)
    else:
        v = tl.load(v_ptrs, eviction_policy="evict_first")
        w0 = tl.load(w_ptrs, eviction_policy="evict_first")
        w1 = tl.load(w_ptrs + 1, eviction_policy="evict_first")
    # The lane's 8 entries of the chunk are bits 8 c .. 8 c + 7 of each index word.
    w0 = w0 >> (8 * c)
    w1 = w1 >> (8 * c)
    if NM_N == 2:
        # group gg: entries 2 gg (slot 0, index i0 = a1 a0) and 2 gg + 1 (slot 1, i1 = b1 b0)
        ma0 = _splat(w0, 2 * gg)
        ma1 = _splat(w1, 2 * gg)
        mb0 = _splat(w0, 2 * gg + 1)
        mb1 = _splat(w1, 2 * gg + 1)
        lo = v & 0xFFFF
        t0 = (lo & mb1) | (v & ~mb1)                 # i1 >= 2 ? (v0, 0) : (v0, v1)
        t0 = ((v << 16) & ma0) | (t0 & ~ma0)         # i0 == 1 ? (0, v0) : ...
        p0 = t0 & ~ma1                               # i0 == 2 ? 0 : ...
        t1 = (v & ma1) | (v & -65536 & ~ma1)         # i0 == 2 ? (v0, v1) : (0, v1)
        t1 = (t1 & mb0) | (((v >> 16) & 0xFFFF) & ~mb0)  # i1 odd ? ... : (v1, 0)
        p1 = t1 & mb1                                # i1 == 1 ? 0 : ...
    else:
        # 1:4: one kept value per group, index i = a1 a0
        vz = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        ma0 = _splat(w0, gg)
        ma1 = _splat(w1, gg)
        t0 = ((vz << 16) & ma0) | (vz & ~ma0)        # i odd ? (0, v) : (v, 0)
        p0 = t0 & ~ma1
        p1 = t0 & ma1
    A2: tl.constexpr = prow.shape[0]
    J: tl.constexpr = 2 * GT
    pairs = tl.reshape(tl.join(p0, p1), (A2, 2, 4, 8, 4, J))       # pair j of lane c
    pairs = tl.permute(pairs, (0, 2, 1, 3, 5, 4))                   # [a_hi, w, a_lo, l, j, c]
    BN: tl.constexpr = A2 * 64
    pairs = tl.reshape(pairs, (BN, BLOCK_K // 2))                   # MMA pair q = 4 j + c
    lo16 = (pairs & 0xFFFF).to(tl.int16).to(W_DTYPE, bitcast=True)
    hi16 = (pairs >> 16).to(tl.int16).to(W_DTYPE, bitcast=True)
    return tl.reshape(tl.join(lo16, hi16), (BN, BLOCK_K))


@triton.jit
def _generic_tile(values_ptr, words_ptr, rows, k0, K, KEPT_PAD, WSTRIDE,
                  NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr, MP2: tl.constexpr,
                  BLOCK_K: tl.constexpr, MASKED: tl.constexpr, W_DTYPE: tl.constexpr):
    """Dense weight tile [BLOCK_N, BLOCK_K] in natural order (groups of MP2 columns), any n:m."""
    G: tl.constexpr = BLOCK_K // MP2
    g = k0 // NM_M + tl.arange(0, G)[None, :]          # [1, G] group index along the row
    p = tl.arange(0, MP2)[None, None, :]
    r = rows[:, None]
    g_ok = (g * NM_M < K) & (r >= 0)
    w = tl.zeros((rows.shape[0], G, MP2), dtype=W_DTYPE)
    for s in tl.static_range(NM_N):
        j = g * NM_N + s                                  # kept entry
        if MASKED:
            v = tl.load(values_ptr + r * KEPT_PAD + j, mask=g_ok, other=0.0)
        else:
            v = tl.load(values_ptr + r * KEPT_PAD + j)
        idx = tl.zeros((rows.shape[0], G), dtype=tl.int32)
        for b in tl.static_range(BITS):
            word = tl.load(words_ptr + r * WSTRIDE + (j // 32) * BITS + b, mask=g_ok, other=0)
            idx |= ((word >> (j % 32)) & 1) << b
        hit = idx[:, :, None] == p
        w += tl.where(hit, v.to(W_DTYPE)[:, :, None], 0.0).to(W_DTYPE)
    return tl.reshape(w, (rows.shape[0], BLOCK_K))


@triton.jit
def nm_mma_kernel(
    # pointers: x [M, K] (unit stride along K), PackedNM values / words, bias [N], out [M, N],
    # split-K workspace (fp32 [SPLIT_K, M, N]) and per-tile semaphores (int32, zero between calls)
    x_ptr, values_ptr, words_ptr, bias_ptr, out_ptr, ws_ptr, sem_ptr,
    # sizes
    M, N, K, KEPT_PAD,
    # strides (rows of x and out)
    stride_xm, stride_om,
    # pattern and storage (MP2: next power of two >= NM_M)
    NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr, MP2: tl.constexpr,
    # fast (permuted 2:4 / 1:4, 16-bit) or generic expansion, bias, numerics
    FAST: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    WSTRIDE = KEPT_PAD // 32 * BITS
    # UPCAST (interpreter only): its tl.dot multiplies the raw bits of bf16 operands, so the tiles go
    # to tl.dot as fp32 there (exact products, like the bf16 MMA with fp32 accumulation).
    w_dtype = values_ptr.dtype.element_ty
    if FAST and NM_N == 2:
        w_dtype = x_ptr.dtype.element_ty  # values_ptr is the int32 view of the 16-bit values
    # K tiles of this split: [t_begin, t_end); the last tile overall may be partial (masked).
    KSTEP: tl.constexpr = BLOCK_K // MP2 * NM_M  # real columns per tile (BLOCK_K unless m is padded)
    n_tiles = tl.cdiv(K, KSTEP)
    n_full = K // KSTEP
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if FAST:
        GT: tl.constexpr = BLOCK_K // 16                   # groups per lane per tile
        A2: tl.constexpr = BLOCK_N // 64
        a_hi = tl.arange(0, A2)[:, None, None, None, None, None]
        a_lo = tl.arange(0, 2)[None, :, None, None, None, None]
        wq = tl.arange(0, 4)[None, None, :, None, None, None]
        ln = tl.arange(0, 8)[None, None, None, :, None, None]
        c = tl.arange(0, 4)[None, None, None, None, :, None]
        gg = tl.arange(0, GT)[None, None, None, None, None, :]
        prow = tl.minimum(n0 + 64 * a_hi + 16 * wq + 8 * a_lo + ln, N - 1)
        for t in range(t_begin, tl.minimum(t_end, n_full)):
            wt = _fast_tile(values_ptr, words_ptr, prow, c, gg, t, KEPT_PAD, WSTRIDE,
                            NM_N, BLOCK_K, GT, False, w_dtype)
            xt = _x_tile(x_ptr, offs_m, M, stride_xm, t * BLOCK_K, K, BLOCK_K, True, NM_M, MP2, False)
            if UPCAST:
                acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(wt, xt, acc, input_precision=DOT_PRECISION)
        if (t_begin <= n_full) & (t_end > n_full):  # this split holds the partial last tile
            wt = _fast_tile(values_ptr, words_ptr, prow, c, gg, n_full, KEPT_PAD, WSTRIDE,
                            NM_N, BLOCK_K, GT, True, w_dtype)
            xt = _x_tile(x_ptr, offs_m, M, stride_xm, n_full * BLOCK_K, K, BLOCK_K, True, NM_M, MP2, True)
            if UPCAST:
                acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(wt, xt, acc, input_precision=DOT_PRECISION)
    else:
        rows = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)
        for t in range(t_begin, tl.minimum(t_end, n_full)):
            wt = _generic_tile(values_ptr, words_ptr, rows, t * KSTEP, K, KEPT_PAD, WSTRIDE,
                               NM_N, NM_M, BITS, MP2, BLOCK_K, False, w_dtype)
            xt = _x_tile(x_ptr, offs_m, M, stride_xm, t * KSTEP, K, BLOCK_K, False, NM_M, MP2, False)
            if UPCAST:
                acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(wt, xt.to(w_dtype), acc, input_precision=DOT_PRECISION)
        if (t_begin <= n_full) & (t_end > n_full):  # this split holds the partial last tile
            wt = _generic_tile(values_ptr, words_ptr, rows, n_full * KSTEP, K, KEPT_PAD, WSTRIDE,
                               NM_N, NM_M, BITS, MP2, BLOCK_K, True, w_dtype)
            xt = _x_tile(x_ptr, offs_m, M, stride_xm, n_full * KSTEP, K, BLOCK_K, False, NM_M, MP2, True)
            if UPCAST:
                acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(wt, xt.to(w_dtype), acc, input_precision=DOT_PRECISION)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = n_ok[:, None] & (offs_m[None, :] < M)
    tile_off = offs_m[None, :] * stride_om + offs_n[:, None]          # out is [M, N]; acc is acc^T
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + tile_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Split-K in the same launch: every split writes its fp32 partial, the last one to arrive at
        # the tile's semaphore sums them, adds the bias, casts, stores, and resets the semaphore.
        ws_off = offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws_ptr + pid_k * M * N + ws_off, acc, mask=mask)
        tl.debug_barrier()
        tile = pid_n * tl.num_programs(1) + pid_m
        arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + ws_off, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + tile_off, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(sem_ptr + tile, 0, sem="relaxed", scope="gpu")
