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
`linear_kl_triton` (forward: online logsumexp of both sides over vocabulary tiles with
a = sum e^(z-m) (z - zr), so that kl = a/s - lse_p + lse_q, in a split-vocabulary grid merged as
in logprob.py: a combines like s, kl = sum_k e^(m_k-M) a_k / S - lse_p + lse_q; backward: per
vocabulary chunk one kernel recomputes the policy (and, if kl gets a gradient, the reference)
logit tile once and writes dz in the input dtype, then cuBLAS does dW = dz.T @ h and
dh += dz @ W as in logprob.py), `linear_kl_chunked` (PyTorch over row chunks, the CPU fallback).
ref_hidden / ref_weight may have a different width d_ref than the policy (e.g. a smaller or
differently-sized reference model), but must share N and V.

Caution:
  * The backward recomputes the reference logits only when kl receives a gradient (one extra
    N*V*d_ref GEMM); it skips them when only logp is differentiated.
  * kl is a difference of fp32 quantities of the size of the logits: its absolute error is
    ~1e-6 * |z|, so tiny KLs (< 1e-6) are dominated by rounding and may come out slightly < 0.
  * The dlogits are rounded to the input dtype before the gradient GEMMs; accumulation stays
    fp32, outputs are fp32 and gradients are returned in the input dtype.
  * Same target validation (and device sync) as linear_logprobs.
