"""Causal / banded / left-padded / document-masked scaled dot-product attention: Triton forward
and backward (kernels in attention_fwd.py / attention_bwd.py), an SDPA path, and a plain PyTorch
reference.

Formula. q [B,H,Tq,D], k and v [B,H,Tk,D], Tq <= Tk, s = scale (default 1/sqrt(D)).
Query row i sits at absolute position p_i = Tk - Tq + i (bottom-right aligned: prefill is
Tq == Tk, decode against a KV cache is Tq = 1 with Tk = cache length). Key j is visible to
query i iff

    (not causal or j <= p_i)  and  (window is None or j > p_i - window)
                              and  (kv_start is None or j >= kv_start[b])
                              and  (segment_ids is None or run(b, j) == run(b, p_i))
                              and  (branch_ids is None or branch_ids[b, j] in (0, branch_ids[b, p_i]))

where run(b, t) is the segment holding position t: a maximal run of equal segment_ids[b, :]
(so the same id in two separate runs is two segments; `segment_bounds` gives each position's
[start, end)). branch_ids (torch and reference paths only; needs segment_ids, Tq == Tk) make
each segment a tree: its branch-0 tokens are a shared prefix that every later token of the
segment sees, and a token of branch k >= 1 sees that prefix and its own branch only (the K
completions of one prompt packed behind a single copy of the prompt). Then

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
                      tile by tile, one program per key block writing dK, dV and adding dQ
                      with fp32 atomics (5 GEMMs per tile pair). Under
                      torch.use_deterministic_algorithms(True), and for decode shapes, dQ has
                      its own pass instead (7 GEMMs, no atomics, bit-identical reruns).
    attention_torch   torch SDPA with an explicit boolean mask (block-diagonal for segments;
                      is_causal=True when possible); bf16/fp16 CPU tensors run in fp32.
    attention_sdpa    SDPA restricted to its flash / cuDNN backends (dense calls only).
    choose_backend    on CUDA under ENGINE_KERNELS=auto: dense calls go to the faster of ours
                      and attention_sdpa for their shape (timed once, logged); kernels.attention
                      uses it, kernels.attention_backend reports it.

Kernel notes: scores use base 2 (exp2 with s * log2(e) folded into one multiplier) and the
saved logsumexp is in the same base. Key tiles that the mask hides entirely are not visited:
the loop bounds come from the causal / window / kv_start / segment limits of the block (a
tile wholly in another document is skipped); tiles that are fully visible run without the
per-element mask. Forward and dQ grids run the longest query blocks first. D is padded to a
power of two (>= 16) inside the kernel with masked loads, so D = 80 or 96 works. Any Tq, Tk
(boundary masks); q, k, v, dO may be strided views (k/v slices of a larger static cache).
Tiles come from FWD_CONFIGS / DKDV_CONFIGS / DQ_CONFIGS keyed by (D_PAD, dtype kind, mask
kind, Tq bucket); `python -m bench aot` compiles every entry for sm_90 and checks that none
exceeds shared memory and that no 16-bit training entry spills registers.

Caution:
  * fp32 inputs use IEEE fp32 dot products (no TF32, no tensor cores) and their tiles spill
    registers on sm_90 (reported by bench aot): correct but slow.
  * Decode shapes (Tq <= 16) run one 16-row query block per head (mma.sync, not wgmma); their
    backward is correct but not tuned. D = 256 backward uses small mma.sync tiles.
  * The default (atomic) dQ differs between GPU reruns in the last bits; set
    torch.use_deterministic_algorithms(True) for bitwise reproducibility.
  * Under TRITON_INTERPRET=1 (CPU) bf16 tiles are multiplied in fp32 and fp32 -> bf16 casts are
    rounded to nearest even by hand, because the interpreter gets both wrong; fp16 and fp32 need
    no emulation.
  * The tile tables target H100/H200; other GPUs may need smaller tiles (shared memory).
  * window must be >= 1; a non-causal window limits only the past (j > p_i - window).
  * kv_start values outside [0, Tk] are clamped by the masks naturally (rows simply see fewer
    keys); they are not validated on the device. segment_ids must be [B, Tk] integers.
  * The first dense call of each shape on CUDA (auto mode) runs both implementations a few
    times to time them; no timing happens during CUDA-graph capture or torch.compile tracing.
  * Under torch.compile attention_triton is the torch.library op engine_triton::attention_fwd
    (fake kernel; backward engine_triton::attention_bwd), so Dynamo does not graph-break on it.
    attention_torch never reads a tensor on the host (no sync, no graph break): with left
    padding it always applies the empty-row fix instead of testing for empty rows.
"""
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_delta
from .attention_fwd import _attn_fwd

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers

