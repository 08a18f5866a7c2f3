"""Triton backward kernels of kernels.attention (FlashAttention-2 structure).

With dO the upstream gradient, P recomputed from the saved base-2 logsumexp (P = exp2(S - LSE)):

    delta_i = sum_d dO_id O_id                                   (_bwd_delta)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta[:, None])
    dK = scale * dS^T Q,  dQ = scale * dS K

_attn_bwd_dkdv: one program per (key block, batch*head) streams the query blocks that can see
its keys (the causal / window / kv0 / segment bounds of kernels/attention_fwd.py, transposed).
  DQ_ATOMIC = True:  it also adds dS K into an fp32 dQ buffer with atomics, 5 GEMMs per tile
                     pair in all (QK^T, dV, dP, dK, dQ) -- the FA2 backward; the order of the
                     atomic adds varies between runs, so dQ is not bit-reproducible.
  DQ_ATOMIC = False: dK, dV only; _attn_bwd_dq then recomputes S and dP per query block and
                     owns its dQ rows (7 GEMMs, every output has one writer: bit-identical
                     reruns). Chosen under torch.use_deterministic_algorithms(True) and for
                     decode shapes.
Rows that see no key have LSE = +inf, so their P is exactly 0 and they contribute nothing.
Key blocks run in natural order, which for the causal mask is longest-first (block 0 is seen by
every query); the dQ pass reverses its query blocks as the forward does.
"""
import triton
import triton.language as tl

from .attention_fwd import _cast, _dot, _q_block_bounds, _tile_split, _visible