"""
import torch

from .logprob import (GROUP_ROWS, IGNORE_INDEX, _check_pair, _grads_in, _logits_ref,
                      _logits_tile, _round_to, _tile_ids, backward_gemms, check_inputs,
                      chunk_log_softmax_, chunk_logits, chunk_rows_for, num_splits,
                      require_triton, tile_config, tl, triton)


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
                   part_ptr,   # [7, S, N] fp32 out per split: m, s, a, mr, sr, z_t, zr_t
                   N, V, D, DR, stride_h, stride_w, stride_rh, stride_rw, inv_temp,
                   TILES_PER_SPLIT,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
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
    v_lo = split * TILES_PER_SPLIT * BLOCK_V
    v_hi = tl.minimum(V, v_lo + TILES_PER_SPLIT * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        hit = cols[None, :] == tgt[:, None]
        # reference side first: its tile is reduced to (mr, sr, zr_t) plus the z - zr product
        # below, so only one [BLOCK_N, BLOCK_V] fp32 tile of each side is live at a time
        zr = _logits_tile(rh_ptr, rw_ptr, rows64, cols64, row_mask, col_mask, DR, stride_rh,
                          stride_rw, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
        zr = tl.where(col_mask[None, :], zr, -1e30)
        mr_new = tl.maximum(mr, tl.max(zr, axis=1))
        sr = tl.exp(mr - mr_new) * sr + tl.sum(tl.exp(zr - mr_new[:, None]), axis=1)
        mr = mr_new
        zrt += tl.sum(tl.where(hit, zr, 0.0), axis=1)
        z = _logits_tile(h_ptr, w_ptr, rows64, cols64, row_mask, col_mask, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
        z = tl.where(col_mask[None, :], z, -1e30)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        # (z - zr) is independent of the running max, so a rescales like s; padded columns
        # have e = 0 and z - zr = 0
        a = alpha * a + tl.sum(e * (z - zr), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    base = part_ptr + split * N + rows
    stride = n_split * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride, s, mask=row_mask)
    tl.store(base + 2 * stride, a, mask=row_mask)
    tl.store(base + 3 * stride, mr, mask=row_mask)
    tl.store(base + 4 * stride, sr, mask=row_mask)
    tl.store(base + 5 * stride, zt, mask=row_mask)
    tl.store(base + 6 * stride, zrt, mask=row_mask)


@triton.jit
def _kl_bwd_dz_kernel(h_ptr,     # [N, D]
                      w_ptr,     # [V, D] (this launch's vocabulary chunk)
                      rh_ptr,    # [N, DR]
                      rw_ptr,    # [V, DR] (same chunk)
                      tgt_ptr,   # [N] int64, shifted to the chunk
                      lse_ptr,   # [N] fp32
                      rlse_ptr,  # [N] fp32
                      kl_ptr,    # [N] fp32 forward kl
                      glp_ptr,   # [N] fp32 upstream grad of logp (0 on ignored rows)
                      gkl_ptr,   # [N] fp32 upstream grad of kl (0 on ignored rows)
                      dz_ptr,    # [N, V] out, input dtype, row stride stride_dz
                      N, V, D, DR, stride_h, stride_w, stride_rh, stride_rw, stride_dz, inv_temp,
                      HAS_KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
                      UPCAST: tl.constexpr):
    rb, vt = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP)
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    if HAS_KL:
        zr = _logits_tile(rh_ptr, rw_ptr, rows64, cols64, row_mask, col_mask, DR, stride_rh,
                          stride_rw, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
        rlse = tl.load(rlse_ptr + rows, mask=row_mask, other=0.0)
        kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
        # c = -log q - kl, so that log p - log q - kl = logp + c
        c = rlse[:, None] - zr - kl[:, None]
    z = _logits_tile(h_ptr, w_ptr, rows64, cols64, row_mask, col_mask, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_KL:
        g_kl = tl.load(gkl_ptr + rows, mask=row_mask, other=0.0)
        dz += g_kl[:, None] * p * (logp + c)
    dz = _round_to(dz * inv_temp, dz_ptr.dtype.element_ty, UPCAST)
    tl.store(dz_ptr + rows64[:, None] * stride_dz + cols[None, :], dz,
             mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- Triton launcher
# Tile tables keyed like logprob.FWD_CONFIGS. The forward holds two fp32 logit tiles (policy
# and reference), so its 16-bit tiles are half those of logprob (larger ones spill on sm_90).
KL_FWD_CONFIGS = {
    ("16", "small"): (64, 128, 64, 8, 3),
    ("16", "large"): (128, 64, 64, 8, 3),
    ("32", "small"): (32, 64, 32, 4, 2),
    ("32", "large"): (64, 64, 32, 4, 2),
}
KL_BWD_CONFIGS = {
    ("16", "small"): (64, 128, 64, 4, 3),
    ("16", "large"): (128, 128, 64, 8, 3),
    ("32", "small"): (32, 64, 32, 4, 2),
    ("32", "large"): (64, 64, 32, 4, 2),
}


def _combine_kl(part):
    """Merge per-split partials [7, S, N] into (lse, rlse, kl, z_t, zr_t) [N]."""
    m, s, a, mr, sr, zt, zrt = part.unbind(0)
    mx, mrx = m.amax(0), mr.amax(0)
    wgt = torch.exp(m - mx)
    tot = (wgt * s).sum(0)
    lse = mx + torch.log(tot)
    rlse = mrx + torch.log((torch.exp(mr - mrx) * sr).sum(0))
    kl = (wgt * a).sum(0) / tot - lse + rlse
    return lse, rlse, kl, zt.sum(0), zrt.sum(0)


class _LinearKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, temperature, opts):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        ref_hidden, ref_weight = ref_hidden.contiguous(), ref_weight.contiguous()
        n, d = hidden.shape
        v, dr = weight.shape[0], ref_hidden.shape[1]
        bn, bv, bk, warps, stages, prec, upcast = tile_config(hidden.dtype, n, KL_FWD_CONFIGS)
        n_split, per = num_splits(n, v, bn, bv, hidden.device, opts.get("splits"))
        part = torch.empty(7, n_split, n, device=hidden.device, dtype=torch.float32)
        if n > 0:
            _kl_fwd_kernel[(triton.cdiv(n, bn), n_split)](
                hidden, weight, ref_hidden, ref_weight, targets, part,
                n, v, d, dr, hidden.stride(0), weight.stride(0), ref_hidden.stride(0),
                ref_weight.stride(0), 1.0 / temperature, per,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PREC=prec, UPCAST=upcast,
                num_warps=warps, num_stages=stages)
        lse, rlse, kl, zt, zrt = _combine_kl(part)
        valid = targets != IGNORE_INDEX
        logp = torch.where(valid, zt - lse, 0.0)
        rlogp = torch.where(valid, zrt - rlse, 0.0)
        kl = torch.where(valid, kl, 0.0)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl)
        ctx.temperature, ctx.opts = temperature, opts
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rlogp)
        return logp, rlogp, kl

    @staticmethod
    def backward(ctx, g_logp, g_rlogp, g_kl):
        hidden, weight, ref_hidden, ref_weight, targets, lse, rlse, kl = ctx.saved_tensors
        n, d = hidden.shape
        dr = ref_hidden.shape[1]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if n == 0 or (g_logp is None and g_kl is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        valid = targets != IGNORE_INDEX
        g_lp = _grads_in(g_logp, lse, valid)
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        has_kl = g_kl is not None
        g_k = _grads_in(g_kl, lse, valid) if has_kl else g_lp
        bn, bv, bk, warps, stages, prec, upcast = tile_config(hidden.dtype, n, KL_BWD_CONFIGS)
        inv_temp = 1.0 / ctx.temperature

        def launch_dz(dz, c0, c1):
            grid = (triton.cdiv(n, bn) * triton.cdiv(c1 - c0, bv),)
            _kl_bwd_dz_kernel[grid](
                hidden, weight[c0:], ref_hidden, ref_weight[c0:], targets - c0, lse, rlse, kl,
                g_lp, g_k, dz, n, c1 - c0, d, dr, hidden.stride(0), weight.stride(0),
                ref_hidden.stride(0), ref_weight.stride(0), dz.stride(0), inv_temp,
                HAS_KL=has_kl, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP=GROUP_ROWS, PREC=prec,
                UPCAST=upcast, num_warps=warps, num_stages=stages)

        dh, dw = backward_gemms(launch_dz, hidden, weight, need_h, need_w,
                                ctx.opts.get("chunk_cols"))
        return dh, dw, None, None, None, None, None


def linear_kl_triton(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0,
                     splits=None, chunk_cols=None):
    """Triton version of `linear_kl_ref` (same contract), never materializing [N, V].
    `splits` / `chunk_cols` as in `linear_logprobs_triton` (tests force them)."""
    targets = _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, targets, temperature)
    require_triton(hidden)
    return _LinearKLTriton.apply(hidden, weight, ref_hidden.detach(), ref_weight.detach(),
                                 targets.contiguous(), float(temperature),
                                 {"splits": splits, "chunk_cols": chunk_cols})


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