def _check(q, k, v, window, kv_start, segment_ids=None, branch_ids=None):
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
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != (B, k.shape[2]):
            raise ValueError(f"segment_ids must be an int tensor [B={B}, Tk={k.shape[2]}], got "
                             f"{tuple(getattr(segment_ids, 'shape', ()))}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be integer, got {segment_ids.dtype}")
    if branch_ids is not None:
        if segment_ids is None or Tq != k.shape[2] or kv_start is not None:
            raise ValueError("branch_ids need segment_ids, Tq == Tk and no kv_start (packed prefill-free rows)")
        if not isinstance(branch_ids, torch.Tensor) or branch_ids.shape != segment_ids.shape:
            raise ValueError(f"branch_ids must be an int tensor shaped like segment_ids {tuple(segment_ids.shape)}, "
                             f"got {tuple(getattr(branch_ids, 'shape', ()))}")


def segment_bounds(segment_ids):
    """[B, T] ids -> int32 [B, 2, T]: (first position, one past the last) of the segment holding
    each position. A segment is a maximal run of equal ids, so the same id in two separate runs
    is two segments."""
    seg = segment_ids.long()
    B, T = seg.shape
    if T == 0:
        return torch.zeros(B, 2, 0, dtype=torch.int32, device=seg.device)
    t = torch.arange(T, device=seg.device).expand(B, T)
    new = torch.ones_like(seg, dtype=torch.bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = torch.where(new, t, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, t + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([start, end], 1).to(torch.int32).contiguous()


def segment_positions(segment_ids, branch_ids=None):
    """Position of each token inside its segment (restarts at 0 at every segment start). With
    branch_ids: a branch's tokens continue from the end of its segment's prefix (branch 0), so
    each branch sits where it would in prefix + branch alone."""
    lo = segment_bounds(segment_ids)[:, 0].long()
    t = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    if branch_ids is None:
        return t - lo
    br = branch_ids.long()
    # runs of equal (segment, branch): a branch's first token starts a run
    run_lo = segment_bounds((segment_ids.long() << 24) + br)[:, 0].long()  # no host sync (ids < 2**24)
    prefix = ((br == 0) & (segment_ids != 0)).long()
    before = prefix.cumsum(1) - prefix            # prefix tokens before each position in its row
    prefix_len = before.gather(1, run_lo) - before.gather(1, lo)  # ... from its segment's start up to its run
    return t - run_lo + torch.where(br > 0, prefix_len, 0)


def attention_mask(Tq, Tk, *, causal=True, window=None, kv_start=None, segment_ids=None,
                   device=None, branch_ids=None):
    """Boolean visibility mask, True = key visible: [1, 1, Tq, Tk], or [B, 1, Tq, Tk] with
    kv_start / segment_ids (/ branch_ids)."""
    pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]      # [Tq, 1] absolute query positions
    j = torch.arange(Tk, device=device)[None, :]                 # [1, Tk]
    m = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        m &= j <= pos
    if window is not None and branch_ids is None:
        m &= j > pos - window
    m = m[None, None]
    if kv_start is not None:
        m = m & (j[None, None] >= kv_start.to(device).view(-1, 1, 1, 1))
    if segment_ids is not None:
        run = segment_bounds(segment_ids.to(device))[:, 0]        # [B, Tk] segment start
        m = m & (run[:, None, Tk - Tq:, None] == run[:, None, None, :])
    if branch_ids is not None:
        br = branch_ids.to(device)
        m = m & ((br[:, None, None, :] == 0) | (br[:, None, Tk - Tq:, None] == br[:, None, None, :]))
        if window is not None:  # the band is in token positions, which a tree's columns are not
            p = segment_positions(segment_ids.to(device), br)
            m = m & (p[:, None, Tk - Tq:, None] - p[:, None, None, :] < window)
    return m


def attention_ref(q, k, v, *, causal=True, window=None, scale=None, kv_start=None,
                  segment_ids=None, branch_ids=None):
    """Dense reference: fp32 math (fp64 for fp64 inputs), result in q.dtype."""
    _check(q, k, v, window, kv_start, segment_ids, branch_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, window=window,
                          kv_start=kv_start, segment_ids=segment_ids, device=q.device, branch_ids=branch_ids)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    # rows with no visible key: softmax would be 0/0; give them an all-zero probability row
    p = torch.softmax(s.masked_fill(~mask.any(-1, keepdim=True), 0.0), dim=-1) * mask
    return torch.matmul(p, v.to(ct)).to(q.dtype)


def attention_torch(q, k, v, *, causal=True, window=None, scale=None, kv_start=None,
                    segment_ids=None, branch_ids=None):
    """torch SDPA with an explicit boolean mask (block-diagonal for segment_ids, a tree within
    each segment with branch_ids); rows that see no key return 0 (and get 0 grad)."""
    _check(q, k, v, window, kv_start, segment_ids, branch_ids)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU SDPA kernels in bf16/fp16 lose up to ~4x more than dense low-precision
        # math on large dV entries (measured at T=97, D=64); fp32 costs little on CPU.
        out = attention_torch(q.float(), k.float(), v.float(), causal=causal, window=window,
                              scale=scale, kv_start=kv_start, segment_ids=segment_ids, branch_ids=branch_ids)
        return out.to(q.dtype)
    Tq, Tk = q.shape[2], k.shape[2]
    if window is None and kv_start is None and segment_ids is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = attention_mask(Tq, Tk, causal=causal, window=window, kv_start=kv_start,
                          segment_ids=segment_ids, device=q.device, branch_ids=branch_ids)
    if kv_start is None and Tq == Tk:
        # every query sees at least itself (its own position, inside its own segment)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Left-padded queries can see no key. SDPA backends disagree on empty rows (NaN or 0); let
    # such rows see key 0, then zero them. Multiplying by 0 also sends a zero upstream gradient
    # into SDPA for those rows, so their dQ is exactly 0 and they add nothing to dK, dV. Done
    # without testing whether any row is empty: that test is a host sync (and a torch.compile
    # graph break) on every call.
    has_key = mask.any(-1, keepdim=True)                         # [*, 1, Tq, 1]
    j0 = torch.arange(Tk, device=q.device) == 0
    mask = mask | (~has_key & j0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * has_key.to(out.dtype)


# ----------------------------------------------------------------------------- tile configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) keyed by (D_PAD, kind, mask, Tq bucket):
# kind "16" = bf16/fp16, "32" = fp32 (IEEE products); mask "causal" (also with segments or left
# padding), "band" (window) or "full"; bucket "decode" (Tq <= 16) or "train". Every entry is
# compiled for sm_90 by `python -m bench aot` (shared memory <= 227 KB; 16-bit training entries
# must not spill). Lookup falls back from a missing mask kind to "causal".

def _table(fn):
    return {(d, kind, mask, bucket): fn(d, kind, mask, bucket)
            for d in (16, 32, 64, 128, 256) for kind in ("16", "32")
            for mask in ("causal", "band", "full") for bucket in ("decode", "train")}


def _fwd_entry(d, kind, mask, bucket):
    if bucket == "decode":            # one 16-row query block, long key loop: no wgmma (M < 64)
        return (16, 128 if d <= 64 else 64, 4, 3) if kind == "16" else (16, 64 if d <= 64 else 32, 4, 2)
    if kind == "32":                  # fp32 tiles are twice the bytes and use no tensor cores
        return (64, 32, 4, 2) if d <= 64 else (32, 32, 4, 2) if d <= 128 else (16, 32, 4, 2)
    if d <= 64:
        return (128, 64 if mask == "band" else 128, 8, 3)
    if d <= 128:
        return (128, 64, 8, 2 if mask == "band" else 3)
    return (64, 32, 8, 2)


def _dkdv_entry(d, kind, mask, bucket):
    """dK/dV (+ atomic dQ) pass: key block BLOCK_N, query tiles BLOCK_M."""
    if kind == "32":
        return (16, 32, 4, 2) if d > 64 else (32, 32, 4, 2)
    if d <= 64:
        return (32, 128, 8, 3)
    if d <= 128:
        return (32, 64, 8, 2)
    return (16, 32, 8, 2)              # D = 256: mma.sync tiles; larger ones spill


def _dq_entry(d, kind, mask, bucket):
    """Deterministic dQ pass: query block BLOCK_M, key tiles BLOCK_N."""
    if bucket == "decode":
        return _fwd_entry(d, kind, mask, bucket)
    if kind == "32":
        return (32, 32, 4, 2) if d <= 64 else (16, 32, 4, 2)
    if d <= 64:
        return (128, 64, 8, 3)
    if d <= 128:
        return (128, 32, 8, 3)
    return (64, 32, 8, 2)


FWD_CONFIGS = _table(_fwd_entry)
DKDV_CONFIGS = _table(_dkdv_entry)
DQ_CONFIGS = _table(_dq_entry)
INTERPRETER_CONFIG = (16, 16, 1, 1)   # the interpreter's cost grows with tile area


def _interpreted():
    return type(_attn_fwd).__name__ == "InterpretedFunction"


def config_key(Tq, D_PAD, dtype, causal, window):
    mask = "band" if window is not None else "causal" if causal else "full"
    return (D_PAD, "32" if dtype == torch.float32 else "16", mask, "decode" if Tq <= 16 else "train")


def _config(table, Tq, D_PAD, dtype, causal, window):
    if _interpreted():
        return INTERPRETER_CONFIG
    key = config_key(Tq, D_PAD, dtype, causal, window)
    return table.get(key) or table[(key[0], key[1], "causal", key[3])]


# ----------------------------------------------------------------------------- launchers

def _common(q, k, window, scale, kv_start, segment_ids):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    D_PAD = max(16, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kv0 = (kv_start.to(device=q.device, dtype=torch.int32).contiguous() if kv_start is not None
           else torch.zeros(1, dtype=torch.int32, device=q.device))
    seg = (segment_bounds(segment_ids.to(q.device)) if segment_ids is not None
           else torch.zeros(1, dtype=torch.int32, device=q.device))
    # fp32 inputs: IEEE products (TF32 would miss a 1e-4 fp32 tolerance); bf16/fp16 ignore it
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if q.dtype == torch.bfloat16 and _interpreted():
        prec = "upcast"
    flags = dict(CAUSAL=None, HAS_WINDOW=window is not None, HAS_KV0=kv_start is not None,
                 HAS_SEG=segment_ids is not None, D_PAD=D_PAD, PREC=prec)
    return B, H, Tq, Tk, D, D_PAD, scale, kv0, seg, flags


def _forward(q, k, v, causal, window, scale, kv_start, segment_ids):
    B, H, Tq, Tk, D, D_PAD, scale, kv0, seg, flags = _common(q, k, window, scale, kv_start,
                                                             segment_ids)
    flags["CAUSAL"] = bool(causal)
    o = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, Tq, dtype=torch.float32, device=q.device)
    BM, BN, warps, stages = _config(FWD_CONFIGS, Tq, D_PAD, q.dtype, causal, window)
    _attn_fwd[(B * H, triton.cdiv(Tq, BM))](
        q, k, v, o, lse, kv0, seg, *q.stride(), *k.stride(), *v.stride(),
        H, Tq, Tk, D, int(window or 0), scale * _LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages, **flags)
    return o, lse


def _deterministic_dq(q):
    """dQ by its own pass (7 GEMMs, bit-identical reruns) instead of atomics (5 GEMMs): under
    torch.use_deterministic_algorithms(True), and for decode shapes (one query block)."""
    return torch.are_deterministic_algorithms_enabled() or q.shape[2] <= 16


def _backward(do, q, k, v, o, lse, causal, window, scale, kv_start, segment_ids):
    B, H, Tq, Tk, D, D_PAD, scale, kv0, seg, flags = _common(q, k, window, scale, kv_start,
                                                             segment_ids)
    flags["CAUSAL"] = bool(causal)
    delta = torch.empty_like(lse)
    BMd = 64 if not _interpreted() else 16
    _bwd_delta[(triton.cdiv(Tq, BMd), B * H)](o, do, delta, *do.stride(), H, Tq, D,
                                              BLOCK_M=BMd, D_PAD=D_PAD)
    dk = torch.empty(B, H, Tk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, Tk, D, dtype=v.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    common = (H, Tq, Tk, D, int(window or 0), scale * _LOG2E, scale)
    atomic = not _deterministic_dq(q)
    dq = (torch.zeros(B, H, Tq, D, dtype=torch.float32, device=q.device) if atomic
          else torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device))
    BM1, BN1, warps1, stages1 = _config(DKDV_CONFIGS, Tq, D_PAD, q.dtype, causal, window)
    _attn_bwd_dkdv[(triton.cdiv(Tk, BN1), B * H)](
        q, k, v, do, lse, delta, dk, dv, dq, kv0, seg, *strides, *common,
        DQ_ATOMIC=atomic, BLOCK_M=BM1, BLOCK_N=BN1, num_warps=warps1, num_stages=stages1, **flags)
    if atomic:
        return dq.to(q.dtype), dk, dv
    BM2, BN2, warps2, stages2 = _config(DQ_CONFIGS, Tq, D_PAD, q.dtype, causal, window)
    _attn_bwd_dq[(B * H, triton.cdiv(Tq, BM2))](
        q, k, v, do, lse, delta, dq, kv0, seg, *strides, *common,
        BLOCK_M=BM2, BLOCK_N=BN2, num_warps=warps2, num_stages=stages2, **flags)
    return dq, dk, dv


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, kv_start, segment_ids):
        o, lse = _forward(q, k, v, causal, window, scale, kv_start, segment_ids)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, segment_ids)
        ctx.args = (causal, window, scale)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kv_start, segment_ids = ctx.saved_tensors
        causal, window, scale = ctx.args
        dq, dk, dv = _backward(do, q, k, v, o, lse, causal, window, scale, kv_start, segment_ids)
        return dq, dk, dv, None, None, None, None, None


