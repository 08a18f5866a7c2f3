"""Tests for kernels/attention.py: the reference against an independent per-row loop, the Triton
kernels (CPU interpreter here, compiled on CUDA) and the SDPA path against the fp32/fp64 oracle."""
import importlib

import pytest
import torch

import kernels

# tests/conftest.py turns on TRITON_INTERPRET=1 (before triton is imported) only without CUDA
A = importlib.import_module("kernels.attention")  # the module; `kernels.attention` is the function

DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(1)

# (Tq, Tk, causal, window, kv_start) -- kv_start rows use B = 2
CASES = [
    (1, 1, True, None, None),
    (17, 17, True, None, None),
    (97, 97, True, None, None),
    (97, 97, True, 8, None),
    (97, 97, False, None, None),
    (17, 17, False, 8, None),
    (33, 33, True, None, [0, 20]),          # rows 0..19 of batch 1 see no key
    (1, 33, True, None, [3, 30]),           # decode against a cache, ragged left padding
    (5, 33, True, 8, [0, 31]),              # short chunk, window and padding
    (1, 33, True, None, [0, 33]),           # batch 1: the whole cache is padding
]
IDS = [f"Tq{c[0]}-Tk{c[1]}-{'causal' if c[2] else 'full'}-w{c[3]}-kv{c[4]}" for c in CASES]


