"""Triton forward kernel of kernels.attention and the helpers its backward shares.

Formula (see kernels/attention.py for the full contract). Query row i of a [Tq, D] block sits at
absolute position p_i = Tk - Tq + i; key j is visible iff

    (not CAUSAL or j <= p_i) and (not HAS_WINDOW or j > p_i - window) and j >= kv0[b]
    and (not HAS_SEG or seg_lo[b, j] == seg_lo[b, p_i])

where seg_lo[b, t] is the first position of the segment (maximal run of equal segment ids) that
holds position t, and seg_hi[b, t] one past its last. Then S = scale * q k^T on visible pairs,
P = softmax(S) (base 2: exp2 with scale * log2(e) folded into `qk_mul`), O = P V, and the saved
row logsumexp LSE is base 2 as well (+inf for rows that see no key; those return O = 0).

Tile skipping: a query block visits keys [lo, hi) only, the union of what its rows can see
(causal / window / kv0 / segment bounds); tiles inside [full_lo, full_hi), which every row of the
block sees entirely, run without the per-element mask.

Launch order: grid = (B*H, query blocks) and the query block index runs backwards, so with the
causal mask the longest rows (last blocks) start first and short ones fill the tail of the wave.

Caution: under the CPU interpreter bf16 products go through fp32 (PREC "upcast") and fp32 -> bf16
casts are rounded by hand (the interpreter truncates); the GPU paths never take those branches.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC "upcast" (CPU interpreter, bf16 only): the interpreter
    multiplies bf16 tiles wrongly; the operands already carry their bf16 rounding, so an fp32
    product gives the values a bf16 MMA with fp32 accumulation would."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cast(x, dtype: tl.constexpr, PREC: tl.constexpr):
    """fp32 -> dtype. PREC "upcast" (CPU interpreter, bf16): the interpreter truncates on this
    cast while the GPU rounds to nearest even, so round the bits first to keep GPU numerics."""
    if PREC == "upcast":
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_split(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the tile loop [lo_a, hi) (lo_a = lo rounded down to BLOCK) into masked head,
    unmasked middle [s1, s2) whose tiles lie inside [full_lo, full_hi), and masked tail."""
    lo_a = (lo // BLOCK) * BLOCK
    s1 = lo_a + tl.cdiv(tl.maximum(full_lo - lo_a, 0), BLOCK) * BLOCK
    s2 = lo_a + (tl.maximum(full_hi - lo_a, 0) // BLOCK) * BLOCK
    empty = s2 <= s1
    s1 = tl.where(empty, lo_a, s1)
    s2 = tl.where(empty, lo_a, s2)
    return lo_a, s1, s2


@triton.jit
def _visible(pos_m, offs_n, Tk, kv0, window, seg_m, seg_n,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """[M, N] visibility of keys offs_n to queries at absolute positions pos_m; seg_m / seg_n are
    the segment starts of those rows and keys (ignored unless HAS_SEG)."""
    ok = (offs_n[None, :] < Tk) & (offs_n[None, :] >= kv0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos_m[:, None])
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > pos_m[:, None] - window)
    if HAS_SEG:
        ok = ok & (seg_n[None, :] == seg_m[:, None])
    return ok


@triton.jit
def _q_block_bounds(pos_lo, pos_hi, Tk, kv0, window, seg_base,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """Keys [lo, hi) some row of the query block (positions pos_lo..pos_hi) can see, and
    [full_lo, full_hi) that all of its rows see."""
    lo = kv0
    hi = Tk
    full_lo = kv0
    full_hi = Tk
    if CAUSAL:
        hi = tl.minimum(hi, pos_hi + 1)
        full_hi = tl.minimum(full_hi, pos_lo + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos_lo - window + 1)
        full_lo = tl.maximum(full_lo, pos_hi - window + 1)
    if HAS_SEG:
        # segments are contiguous runs: the block's keys lie in [start of its first row's
        # segment, end of its last row's); all rows share one segment only if both ends agree
        lo = tl.maximum(lo, tl.load(seg_base + pos_lo))
        hi = tl.minimum(hi, tl.load(seg_base + Tk + pos_hi))
        full_lo = tl.maximum(full_lo, tl.load(seg_base + pos_hi))
        full_hi = tl.minimum(full_hi, tl.load(seg_base + Tk + pos_lo))
    lo = tl.maximum(lo, 0)
    return lo, hi, full_lo, full_hi


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               start, end, pos_m, seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ld = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=ld, other=0.0)
        s = _dot(q, tl.trans(k), PREC) * qk_mul
        if MASKED:
            seg_n = offs_n
            if HAS_SEG:
                seg_n = tl.load(seg_base + offs_n, mask=offs_n < Tk, other=-1)
            vis = _visible(pos_m, offs_n, Tk, kv0, window, seg_m, seg_n, CAUSAL, HAS_WINDOW, HAS_SEG)
            s = tl.where(vis, s, float("-inf"))
        # m_i starts finite (-1e38), so a row that is all -inf so far keeps p = 0 and alpha = 1
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=ld, other=0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, PREC), v, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV0, SEG,
              # Q [B,H,Tq,D] strided; K, V [B,H,Tk,D] strided; O [B,H,Tq,D] contiguous;
              # LSE [B*H, Tq] fp32; KV0 [B] int32 (if HAS_KV0);
              # SEG [B, 2, Tk] int32: seg_lo then seg_hi per position (if HAS_SEG)
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
              H, Tq, Tk, D, window, qk_mul,
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

    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e38, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, lo_a, s1,
                               pos_m, seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SEG, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, s1, s2,
                               pos_m, seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D,
                               BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_SEG, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, s2, hi,
                               pos_m, seg_m, seg_base, offs_d, Tk, kv0, window, qk_mul, D,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SEG, PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)
    o_ptr = O + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptr, _cast(out, O.dtype.element_ty, PREC), mask=row_ok[:, None] & (offs_d[None, :] < D))
