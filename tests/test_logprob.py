"""kernels.linear_logprobs: Triton (interpreted on CPU) and chunked paths vs an fp64 oracle."""
import pytest
import torch

import kernels
from kernels import logprob
from kernels.logprob import (linear_logprobs_chunked, linear_logprobs_ref,
                             linear_logprobs_triton)

CUDA = torch.cuda.is_available()
V = 1271


def _triton_usable():
    # kernels are interpreted only if TRITON_INTERPRET=1 was set before kernels/ was first imported
    if CUDA:
        return True
    return logprob.HAS_TRITON and type(logprob._fwd_kernel).__name__ == "InterpretedFunction"


needs_triton = pytest.mark.skipif(not logprob.HAS_TRITON, reason="triton not installed")

IMPLS = {
    "triton": linear_logprobs_triton,
    # 3 vocabulary splits of the forward grid + combine, 256-column backward chunks (V = 1271)
    "triton_split": lambda *a, **k: linear_logprobs_triton(*a, splits=3, chunk_cols=256, **k),
    # chunk of 7 rows: N = 17 / 97 run 3 / 14 chunks, including a ragged last one
    "chunked": lambda *a, **k: linear_logprobs_chunked(*a, chunk_rows=7, **k),
}


def make_inputs(n, d, v=V, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    # logits std ~2.5, a realistic LM-head scale (the max over V sits near 8)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.5 / d ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < ignore_frac
    if n > 1:
        ignored[0] = False       # keep at least one live row
        ignored[n // 2] = True   # and at least one ignored row
    targets[ignored] = -100
    return hidden, weight, targets


def run(fn, hidden, weight, targets, dtype, temperature, entropy, seed=1):
    """Forward + backward with random upstream gradients on every output; fp64 results."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    out = fn(h, w, targets, temperature=temperature, return_entropy=entropy)
    outs = out if entropy else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs)
    loss.backward()
    return [o.detach().double() for o in outs] + [h.grad.double(), w.grad.double()]


def assert_close_scaled(got, want, tol, what):
    """max |got - want| <= tol * max(1, max |want|): relative to the tensor's own scale."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.fixture(params=list(IMPLS))
def impl(request):
    if request.param.startswith("triton"):
        if not logprob.HAS_TRITON:
            pytest.skip("triton not installed")
        assert _triton_usable(), "kernels/ was imported before TRITON_INTERPRET=1 was set"
    return request.param


@pytest.mark.parametrize("n,d", [(1, 80), (17, 64), (97, 80)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_fp32_matches_fp64_oracle(impl, n, d, temperature, entropy):
    hidden, weight, targets = make_inputs(n, d, seed=n * 100 + d)
    want = run(linear_logprobs_ref, hidden, weight, targets, torch.float64, temperature, entropy)
    got = run(IMPLS[impl], hidden, weight, targets, torch.float32, temperature, entropy)
    names = ["logp", "entropy"][: 1 + entropy] + ["d hidden", "d weight"]
    for name, a, b in zip(names, got, want):
        if name in ("logp", "entropy"):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert_close_scaled(a, b, 1e-5, name)
    ignored = targets == -100
    assert (got[0][ignored] == 0).all()
    if entropy:
        assert (got[1][ignored] == 0).all() and (got[1][~ignored] > 0).all()
    assert (got[-2][ignored] == 0).all(), "ignored rows must get exactly zero d hidden"


def test_oracle_is_log_softmax_gather():
    # pins the oracle itself to an independent formulation (cross_entropy = -logp)
    hidden, weight, targets = make_inputs(9, 80)
    logp, ent = linear_logprobs_ref(hidden, weight, targets, temperature=0.7, return_entropy=True)
    logits = hidden @ weight.T / 0.7
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(logp, -ce, atol=1e-12, rtol=0)
    probs = torch.softmax(logits, -1)
    h = torch.distributions.Categorical(probs=probs).entropy()
    torch.testing.assert_close(ent, torch.where(targets == -100, 0.0, h), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vs_fp32(impl, dtype):
    hidden, weight, targets = make_inputs(33, 80, seed=5)
    # oracle on the same (rounded) inputs, so only the kernel's own precision is measured
    h16, w16 = hidden.to(dtype), weight.to(dtype)
    want = run(linear_logprobs_ref, h16, w16, targets, torch.float64, 0.7, True)
    got = run(IMPLS[impl], h16, w16, targets, dtype, 0.7, True)
    # both fused paths accumulate the (exact) 16-bit products in fp32: outputs are fp32-exact
    out_tol = 1e-4
    for name, a, b in zip(["logp", "entropy"], got, want):
        torch.testing.assert_close(a, b, atol=out_tol, rtol=0, msg=lambda m: f"{name}: {m}")
    # gradients come back in the input dtype (<= 2^-8 relative for bf16)
    grad_tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_close_scaled(got[2], want[2], grad_tol, "d hidden")
    assert_close_scaled(got[3], want[3], grad_tol, "d weight")


def test_grad_types_and_partial_grads(impl):
    hidden, weight, targets = make_inputs(17, 64, seed=3)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    logp, ent = IMPLS[impl](h, w, targets, temperature=0.7, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (17,)
    # gradient through the entropy only (logp unused) and into hidden only (weight frozen)
    w.requires_grad_(False)
    ent_only = torch.autograd.grad(ent.sum(), h)[0].double()
    hr = hidden.clone().requires_grad_()
    _, ent_ref = linear_logprobs_ref(hr, weight, targets, temperature=0.7, return_entropy=True)
    want = torch.autograd.grad(ent_ref.sum(), hr)[0]
    assert_close_scaled(ent_only, want, 1e-5, "d hidden from entropy only")
    assert h.grad is None and w.grad is None


def test_backward_is_deterministic(impl):
    hidden, weight, targets = make_inputs(97, 80, seed=7)
    a = run(IMPLS[impl], hidden, weight, targets, torch.float32, 0.7, True, seed=3)
    b = run(IMPLS[impl], hidden, weight, targets, torch.float32, 0.7, True, seed=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_chunk_size_does_not_change_result():
    hidden, weight, targets = make_inputs(29, 64, seed=11)
    one = run(linear_logprobs_chunked, hidden, weight, targets, torch.float32, 1.0, True)
    many = run(lambda *a, **k: linear_logprobs_chunked(*a, chunk_rows=4, **k),
               hidden, weight, targets, torch.float32, 1.0, True)
    for x, y in zip(one, many):
        assert_close_scaled(x, y, 1e-6, "chunked")
    assert logprob.chunk_rows_for(50257) * 50257 * 4 <= logprob.CHUNK_BYTES


@pytest.mark.parametrize("fn", [linear_logprobs_ref, linear_logprobs_chunked,
                                linear_logprobs_triton])
def test_validation_names_the_tensor(fn):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])
    with pytest.raises(ValueError, match="hidden"):
        fn(h[0], w, t)
    with pytest.raises(ValueError, match="weight"):
        fn(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="targets"):
        fn(h, w, t[:3])
    with pytest.raises(ValueError, match="targets"):
        fn(h, w, t.float())
    with pytest.raises(ValueError, match=r"targets\[3\] = 10"):
        fn(h, w, torch.tensor([1, 2, -100, 10]))
    with pytest.raises(ValueError, match="dtype"):
        fn(h, w.double(), t)
    with pytest.raises(ValueError, match="temperature"):
        fn(h, w, t, temperature=0.0)


@pytest.mark.parametrize("mode", ["ref", "torch", "triton"])
def test_dispatch(monkeypatch, mode):
    if mode == "triton" and not _triton_usable():
        pytest.skip("triton kernels not runnable here")
    monkeypatch.setenv("ENGINE_KERNELS", mode)
    hidden, weight, targets = make_inputs(5, 64, seed=2)
    h, w = hidden.float(), weight.float()
    logp, ent = kernels.linear_logprobs(h, w, targets, temperature=0.7, return_entropy=True)
    ref_logp, ref_ent = linear_logprobs_ref(hidden, weight, targets, temperature=0.7,
                                            return_entropy=True)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size(dtype):
    n, d, v = 4096, 768, 50257
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, d, device="cuda", generator=g) * (2.5 / d ** 0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
    gl, ge = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)

    def go(fn, h, w):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        logp, ent = fn(h, w, targets, temperature=0.7, return_entropy=True)
        ((logp * gl).sum() + (ent * ge).sum()).backward()
        return logp, ent, h.grad.float(), w.grad.float()

    want = go(linear_logprobs_ref, hidden.float(), weight.float())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = go(linear_logprobs_triton, hidden, weight)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N*d + V*d): fp32 gradient accumulators + outputs, nothing of size N*V (823 MB here)
    bound = 2 * v * d * 4 + 2 * n * d * 4 + (64 << 20)
    assert extra < bound, f"Triton path used {extra / 2**20:.0f} MiB extra"
    out_tol = 2e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got[0], want[0], atol=out_tol, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=out_tol, rtol=0)
    grad_tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close_scaled(got[2], want[2], grad_tol, "d hidden")
    assert_close_scaled(got[3], want[3], grad_tol, "d weight")
    again = go(linear_logprobs_triton, hidden, weight)
    for x, y in zip(got, again):
        assert torch.equal(x, y)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_does_not_read_uninitialised_memory(monkeypatch, dtype):
    """Every torch.empty buffer starts as NaN: the backward must not let any unwritten element
    reach the gradients. (The CPU bf16 GEMM reads past a strided view's columns into the row
    padding of the dlogits buffer; with that buffer uninitialised, 16-row blocks of dh came out
    NaN whenever the memory held NaNs from an earlier test.)"""
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t
    monkeypatch.setattr(torch, "empty", poisoned)
    hidden, weight, targets = make_inputs(33, 80, seed=5)
    h16, w16 = hidden.to(dtype), weight.to(dtype)
    want = run(linear_logprobs_ref, h16, w16, targets, torch.float64, 0.7, True)
    got = run(linear_logprobs_triton, h16, w16, targets, dtype, 0.7, True)
    assert_close_scaled(got[2], want[2], 2e-2, "d hidden")
    assert_close_scaled(got[3], want[3], 2e-2, "d weight")