def _inputs(B, H, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    return mk(B, H, Tq, D), mk(B, H, Tk, D), mk(B, H, Tk, D), mk(B, H, Tq, D)


def _fwd_bwd(fn, q, k, v, do, **kw):
    """(out, dq, dk, dv) of fn with upstream gradient do."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _naive_lowp(q, k, v, *, causal=True, window=None, scale=None, kv_start=None, mask_extra=None):
    """Dense attention computed entirely in the input dtype: what plain PyTorch gets in bf16/fp16."""
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    mask = A.attention_mask(q.shape[2], k.shape[2], causal=causal, window=window,
                            kv_start=kv_start, segment_ids=mask_extra, device=q.device)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.masked_fill(~mask.any(-1, keepdim=True), 0.0), dim=-1) * mask
    return p @ v


def _errors(got, lowp, ref, dtype):
    """(max error of got, bound) vs the fp32 oracle ref, flash-attn's rule:
    bound = 2 * (PyTorch's own error in dtype) + 2 * (ref_d + 0.3 - 0.3 - ref_d), where ref_d is
    ref rounded to dtype; the second term, evaluated in dtype, is the rounding granularity at the
    size of the entries, so one ulp on the largest entry never decides the test."""
    ref_d = ref.to(dtype)
    slack = 2 * (ref_d + 0.3 - 0.3 - ref_d).abs().max().item()
    err = (got.float() - ref).abs().max().item()
    return err, 2 * (lowp.float() - ref).abs().max().item() + slack


def _kv(kv, B):
    return None if kv is None else torch.tensor(kv, dtype=torch.int32, device=DEV)


# ----------------------------------------------------------------------------- the oracle itself

def test_ref_matches_per_row_loop():
    """attention_ref against the visibility rule written out one query row at a time."""
    B, H, Tq, Tk, D = 2, 2, 6, 11, 8
    q, k, v, _ = _inputs(B, H, Tq, Tk, D, torch.float64)
    kv = torch.tensor([0, 7], device=DEV)
    for causal, window in ((True, None), (True, 3), (False, None), (False, 2)):
        out = A.attention_ref(q, k, v, causal=causal, window=window, kv_start=kv, scale=0.3)
        for b in range(B):
            for i in range(Tq):
                p = Tk - Tq + i
                js = [j for j in range(Tk) if (not causal or j <= p)
                      and (window is None or j > p - window) and j >= int(kv[b])]
                if not js:
                    assert torch.equal(out[b, :, i], torch.zeros_like(out[b, :, i]))
                    continue
                w = torch.softmax(0.3 * q[b, :, i, None, :] @ k[b, :, js].transpose(-1, -2), -1)
                torch.testing.assert_close(out[b, :, i], (w @ v[b, :, js])[:, 0], rtol=0, atol=1e-12)


def test_invalid_arguments():
    q, k, v, _ = _inputs(1, 1, 4, 3, 16, torch.float32)
    for fn in (A.attention_ref, A.attention_torch, A.attention_triton):
        with pytest.raises(ValueError):
            fn(q, k, v)                                   # Tq > Tk
        with pytest.raises(ValueError):
            fn(k, k, v, window=0)


# ----------------------------------------------------------------------------- fp32 vs oracle

@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp32_matches_oracle(impl, case, D):
    Tq, Tk, causal, window, kv = case
    B, H = (2, 1) if kv is not None else (1, 1)
    fn = A.attention_triton if impl == "triton" else A.attention_torch
    kw = dict(causal=causal, window=window, kv_start=_kv(kv, B))
    q, k, v, do = _inputs(B, H, Tq, Tk, D, torch.float32, seed=Tq * 7 + D)
    got = _fwd_bwd(fn, q, k, v, do, **kw)
    ref = _fwd_bwd(A.attention_ref, *(t.double() for t in (q, k, v, do)), **kw)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("off", range(16))
def test_every_block_alignment(off):
    """Tk - Tq = off sweeps the query positions across a 16-wide tile grid, so the boundaries of
    the skipped / unmasked / masked tile ranges land on every residue (off-by-one guard)."""
    B, H, Tq, D = 1, 1, 33, 24
    Tk = Tq + off
    q, k, v, do = _inputs(B, H, Tq, Tk, D, torch.float32, seed=100 + off)
    kv = _kv([(5 * off) % 29 + 4], B)                    # often leaves early rows with no key
    for causal, window, kvs in ((True, None, None), (True, None, kv), (True, 5, None), (True, 21, kv),
                                (False, 6, None)):
        kw = dict(causal=causal, window=window, kv_start=kvs)
        got = _fwd_bwd(A.attention_triton, q, k, v, do, **kw)
        ref = _fwd_bwd(A.attention_ref, *(t.double() for t in (q, k, v, do)), **kw)
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4, msg=lambda m: f"{kw} {name}: {m}")


def test_custom_scale_and_unaligned_cache_views():
    """k/v are prefixes of a bigger static cache, q is a transposed [B,T,H,D] view, do has stride 0."""
    B, H, Tq, Tk, Tmax, D = 2, 2, 9, 21, 40, 80
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, B, H, Tmax, D, generator=g).to(DEV)
    k, v = cache[0, :, :, :Tk], cache[1, :, :, :Tk]
    q = torch.randn(B, Tq, H, D, generator=g).to(DEV).transpose(1, 2)
    do = torch.randn(1, 1, 1, D, generator=g).to(DEV).expand(B, H, Tq, D)
    assert not k.is_contiguous() and not q.is_contiguous()
    kw = dict(causal=True, window=12, scale=0.05, kv_start=_kv([2, 5], B))
    got = _fwd_bwd(A.attention_triton, q, k, v, do, **kw)
    ref = _fwd_bwd(A.attention_ref, q.double(), k.double(), v.double(), do.double(), **kw)
    for g_, r in zip(got, ref):
        torch.testing.assert_close(g_.double(), r, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", [(97, 97, True, None, None), (97, 97, True, 8, None),
                                  (17, 17, False, None, None), (1, 33, True, None, [3, 30]),
                                  (33, 33, True, None, [0, 20])], ids=lambda c: f"{c}")
def test_low_precision_within_2x_pytorch_error(impl, case, dtype):
    """Error vs the fp32 oracle <= 2x the error of plain PyTorch in the same dtype (+ rounding slack)."""
    Tq, Tk, causal, window, kv = case
    B, H, D = (2 if kv is not None else 1), 1, 64
    fn = A.attention_triton if impl == "triton" else A.attention_torch
    kw = dict(causal=causal, window=window, kv_start=_kv(kv, B))
    q, k, v, do = _inputs(B, H, Tq, Tk, D, dtype, seed=3)
    got = _fwd_bwd(fn, q, k, v, do, **kw)
    lowp = _fwd_bwd(_naive_lowp, q, k, v, do, **kw)
    ref = _fwd_bwd(A.attention_ref, *(t.float() for t in (q, k, v, do)), **kw)
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err, bound = _errors(g, lo, r, dtype)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype})"


# ----------------------------------------------------------------------------- masking details

@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fully_masked_rows_are_zero_with_zero_grad(impl):
    fn = A.attention_triton if impl == "triton" else A.attention_torch
    B, H, T, D = 2, 2, 23, 64
    q, k, v, do = _inputs(B, H, T, T, D, torch.float32, seed=5)
    kv = _kv([0, 10], B)                                  # batch 1: query rows 0..9 see nothing
    out, dq, dk, dv = _fwd_bwd(fn, q, k, v, do, causal=True, kv_start=kv)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert torch.equal(out[1, :, :10], torch.zeros_like(out[1, :, :10]))
    assert torch.equal(dq[1, :, :10], torch.zeros_like(dq[1, :, :10]))
    # padded keys get no gradient either (no visible query uses them)
    assert torch.equal(dk[1, :, :10], torch.zeros_like(dk[1, :, :10]))
    assert torch.equal(dv[1, :, :10], torch.zeros_like(dv[1, :, :10]))
    assert out[1, :, 10:].abs().sum() > 0 and dq[1, :, 10:].abs().sum() > 0


def test_decode_matches_prefill():
    """One-token decode against the cache equals the matching row of the full prefill."""
    B, H, T, D = 2, 2, 29, 80
    q, k, v, _ = _inputs(B, H, T, T, D, torch.float32, seed=6)
    kv = _kv([0, 11], B)
    for window in (None, 8):
        full = A.attention_triton(q, k, v, causal=True, window=window, kv_start=kv)
        for t in (11, 20, T):                             # cache length after writing token t-1
            step = A.attention_triton(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t],
                                      causal=True, window=window, kv_start=kv)
            torch.testing.assert_close(step, full[:, :, t - 1:t], rtol=0, atol=1e-5)


@pytest.mark.skipif(not A._interpreted(), reason="tile sizes are those of the CPU interpreter (16 x 16)")
@pytest.mark.filterwarnings("ignore:All-NaN slice")     # the interpreter's max over poisoned tiles
def test_hidden_tiles_are_not_visited():
    """Keys in tiles that a query block cannot see are never read: NaN poison there stays out.

    A visited tile would multiply a masked probability 0 by NaN and give NaN, so finite outputs
    prove that the loop bounds (not only the mask) skip the tile."""
    BM, BN = A.INTERPRETER_CONFIG[:2]
    assert (BM, BN) == (16, 16)
    B, H, T, D, W = 1, 1, 97, 64, 8
    q, k, v, do = _inputs(B, H, T, T, D, torch.float32, seed=7)
    cut = 4 * BN                                          # keys [0, cut) poisoned
    first_clean = -(-(cut + W) // BM) * BM                # first query block starting past the band
    kp, vp = k.clone(), v.clone()
    kp[:, :, :cut] = float("nan")
    vp[:, :, :cut] = float("nan")
    q, kp, vp = (t.requires_grad_(True) for t in (q, kp, vp))
    out = A.attention_triton(q, kp, vp, causal=True, window=W)
    dq, dk, dv = torch.autograd.grad(out, (q, kp, vp), do)
    ref = A.attention_ref(q.detach(), k, v, causal=True, window=W)
    assert first_clean < T
    torch.testing.assert_close(out[:, :, first_clean:], ref[:, :, first_clean:], rtol=0, atol=1e-5)
    assert torch.isfinite(dq[:, :, first_clean:]).all()
    assert torch.isfinite(dk[:, :, first_clean:]).all() and torch.isfinite(dv[:, :, first_clean:]).all()
    # causal: future key tiles are not read by earlier query blocks
    kf, vf = k.clone(), v.clone()
    kf[:, :, 3 * BN:] = float("nan")
    vf[:, :, 3 * BN:] = float("nan")
    got = _fwd_bwd(A.attention_triton, q.detach(), kf, vf, do, causal=True)
    rows = 3 * BN // BM * BM                              # query blocks ending at or before key 3*BN
    ref = A.attention_ref(q.detach(), k, v, causal=True)
    torch.testing.assert_close(got[0][:, :, :rows], ref[:, :, :rows], rtol=0, atol=1e-5)
    assert torch.isfinite(got[1][:, :, :rows]).all()
    # dK/dV pass: query rows far past a key block's band are not read either
    qp, dop = q.detach().clone(), do.clone()
    qp[:, :, 3 * BM:] = float("nan")
    dop[:, :, 3 * BM:] = float("nan")
    _, _, dk, dv = _fwd_bwd(A.attention_triton, qp, k, v, dop, causal=True, window=W)
    last_clean = (3 * BM - W) // BN * BN                  # key blocks ending before row 3*BM - W
    assert last_clean > 0
    assert torch.isfinite(dk[:, :, :last_clean]).all() and torch.isfinite(dv[:, :, :last_clean]).all()
    # left padding: whole padded key tiles are skipped in all three passes
    kvp, vvp = k.clone(), v.clone()
    kvp[:, :, :BN] = float("nan")
    vvp[:, :, :BN] = float("nan")
    got = _fwd_bwd(A.attention_triton, q.detach(), kvp, vvp, do, causal=True,
                   kv_start=torch.tensor([BN + 3], device=DEV))
    assert all(torch.isfinite(t).all() for t in got)
    assert torch.equal(got[2][:, :, :BN], torch.zeros_like(got[2][:, :, :BN]))


# ----------------------------------------------------------------------------- segment ids

def _seg(rows):
    return torch.tensor(rows, dtype=torch.int64, device=DEV)


def test_segment_bounds_and_positions():
    seg = _seg([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 7, 7, 7, 5, 5, 5, 9]])
    lo, hi = A.segment_bounds(seg).long().unbind(1)
    assert lo.tolist() == [[0, 0, 0, 3, 3, 5, 5, 5, 5], [0, 0, 2, 2, 2, 5, 5, 5, 8]]
    assert hi.tolist() == [[3, 3, 3, 5, 5, 9, 9, 9, 9], [2, 2, 5, 5, 5, 8, 8, 8, 9]]
    assert A.segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3],
                                                 [0, 1, 0, 1, 2, 0, 1, 2, 0]]


def test_ref_segments_match_per_row_loop():
    B, H, Tq, Tk, D = 2, 2, 7, 10, 8
    q, k, v, _ = _inputs(B, H, Tq, Tk, D, torch.float64)
    seg = _seg([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [3, 3, 4, 4, 3, 3, 3, 3, 3, 8]])
    lo = A.segment_bounds(seg)[:, 0]
    for causal, window in ((True, None), (True, 3), (False, None)):
        out = A.attention_ref(q, k, v, causal=causal, window=window, segment_ids=seg, scale=0.3)
        for b in range(B):
            for i in range(Tq):
                p = Tk - Tq + i
                js = [j for j in range(Tk) if (not causal or j <= p) and lo[b, j] == lo[b, p]
                      and (window is None or j > p - window)]
                w = torch.softmax(0.3 * q[b, :, i, None, :] @ k[b, :, js].transpose(-1, -2), -1)
                torch.testing.assert_close(out[b, :, i], (w @ v[b, :, js])[:, 0], rtol=0, atol=1e-12)


def _random_segments(B, T, seed, max_len=23):
    """Runs of random lengths (1..max_len); ids repeat across runs to test the run semantics."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        ids, cur = [], 0
        while len(ids) < T:
            n = int(torch.randint(1, max_len + 1, (1,), generator=g))
            ids += [cur % 3] * n
            cur += 1
        rows.append(ids[:T])
    return _seg(rows)


SEG_CASES = [  # (Tq, Tk, causal, window, kv_start, max segment length)
    (97, 97, True, None, None, 23),
    (97, 97, True, 8, None, 40),
    (64, 64, False, None, None, 16),     # segment boundaries on the 16-wide tile grid
    (45, 45, True, None, [0, 6], 20),
    (5, 40, True, None, None, 11),       # a short chunk against a longer cache
    (1, 33, True, 8, [3, 0], 9),          # decode
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-pass"])
@pytest.mark.parametrize("case", SEG_CASES, ids=[str(c) for c in SEG_CASES])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_segments_fp32_match_oracle(impl, case, deterministic):
    if impl == "torch" and deterministic:
        pytest.skip("one SDPA run is enough")
    Tq, Tk, causal, window, kv, max_len = case
    B, H, D = 2, 2, 24
    fn = A.attention_triton if impl == "triton" else A.attention_torch
    seg = _random_segments(B, Tk, seed=Tq + Tk, max_len=max_len)
    kw = dict(causal=causal, window=window, kv_start=_kv(kv, B), segment_ids=seg)
    q, k, v, do = _inputs(B, H, Tq, Tk, D, torch.float32, seed=Tq)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = _fwd_bwd(fn, q, k, v, do, **kw)
    finally:
        torch.use_deterministic_algorithms(prev)
    ref = _fwd_bwd(A.attention_ref, *(t.double() for t in (q, k, v, do)), **kw)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_packed_row_equals_documents_one_by_one(impl):
    """A packed row with segment ids gives each document exactly its own attention."""
    fn = A.attention_triton if impl == "triton" else A.attention_torch
    lens = [13, 1, 30, 20]
    T, H, D = sum(lens), 2, 32
    q, k, v, do = _inputs(1, H, T, T, D, torch.float32, seed=12)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].to(DEV)
    got = _fwd_bwd(fn, q, k, v, do, causal=True, segment_ids=seg)
    a = 0
    for n in lens:
        sl = slice(a, a + n)
        one = _fwd_bwd(fn, q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl], causal=True)
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, one):
            torch.testing.assert_close(g[:, :, sl], r, rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
        a += n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segments_low_precision_within_2x_pytorch_error(dtype):
    B, H, T, D = 2, 1, 97, 64
    seg = _random_segments(B, T, seed=4, max_len=30)
    kw = dict(causal=True, segment_ids=seg)
    q, k, v, do = _inputs(B, H, T, T, D, dtype, seed=13)
    got = _fwd_bwd(A.attention_triton, q, k, v, do, **kw)
    lowp = _fwd_bwd(lambda *a, segment_ids, **w: _naive_lowp(*a, **w, mask_extra=segment_ids),
                    q, k, v, do, **kw)
    ref = _fwd_bwd(A.attention_ref, *(t.float() for t in (q, k, v, do)), **kw)
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        err, bound = _errors(g, lo, r, dtype)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype})"