# torch.library ops for torch.compile: Dynamo sees one opaque op with a fake (shape-only) kernel,
# so it neither graph-breaks on the launcher nor traces its host-side tile lookup. Eager calls
# keep _AttentionFn (no dispatcher overhead on each decode step); both run _forward/_backward.

@torch.library.custom_op("engine_triton::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: Optional[int],
                      scale: Optional[float], kv_start: Optional[Tensor],
                      segment_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, causal, window, scale, kv_start, segment_ids)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, window, scale, kv_start, segment_ids):
    B, H, Tq, D = q.shape
    return q.new_empty(B, H, Tq, D), q.new_empty(B * H, Tq, dtype=torch.float32)


@torch.library.custom_op("engine_triton::attention_bwd", mutates_args=())
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      causal: bool, window: Optional[int], scale: Optional[float],
                      kv_start: Optional[Tensor], segment_ids: Optional[Tensor]
                      ) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, o, lse, causal, window, scale, kv_start, segment_ids)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, window, scale, kv_start, segment_ids):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_op_setup(ctx, inputs, output):
    q, k, v, causal, window, scale, kv_start, segment_ids = inputs
    ctx.save_for_backward(q, k, v, *output, kv_start, segment_ids)
    ctx.args = (causal, window, scale)
    ctx.mark_non_differentiable(output[1])