@triton.jit
def _bwd_delta(O, DO, DELTA,
               # O [B,H,Tq,D] contiguous; DO [B,H,Tq,D] strided; DELTA [B*H, Tq] fp32
               sdb, sdh, sdt, sdd, H, Tq, D, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ld = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                 + offs_d[None, :] * sdd, mask=ld, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, seg_base, seg_n,
                sqt, sqd, sdt, sdd, start, end, offs_n, offs_d, Tq, Tk, kv0, window, qk_mul,
                scale, D, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                PREC: tl.constexpr):
    off = Tk - Tq
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        ld = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=ld, other=0.0)
        # padded rows: lse = +inf makes their P exactly 0
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        sT = _dot(k, tl.trans(q), PREC) * qk_mul            # [N, M]
        if MASKED:
            seg_m = offs_m
            if HAS_SEG:
                seg_m = tl.load(seg_base + off + offs_m, mask=row_ok, other=-2)
            vis = _visible(off + offs_m, offs_n, Tk, kv0, window, seg_m, seg_n,
                           CAUSAL, HAS_WINDOW, HAS_SEG)
            sT = tl.where(tl.trans(vis), sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=ld, other=0.0)
        dv += _dot(_cast(pT, do.dtype, PREC), do, PREC)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpT = _dot(v, tl.trans(do), PREC)
        dsT = _cast(pT * (dpT - delta[None, :]), q.dtype, PREC)
        dk += _dot(dsT, q, PREC)
        if DQ_ATOMIC:
            dq = _dot(tl.trans(dsT), k, PREC) * scale       # [M, D] partial sum of this key block
            tl.atomic_add(dq_base + offs_m[:, None] * D + offs_d[None, :], dq, mask=ld, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KV0, SEG,
                   # Q, DO [B,H,Tq,D] strided; K, V [B,H,Tk,D] strided; LSE, DELTA [B*H, Tq] fp32;
                   # DK, DV [B,H,Tk,D] contiguous; DQ [B,H,Tq,D] fp32 zeros (if DQ_ATOMIC);
                   # KV0 [B] int32; SEG [B, 2, Tk] int32 (seg_lo, seg_hi)
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   H, Tq, Tk, D, window, qk_mul, scale,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV0: tl.constexpr,
                   HAS_SEG: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    off = Tk - Tq
    n0 = pid_n * BLOCK_N
    n_last = tl.minimum(n0 + BLOCK_N, Tk) - 1
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    kv0 = 0
    if HAS_KV0:
        kv0 = tl.load(KV0 + b)
    seg_base = SEG + b.to(tl.int64) * 2 * Tk
    # query rows [lo, hi) that can see some key of this block; [full_lo, full_hi) see all of them
    lo = 0
    hi = Tq
    full_lo = 0
    full_hi = Tq
    if CAUSAL:
        lo = tl.maximum(lo, n0 - off)
        full_lo = tl.maximum(full_lo, n_last - off)
    if HAS_WINDOW:
        hi = tl.minimum(hi, n_last + window - off)
        full_hi = tl.minimum(full_hi, n0 + window - off)
    seg_n = offs_n
    if HAS_SEG:
        seg_n = tl.load(seg_base + offs_n, mask=offs_n < Tk, other=-1)
        lo = tl.maximum(lo, tl.load(seg_base + n0) - off)
        hi = tl.minimum(hi, tl.load(seg_base + Tk + n_last) - off)
        full_lo = tl.maximum(full_lo, tl.load(seg_base + n_last) - off)
        full_hi = tl.minimum(full_hi, tl.load(seg_base + Tk + n0) - off)
    lo = tl.maximum(lo, 0)
    hi = tl.where(n_last < kv0, lo, hi)                 # block lies entirely in the left padding
    full_hi = tl.where((n0 < kv0) | (n0 + BLOCK_N > Tk), full_lo, full_hi)
    lo_a, s1, s2 = _tile_split(lo, hi, full_lo, full_hi, BLOCK_M)

    ld = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_n[:, None] * skt
                + offs_d[None, :] * skd, mask=ld, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_n[:, None] * svt
                + offs_d[None, :] * svd, mask=ld, other=0.0)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    lse_base = LSE + bh.to(tl.int64) * Tq
    delta_base = DELTA + bh.to(tl.int64) * Tq
    dq_base = DQ + bh.to(tl.int64) * Tq * D
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, seg_base,
                         seg_n, sqt, sqd, sdt, sdd, lo_a, s1, offs_n, offs_d, Tq, Tk, kv0, window,
                         qk_mul, scale, D, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_SEG, DQ_ATOMIC,
                         PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, seg_base,
                         seg_n, sqt, sqd, sdt, sdd, s1, s2, offs_n, offs_d, Tq, Tk, kv0, window,
                         qk_mul, scale, D, BLOCK_M, False, CAUSAL, HAS_WINDOW, HAS_SEG, DQ_ATOMIC,
                         PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, seg_base,
                         seg_n, sqt, sqd, sdt, sdd, s2, hi, offs_n, offs_d, Tq, Tk, kv0, window,
                         qk_mul, scale, D, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_SEG, DQ_ATOMIC,
                         PREC)
    out_off = bh.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, _cast(dk * scale, DK.dtype.element_ty, PREC), mask=ld)
    tl.store(DV + out_off, _cast(dv, DV.dtype.element_ty, PREC), mask=ld)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd,
              start, end, pos_m, seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ld = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=ld, other=0.0)
        s = _dot(q, tl.trans(k), PREC) * qk_mul
        if MASKED:
            seg_n = offs_n
            if HAS_SEG:
                seg_n = tl.load(seg_base + offs_n, mask=offs_n < Tk, other=-1)
            vis = _visible(pos_m, offs_n, Tk, kv0, window, seg_m, seg_n, CAUSAL, HAS_WINDOW, HAS_SEG)
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=ld, other=0.0)
        dp = _dot(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, PREC), k, PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV0, SEG,
                 # Q, DO [B,H,Tq,D] strided; K, V [B,H,Tk,D] strided; LSE, DELTA [B*H, Tq] fp32;
                 # DQ [B,H,Tq,D] contiguous; KV0 [B] int32; SEG [B, 2, Tk] int32
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                 H, Tq, Tk, D, window, qk_mul, scale,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV0: tl.constexpr,
                 HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 D_PAD: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)      # longest query blocks first
    b = bh // H
    h = bh % H
    off = Tk - Tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    pos_m = off + offs_m
    row_ok = offs_m < Tq
    kv0 = 0
    if HAS_KV0:
        kv0 = tl.load(KV0 + b)
    seg_base = SEG + b.to(tl.int64) * 2 * Tk
    seg_m = pos_m
    if HAS_SEG:
        seg_m = tl.load(seg_base + pos_m, mask=row_ok, other=-2)
    lo, hi, full_lo, full_hi = _q_block_bounds(off + m0, off + tl.minimum(m0 + BLOCK_M, Tq) - 1,
                                               Tk, kv0, window, seg_base, CAUSAL, HAS_WINDOW, HAS_SEG)
    lo_a, s1, s2 = _tile_split(lo, hi, full_lo, full_hi, BLOCK_N)

    ld = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt
                + offs_d[None, :] * sqd, mask=ld, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                 + offs_d[None, :] * sdd, mask=ld, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd, lo_a, s1, pos_m,
                   seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D, BLOCK_N, True, CAUSAL,
                   HAS_WINDOW, HAS_SEG, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd, s1, s2, pos_m,
                   seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D, BLOCK_N, False, CAUSAL,
                   HAS_WINDOW, HAS_SEG, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd, s2, hi, pos_m,
                   seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D, BLOCK_N, True, CAUSAL,
                   HAS_WINDOW, HAS_SEG, PREC)
    tl.store(DQ + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :],
             _cast(dq * scale, DQ.dtype.element_ty, PREC), mask=ld)
