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
  linear_logprobs_triton   Triton forward + Triton/cuBLAS backward:
      forward   one program per (row block, vocabulary split) walks its vocabulary tiles with an
                online logsumexp (running max m, s = sum e^(z-m), u = sum e^(z-m) (z-m), z_t);
                the S splits are merged on the host side in fp32:
                    M = max_k m_k,  lse = M + log sum_k e^(m_k-M) s_k,
                    H = log S - sum_k e^(m_k-M) (u_k + (m_k-M) s_k) / S,  S = sum_k e^(m_k-M) s_k.
                S > 1 only when N / BLOCK_N row blocks cannot fill the SMs (PPO-sized N).
      backward  the vocabulary is cut into chunks of Vc columns (dlogits chunk [N, Vc] of about
                DZ_BYTES in the input dtype); per chunk one Triton kernel recomputes each logit
                tile once and writes dz = dL/d(h @ W.T) (input dtype: bf16 under autocast),
                then cuBLAS does dW[chunk] = dz.T @ h (each dW row written once, no
                accumulation) and dh += dz @ W[chunk] (fp32 accumulator of N x d). Work: one
                N*V*d GEMM to recompute the logits plus the two gradient GEMMs eager also runs;
                no atomics, so reruns are bit-identical.
  linear_logprobs_chunked  PyTorch autograd.Function over row chunks (the CPU fallback); keeps only
                           lse and H per row between forward and backward.
Extra memory of the fused paths: O(N) saved stats + one chunk of logits / dlogits (O(chunk x V)),
never [N, V]; the Triton backward also holds dh in fp32 (N x d) while chunks accumulate.

Tiles: FWD_CONFIGS / BWD_CONFIGS map (dtype kind, N bucket) to (BLOCK_N, BLOCK_V, BLOCK_K,
num_warps, num_stages); `python -m bench aot` compiles each entry for sm_90 and checks shared
memory and register spills. The CPU interpreter uses one large tile instead.

Caution:
  * Accumulation is fp32. fp32 inputs use exact fp32 products in tl.dot (input_precision="ieee",
    not TF32), so the Triton path matches the fp64 oracle to ~1e-6. bf16/fp16 inputs use 16-bit
    tensor-core tiles with fp32 accumulation; the reference, like eager training, rounds the
    logits to the input dtype before the fp32 softmax, so the fused paths are the more accurate.
    Logprobs, entropy and the saved statistics are always fp32.
  * In the backward the dlogits are rounded to the input dtype before the gradient GEMMs (as
    eager bf16 training does); gradients are returned in the input dtype. When the vocabulary
    takes several chunks and this torch has no fp32-output bf16 GEMM (`out_dtype`), each chunk's
    contribution to dh is rounded to the input dtype once before the fp32 sum.
  * Targets outside [0, V) other than -100 raise ValueError on CPU tensors; on CUDA the check
    (a device sync) runs only with ENGINE_DEBUG=1, since it would sync every training forward.
  * The entropy term of the backward is skipped when no gradient reaches the entropy output.
  * Interpreter mode (TRITON_INTERPRET=1) is read once, when this module is imported.
  * The Triton path is the torch.library op engine_triton::linear_logprobs_fwd (fake kernel,
    autograd through engine_triton::linear_logprobs_bwd), so torch.compile does not graph-break
    on it; under compile the target range check is skipped (a data-dependent branch).
