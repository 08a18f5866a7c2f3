"""Fused policy / reference target log-probs and the exact per-token KL(pi || pi_ref).

    z   = (hidden @ weight.T) / temperature              # policy logits   [N, V], never stored
    zr  = (ref_hidden @ ref_weight.T) / temperature      # reference logits [N, V], never stored
    logp_i     = z_{i,t_i}  - lse(z_i)
    ref_logp_i = zr_{i,t_i} - lse(zr_i)
    kl_i       = sum_v p_iv (log p_iv - log q_iv),   p = softmax(z), q = softmax(zr)
               = sum_v p_iv (z_iv - zr_iv) - lse(z_i) + lse(zr_i)

Rows with t_i == -100 are ignored: all three outputs are 0 there and no gradient flows.
Gradients reach hidden and weight only; the reference side is treated as constant and
ref_logp is not differentiable. With g, g_kl the upstream gradients of logp and kl:
    dL/dz_j = g * (1[j == t] - p_j) + g_kl * p_j * ((log p_j - log q_j) - kl)
then divided by temperature for the raw logits hidden @ weight.T.

Implementations (same signature): `linear_kl_ref` (eager, materializes [N, V]; the oracle),
`linear_kl_triton` (online logsumexp of both sides in one pass over vocabulary tiles, with
a = sum e^(z-m) (z - zr) so that kl = a/s - lse_p + lse_q; backward recomputes tiles in two
kernels as in logprob.py), `linear_kl_chunked` (PyTorch over row chunks, the CPU fallback).
ref_hidden / ref_weight may have a different width d_ref than the policy (e.g. a smaller or
differently-sized reference model), but must share N and V.

Caution:
  * The backward recomputes the reference logits whenever kl receives a gradient (two extra
    GEMMs per gradient kernel); it skips them when only logp is differentiated.
  * kl is a difference of fp32 quantities of the size of the logits: its absolute error is
    ~1e-6 * |z|, so tiny KLs (< 1e-6) are dominated by rounding and may come out slightly < 0.
  * The Triton backward casts each logit-gradient tile to the input dtype before the gradient
    GEMMs; accumulation stays fp32 and gradients are returned in the input dtype.
  * Same target validation (and device sync) as linear_logprobs.
"""
import torch

from .logprob import (IGNORE_INDEX, _check_pair, _grads_in, _logits_ref,
                      _logits_tile, _mma, check_inputs, chunk_log_softmax_,
                      chunk_logits, chunk_rows_for, require_triton, tile_config,
                      tl, triton)


def _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, targets, temperature):
    targets = check_inputs(hidden, weight, targets, temperature)
    _check_pair(ref_hidden, ref_weight, "ref_hidden", "ref_weight")
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden has {ref_hidden.shape[0]} rows but hidden has "
                         f"{hidden.shape[0]}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has V = {ref_weight.shape[0]} but weight has "
                         f"V = {weight.shape[0]}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden on {hidden.device}")
    return targets


# ----------------------------------------------------------------------------- reference

