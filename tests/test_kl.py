"""kernels.linear_kl: Triton (interpreted on CPU) and chunked paths vs an fp64 oracle."""
import pytest
import torch

import kernels
from kernels import kl as klmod
from kernels.kl import linear_kl_chunked, linear_kl_ref, linear_kl_triton
from kernels.logprob import HAS_TRITON

CUDA = torch.cuda.is_available()
V = 1271

IMPLS = {
    "triton": linear_kl_triton,
    # 3 vocabulary splits of the forward grid + combine, 256-column backward chunks (V = 1271)
    "triton_split": lambda *a, **k: linear_kl_triton(*a, splits=3, chunk_cols=256, **k),
    # 6-row chunks: several chunks and a ragged last one for N = 17 / 97
    "chunked": lambda *a, **k: linear_kl_chunked(*a, chunk_rows=6, **k),
}


def _triton_usable():
    if CUDA:
        return True
    return HAS_TRITON and type(klmod._kl_fwd_kernel).__name__ == "InterpretedFunction"


@pytest.fixture(params=list(IMPLS))
def impl(request):
    if request.param.startswith("triton"):
        if not HAS_TRITON:
            pytest.skip("triton not installed")
        assert _triton_usable(), "kernels/ was imported before TRITON_INTERPRET=1 was set"
    return request.param