"""
import os
from typing import Optional

import torch
from torch import Tensor

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

# Decided once, at import (as Triton itself does when it decorates the kernels below).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

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
    if torch.compiler.is_compiling() or (targets.is_cuda and os.environ.get("ENGINE_DEBUG", "0") in ("", "0")):
        # The range check reads a flag back from the device: a host sync on every training
        # forward. On CUDA it runs only with ENGINE_DEBUG=1 (token ids come from the tokenizer);
        # a target out of range then gives a wrong logprob in the Triton kernels (they compare
        # column ids with it, never index by it) and a device-side assert in the torch paths.
        # Under torch.compile it is skipped too (a data-dependent branch breaks the graph).
        return targets
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
def _round_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. The interpreter truncates fp32 -> bf16, so under
    UPCAST the bits are rounded by hand first (the GPU cast already rounds)."""
    if UPCAST:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


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
def _tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """(row block, vocab tile) of this program: GROUP row blocks walk the vocabulary together,
    so each weight tile is read from HBM once per group and from L2 otherwise."""
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_N)
    n_vt = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * n_vt
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_rb - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _fwd_kernel(h_ptr,      # [N, D] hidden, input dtype
                w_ptr,      # [V, D] weight, input dtype
                tgt_ptr,    # [N] int64 targets (-100 = ignored)
                part_ptr,   # [4, S, N] fp32 out: per-split m, s, u, z_target (see _combine)
                N, V, D, stride_h, stride_w, inv_temp, TILES_PER_SPLIT,
                WITH_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online logsumexp of one row block over the vocabulary tiles of split program_id(1)."""
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)  # V*D or N*D can pass 2^31 at real sizes
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
    # finite start so that (m - m_new) * s is 0, not -inf * 0, on the first tile
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = split * TILES_PER_SPLIT * BLOCK_V
    v_hi = tl.minimum(V, v_lo + TILES_PER_SPLIT * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows64, cols.to(tl.int64), row_mask, col_mask, D,
                         stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K, PREC,
                         UPCAST) * inv_temp
        z = tl.where(col_mask[None, :], z, -1e30)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])   # exactly 0 on padded columns (z = -1e30)
        if WITH_ENT:
            # u tracks sum e^(z-m) (z-m) rather than sum e^(z-m) z: no cancellation when |z| >> H
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * (z - m_new[:, None]), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    base = part_ptr + split * N + rows
    stride = n_split * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride, s, mask=row_mask)
    tl.store(base + 2 * stride, u, mask=row_mask)
    tl.store(base + 3 * stride, zt, mask=row_mask)


@triton.jit
def _bwd_dz_kernel(h_ptr,     # [N, D] hidden
                   w_ptr,     # [V, D] weight (this launch's vocabulary chunk)
                   tgt_ptr,   # [N] int64 targets, already shifted to the chunk (may be < 0)
                   lse_ptr,   # [N] fp32 from forward
                   ent_ptr,   # [N] fp32 from forward (read if HAS_ENT)
                   glp_ptr,   # [N] fp32 upstream grad of logp (0 on ignored rows)
                   gent_ptr,  # [N] fp32 upstream grad of entropy (0 on ignored rows; if HAS_ENT)
                   dz_ptr,    # [N, V] out, input dtype, row stride stride_dz: dL/d(h @ w.T)
                   N, V, D, stride_h, stride_w, stride_dz, inv_temp,
                   HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile of the raw-logit gradient, the logits recomputed once."""
    rb, vt = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP)
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows64, cols.to(tl.int64), row_mask, col_mask, D,
                     stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K, PREC, UPCAST) * inv_temp
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_ENT:
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        dz -= g_ent[:, None] * p * (logp + ent[:, None])
    dz = _round_to(dz * inv_temp, dz_ptr.dtype.element_ty, UPCAST)
    tl.store(dz_ptr + rows64[:, None] * stride_dz + cols[None, :], dz,
             mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- tile configs
# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) keyed by (kind, N bucket): kind "16" is
# bf16/fp16 (wgmma tiles on Hopper), "32" is fp32 (IEEE products, no tensor cores). Every entry
# is compiled for sm_90 by `python -m bench aot`, which checks shared memory and spills.
FWD_CONFIGS = {
    ("16", "small"): (64, 128, 64, 4, 4),     # N <= 512: short row blocks, the split-V grid fills SMs
    ("16", "large"): (128, 128, 64, 8, 3),
    ("32", "small"): (32, 64, 32, 4, 2),
    ("32", "large"): (64, 64, 32, 4, 2),
}
BWD_CONFIGS = {                              # the dlogits kernel: a plain GEMM tile + epilogue
    ("16", "small"): (64, 128, 64, 4, 4),
    ("16", "large"): (128, 128, 64, 8, 3),
    ("32", "small"): (32, 64, 32, 4, 2),
    ("32", "large"): (64, 64, 32, 4, 2),
}
GROUP_ROWS = 8
DZ_BYTES = 128 << 20    # one chunk of the dlogits buffer [N, Vc] in the input dtype


def _interpreting():
    return INTERPRET


def config_key(n, dtype):
    return ("32" if dtype == torch.float32 else "16", "small" if n <= 512 else "large")


def tile_config(dtype, n=1 << 20, table=None):
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages, input_precision, upcast)."""
    prec = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    if _interpreting():
        # the CPU interpreter pays per op, not per element: few, large tiles run fastest
        upcast = dtype == torch.bfloat16
        return 16, 256, 128, 4, 1, "ieee" if upcast else prec, upcast
    cfg = (table or FWD_CONFIGS)[config_key(n, dtype)]
    return (*cfg, prec, False)


def num_splits(n, v, bn, bv, device, splits=None):
    """Vocabulary splits of the forward grid: enough programs to fill the SMs about twice."""
    tiles = triton.cdiv(v, bv)
    if splits is None:
        if device.type != "cuda":
            return 1, tiles
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        blocks = triton.cdiv(n, bn)
        splits = 1 if blocks >= sms else triton.cdiv(2 * sms, blocks)
    per = triton.cdiv(tiles, max(1, min(int(splits), tiles)))
    return triton.cdiv(tiles, per), per


def _combine(part, with_ent):
    """Merge per-split (m, s, u, z_t) [S, N] into (lse, z_t, entropy-or-None) [N].
    With one split this is exact (weights e^0 = 1)."""
    m, s, u, zt = part.unbind(0)
    mx = m.amax(0)
    wgt = torch.exp(m - mx)
    tot = (wgt * s).sum(0)
    lse = mx + torch.log(tot)
    ent = None
    if with_ent:
        ent = torch.log(tot) - (wgt * (u + (m - mx) * s)).sum(0) / tot
    return lse, zt.sum(0), ent


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


def chunk_cols_for(n, v, elt, chunk_cols=None, align=256):
    """Vocabulary columns per backward chunk so that the [N, Vc] dlogits buffer is ~DZ_BYTES."""
    if chunk_cols is None:
        chunk_cols = DZ_BYTES // max(1, n * elt)
    return min(v, max(align, (int(chunk_cols) // align) * align)) if v > align else v


def _mm_acc(acc, a, b, first):
    """acc (fp32) (+)= a @ b with fp32 accumulation (no intermediate rounding where possible)."""
    if acc.dtype == a.dtype:
        return torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    if a.is_cuda:
        try:
            return (torch.mm(a, b, out_dtype=torch.float32, out=acc) if first
                    else torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc))
        except (TypeError, RuntimeError):
            pass
    r = torch.mm(a, b)                       # fallback: one rounding to the input dtype per chunk
    return acc.copy_(r) if first else acc.add_(r)


def backward_gemms(launch_dz, hidden, weight, need_h, need_w, chunk_cols=None):
    """dh = dz @ W and dW = dz.T @ h with dz [N, V] produced chunk by chunk over the vocabulary
    by `launch_dz(dz_buffer_view, c0, c1)`: each dW row block is written once (one GEMM over all
    N rows), dh accumulates over chunks in fp32 (N x d, small next to V x d)."""
    n, d = hidden.shape
    v = weight.shape[0]
    cc = chunk_cols_for(n, v, hidden.element_size(), chunk_cols)
    pad = triton.cdiv(cc, 64) * 64           # 128-byte aligned rows for cuBLAS
    # zeros, not empty: the columns past a chunk's width are never written, and the CPU bf16 GEMM
    # reads them (its K blocking runs past the view into the row padding): uninitialised NaNs
    # there turned 16-row blocks of dh into NaN (0 * NaN), depending on what memory held before
    buf = torch.zeros(n, pad, device=hidden.device, dtype=hidden.dtype)
    dh = torch.empty(n, d, device=hidden.device, dtype=torch.float32) if need_h else None
    dw = torch.empty(v, d, device=hidden.device, dtype=hidden.dtype) if need_w else None
    for c0 in range(0, v, cc):
        c1 = min(v, c0 + cc)
        dz = buf[:, : c1 - c0]
        launch_dz(dz, c0, c1)
        if need_h:
            _mm_acc(dh, dz, weight[c0:c1], c0 == 0)
        if need_w:
            torch.mm(dz.T, hidden, out=dw[c0:c1])
    return (dh.to(hidden.dtype) if need_h else None), dw


def _triton_fwd(hidden, weight, targets, temperature, with_ent, splits):
    """-> (logp [N], entropy [N] or [0], lse [N]) fp32."""
    n, d = hidden.shape
    v = weight.shape[0]
    bn, bv, bk, warps, stages, prec, upcast = tile_config(hidden.dtype, n)
    n_split, per = num_splits(n, v, bn, bv, hidden.device, splits)
    part = torch.empty(4, n_split, n, device=hidden.device, dtype=torch.float32)
    if n > 0:
        _fwd_kernel[(triton.cdiv(n, bn), n_split)](
            hidden, weight, targets, part, n, v, d, hidden.stride(0), weight.stride(0),
            1.0 / temperature, per, WITH_ENT=with_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
            PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=stages)
    lse, zt, ent = _combine(part, with_ent)
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, zt - lse, 0.0)
    ent = torch.where(valid, ent, 0.0) if with_ent else torch.empty(0, device=hidden.device)
    return logp, ent, lse


def _triton_bwd(g_logp, g_ent, hidden, weight, targets, lse, ent, temperature, with_ent,
                need_h, need_w, chunk_cols):
    """(dh or None, dW or None) for upstream gradients g_logp / g_ent (either may be None)."""
    n, d = hidden.shape
    valid = targets != IGNORE_INDEX
    g_lp = _grads_in(g_logp, lse, valid)
    if g_lp is None:
        g_lp = torch.zeros_like(lse)
    has_ent = with_ent and g_ent is not None
    g_en = _grads_in(g_ent, lse, valid) if has_ent else g_lp
    ent_arg = ent if has_ent else lse
    bn, bv, bk, warps, stages, prec, upcast = tile_config(hidden.dtype, n, BWD_CONFIGS)
    inv_temp = 1.0 / temperature

    def launch_dz(dz, c0, c1):
        grid = (triton.cdiv(n, bn) * triton.cdiv(c1 - c0, bv),)
        _bwd_dz_kernel[grid](hidden, weight[c0:], targets - c0, lse, ent_arg, g_lp, g_en, dz,
                             n, c1 - c0, d, hidden.stride(0), weight.stride(0), dz.stride(0),
                             inv_temp, HAS_ENT=has_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
                             GROUP=GROUP_ROWS, PREC=prec, UPCAST=upcast, num_warps=warps,
                             num_stages=stages)

    return backward_gemms(launch_dz, hidden, weight, need_h, need_w, chunk_cols)


# The Triton path is a torch.library op (fake kernel, autograd through the backward op), in
# eager mode as under torch.compile, where Dynamo then sees one opaque op instead of tracing the
# launcher. (Attention keeps an autograd.Function for eager calls: it runs once per decode step,
# where the dispatcher's overhead would show; this op runs once per training forward.)

@torch.library.custom_op("engine_triton::linear_logprobs_fwd", mutates_args=())
def _lp_fwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
               with_ent: bool, splits: Optional[int], chunk_cols: Optional[int]
               ) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_fwd(hidden.contiguous(), weight.contiguous(), targets, temperature, with_ent,
                       splits)


@_lp_fwd_op.register_fake
def _(hidden, weight, targets, temperature, with_ent, splits, chunk_cols):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n, **f32), hidden.new_empty(n if with_ent else 0, **f32), hidden.new_empty(n, **f32)


@torch.library.custom_op("engine_triton::linear_logprobs_bwd", mutates_args=())
def _lp_bwd_op(g_logp: Optional[Tensor], g_ent: Optional[Tensor], hidden: Tensor, weight: Tensor,
               targets: Tensor, lse: Tensor, ent: Tensor, temperature: float, with_ent: bool,
               need_h: bool, need_w: bool, chunk_cols: Optional[int]) -> tuple[Tensor, Tensor]:
    dh, dw = _triton_bwd(g_logp, g_ent, hidden.contiguous(), weight.contiguous(), targets, lse,
                         ent, temperature, with_ent, need_h, need_w, chunk_cols)
    return (dh if need_h else hidden.new_empty(0)), (dw if need_w else weight.new_empty(0))


@_lp_bwd_op.register_fake
def _(g_logp, g_ent, hidden, weight, targets, lse, ent, temperature, with_ent, need_h, need_w,
      chunk_cols):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0)), \
        (torch.empty_like(weight) if need_w else weight.new_empty(0))


def _lp_setup(ctx, inputs, output):
    hidden, weight, targets, temperature, with_ent, _, chunk_cols = inputs
    logp, ent, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, ent)
    ctx.temperature, ctx.with_ent, ctx.chunk_cols = temperature, with_ent, chunk_cols
    ctx.mark_non_differentiable(lse)
    if not with_ent:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)


def _lp_backward(ctx, g_logp, g_ent, _g_lse):
    hidden, weight, targets, lse, ent = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    none = (None,) * 5
    if g_logp is None and g_ent is None or not (need_h or need_w):
        return None, None, *none
    if hidden.shape[0] == 0:
        return (torch.zeros_like(hidden) if need_h else None), (torch.zeros_like(weight) if need_w else None), *none
    dh, dw = torch.ops.engine_triton.linear_logprobs_bwd(
        g_logp, g_ent if ctx.with_ent else None, hidden, weight, targets, lse, ent,
        ctx.temperature, ctx.with_ent, need_h, need_w, ctx.chunk_cols)
    return (dh if need_h else None), (dw if need_w else None), *none


_lp_fwd_op.register_autograd(_lp_backward, setup_context=_lp_setup)


def linear_logprobs_triton(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                           splits=None, chunk_cols=None):
    """Triton version of `linear_logprobs_ref` (same contract), never materializing [N, V].

    `splits` forces the number of vocabulary splits of the forward grid and `chunk_cols` the
    vocabulary chunk of the backward (tests use both; the defaults size them to the GPU).
    """
    targets = check_inputs(hidden, weight, targets, temperature)
    require_triton(hidden)
    logp, ent, _ = torch.ops.engine_triton.linear_logprobs_fwd(
        hidden, weight, targets.contiguous(), float(temperature), bool(return_entropy), splits,
        chunk_cols)
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
