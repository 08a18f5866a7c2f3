"""Causal / banded / left-padded scaled dot-product attention: Triton forward and backward,
an SDPA path for CPU, and a plain PyTorch reference.

Formula. q [B,H,Tq,D], k and v [B,H,Tk,D], Tq <= Tk, s = scale (default 1/sqrt(D)).
Query row i sits at absolute position p_i = Tk - Tq + i (bottom-right aligned: prefill is
Tq == Tk, decode against a KV cache is Tq = 1 with Tk = cache length). Key j is visible to
query i iff

    (not causal or j <= p_i)  and  (window is None or j > p_i - window)
                              and  (kv_start is None or j >= kv_start[b])

    S_ij = s * q_i . k_j  on visible pairs, -inf elsewhere
    P    = softmax(S) row-wise,  O = P V
    a row with no visible key gives O_i = 0 and no gradient (never NaN).

Backward (with dO the upstream gradient):
    dV = P^T dO,  dP = dO V^T,  delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij,
    dS = P * (dP - delta[:, None]),  dQ = s dS K,  dK = s dS^T Q.

Public functions (same signature):
    attention_ref     dense masked softmax in fp32 (fp64 for fp64 inputs); the test oracle.
    attention_triton  FlashAttention-2 style kernels: the forward streams key tiles with an
                      online softmax and saves the row logsumexp; the backward recomputes P
                      tile by tile in two passes (one program per key block writes dK, dV; one
                      program per query block writes dQ), so no atomics and reruns are
                      bit-identical.
    attention_torch   torch SDPA with an explicit boolean mask (is_causal=True when possible);
                      bf16/fp16 CPU tensors are computed in fp32 and cast back.

Kernel notes: scores use base 2 (exp2 with s * log2(e) folded into one multiplier) and the
saved logsumexp is in the same base. Key tiles that the mask hides entirely are not visited:
the loop bounds come from the causal / window / kv_start limits of the query block; tiles that
are fully visible run without the per-element mask. D is padded to a power of two (>= 16)
inside the kernel with masked loads, so D = 80 or 96 works. Any Tq, Tk (boundary masks); q, k,
v, dO may be strided views (k/v slices of a larger static cache are fine).

Caution:
  * fp32 inputs use IEEE fp32 dot products (no TF32), so they are slower than bf16/fp16.
  * Decode shapes (Tq <= 16) run one 16-row query block per head; their backward is correct
    but not tuned.
  * Under TRITON_INTERPRET=1 (CPU) bf16 tiles are multiplied in fp32 and fp32 -> bf16 casts are
    rounded to nearest even by hand, because the interpreter gets both wrong; fp16 and fp32 need
    no emulation.
  * The GPU block-size / num_warps / num_stages table targets H100/H200; other GPUs may need
    smaller tiles (shared-memory limits) for D > 128 or fp32 inputs.
  * window must be >= 1; a non-causal window limits only the past (j > p_i - window).
  * kv_start values outside [0, Tk] are clamped by the masks naturally (rows simply see fewer
    keys); they are not validated on the device.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers

def _check(q, k, v, window, kv_start):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape [B, H, T, D]")
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape != k.shape or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Tq > k.shape[2]:
        raise ValueError(f"Tq={Tq} > Tk={k.shape[2]}: queries are bottom-right aligned to the keys")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: must be >= 1 (or None)")
    if kv_start is not None and (kv_start.dim() != 1 or kv_start.shape[0] != B):
        raise ValueError(f"kv_start must be an int tensor [B={B}], got {tuple(kv_start.shape)}")


def attention_mask(Tq, Tk, *, causal=True, window=None, kv_start=None, device=None):
    """Boolean visibility mask, True = key visible: [1, 1, Tq, Tk], or [B, 1, Tq, Tk] with kv_start."""
    pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]      # [Tq, 1] absolute query positions
    j = torch.arange(Tk, device=device)[None, :]                 # [1, Tk]
    m = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        m &= j <= pos
    if window is not None:
        m &= j > pos - window
    m = m[None, None]
    if kv_start is not None:
        m = m & (j[None, None] >= kv_start.to(device).view(-1, 1, 1, 1))
    return m


def attention_ref(q, k, v, *, causal=True, window=None, scale=None, kv_start=None):
    """Dense reference: fp32 math (fp64 for fp64 inputs), result in q.dtype."""
    _check(q, k, v, window, kv_start)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, window=window,
                          kv_start=kv_start, device=q.device)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    # rows with no visible key: softmax would be 0/0; give them an all-zero probability row
    p = torch.softmax(s.masked_fill(~mask.any(-1, keepdim=True), 0.0), dim=-1) * mask
    return torch.matmul(p, v.to(ct)).to(q.dtype)


def attention_torch(q, k, v, *, causal=True, window=None, scale=None, kv_start=None):
    """torch SDPA with an explicit boolean mask; rows that see no key return 0 (and get 0 grad)."""
    _check(q, k, v, window, kv_start)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU SDPA kernels in bf16/fp16 lose up to ~4x more than dense low-precision
        # math on large dV entries (measured at T=97, D=64); fp32 costs little on CPU.
        out = attention_torch(q.float(), k.float(), v.float(), causal=causal, window=window,
                              scale=scale, kv_start=kv_start)
        return out.to(q.dtype)
    Tq, Tk = q.shape[2], k.shape[2]
    if window is None and kv_start is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = attention_mask(Tq, Tk, causal=causal, window=window, kv_start=kv_start, device=q.device)
    has_key = mask.any(-1, keepdim=True)                         # [*, 1, Tq, 1]
    if bool(has_key.all()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA backends disagree on empty rows (NaN or 0); let such rows see key 0, then zero them.
    # Multiplying by 0 also sends a zero upstream gradient into SDPA for those rows, so their
    # dQ is exactly 0 and they add nothing to dK, dV.
    j0 = torch.arange(Tk, device=q.device) == 0
    mask = mask | (~has_key & j0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * has_key.to(out.dtype)


# ----------------------------------------------------------------------------- Triton kernels

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
def _visible(pos_m, offs_n, Tk, kv0, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[M, N] visibility of keys offs_n to queries at absolute positions pos_m."""
    ok = (offs_n[None, :] < Tk) & (offs_n[None, :] >= kv0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos_m[:, None])
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > pos_m[:, None] - window)
    return ok


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               start, end, pos_m, offs_d, Tk, kv0, window, qk_mul, D,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ld = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=ld, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=ld, other=0.0)
        s = _dot(q, tl.trans(k), PREC) * qk_mul
        if MASKED:
            s = tl.where(_visible(pos_m, offs_n, Tk, kv0, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        # m_i starts finite (-1e38), so a row that is all -inf so far keeps p = 0 and alpha = 1
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, PREC), v, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV0,
              # Q [B,H,Tq,D] strided; K, V [B,H,Tk,D] strided; O [B,H,Tq,D] contiguous;
              # LSE [B*H, Tq] fp32 (base-2 logsumexp of the scaled scores, +inf for empty rows);
              # KV0 [B] int32 (read only when HAS_KV0)
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
              H, Tq, Tk, D, window, qk_mul,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV0: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    off = Tk - Tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    pos_m = off + offs_m
    pos_lo = off + m0
    pos_hi = off + tl.minimum(m0 + BLOCK_M, Tq) - 1
    kv0 = 0
    if HAS_KV0:
        kv0 = tl.load(KV0 + b)
    # visited keys [lo, hi): everything outside is hidden from every row of this block
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
    lo = tl.maximum(lo, 0)
    lo_a, s1, s2 = _tile_split(lo, hi, full_lo, full_hi, BLOCK_N)

    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e38, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, lo_a, s1,
                               pos_m, offs_d, Tk, kv0, window, qk_mul, D,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, s1, s2,
                               pos_m, offs_d, Tk, kv0, window, qk_mul, D,
                               BLOCK_N, False, CAUSAL, HAS_WINDOW, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd, s2, hi,
                               pos_m, offs_d, Tk, kv0, window, qk_mul, D,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    row_ok = offs_m < Tq
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)
    o_ptr = O + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptr, _cast(out, O.dtype.element_ty, PREC), mask=row_ok[:, None] & (offs_d[None, :] < D))


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
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sqd, sdt, sdd,
                start, end, offs_n, offs_d, Tq, Tk, kv0, window, qk_mul, D,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    off = Tk - Tq
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ld = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=ld, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=ld, other=0.0)
        # padded rows: lse = +inf makes their P exactly 0
        lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
        sT = _dot(k, tl.trans(q), PREC) * qk_mul            # [N, M]
        if MASKED:
            vis = _visible(off + offs_m, offs_n, Tk, kv0, window, CAUSAL, HAS_WINDOW)
            sT = tl.where(tl.trans(vis), sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv += _dot(_cast(pT, do.dtype, PREC), do, PREC)
        dpT = _dot(v, tl.trans(do), PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(_cast(dsT, q.dtype, PREC), q, PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV0,
                   # Q, DO [B,H,Tq,D] strided; K, V [B,H,Tk,D] strided; LSE, DELTA [B*H, Tq] fp32;
                   # DK, DV [B,H,Tk,D] contiguous; KV0 [B] int32
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   H, Tq, Tk, D, window, qk_mul, scale,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV0: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                   PREC: tl.constexpr):
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
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sqd, sdt, sdd,
                         lo_a, s1, offs_n, offs_d, Tq, Tk, kv0, window, qk_mul, D,
                         BLOCK_M, True, CAUSAL, HAS_WINDOW, PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sqd, sdt, sdd,
                         s1, s2, offs_n, offs_d, Tq, Tk, kv0, window, qk_mul, D,
                         BLOCK_M, False, CAUSAL, HAS_WINDOW, PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sqd, sdt, sdd,
                         s2, hi, offs_n, offs_d, Tq, Tk, kv0, window, qk_mul, D,
                         BLOCK_M, True, CAUSAL, HAS_WINDOW, PREC)
    out_off = bh.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, _cast(dk * scale, DK.dtype.element_ty, PREC), mask=ld)
    tl.store(DV + out_off, _cast(dv, DV.dtype.element_ty, PREC), mask=ld)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd,
              start, end, pos_m, offs_d, Tk, kv0, window, qk_mul, D,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ld = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=ld, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=ld, other=0.0)
        s = _dot(q, tl.trans(k), PREC) * qk_mul
        if MASKED:
            s = tl.where(_visible(pos_m, offs_n, Tk, kv0, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, PREC), k, PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV0,
                 # Q, DO [B,H,Tq,D] strided; K, V [B,H,Tk,D] strided; LSE, DELTA [B*H, Tq] fp32;
                 # DQ [B,H,Tq,D] contiguous; KV0 [B] int32
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                 H, Tq, Tk, D, window, qk_mul, scale,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV0: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                 PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    off = Tk - Tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    pos_m = off + offs_m
    pos_lo = off + m0
    pos_hi = off + tl.minimum(m0 + BLOCK_M, Tq) - 1
    kv0 = 0
    if HAS_KV0:
        kv0 = tl.load(KV0 + b)
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
    lo = tl.maximum(lo, 0)
    lo_a, s1, s2 = _tile_split(lo, hi, full_lo, full_hi, BLOCK_N)

    row_ok = offs_m < Tq
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
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd, lo_a, s1,
                   pos_m, offs_d, Tk, kv0, window, qk_mul, D, BLOCK_N, True, CAUSAL, HAS_WINDOW, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd, s1, s2,
                   pos_m, offs_d, Tk, kv0, window, qk_mul, D, BLOCK_N, False, CAUSAL, HAS_WINDOW, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, skd, svt, svd, s2, hi,
                   pos_m, offs_d, Tk, kv0, window, qk_mul, D, BLOCK_N, True, CAUSAL, HAS_WINDOW, PREC)
    tl.store(DQ + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :],
             _cast(dq * scale, DQ.dtype.element_ty, PREC), mask=ld)