def _attention_op_backward(ctx, do, _dlse):
    q, k, v, o, lse, kv_start, segment_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.engine_triton.attention_bwd(do.contiguous(), q, k, v, o, lse, *ctx.args,
                                                       kv_start, segment_ids)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd_op.register_autograd(_attention_op_backward, setup_context=_attention_op_setup)


def attention_triton(q, k, v, *, causal=True, window=None, scale=None, kv_start=None,
                     segment_ids=None):
    """Flash attention (Triton) forward + backward; see the module docstring for the formula.
    Under torch.compile the call is the torch.library op engine_triton::attention_fwd."""
    _check(q, k, v, window, kv_start, segment_ids)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if torch.compiler.is_compiling():
        return torch.ops.engine_triton.attention_fwd(
            q, k, v, bool(causal), None if window is None else int(window),
            None if scale is None else float(scale), kv_start, segment_ids)[0]
    return _AttentionFn.apply(q, k, v, causal, window, scale, kv_start, segment_ids)


# ----------------------------------------------------------------------------- backend choice
# On CUDA, dense attention without window, left padding or segments (plain causal prefill or
# non-causal) is the one case where torch SDPA's flash / cuDNN kernels may beat ours; for those
# calls the first use of each shape times both (forward, plus backward when grads are needed)
# and remembers the faster. Banded layers, left padding, segments and decode always use ours.
_CHOICES: dict = {}
_log = logging.getLogger("kernels.attention")