@pytest.mark.skipif(not A._interpreted(), reason="tile sizes are those of the CPU interpreter (16 x 16)")
@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_tiles_across_segment_boundaries_are_skipped():
    """NaN in the keys / queries of one document never reaches another: tiles that lie wholly in
    another segment are not visited by any of the three passes."""
    BM, BN = A.INTERPRETER_CONFIG[:2]
    T, D = 96, 32
    q, k, v, do = _inputs(1, 1, T, T, D, torch.float32, seed=14)
    seg = _seg([[0] * 32 + [1] * 64])                    # boundary on a tile edge
    bad = slice(0, 32)
    kp, vp, qp, dop = (t.clone() for t in (k, v, q, do))
    for t in (kp, vp, qp, dop):
        t[:, :, bad] = float("nan")
    got = _fwd_bwd(A.attention_triton, qp, kp, vp, dop, causal=False, segment_ids=seg)
    ref = _fwd_bwd(A.attention_ref, q, k, v, do, causal=False, segment_ids=seg)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g[:, :, 32:], r[:, :, 32:], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_segment_validation():
    q, k, v, _ = _inputs(1, 1, 4, 6, 16, torch.float32)
    for fn in (A.attention_ref, A.attention_torch, A.attention_triton):
        with pytest.raises(ValueError, match="segment_ids"):
            fn(q, k, v, segment_ids=torch.zeros(1, 4, dtype=torch.long, device=DEV))
        with pytest.raises(ValueError, match="segment_ids"):
            fn(q, k, v, segment_ids=torch.zeros(1, 6, device=DEV))


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-pass"])
def test_backward_is_bit_identical_on_rerun(deterministic):
    """With torch.use_deterministic_algorithms(True) dQ has its own pass and reruns are bitwise
    equal on any device; the default atomic dQ is bitwise reproducible only in the interpreter."""
    if not deterministic and not A._interpreted():
        pytest.skip("atomic dQ adds in a run-dependent order on a GPU")
    B, H, T, D = 2, 1, 45, 80
    q, k, v, do = _inputs(B, H, T, T, D, torch.float32, seed=8)
    kw = dict(causal=True, window=20, kv_start=_kv([0, 7], B),
              segment_ids=_random_segments(B, T, seed=3))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        first = _fwd_bwd(A.attention_triton, q, k, v, do, **kw)
        again = _fwd_bwd(A.attention_triton, q, k, v, do, **kw)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_dispatch_uses_requested_backend(monkeypatch):
    q, k, v, _ = _inputs(1, 1, 5, 9, 16, torch.float32, seed=9)
    ref = A.attention_ref(q, k, v, window=3)
    for mode in ("ref", "triton", "torch", "auto"):
        monkeypatch.setenv("ENGINE_KERNELS", mode)
        torch.testing.assert_close(kernels.attention(q, k, v, window=3), ref, rtol=0, atol=1e-5)


