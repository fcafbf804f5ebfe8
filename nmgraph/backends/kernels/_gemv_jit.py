"""Triton code of :mod:`nmgraph.backends.kernels.nm_gemv` (imported lazily: it imports triton)."""

import triton
import triton.language as tl

__all__ = ["nm_gemv_kernel"]


@triton.jit
def _cat(a, b):
    """Concatenates two [R, C, L] tensors along the last dim (in registers)."""
    L: tl.constexpr = a.shape[2]
    ab = tl.permute(tl.join(a, b), (0, 1, 3, 2))
    return tl.reshape(ab, (a.shape[0], a.shape[1], 2 * L))

@triton.jit
def _span(ptrs, pos, K, H: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr):
    """H consecutive 16-byte vectors starting at ``ptrs`` ([1, C, VEC]) as one [1, C, H*VEC]."""
    if H == 1:
        if MASKED:
            return tl.load(ptrs, mask=pos < K, other=0.0)
        else:
            return tl.load(ptrs)
    else:
        HALF: tl.constexpr = H // 2
        lo = _span(ptrs, pos, K, HALF, VEC, MASKED)
        hi = _span(ptrs + HALF * VEC, pos + HALF * VEC, K, HALF, VEC, MASKED)
        return _cat(lo, hi)

@triton.jit
def _mux(cand, bits, s, LOW: tl.constexpr, T: tl.constexpr, W: tl.constexpr, SPAN: tl.constexpr):
    """Selects, per entry, candidate ``idx`` among ``cand`` [1, C, G, 1, W].

    ``cand`` holds the candidates ``p`` with ``p % 2**T == LOW`` (in order of ``p >> T``); ``bits[t]``
    is bit ``t`` of each entry's index ([BN, C, G, NN] bool); ``s`` the entry's slot. A subtree that
    cannot hold the index of slot ``s`` (no ``p`` in ``[s, s + SPAN]``) is never taken; the
    condition is a per-register constant, so the compiler drops those selects.
    """
    if W == 1:
        return tl.reshape(cand, (cand.shape[0], cand.shape[1], cand.shape[2], 1))
    else:
        STEP: tl.constexpr = 2 ** (T + 1)
        HI: tl.constexpr = LOW + 2**T
        pair = tl.reshape(cand, (cand.shape[0], cand.shape[1], cand.shape[2], 1, W // 2, 2))
        even, odd = tl.split(pair)
        odd_ok = ((HI - s) & (STEP - 1)) <= SPAN
        even_ok = ((LOW - s) & (STEP - 1)) <= SPAN
        take_odd = (bits[T] & odd_ok) | (even_ok == 0)
        hi = _mux(odd, bits, s, HI, T + 1, W // 2, SPAN)
        lo = _mux(even, bits, s, LOW, T + 1, W // 2, SPAN)
        return tl.where(take_odd, hi, lo)

@triton.jit
def _word(ptrs, mask, MASKED: tl.constexpr):
    """One index word per (row, vector): [BN, C, 1]."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0)
    else:
        return tl.load(ptrs, eviction_policy="evict_first")


@triton.jit
def _bits(w_ptrs, w_mask, sh, q4, T: tl.constexpr, MASKED: tl.constexpr):
    """Bit T of the index of every entry of the thread's vectors, [BN, C, G, NN] bool."""
    w = _word(w_ptrs + T, w_mask, MASKED) >> sh
    return (tl.reshape(w, (w.shape[0], w.shape[1], 1, 1)) >> q4) & 1 != 0


@triton.jit
def _fast_row(acc, v, bits, s, x_row_ptr, e0, q, K,
              NM_N: tl.constexpr, NM_M: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr):
    """acc += v * (selected x of one activation row), fast path."""
    BN: tl.constexpr = v.shape[0]
    C: tl.constexpr = v.shape[1]
    G: tl.constexpr = VEC // NM_N
    H: tl.constexpr = NM_M // NM_N
    pos = (e0 // NM_N) * NM_M + q  # [1, C, VEC]: first activation under the thread's vector
    xs = _span(x_row_ptr + pos, pos, K, H, VEC, MASKED).to(tl.float32)  # [1, C, G*m]
    cand = tl.reshape(xs, (1, C, G, 1, NM_M))
    sel = _mux(cand, bits, s, 0, 0, NM_M, NM_M - NM_N)  # [BN, C, G, NN]
    sel = tl.reshape(tl.broadcast_to(sel, (BN, C, G, NM_N)), (BN, C, VEC))
    return acc + v * sel

@triton.jit
def _gather_row(acc, v, idx, x_row_ptr, j, K, NM_N: tl.constexpr, NM_M: tl.constexpr):
    """acc += v * x[(j // n) * m + idx], general path (activations from L1)."""
    pos = (j // NM_N) * NM_M + idx
    xv = tl.load(x_row_ptr + pos, mask=pos < K, other=0.0).to(tl.float32)
    return acc + v * xv

@triton.jit
def _step(acc0, acc1, x_ptr, xrow0, xrow1, values_ptr, words_ptr, rows3, j0,
          K, KEPT_PAD, WSTRIDE, stride_xm,
          NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr,
          M_ROWS: tl.constexpr, FAST: tl.constexpr, BLOCK_E: tl.constexpr, MASKED: tl.constexpr):
    BN: tl.constexpr = rows3.shape[0]
    C: tl.constexpr = BLOCK_E // VEC
    c = tl.arange(0, C)[None, :, None]
    q = tl.arange(0, VEC)[None, None, :]
    e0 = j0 + c * VEC  # [1, C, 1] first kept entry of each thread's vector
    v_ptrs = values_ptr + rows3 * KEPT_PAD + e0 + q
    if MASKED:
        v = tl.load(v_ptrs, mask=(e0 + q) < KEPT_PAD, other=0.0)
    else:
        v = tl.load(v_ptrs, eviction_policy="evict_first")
    v = v.to(tl.float32)
    # Index words of the chunk holding the vector, shifted so the vector's first entry is bit 0.
    w_ptrs = words_ptr + rows3 * WSTRIDE + (e0 // 32) * BITS  # [BN, C, 1]
    w_mask = (e0 < KEPT_PAD) & (rows3 >= 0)
    sh = e0 % 32
    if FAST:
        G: tl.constexpr = VEC // NM_N
        q4 = tl.reshape(q, (1, 1, G, NM_N))
        s = q4 % NM_N
        b0 = _bits(w_ptrs, w_mask, sh, q4, 0, MASKED)
        b1 = b0
        b2 = b0
        b3 = b0
        if BITS > 1:
            b1 = _bits(w_ptrs, w_mask, sh, q4, 1, MASKED)
        if BITS > 2:
            b2 = _bits(w_ptrs, w_mask, sh, q4, 2, MASKED)
        if BITS > 3:
            b3 = _bits(w_ptrs, w_mask, sh, q4, 3, MASKED)
        bits = (b0, b1, b2, b3)
        acc0 = _fast_row(acc0, v, bits, s, x_ptr + xrow0 * stride_xm, e0, q, K, NM_N, NM_M, VEC, MASKED)
        if M_ROWS == 2:
            acc1 = _fast_row(acc1, v, bits, s, x_ptr + xrow1 * stride_xm, e0, q, K, NM_N, NM_M, VEC,
                             MASKED)
    else:
        idx = tl.zeros((BN, C, VEC), dtype=tl.int32)
        for t in tl.static_range(BITS):
            idx |= ((_word(w_ptrs + t, w_mask, MASKED) >> sh >> q) & 1) << t
        j = e0 + q
        acc0 = _gather_row(acc0, v, idx, x_ptr + xrow0 * stride_xm, j, K, NM_N, NM_M)
        if M_ROWS == 2:
            acc1 = _gather_row(acc1, v, idx, x_ptr + xrow1 * stride_xm, j, K, NM_N, NM_M)
    return acc0, acc1

@triton.jit
def nm_gemv_kernel(
    # pointers: x [M, K] (unit stride along K), PackedNM values/words, bias [N], out [M, N]
    x_ptr, values_ptr, words_ptr, bias_ptr, out_ptr,
    # sizes: KEPT kept entries per row, KEPT_PAD = row stride of values (multiple of 32)
    M, N, K, KEPT, KEPT_PAD,
    # strides (rows of x and out)
    stride_xm, stride_om,
    # pattern and storage: BITS index bits, VEC entries per 16-byte vector
    NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr,
    # rows of x per program (1 or 2), select (fast) or gather path, bias
    M_ROWS: tl.constexpr, FAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows3 = tl.minimum(offs_n, N - 1)[:, None, None]  # clamped: no masks in the loop
    xrow0 = pid_m * M_ROWS
    xrow1 = tl.minimum(xrow0 + 1, M - 1)
    WSTRIDE = KEPT_PAD // 32 * BITS
    C: tl.constexpr = BLOCK_E // VEC
    acc0 = tl.zeros((BLOCK_N, C, VEC), dtype=tl.float32)
    acc1 = acc0
    n_full = KEPT // BLOCK_E
    for i in range(0, n_full):
        acc0, acc1 = _step(acc0, acc1, x_ptr, xrow0, xrow1, values_ptr, words_ptr, rows3, i * BLOCK_E,
                           K, KEPT_PAD, WSTRIDE, stride_xm,
                           NM_N, NM_M, BITS, VEC, M_ROWS, FAST, BLOCK_E, False)
    if n_full * BLOCK_E < KEPT:
        acc0, acc1 = _step(acc0, acc1, x_ptr, xrow0, xrow1, values_ptr, words_ptr, rows3,
                           n_full * BLOCK_E, K, KEPT_PAD, WSTRIDE, stride_xm,
                           NM_N, NM_M, BITS, VEC, M_ROWS, FAST, BLOCK_E, True)
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y0 = tl.sum(tl.reshape(acc0, (BLOCK_N, C * VEC)), axis=1) + bias
    tl.store(out_ptr + xrow0 * stride_om + offs_n, y0.to(out_ptr.dtype.element_ty), mask=mask_n)
    if M_ROWS == 2:
        y1 = tl.sum(tl.reshape(acc1, (BLOCK_N, C * VEC)), axis=1) + bias
        tl.store(out_ptr + (xrow0 + 1) * stride_om + offs_n, y1.to(out_ptr.dtype.element_ty),
                 mask=mask_n & (offs_n * 0 + xrow0 + 1 < M))