def sdpa_eligible(q, k, *, causal=True, window=None, kv_start=None, segment_ids=None):
    """True if torch SDPA's flash / cuDNN backends compute this call exactly as ours would."""
    return (q.is_cuda and window is None and kv_start is None and segment_ids is None
            and (not causal or q.shape[2] == k.shape[2]) and q.shape[2] > 16
            and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def _sdpa_fast(q, k, v, causal, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _time_ms(fn, q, k, v, grad, reps=3):
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))

    def once():
        o = fn(q, k, v)
        if grad:
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    once()                                           # compile / warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        once()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def choose_backend(q, k, v, *, causal=True, window=None, scale=None, kv_start=None,
                   segment_ids=None):
    """'triton' or 'sdpa' for a CUDA call under ENGINE_KERNELS=auto (see the comment above);
    the first choice for each case is logged at INFO level by the "kernels.attention" logger."""
    if not sdpa_eligible(q, k, causal=causal, window=window, kv_start=kv_start,
                         segment_ids=segment_ids):
        return "triton"
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    B, H, Tq, D = q.shape
    key = (triton.next_power_of_2(B * H), Tq, k.shape[2], D, q.dtype, bool(causal), grad,
           q.device.index)
    got = _CHOICES.get(key)
    if got is not None:
        return got
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return "triton"                              # no timing inside graphs; do not cache
    try:
        t_ours = _time_ms(lambda a, b, c: attention_triton(a, b, c, causal=causal, scale=scale),
                          q, k, v, grad)
        t_sdpa = _time_ms(lambda a, b, c: _sdpa_fast(a, b, c, causal, scale), q, k, v, grad)
    except RuntimeError as e:                        # e.g. no flash / cuDNN kernel for this GPU
        _log.info("attention %s: SDPA flash/cuDNN unavailable (%s); using triton", key, e)
        _CHOICES[key] = "triton"
        return "triton"
    got = "sdpa" if t_sdpa < t_ours else "triton"
    _CHOICES[key] = got
    _log.info("attention B*H~%d Tq=%d Tk=%d D=%d %s causal=%s grad=%s: %s (triton %.3f ms, "
              "sdpa %.3f ms)", key[0], Tq, k.shape[2], D, str(q.dtype).replace("torch.", ""),
              causal, grad, got, t_ours, t_sdpa)
    return got


def attention_sdpa(q, k, v, *, causal=True, window=None, scale=None, kv_start=None,
                   segment_ids=None):
    """The 'sdpa' choice: torch SDPA restricted to its flash / cuDNN backends (eligible calls)."""
    assert window is None and kv_start is None and segment_ids is None
    return _sdpa_fast(q, k, v, causal, scale)
