"""Fused linear -> log-softmax -> gather (+ entropy), without the [N, V] logits.

    z      = (hidden @ weight.T) / temperature          # [N, V], never stored
    lse_i  = log sum_v exp(z_iv)
    logp_i = z_{i, t_i} - lse_i                          # t = targets
    H_i    = lse_i - sum_v p_iv z_iv = -sum_v p_iv log p_iv,   p = softmax(z)

Rows with t_i == -100 are ignored: logp_i = H_i = 0 and no gradient flows through them.

Backward (per row, g = upstream gradient of logp, g_H = upstream gradient of H):
    dL/dz_j = g * (1[j == t] - p_j) - g_H * p_j * (log p_j + H)
(from dH/dz_j = -p_j (z_j - sum_k p_k z_k) and z_j - sum_k p_k z_k = log p_j + H), then
dL/dx = dL/dz / temperature for the raw logits x = hidden @ weight.T, and
d hidden = dx @ weight, d weight = dx.T @ hidden.

Three implementations with one signature:
  linear_logprobs_ref      eager PyTorch, materializes [N, V]: the test oracle.
  linear_logprobs_triton   Triton. Forward: one program per row block walks the vocabulary in tiles
                           with an online logsumexp (running max m, s = sum e^(z-m),
                           u = sum e^(z-m) (z-m); H = log s - u/s). Backward: two kernels that
                           recompute logit tiles; one owns a row block of d hidden, the other a
                           vocabulary tile of d weight, so every output element has exactly one
                           writer (no atomics, bit-identical reruns).
  linear_logprobs_chunked  PyTorch autograd.Function over row chunks (the CPU fallback); keeps only
                           lse and H per row between forward and backward.
Extra memory of the fused paths: O(N) saved stats + one tile/chunk of logits + fp32 gradient
accumulators of the size of hidden and weight.

Caution:
  * Accumulation is fp32. fp32 inputs use exact fp32 products in tl.dot (input_precision="ieee",
    not TF32), so the Triton path matches the fp64 oracle to ~1e-6. bf16/fp16 products are
    accumulated in fp32 by both fused paths (the chunked path upcasts a copy of weight); the
    reference, like eager training, rounds the logits to the input dtype before the fp32
    softmax, so the fused paths are the more accurate ones.
  * In the Triton backward the logit gradient tile is cast to the input dtype before the gradient
    GEMMs (as eager bf16 training does); gradients are returned in the input dtype.
  * Targets outside [0, V) other than -100 raise ValueError; this check syncs the device once.
  * The Triton backward recomputes the logits twice (once per gradient kernel): 4 GEMMs of
    N*V*d instead of the eager 3, the price of determinism without atomics.
  * The entropy term of the backward is skipped when no gradient reaches the entropy output.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton has no wheels for macOS/Windows; the PyTorch paths still work there.
    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn
    triton = tl = _NoTriton()
    HAS_TRITON = False
else:
    HAS_TRITON = True

IGNORE_INDEX = -100
CHUNK_BYTES = 16 << 20  # one fp32 [rows, V] buffer of the chunked path (2 for logprob, 3 for KL)


# ----------------------------------------------------------------------------- validation helpers

def _check_pair(hidden, weight, hname, wname):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"{hname} must be a 2-D tensor [N, d], got shape "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{wname} must be a 2-D tensor [V, d], got shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{hname} [N, d] = {tuple(hidden.shape)} and {wname} [V, d] = "
                         f"{tuple(weight.shape)} disagree on d")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"{hname} ({hidden.dtype}) and {wname} ({weight.dtype}) must share one "
                         f"floating dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{hname} is on {hidden.device} but {wname} on {weight.device}")


def check_inputs(hidden, weight, targets, temperature):
    """Validate shapes/dtypes; returns targets as int64 [N]. Raises ValueError naming the tensor."""
    _check_pair(hidden, weight, "hidden", "weight")
    n, v = hidden.shape[0], weight.shape[0]
    if not isinstance(targets, torch.Tensor) or targets.shape != (n,):
        raise ValueError(f"targets must have shape [N] = ({n},), got "
                         f"{tuple(getattr(targets, 'shape', ()))}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer (long) tensor, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    targets = targets.long()
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, V={v}) and is not "
                         f"{IGNORE_INDEX}")
    return targets


def _logits_ref(hidden, weight, temperature):
    # fp32 softmax for half inputs (like eager training), fp64 kept for the fp64 oracle.
    z = hidden @ weight.T
    return z.to(torch.promote_types(z.dtype, torch.float32)) / temperature


# ----------------------------------------------------------------------------- reference

def linear_logprobs_ref(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Eager reference: log_softmax((hidden @ weight.T).float() / temperature).gather(targets).

    Materializes [N, V]. Returns logp [N] (fp32; fp64 for fp64 inputs) or (logp, entropy).
    """
    targets = check_inputs(hidden, weight, targets, temperature)
    logsm = torch.log_softmax(_logits_ref(hidden, weight, temperature), dim=-1)
    valid = targets != IGNORE_INDEX
    logp = logsm.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    logp = torch.where(valid, logp, torch.zeros_like(logp))  # where(): no gradient to ignored rows
    if not return_entropy:
        return logp
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, torch.where(valid, ent, torch.zeros_like(ent))


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: the CPU interpreter's dot misreads bf16 (stored as uint16),
    so there the operands go to fp32 first; bf16 x bf16 products are exact in fp32, so the
    result is what the GPU's fp32-accumulating MMA computes."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """x[rows, cols] = h[rows, :] @ w[cols, :].T in fp32, looping over d in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)    # [BLOCK_N, BLOCK_K]
        wt = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None],
                     mask=col_mask[None, :] & kmask[:, None], other=0.0)   # [BLOCK_K, BLOCK_V]
        acc = _mma(h, wt, acc, PREC, UPCAST)
    return acc