def test_attention_backend_reports_the_choice(monkeypatch):
    q, k, v, _ = _inputs(1, 2, 32, 32, 16, torch.float32, seed=9)
    seg = _random_segments(1, 32, seed=1)
    want = {"auto": "triton" if q.is_cuda else "torch",   # windowed + segments: never SDPA
            "triton": "triton", "torch": "torch", "ref": "ref", "cpp": "torch"}
    for mode, name in want.items():
        monkeypatch.setenv("ENGINE_KERNELS", mode)
        got = kernels.attention_backend(q, k, v, causal=True, window=4, segment_ids=seg)
        assert got == name, (mode, got)
        out = kernels.attention(q, k, v, causal=True, window=4, segment_ids=seg)
        torch.testing.assert_close(out, A.attention_ref(q, k, v, window=4, segment_ids=seg),
                                   rtol=0, atol=1e-5)
    # only dense 16-bit CUDA calls may go to SDPA's flash / cuDNN kernels
    assert not A.sdpa_eligible(q.cpu(), k.cpu())
    if torch.cuda.is_available():
        h = q.cuda().half()
        assert A.sdpa_eligible(h, h) and not A.sdpa_eligible(h, h, window=8)
        assert not A.sdpa_eligible(h, h, segment_ids=seg.cuda())
        assert not A.sdpa_eligible(h[:, :, :1], h)       # decode stays ours


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_dispatch_picks_one_and_matches(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "auto")
    q, k, v, do = _inputs(2, 4, 1024, 1024, 64, torch.bfloat16, seed=11)
    name = kernels.attention_backend(q, k, v, causal=True)
    assert name in ("triton", "sdpa")
    got = _fwd_bwd(kernels.attention, q, k, v, do, causal=True)
    ref = _fwd_bwd(A.attention_ref, *(t.float() for t in (q, k, v, do)), causal=True)
    lowp = _fwd_bwd(_naive_lowp, q, k, v, do, causal=True)
    for n, g, lo, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        err, bound = _errors(g, lo, r, torch.bfloat16)
        assert err <= bound, f"{name} {n}: {err:.3g} > {bound:.3g}"
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    assert kernels.attention_backend(q, k, v, causal=True) == "triton"


