"""Triton code of :mod:`nmgraph.backends.kernels.nm_gemv` (imported lazily: it imports triton).

Tiles are 4-D, ``[R, WR, C, VEC]``: ``C`` threads along K each own one 16-byte vector of ``VEC`` kept
entries of a row, ``WR = 32 * NUM_WARPS / C`` rows are spread over the remaining lanes and the warps,
and every thread holds ``R`` rows in registers (weight row ``n0 + r * WR + w``). The activations
under a thread's vector are loaded as ``[1, WR, C, ...]`` with the same lane/warp assignment, so the
weights, index bits and activations of an entry always meet in one thread: no layout conversion and
no shared memory in the loop.
"""

import triton
import triton.language as tl

__all__ = ["nm_gemv_kernel"]


@triton.jit
def _cat(a, b):
    """Concatenates two [A, B, C, L] tensors along the last dim (in registers)."""
    L: tl.constexpr = a.shape[3]
    ab = tl.permute(tl.join(a, b), (0, 1, 2, 4, 3))
    return tl.reshape(ab, (a.shape[0], a.shape[1], a.shape[2], 2 * L))


@triton.jit
def _span(ptrs, pos, K, H: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr):
    """H consecutive 16-byte vectors starting at ``ptrs`` ([1, WR, C, VEC]) as [1, WR, C, H*VEC]."""
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
    """Selects, per entry, the candidate its index names, from ``cand`` [1, WR, C, G, 1, W].

    ``cand`` holds the candidates ``p`` with ``p % 2**T == LOW`` (in order of ``p >> T``); ``bits[t]``
    is bit ``t`` of each entry's index ([R, WR, C, G, NN] bool); ``s`` the entry's slot. A subtree
    that cannot hold the index of slot ``s`` (kept indices are sorted, so slot ``s`` lies in ``[s, s +
    SPAN]``) is never taken; that condition is a per-register constant, so the compiler drops those
    selects.
    """
    if W == 1:
        return tl.reshape(cand, (cand.shape[0], cand.shape[1], cand.shape[2], cand.shape[3], 1))
    else:
        STEP: tl.constexpr = 2 ** (T + 1)
        HI: tl.constexpr = LOW + 2**T
        pair = tl.reshape(cand, (cand.shape[0], cand.shape[1], cand.shape[2], cand.shape[3], 1, W // 2, 2))
        even, odd = tl.split(pair)
        odd_ok = ((HI - s) & (STEP - 1)) <= SPAN
        even_ok = ((LOW - s) & (STEP - 1)) <= SPAN
        take_odd = (bits[T] & odd_ok) | (even_ok == 0)
        hi = _mux(odd, bits, s, HI, T + 1, W // 2, SPAN)
        lo = _mux(even, bits, s, LOW, T + 1, W // 2, SPAN)
        return tl.where(take_odd, hi, lo)


@triton.jit
def _bits(w, q5, T: tl.constexpr):
    """Bit T of the index of every entry of the thread's vectors, [R, WR, C, G, NN] bool.

    ``w`` is the tuple of index words (shifted so the vector's first entry is bit 0), [R, WR, C, 1].
    """
    wt = w[T]
    return (tl.reshape(wt, (wt.shape[0], wt.shape[1], wt.shape[2], 1, 1)) >> q5) & 1 != 0


@triton.jit
def _fast_row(acc, v, w, x_row_ptr, e0, q, K,
              NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr,
              MASKED: tl.constexpr):
    """acc += v * (selected x of one activation row); select path."""
    R: tl.constexpr = v.shape[0]
    WR: tl.constexpr = v.shape[1]
    C: tl.constexpr = v.shape[2]
    G: tl.constexpr = VEC // NM_N
    H: tl.constexpr = NM_M // NM_N
    q5 = tl.reshape(q, (1, 1, 1, G, NM_N))
    s = q5 % NM_N
    b0 = _bits(w, q5, 0)
    b1 = b0
    b2 = b0
    b3 = b0
    if BITS > 1:
        b1 = _bits(w, q5, 1)
    if BITS > 2:
        b2 = _bits(w, q5, 2)
    if BITS > 3:
        b3 = _bits(w, q5, 3)
    pos = (e0 // NM_N) * NM_M + q  # [1, WR, C, VEC]: activations under the thread's vector
    xs = _span(x_row_ptr + pos, pos, K, H, VEC, MASKED).to(tl.float32)  # [1, WR, C, G*m]
    cand = tl.reshape(xs, (1, WR, C, G, 1, NM_M))
    sel = _mux(cand, (b0, b1, b2, b3), s, 0, 0, NM_M, NM_M - NM_N)  # [R, WR, C, G, NN]
    sel = tl.reshape(tl.broadcast_to(sel, (R, WR, C, G, NM_N)), (R, WR, C, VEC))
    return acc + v * sel


@triton.jit
def _gather_row(acc, v, w, x_row_ptr, e0, q, K, NM_N: tl.constexpr, NM_M: tl.constexpr,
                BITS: tl.constexpr):
    """acc += v * x[(j // n) * m + idx]; general path (activations from L1)."""
    idx = ((w[0] >> q) & 1)
    for t in tl.static_range(1, BITS):
        idx |= ((w[t] >> q) & 1) << t
    pos = ((e0 + q) // NM_N) * NM_M + idx
    xv = tl.load(x_row_ptr + pos, mask=pos < K, other=0.0).to(tl.float32)
    return acc + v * xv


@triton.jit
def _load_tile(values_ptr, words_ptr, rows4, e0, q, KEPT_PAD, WSTRIDE, BITS: tl.constexpr,
               MASKED: tl.constexpr):
    """Kept values [R, WR, C, VEC] (fp32) and index words (tuple of BITS x [R, WR, C, 1], shifted so
    that the vector's first entry is bit 0) of one K step."""
    v_ptrs = values_ptr + rows4 * KEPT_PAD + e0 + q
    w_ptrs = words_ptr + rows4 * WSTRIDE + (e0 // 32) * BITS
    sh = e0 % 32
    if MASKED:
        v = tl.load(v_ptrs, mask=(e0 + q) < KEPT_PAD, other=0.0)
        w_ok = (e0 < KEPT_PAD) & (rows4 >= 0)
        w0 = tl.load(w_ptrs, mask=w_ok, other=0) >> sh
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        w5 = w0
        w6 = w0
        if BITS > 1:
            w1 = tl.load(w_ptrs + 1, mask=w_ok, other=0) >> sh
        if BITS > 2:
            w2 = tl.load(w_ptrs + 2, mask=w_ok, other=0) >> sh
        if BITS > 3:
            w3 = tl.load(w_ptrs + 3, mask=w_ok, other=0) >> sh
        if BITS > 4:
            w4 = tl.load(w_ptrs + 4, mask=w_ok, other=0) >> sh
        if BITS > 5:
            w5 = tl.load(w_ptrs + 5, mask=w_ok, other=0) >> sh
        if BITS > 6:
            w6 = tl.load(w_ptrs + 6, mask=w_ok, other=0) >> sh
    else:
        v = tl.load(v_ptrs, eviction_policy="evict_first")
        w0 = tl.load(w_ptrs, eviction_policy="evict_first") >> sh
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        w5 = w0
        w6 = w0
        if BITS > 1:
            w1 = tl.load(w_ptrs + 1, eviction_policy="evict_first") >> sh
        if BITS > 2:
            w2 = tl.load(w_ptrs + 2, eviction_policy="evict_first") >> sh
        if BITS > 3:
            w3 = tl.load(w_ptrs + 3, eviction_policy="evict_first") >> sh
        if BITS > 4:
            w4 = tl.load(w_ptrs + 4, eviction_policy="evict_first") >> sh
        if BITS > 5:
            w5 = tl.load(w_ptrs + 5, eviction_policy="evict_first") >> sh
        if BITS > 6:
            w6 = tl.load(w_ptrs + 6, eviction_policy="evict_first") >> sh
    return v.to(tl.float32), (w0, w1, w2, w3, w4, w5, w6)


@triton.jit
def _step(acc0, acc1, v, w, x_ptr, xrow0, xrow1, e0, q, K, stride_xm,
          NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr,
          M_ROWS: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr):
    if FAST:
        acc0 = _fast_row(acc0, v, w, x_ptr + xrow0 * stride_xm, e0, q, K, NM_N, NM_M, BITS, VEC, MASKED)
        if M_ROWS == 2:
            acc1 = _fast_row(acc1, v, w, x_ptr + xrow1 * stride_xm, e0, q, K, NM_N, NM_M, BITS, VEC, MASKED)
    else:
        acc0 = _gather_row(acc0, v, w, x_ptr + xrow0 * stride_xm, e0, q, K, NM_N, NM_M, BITS)
        if M_ROWS == 2:
            acc1 = _gather_row(acc1, v, w, x_ptr + xrow1 * stride_xm, e0, q, K, NM_N, NM_M, BITS)
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
    # meta-parameters (NUM_WARPS: the launch's num_warps, which sets the tile's thread layout)
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, NUM_WARPS: tl.constexpr,
):
    C: tl.constexpr = BLOCK_E // VEC                   # threads along K per row (one vector each)
    WR: tl.constexpr = (32 * NUM_WARPS) // C            # rows over the other lanes and the warps
    R: tl.constexpr = BLOCK_N // WR                     # rows per thread
    tl.static_assert(C <= 32 * NUM_WARPS, "BLOCK_E / VEC must not exceed the threads of a program")
    tl.static_assert(R * WR == BLOCK_N, "BLOCK_N must be a multiple of 32 * NUM_WARPS * VEC / BLOCK_E")
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    r = tl.arange(0, R)[:, None, None, None]
    wr = tl.arange(0, WR)[None, :, None, None]
    rows4 = tl.minimum(n0 + r * WR + wr, N - 1)        # clamped: no masks in the loop
    c = tl.arange(0, C)[None, None, :, None]
    q = tl.arange(0, VEC)[None, None, None, :]
    cw = c + wr * 0                                     # [1, WR, C, 1]: x is loaded once per warp row
    xrow0 = pid_m * M_ROWS
    xrow1 = tl.minimum(xrow0 + 1, M - 1)
    WSTRIDE = KEPT_PAD // 32 * BITS
    acc0 = tl.zeros((R, WR, C, VEC), dtype=tl.float32)
    acc1 = acc0
    n_full = KEPT // BLOCK_E
    for i in range(0, n_full):
        e0 = i * BLOCK_E + cw * VEC
        v, w = _load_tile(values_ptr, words_ptr, rows4, e0, q, KEPT_PAD, WSTRIDE, BITS, False)
        acc0, acc1 = _step(acc0, acc1, v, w, x_ptr, xrow0, xrow1, e0, q, K, stride_xm,
                           NM_N, NM_M, BITS, VEC, M_ROWS, FAST, False)
    if n_full * BLOCK_E < KEPT:
        e0 = n_full * BLOCK_E + cw * VEC
        v, w = _load_tile(values_ptr, words_ptr, rows4, e0, q, KEPT_PAD, WSTRIDE, BITS, True)
        acc0, acc1 = _step(acc0, acc1, v, w, x_ptr, xrow0, xrow1, e0, q, K, stride_xm,
                           NM_N, NM_M, BITS, VEC, M_ROWS, FAST, True)
    offs_n = n0 + tl.reshape(r * WR + wr, (BLOCK_N,))
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