@triton.jit
def _dz_tile(z, cols, col_mask, tgt, lse, g_lp, g_ent, ent, HAS_ENT: tl.constexpr):
    """dL/dz for one [BLOCK_N, BLOCK_V] tile (see the module docstring); 0 on padded columns."""
    logp = z - lse[:, None]
    p = tl.where(col_mask[None, :], tl.exp(logp), 0.0)
    dz = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_ENT:
        # where() before the product: padded columns have logp = -inf and p = 0 -> 0 * inf = nan
        dz -= g_ent[:, None] * p * tl.where(col_mask[None, :], logp + ent[:, None], 0.0)
    return dz


@triton.jit
def _fwd_kernel(h_ptr,      # [N, D] hidden, input dtype
                w_ptr,      # [V, D] weight, input dtype
                tgt_ptr,    # [N] int64 targets (-100 = ignored)
                logp_ptr,   # [N] fp32 out
                lse_ptr,    # [N] fp32 out, saved for backward
                ent_ptr,    # [N] fp32 out (written only if WITH_ENT)
                N, V, D, stride_h, stride_w, inv_temp,
                WITH_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)  # V*D or N*D can pass 2^31 at real sizes
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
    # finite start so that (m - m_new) * s is 0, not -inf * 0, on the first tile
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows64, cols.to(tl.int64), row_mask, col_mask, D,
                         stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K, PREC,
                         UPCAST) * inv_temp
        z = tl.where(col_mask[None, :], z, -1e30)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        if WITH_ENT:
            # u tracks sum e^(z-m) (z-m) rather than sum e^(z-m) z: no cancellation when |z| >> H
            u = alpha * (u + (m - m_new) * s) + \
                tl.sum(tl.where(col_mask[None, :], e * (z - m_new[:, None]), 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    valid = row_mask & (tgt != -100)
    tl.store(logp_ptr + rows, tl.where(valid, zt - lse, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WITH_ENT:
        tl.store(ent_ptr + rows, tl.where(valid, tl.log(s) - u / s, 0.0), mask=row_mask)


@triton.jit
def _bwd_dh_kernel(h_ptr,     # [N, D] hidden
                   w_ptr,     # [V, D] weight
                   tgt_ptr,   # [N] int64
                   lse_ptr,   # [N] fp32 from forward
                   ent_ptr,   # [N] fp32 from forward (read if HAS_ENT)
                   glp_ptr,   # [N] fp32 upstream grad of logp (0 on ignored rows)
                   gent_ptr,  # [N] fp32 upstream grad of entropy (0 on ignored rows; if HAS_ENT)
                   dh_ptr,    # [N, D] fp32 out, zero-initialized; this program owns its rows
                   N, V, D, stride_h, stride_w, inv_temp,
                   HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    g_ent = g_lp
    ent = g_lp
    if HAS_ENT:
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, rows64, cols64, row_mask, col_mask, D,
                         stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K, PREC,
                         UPCAST) * inv_temp
        dx = _dz_tile(z, cols, col_mask, tgt, lse, g_lp, g_ent, ent, HAS_ENT) * inv_temp
        dx = dx.to(w_ptr.dtype.element_ty)
        # d hidden[rows, k-chunk] += dx @ w[cols, k-chunk]; read-modify-write of rows this
        # program alone owns (no atomics -> deterministic), resident in L2 across tiles
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            w = tl.load(w_ptr + cols64[:, None] * stride_w + ks[None, :],
                        mask=col_mask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_V, BLOCK_K]
            ptrs = dh_ptr + rows64[:, None] * D + ks[None, :]
            omask = row_mask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0)
            acc = _mma(dx, w, acc, PREC, UPCAST)
            tl.store(ptrs, acc, mask=omask)


@triton.jit
def _bwd_dw_kernel(h_ptr,     # [N, D] hidden
                   w_ptr,     # [V, D] weight
                   tgt_ptr,   # [N] int64
                   lse_ptr,   # [N] fp32
                   ent_ptr,   # [N] fp32 (if HAS_ENT)
                   glp_ptr,   # [N] fp32
                   gent_ptr,  # [N] fp32 (if HAS_ENT)
                   dw_ptr,    # [V, D] fp32 out, zero-initialized; this program owns its columns
                   N, V, D, stride_h, stride_w, inv_temp,
                   HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
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
        g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
        g_ent = g_lp
        ent = g_lp
        if HAS_ENT:
            g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        z = _logits_tile(h_ptr, w_ptr, rows64, cols64, row_mask, col_mask, D,
                         stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K, PREC,
                         UPCAST) * inv_temp
        dx = _dz_tile(z, cols, col_mask, tgt, lse, g_lp, g_ent, ent, HAS_ENT) * inv_temp
        dxt = tl.trans(dx.to(h_ptr.dtype.element_ty))                        # [BLOCK_V, BLOCK_N]
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                        mask=row_mask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            ptrs = dw_ptr + cols64[:, None] * D + ks[None, :]
            omask = col_mask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0)
            acc = _mma(dxt, h, acc, PREC, UPCAST)
            tl.store(ptrs, acc, mask=omask)


# ----------------------------------------------------------------------------- launchers

def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_config(dtype):
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, input_precision, upcast) for the Triton kernels."""
    prec = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    if _interpreting():
        # the CPU interpreter pays per op, not per element: few, large tiles run fastest
        upcast = dtype == torch.bfloat16
        return 16, 256, 128, 4, "ieee" if upcast else prec, upcast
    return (64, 128, 64, 8 if dtype == torch.float32 else 4, prec, False)


def require_triton(t):
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use ENGINE_KERNELS=torch or ref")
    if not t.is_cuda and not _interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 "
                           "(set before triton is imported)")


def _grads_in(g, like, valid):
    """Upstream gradient as fp32 [N] with ignored rows zeroed (None -> None)."""
    if g is None:
        return None
    return torch.where(valid, g.float(), 0.0).contiguous()


class _LinearLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_ent):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        n, d = hidden.shape
        v = weight.shape[0]
        bn, bv, bk, warps, prec, upcast = tile_config(hidden.dtype)
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.zeros_like(logp) if with_ent else torch.empty(0, device=hidden.device)
        if n > 0:
            _fwd_kernel[(triton.cdiv(n, bn),)](
                hidden, weight, targets, logp, lse, ent if with_ent else logp,
                n, v, d, hidden.stride(0), weight.stride(0), 1.0 / temperature,
                WITH_ENT=with_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PREC=prec,
                UPCAST=upcast, num_warps=warps)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.with_ent = temperature, with_ent
        ctx.set_materialize_grads(False)
        if not with_ent:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        n, d = hidden.shape
        v = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if n == 0 or (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None
        valid = targets != IGNORE_INDEX
        g_lp = _grads_in(g_logp, lse, valid)
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        has_ent = ctx.with_ent and g_ent is not None
        g_en = _grads_in(g_ent, lse, valid) if has_ent else g_lp
        bn, bv, bk, warps, prec, upcast = tile_config(hidden.dtype)
        args = (n, v, d, hidden.stride(0), weight.stride(0), 1.0 / ctx.temperature)
        kw = dict(HAS_ENT=has_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PREC=prec, UPCAST=upcast,
                  num_warps=warps)
        ent_arg = ent if has_ent else lse
        dh = dw = None
        if need_h:
            dh = torch.zeros(n, d, device=hidden.device, dtype=torch.float32)
            _bwd_dh_kernel[(triton.cdiv(n, bn),)](hidden, weight, targets, lse, ent_arg, g_lp,
                                                  g_en, dh, *args, **kw)
            dh = dh.to(hidden.dtype)
        if need_w:
            dw = torch.zeros(v, d, device=hidden.device, dtype=torch.float32)
            _bwd_dw_kernel[(triton.cdiv(v, bv),)](hidden, weight, targets, lse, ent_arg, g_lp,
                                                  g_en, dw, *args, **kw)
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None


def linear_logprobs_triton(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Triton version of `linear_logprobs_ref` (same contract), never materializing [N, V]."""
    targets = check_inputs(hidden, weight, targets, temperature)
    require_triton(hidden)
    logp, ent = _LinearLogprobsTriton.apply(hidden, weight, targets.contiguous(),
                                            float(temperature), bool(return_entropy))
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------- chunked PyTorch
# Every [rows, V] tensor lives in a buffer allocated once per call and reused by all chunks
# (out= GEMMs, in-place elementwise ops): per-chunk temporaries would be carved from the heap
# and, fragmented, stay resident, which on CPU costs more than the chunking saves.

def chunk_rows_for(v, chunk_rows=None):
    """Rows per chunk so that one fp32 [rows, V] buffer is about CHUNK_BYTES."""
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, CHUNK_BYTES // (4 * max(v, 1)))


def chunk_logits(out, h, w32, inv_temp):
    """out[:] = (h @ w32.T) * inv_temp in fp32 (16-bit products are exact in fp32: the same
    numbers the Triton kernels produce)."""
    torch.mm(h.float(), w32.T, out=out)
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return out


def chunk_log_softmax_(z, pbuf):
    """In place: z <- log_softmax(z); returns (lse [rows], p = softmax(z) stored in pbuf)."""
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    p = torch.exp(z, out=pbuf)
    s = p.sum(dim=1, keepdim=True)
    log_s = s.log()
    z.sub_(log_s)
    p.div_(s)
    return (m + log_s)[:, 0], p


class _LinearLogprobsChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_ent, chunk_rows):
        n, v = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        safe_t = targets.clamp(min=0)[:, None]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.zeros_like(logp) if with_ent else torch.empty(0, device=hidden.device)
        w32 = weight.float()  # a copy only for 16-bit weights
        rows = min(chunk_rows, max(n, 1))
        zbuf = torch.empty(rows, v, dtype=torch.float32, device=hidden.device)
        pbuf = torch.empty_like(zbuf)
        for i in range(0, n, chunk_rows):
            j = min(i + chunk_rows, n)
            z = chunk_logits(zbuf[: j - i], hidden[i:j], w32, inv_temp)
            lse[i:j], p = chunk_log_softmax_(z, pbuf[: j - i])
            logp[i:j] = z.gather(1, safe_t[i:j])[:, 0]
            if with_ent:
                ent[i:j] = p.mul_(z).sum(dim=1).neg_()      # -sum p log p
        valid = targets != IGNORE_INDEX
        logp.masked_fill_(~valid, 0.0)
        if with_ent:
            ent.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.with_ent, ctx.chunk_rows = temperature, with_ent, chunk_rows
        ctx.set_materialize_grads(False)
        if not with_ent:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        n, d = hidden.shape
        v = weight.shape[0]
        inv_temp = 1.0 / ctx.temperature
        valid = targets != IGNORE_INDEX
        g_lp = _grads_in(g_logp, lse, valid)
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        has_ent = ctx.with_ent and g_ent is not None
        g_en = _grads_in(g_ent, lse, valid) if has_ent else None
        safe_t = targets.clamp(min=0)[:, None]
        w32 = weight.float()  # no copy for fp32
        dh = torch.empty(n, d, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        rows = min(ctx.chunk_rows, max(n, 1))
        zbuf = torch.empty(rows, v, dtype=torch.float32, device=hidden.device)
        pbuf = torch.empty_like(zbuf)
        for i in range(0, n, ctx.chunk_rows):
            j = min(i + ctx.chunk_rows, n)
            z = chunk_logits(zbuf[: j - i], hidden[i:j], w32, inv_temp)
            z.sub_(lse[i:j, None])                        # log p
            p = torch.exp(z, out=pbuf[: j - i])
            # dz = -p * (g + g_H * (log p + H)) + g * onehot(t), built in the log p buffer
            if has_ent:
                z.add_(ent[i:j, None]).mul_(g_en[i:j, None]).add_(g_lp[i:j, None])
            else:
                z.copy_(g_lp[i:j, None].expand_as(z))
            z.mul_(p).neg_()
            z.scatter_add_(1, safe_t[i:j], g_lp[i:j, None])
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            if need_h:
                torch.mm(z, w32, out=dh[i:j])
            if need_w:
                dw.addmm_(z.T, hidden[i:j].float())
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None,
                None, None, None, None)


def linear_logprobs_chunked(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                            chunk_rows=None):
    """PyTorch version of `linear_logprobs_ref` over row chunks of ~CHUNK_BYTES fp32 logits.

    `chunk_rows` overrides the chunk size (tests force several chunks with it).
    """
    targets = check_inputs(hidden, weight, targets, temperature)
    rows = chunk_rows_for(weight.shape[0], chunk_rows)
    logp, ent = _LinearLogprobsChunked.apply(hidden, weight, targets, float(temperature),
                                             bool(return_entropy), rows)
    return (logp, ent) if return_entropy else logp