# ----------------------------------------------------------------------------- GPU, real sizes

def _chunked(fn, q, k, v, chunk=1024, **kw):
    """Causal attention row chunk by row chunk: rows [a, b) only need keys [0, Tk - Tq + b)."""
    off = k.shape[2] - q.shape[2]
    outs = [fn(q[:, :, a:a + chunk], k[:, :, :off + min(a + chunk, q.shape[2])],
               v[:, :, :off + min(a + chunk, q.shape[2])], causal=True, **kw)
            for a in range(0, q.shape[2], chunk)]
    return torch.cat(outs, dim=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,D,window", [(1025, 64, None), (8192, 128, None), (8192, 64, 256),
                                        (4096, 128, 1024)])
def test_gpu_real_sizes(T, D, window, dtype):
    B, H = 1, 2
    q, k, v, do = _inputs(B, H, T, T, D, dtype, seed=10)
    kw = dict(window=window)
    got = _fwd_bwd(lambda *a, **w: A.attention_triton(*a, causal=True, **w), q, k, v, do, **kw)
    lowp = _fwd_bwd(lambda *a, **w: _chunked(_naive_lowp, *a, **w), q, k, v, do, **kw)
    ref = _fwd_bwd(lambda *a, **w: _chunked(A.attention_ref, *a, **w),
                   *(t.float() for t in (q, k, v, do)), **kw)
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        err, bound = _errors(g, lo, r, dtype)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype})"
    torch.use_deterministic_algorithms(True)
    try:
        det = _fwd_bwd(lambda *a, **w: A.attention_triton(*a, causal=True, **w), q, k, v, do, **kw)
        again = _fwd_bwd(lambda *a, **w: A.attention_triton(*a, causal=True, **w), q, k, v, do, **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(det, again))
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), det, lowp, ref):
        err, bound = _errors(g, lo, r, dtype)
        assert err <= bound, f"deterministic {name}: error {err:.3g} > bound {bound:.3g}"