def make_inputs(n, d, d_ref, v=V, seed=0, ignore_frac=0.25, ref_noise=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.5 / d ** 0.5)
    if d_ref == d:
        # a reference that is a perturbed copy of the policy: KL of a realistic size (~0.1-1)
        ref_hidden = hidden + ref_noise * torch.randn(n, d, generator=g, dtype=torch.float64)
        ref_weight = weight + ref_noise * (2.5 / d ** 0.5) * torch.randn(v, d, generator=g,
                                                                          dtype=torch.float64)
    else:
        ref_hidden = torch.randn(n, d_ref, generator=g, dtype=torch.float64)
        ref_weight = torch.randn(v, d_ref, generator=g, dtype=torch.float64) * (2.5 / d_ref ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < ignore_frac
    if n > 1:
        ignored[0] = False
        ignored[n // 2] = True
    targets[ignored] = -100
    return hidden, weight, ref_hidden, ref_weight, targets


def run(fn, inputs, dtype, temperature, seed=1, use=(True, True)):
    """Forward + backward with random upstream gradients on logp and kl (selected by `use`)."""
    hidden, weight, ref_hidden, ref_weight, targets = inputs
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    rh = ref_hidden.detach().to(dtype).requires_grad_()  # must receive no gradient
    rw = ref_weight.detach().to(dtype)
    logp, ref_logp, kl = fn(h, w, rh, rw, targets, temperature=temperature)
    assert not ref_logp.requires_grad
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    gk = torch.randn(kl.shape, generator=g, dtype=torch.float64)
    loss = (logp.double() * gl).sum() * use[0] + (kl.double() * gk).sum() * use[1]
    loss.backward()
    assert rh.grad is None
    return [t.detach().double() for t in (logp, ref_logp, kl)] + [h.grad.double(),
                                                                   w.grad.double()]


def assert_close_scaled(got, want, tol, what):
    """max |got - want| <= tol * max(1, max |want|)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} * {scale:.3g}"


NAMES = ["logp", "ref_logp", "kl", "d hidden", "d weight"]


@pytest.mark.parametrize("n,d,d_ref", [(1, 80, 80), (17, 64, 80), (97, 80, 80)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_fp64_oracle(impl, n, d, d_ref, temperature):
    inputs = make_inputs(n, d, d_ref, seed=n * 7 + d)
    want = run(linear_kl_ref, inputs, torch.float64, temperature)
    got = run(IMPLS[impl], inputs, torch.float32, temperature)
    for name, a, b in zip(NAMES, got, want):
        if name in ("logp", "ref_logp", "kl"):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert_close_scaled(a, b, 1e-5, name)
    ignored = inputs[-1] == -100
    for t in got[:3]:
        assert (t[ignored] == 0).all()
    assert (got[3][ignored] == 0).all(), "ignored rows must get exactly zero d hidden"
    assert (got[2][~ignored] > 0).all()


@pytest.mark.parametrize("use", [(True, False), (False, True)])
def test_each_output_gradient_alone(impl, use):
    # logp-only skips the reference recompute in backward; kl-only has no logp gradient
    inputs = make_inputs(17, 64, 64, seed=4)
    want = run(linear_kl_ref, inputs, torch.float64, 0.7, use=use)
    got = run(IMPLS[impl], inputs, torch.float32, 0.7, use=use)
    assert_close_scaled(got[3], want[3], 1e-5, "d hidden")
    assert_close_scaled(got[4], want[4], 1e-5, "d weight")


def test_oracle_matches_kl_div():
    hidden, weight, ref_hidden, ref_weight, targets = make_inputs(9, 80, 64)
    logp, ref_logp, kl = linear_kl_ref(hidden, weight, ref_hidden, ref_weight, targets,
                                       temperature=0.7)
    lp = torch.log_softmax(hidden @ weight.T / 0.7, -1)
    lq = torch.log_softmax(ref_hidden @ ref_weight.T / 0.7, -1)
    want = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    live = targets != -100
    torch.testing.assert_close(kl[live], want[live], atol=1e-12, rtol=0)
    torch.testing.assert_close(ref_logp[live], lq[live].gather(1, targets[live, None])[:, 0])


def test_kl_is_zero_against_itself(impl):
    hidden, weight, _, _, targets = make_inputs(17, 64, 64, seed=9)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, ref_logp, kl = IMPLS[impl](h, w, h.detach().clone(), w.detach().clone(), targets)
    assert torch.equal(logp, ref_logp)
    assert float(kl.detach().abs().max()) < 1e-5
    # at p == q the KL gradient vanishes: dKL/dz = p (log p - log q - KL) = 0
    kl.sum().backward()
    assert float(h.grad.abs().max()) < 1e-5 and float(w.grad.abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vs_fp32(impl, dtype):
    inputs = make_inputs(33, 80, 80, seed=5)
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    want = run(linear_kl_ref, inputs, torch.float64, 0.7)
    got = run(IMPLS[impl], inputs, dtype, 0.7)
    # fp32 accumulation of exact 16-bit products: outputs as accurate as fp32
    for name, a, b in zip(NAMES[:3], got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
    grad_tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # gradients in the input dtype
    assert_close_scaled(got[3], want[3], grad_tol, "d hidden")
    assert_close_scaled(got[4], want[4], grad_tol, "d weight")


def test_backward_is_deterministic(impl):
    inputs = make_inputs(97, 80, 64, seed=8)
    a = run(IMPLS[impl], inputs, torch.float32, 0.7, seed=2)
    b = run(IMPLS[impl], inputs, torch.float32, 0.7, seed=2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fn", [linear_kl_ref, linear_kl_chunked, linear_kl_triton])
def test_validation_names_the_tensor(fn):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])
    with pytest.raises(ValueError, match="ref_hidden"):
        fn(h, w, torch.randn(3, 8), w, t)
    with pytest.raises(ValueError, match="ref_weight"):
        fn(h, w, h, torch.randn(11, 8), t)
    with pytest.raises(ValueError, match="ref_weight"):
        fn(h, w, h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="weight"):
        fn(h, torch.randn(10, 7), h, w, t)
    with pytest.raises(ValueError, match="targets"):
        fn(h, w, h, w, torch.tensor([1, 2, -100, 10]))


@pytest.mark.parametrize("mode", ["ref", "torch", "triton"])
def test_dispatch(monkeypatch, mode):
    if mode == "triton" and not _triton_usable():
        pytest.skip("triton kernels not runnable here")
    monkeypatch.setenv("ENGINE_KERNELS", mode)
    inputs = make_inputs(5, 64, 64, seed=2)
    got = kernels.linear_kl(*[t.float() if t.is_floating_point() else t for t in inputs],
                            temperature=0.7)
    want = linear_kl_ref(*inputs, temperature=0.7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size(dtype):
    n, d, v = 4096, 768, 50257
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    hidden, weight = rnd(n, d), rnd(v, d, scale=2.5 / d ** 0.5)
    ref_hidden = (hidden.float() + rnd(n, d, scale=0.5).float()).to(dtype)
    ref_weight = (weight.float() + rnd(v, d, scale=1.25 / d ** 0.5).float()).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
    gl, gk = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)

    def go(fn, *xs):
        h, w = xs[0].detach().requires_grad_(), xs[1].detach().requires_grad_()
        logp, ref_logp, kl = fn(h, w, xs[2], xs[3], targets, temperature=0.7)
        ((logp * gl).sum() + (kl * gk).sum()).backward()
        return logp, ref_logp, kl, h.grad.float(), w.grad.float()

    want = go(linear_kl_ref, hidden.float(), weight.float(), ref_hidden.float(),
              ref_weight.float())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = go(linear_kl_triton, hidden, weight, ref_hidden, ref_weight)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = 2 * v * d * 4 + 2 * n * d * 4 + (64 << 20)  # nothing of size N*V (823 MB)
    assert extra < bound, f"Triton path used {extra / 2**20:.0f} MiB extra"
    out_tol = 2e-4 if dtype == torch.float32 else 2e-3
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=out_tol, rtol=0)
    grad_tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close_scaled(got[3], want[3], grad_tol, "d hidden")
    assert_close_scaled(got[4], want[4], grad_tol, "d weight")
    again = go(linear_kl_triton, hidden, weight, ref_hidden, ref_weight)
    for x, y in zip(got, again):
        assert torch.equal(x, y)