# ----------------------------------------------------------------------------- launchers

def _interpreted():
    return type(_attn_fwd).__name__ == "InterpretedFunction"


def _fwd_config(Tq, D_PAD, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward and the dQ pass."""
    if _interpreted():
        return 16, 16, 1, 1            # the interpreter cost grows with tile area
    if Tq <= 16:                       # decode: one short query block, long key loop
        return 16, 128 if D_PAD <= 64 else 64, 4, 3
    if dtype == torch.float32:         # fp32 tiles are twice the bytes: keep shared memory in budget
        return 64, 32, 4, 2
    if D_PAD <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3 if D_PAD <= 128 else 2


def _bwd_config(D_PAD, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the dK/dV pass (key block = BLOCK_N)."""
    if _interpreted():
        return 16, 16, 1, 1
    if dtype == torch.float32 or D_PAD > 128:
        return 32, 64, 4, 2
    return 32, 128, 8 if D_PAD > 64 else 4, 3


def _common(q, k, window, scale, kv_start):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    D_PAD = max(16, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kv0 = (kv_start.to(device=q.device, dtype=torch.int32).contiguous() if kv_start is not None
           else torch.zeros(1, dtype=torch.int32, device=q.device))
    # fp32 inputs: IEEE products (TF32 would miss a 1e-4 fp32 tolerance); bf16/fp16 ignore it
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if q.dtype == torch.bfloat16 and _interpreted():
        prec = "upcast"
    flags = dict(CAUSAL=None, HAS_WINDOW=window is not None, HAS_KV0=kv_start is not None,
                 D_PAD=D_PAD, PREC=prec)
    return B, H, Tq, Tk, D, D_PAD, scale, kv0, flags


def _forward(q, k, v, causal, window, scale, kv_start):
    B, H, Tq, Tk, D, D_PAD, scale, kv0, flags = _common(q, k, window, scale, kv_start)
    flags["CAUSAL"] = bool(causal)
    o = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, Tq, dtype=torch.float32, device=q.device)
    BM, BN, warps, stages = _fwd_config(Tq, D_PAD, q.dtype)
    _attn_fwd[(triton.cdiv(Tq, BM), B * H)](
        q, k, v, o, lse, kv0, *q.stride(), *k.stride(), *v.stride(),
        H, Tq, Tk, D, int(window or 0), scale * _LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages, **flags)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, window, scale, kv_start):
    B, H, Tq, Tk, D, D_PAD, scale, kv0, flags = _common(q, k, window, scale, kv_start)
    flags["CAUSAL"] = bool(causal)
    delta = torch.empty_like(lse)
    BM, BN, warps, stages = _fwd_config(Tq, D_PAD, q.dtype)
    _bwd_delta[(triton.cdiv(Tq, BM), B * H)](o, do, delta, *do.stride(), H, Tq, D,
                                             BLOCK_M=BM, D_PAD=D_PAD)
    dq = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, Tk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, Tk, D, dtype=v.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    common = (H, Tq, Tk, D, int(window or 0), scale * _LOG2E, scale)
    BM1, BN1, warps1, stages1 = _bwd_config(D_PAD, q.dtype)
    _attn_bwd_dkdv[(triton.cdiv(Tk, BN1), B * H)](
        q, k, v, do, lse, delta, dk, dv, kv0, *strides, *common,
        BLOCK_M=BM1, BLOCK_N=BN1, num_warps=warps1, num_stages=stages1, **flags)
    BM2, BN2 = (BM, BN) if _interpreted() else (min(BM, 64), min(BN, 64))
    _attn_bwd_dq[(triton.cdiv(Tq, BM2), B * H)](
        q, k, v, do, lse, delta, dq, kv0, *strides, *common,
        BLOCK_M=BM2, BLOCK_N=BN2, num_warps=warps, num_stages=stages, **flags)
    return dq, dk, dv


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, kv_start):
        o, lse = _forward(q, k, v, causal, window, scale, kv_start)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.args = (causal, window, scale)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        causal, window, scale = ctx.args
        dq, dk, dv = _backward(do, q, k, v, o, lse, causal, window, scale, kv_start)
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, *, causal=True, window=None, scale=None, kv_start=None):
    """Flash attention (Triton) forward + backward; see the module docstring for the formula."""
    _check(q, k, v, window, kv_start)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    return _AttentionFn.apply(q, k, v, causal, window, scale, kv_start)