def linear_kl_ref(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0):
    """Eager reference -> (logp, ref_logp, kl), each [N] fp32 (fp64 for fp64 inputs)."""
    targets = _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, targets, temperature)
    logp_all = torch.log_softmax(_logits_ref(hidden, weight, temperature), dim=-1)
    with torch.no_grad():
        logq_all = torch.log_softmax(_logits_ref(ref_hidden, ref_weight, temperature), dim=-1)
    valid = targets != IGNORE_INDEX
    t = targets.clamp(min=0)[:, None]
    kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    zero = torch.zeros_like(kl)
    return (torch.where(valid, logp_all.gather(1, t)[:, 0], zero),
            torch.where(valid, logq_all.gather(1, t)[:, 0], zero),
            torch.where(valid, kl, zero))


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _kl_fwd_kernel(h_ptr,      # [N, D] policy hidden
                   w_ptr,      # [V, D] policy weight
                   rh_ptr,     # [N, DR] reference hidden
                   rw_ptr,     # [V, DR] reference weight
                   tgt_ptr,    # [N] int64 targets (-100 = ignored)
                   logp_ptr,   # [N] fp32 out
                   rlogp_ptr,  # [N] fp32 out
                   kl_ptr,     # [N] fp32 out
                   lse_ptr,    # [N] fp32 out, policy lse (saved)
                   rlse_ptr,   # [N] fp32 out, reference lse (saved)
                   N, V, D, DR, stride_h, stride_w, stride_rh, stride_rw, inv_temp,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)    # sum e^(z-m) (z - zr)
    mr = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    sr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zrt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, rows64, cols64, row_mask, col_mask, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
        zr = _logits_tile(rh_ptr, rw_ptr, rows64, cols64, row_mask, col_mask, DR, stride_rh,
                          stride_rw, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
        z = tl.where(col_mask[None, :], z, -1e30)
        zr = tl.where(col_mask[None, :], zr, -1e30)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        # (z - zr) is independent of the running max, so a rescales like s
        a = alpha * a + tl.sum(tl.where(col_mask[None, :], e * (z - zr), 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        mr_new = tl.maximum(mr, tl.max(zr, axis=1))
        sr = tl.exp(mr - mr_new) * sr + tl.sum(tl.exp(zr - mr_new[:, None]), axis=1)
        mr = mr_new
        hit = cols[None, :] == tgt[:, None]
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        zrt += tl.sum(tl.where(hit, zr, 0.0), axis=1)
    lse = m + tl.log(s)
    rlse = mr + tl.log(sr)
    valid = row_mask & (tgt != -100)
    tl.store(logp_ptr + rows, tl.where(valid, zt - lse, 0.0), mask=row_mask)
    tl.store(rlogp_ptr + rows, tl.where(valid, zrt - rlse, 0.0), mask=row_mask)
    tl.store(kl_ptr + rows, tl.where(valid, a / s - lse + rlse, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(rlse_ptr + rows, rlse, mask=row_mask)


@triton.jit
def _kl_dz_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, rows64, cols, row_mask, col_mask, D, DR,
                stride_h, stride_w, stride_rh, stride_rw, inv_temp, tgt, lse, rlse, kl, g_lp,
                g_kl, HAS_KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dL/dx for one tile of the raw policy logits (already divided by temperature)."""
    cols64 = cols.to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, rows64, cols64, row_mask, col_mask, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
    logp = z - lse[:, None]
    p = tl.where(col_mask[None, :], tl.exp(logp), 0.0)
    dz = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_KL:
        zr = _logits_tile(rh_ptr, rw_ptr, rows64, cols64, row_mask, col_mask, DR, stride_rh,
                          stride_rw, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
        diff = tl.where(col_mask[None, :], logp - (zr - rlse[:, None]) - kl[:, None], 0.0)
        dz += g_kl[:, None] * p * diff
    return dz * inv_temp


@triton.jit
def _kl_bwd_dh_kernel(h_ptr,     # [N, D]
                      w_ptr,     # [V, D]
                      rh_ptr,    # [N, DR]
                      rw_ptr,    # [V, DR]
                      tgt_ptr,   # [N] int64
                      lse_ptr,   # [N] fp32
                      rlse_ptr,  # [N] fp32
                      kl_ptr,    # [N] fp32 forward kl
                      glp_ptr,   # [N] fp32 upstream grad of logp (0 on ignored rows)
                      gkl_ptr,   # [N] fp32 upstream grad of kl (0 on ignored rows)
                      dh_ptr,    # [N, D] fp32 out, zero-initialized; rows owned by this program
                      N, V, D, DR, stride_h, stride_w, stride_rh, stride_rw, inv_temp,
                      HAS_KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    rlse = tl.load(rlse_ptr + rows, mask=row_mask, other=0.0)
    kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    g_kl = tl.load(gkl_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        dx = _kl_dz_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, rows64, cols, row_mask, col_mask, D, DR,
                         stride_h, stride_w, stride_rh, stride_rw, inv_temp, tgt, lse, rlse, kl,
                         g_lp, g_kl, HAS_KL, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST)
        dx = dx.to(w_ptr.dtype.element_ty)
        cols64 = cols.to(tl.int64)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            w = tl.load(w_ptr + cols64[:, None] * stride_w + ks[None, :],
                        mask=col_mask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_V, BLOCK_K]
            ptrs = dh_ptr + rows64[:, None] * D + ks[None, :]
            omask = row_mask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0)
            tl.store(ptrs, _mma(dx, w, acc, PREC, UPCAST), mask=omask)


@triton.jit
def _kl_bwd_dw_kernel(h_ptr,     # [N, D]
                      w_ptr,     # [V, D]
                      rh_ptr,    # [N, DR]
                      rw_ptr,    # [V, DR]
                      tgt_ptr,   # [N] int64
                      lse_ptr,   # [N] fp32
                      rlse_ptr,  # [N] fp32
                      kl_ptr,    # [N] fp32
                      glp_ptr,   # [N] fp32
                      gkl_ptr,   # [N] fp32
                      dw_ptr,    # [V, D] fp32 out, zero-initialized; columns owned by program
                      N, V, D, DR, stride_h, stride_w, stride_rh, stride_rw, inv_temp,
                      HAS_KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        rlse = tl.load(rlse_ptr + rows, mask=row_mask, other=0.0)
        kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
        g_kl = tl.load(gkl_ptr + rows, mask=row_mask, other=0.0)
        dx = _kl_dz_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, rows64, cols, row_mask, col_mask, D, DR,
                         stride_h, stride_w, stride_rh, stride_rw, inv_temp, tgt, lse, rlse, kl,
                         g_lp, g_kl, HAS_KL, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST)
        dxt = tl.trans(dx.to(h_ptr.dtype.element_ty))                        # [BLOCK_V, BLOCK_N]
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                        mask=row_mask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            ptrs = dw_ptr + cols64[:, None] * D + ks[None, :]
            omask = col_mask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0)
            tl.store(ptrs, _mma(dxt, h, acc, PREC, UPCAST), mask=omask)


# ----------------------------------------------------------------------------- Triton launcher

class _LinearKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, temperature):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        ref_hidden, ref_weight = ref_hidden.contiguous(), ref_weight.contiguous()
        n, d = hidden.shape
        v, dr = weight.shape[0], ref_hidden.shape[1]
        bn, bv, bk, warps, prec, upcast = tile_config(hidden.dtype)
        out = torch.empty(5, n, device=hidden.device, dtype=torch.float32)
        logp, rlogp, kl, lse, rlse = out.unbind(0)
        if n > 0:
            _kl_fwd_kernel[(triton.cdiv(n, bn),)](
                hidden, weight, ref_hidden, ref_weight, targets, logp, rlogp, kl, lse, rlse,
                n, v, d, dr, hidden.stride(0), weight.stride(0), ref_hidden.stride(0),
                ref_weight.stride(0), 1.0 / temperature,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PREC=prec, UPCAST=upcast,
                num_warps=warps)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        outs = logp.clone(), rlogp.clone(), kl.clone()  # own storage, not views of `out`
        ctx.mark_non_differentiable(outs[1])
        return outs

    @staticmethod
    def backward(ctx, g_logp, g_rlogp, g_kl):
        hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl = ctx.saved_tensors
        n, d = hidden.shape
        v, dr = weight.shape[0], ref_hidden.shape[1]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if n == 0 or (g_logp is None and g_kl is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        valid = targets != IGNORE_INDEX
        g_lp = _grads_in(g_logp, lse, valid)
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        has_kl = g_kl is not None
        g_k = _grads_in(g_kl, lse, valid) if has_kl else g_lp
        bn, bv, bk, warps, prec, upcast = tile_config(hidden.dtype)
        args = (hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl, g_lp, g_k)
        sizes = (n, v, d, dr, hidden.stride(0), weight.stride(0), ref_hidden.stride(0),
                 ref_weight.stride(0), 1.0 / ctx.temperature)
        kw = dict(HAS_KL=has_kl, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PREC=prec, UPCAST=upcast,
                  num_warps=warps)
        dh = dw = None
        if need_h:
            dh = torch.zeros(n, d, device=hidden.device, dtype=torch.float32)
            _kl_bwd_dh_kernel[(triton.cdiv(n, bn),)](*args, dh, *sizes, **kw)
            dh = dh.to(hidden.dtype)
        if need_w:
            dw = torch.zeros(v, d, device=hidden.device, dtype=torch.float32)
            _kl_bwd_dw_kernel[(triton.cdiv(v, bv),)](*args, dw, *sizes, **kw)
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None


def linear_kl_triton(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0):
    """Triton version of `linear_kl_ref` (same contract), never materializing [N, V]."""
    targets = _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, targets, temperature)
    require_triton(hidden)
    return _LinearKLTriton.apply(hidden, weight, ref_hidden.detach(), ref_weight.detach(),
                                 targets.contiguous(), float(temperature))


# ----------------------------------------------------------------------------- chunked PyTorch
# [rows, V] buffers are allocated once per call and reused by every chunk (see logprob.py).

class _LinearKLChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, temperature, chunk_rows):
        n, v = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        safe_t = targets.clamp(min=0)[:, None]
        out = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
        logp, rlogp, kl, lse, rlse = out.unbind(0)
        w32, rw32 = weight.float(), ref_weight.float()  # copies only for 16-bit weights
        bufs = torch.empty(3, min(chunk_rows, max(n, 1)), v, dtype=torch.float32,
                           device=hidden.device)
        for i in range(0, n, chunk_rows):
            j = min(i + chunk_rows, n)
            z, zr, pbuf = bufs[:, : j - i]
            chunk_logits(z, hidden[i:j], w32, inv_temp)
            chunk_logits(zr, ref_hidden[i:j], rw32, inv_temp)
            rlse[i:j], _ = chunk_log_softmax_(zr, pbuf)   # zr <- log q
            lse[i:j], p = chunk_log_softmax_(z, pbuf)     # z <- log p, pbuf <- p
            logp[i:j] = z.gather(1, safe_t[i:j])[:, 0]
            rlogp[i:j] = zr.gather(1, safe_t[i:j])[:, 0]
            zr.neg_().add_(z)                             # log p - log q
            kl[i:j] = p.mul_(zr).sum(dim=1)
        valid = targets != IGNORE_INDEX
        out[:3].masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        outs = logp.clone(), rlogp.clone(), kl.clone()  # own storage, not views of `out`
        ctx.mark_non_differentiable(outs[1])
        return outs

    @staticmethod
    def backward(ctx, g_logp, g_rlogp, g_kl):
        hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nothing = (None,) * 7
        if (g_logp is None and g_kl is None) or not (need_h or need_w):
            return nothing
        n, d = hidden.shape
        v = weight.shape[0]
        inv_temp = 1.0 / ctx.temperature
        valid = targets != IGNORE_INDEX
        g_lp = _grads_in(g_logp, lse, valid)
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        g_k = _grads_in(g_kl, lse, valid)
        safe_t = targets.clamp(min=0)[:, None]
        w32 = weight.float()
        rw32 = ref_weight.float() if g_k is not None else None
        dh = torch.empty(n, d, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        bufs = torch.empty(3 if g_k is not None else 2, min(ctx.chunk_rows, max(n, 1)), v,
                           dtype=torch.float32, device=hidden.device)
        for i in range(0, n, ctx.chunk_rows):
            j = min(i + ctx.chunk_rows, n)
            z = chunk_logits(bufs[0, : j - i], hidden[i:j], w32, inv_temp)
            z.sub_(lse[i:j, None])                        # log p
            p = torch.exp(z, out=bufs[1, : j - i])
            # dz = p * (g_kl * (log p - log q - kl) - g) + g * onehot(t), built in the z buffer
            if g_k is not None:
                zr = chunk_logits(bufs[2, : j - i], ref_hidden[i:j], rw32, inv_temp)
                z.sub_(zr).add_(rlse[i:j, None])          # log p - log q
                z.sub_(kl[i:j, None]).mul_(g_k[i:j, None]).sub_(g_lp[i:j, None])
            else:
                z.copy_(g_lp[i:j, None].expand_as(z)).neg_()
            z.mul_(p)
            z.scatter_add_(1, safe_t[i:j], g_lp[i:j, None])
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            if need_h:
                torch.mm(z, w32, out=dh[i:j])
            if need_w:
                dw.addmm_(z.T, hidden[i:j].float())
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None,
                None, None, None, None, None)


def linear_kl_chunked(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0,
                      chunk_rows=None):
    """PyTorch version of `linear_kl_ref` over row chunks (`chunk_rows` overrides the size)."""
    targets = _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, targets, temperature)
    rows = chunk_rows_for(weight.shape[0], chunk_rows)
    return _LinearKLChunked.apply(hidden, weight, ref_hidden.detach(), ref_weight.detach(),
                                  targets, float(temperature), rows)
