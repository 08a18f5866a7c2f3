"""C++ ops from csrc/ (kernels/_cpp.py) against the fp64 references."""
import pytest
import torch

from kernels import _cpp
from kernels.gae import gae_ref
from kernels.kl import linear_kl_ref
from kernels.logprob import linear_logprobs_ref

if not _cpp.available():
    pytest.skip("C++ ops unavailable (ENGINE_NO_CSRC=1, no compiler/ninja, or the csrc build "
                "failed: see the RuntimeWarning)", allow_module_level=True)

ATOL = 1e-5


def close(got, want, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def kl_rounding_scale(h, w, hr, wr, t, temperature, g_lp, g_kl, samples=4):
    """Per-element scale of the fp32 rounding error of (kl, d hidden, d weight), in fp64.

    Error analysis of the fused op: a logit z_iv = h_i . w_v / T summed in fp32 carries an
    error of about dz_iv = sqrt(d) * u * sum_k |h_ik w_vk| / T (u = 2^-24; rounding errors of a
    d-term sum add like a random walk, hence sqrt(d)). The outputs' sensitivity to it is measured
    by rerunning the fp64 formula on logits with independent errors of that size added; the
    gradient GEMMs (sums over V and over N) add sqrt(V) u |dz| |w| and sqrt(N) u |dz|^T |h|, and
    the KL's own reduction, sum_v p (z - zr) - lse + lse_r from V-term sums, adds
    sqrt(V) u (2 + sum_v p (|z| + |zr|)) + u (|lse| + |lse_r|) (it cancels when pi ~ pi_ref);
    the logit gradient g_kl p_v (log p_v - log q_v - KL) inherits that error plus
    u (|z_v| + |zr_v| + |lse| + |lse_r|), and passes it on through the gradient GEMMs.
    How the sums are split (AVX-512 vs AVX2 lanes, OpenMP chunks) changes the rounding, not this
    scale, so a small multiple of it passes on every CPU while a wrong formula cannot.
    """
    u = 2.0 ** -24
    h, w, hr, wr = (x.double() for x in (h, w, hr, wr))
    valid = t != -100
    tt = t.clamp(min=0)[:, None]
    g = torch.Generator().manual_seed(7)

    def outputs(noise, noise_r):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        z = h1 @ w1.T / temperature + noise
        zr = hr @ wr.T / temperature + noise_r
        logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
        kl = torch.where(valid, (logp.exp() * (logp - logq)).sum(-1), 0.0)
        lp = torch.where(valid, logp.gather(1, tt)[:, 0], 0.0)
        dh, dw, dz = torch.autograd.grad((lp * g_lp.double() + kl * g_kl.double()).sum(), (h1, w1, z))
        return kl.detach(), dh, dw, dz

    dz_s = (h.shape[1] ** 0.5) * u * (h.abs() @ w.abs().T) / temperature
    dzr_s = (hr.shape[1] ** 0.5) * u * (hr.abs() @ wr.abs().T) / temperature
    clean = outputs(0.0, 0.0)
    scale = [torch.zeros_like(x) for x in clean[:3]]
    for _ in range(samples):
        noisy = outputs(dz_s * torch.randn(dz_s.shape, generator=g, dtype=torch.float64),
                        dzr_s * torch.randn(dzr_s.shape, generator=g, dtype=torch.float64))
        scale = [torch.maximum(sc, (a - b).abs()) for sc, a, b in zip(scale, noisy, clean)]
    z, zr = h @ w.T / temperature, hr @ wr.T / temperature
    p = torch.softmax(z, -1)
    red = (w.shape[0] ** 0.5) * u * (2 + (p * (z.abs() + zr.abs())).sum(-1)) \
        + u * (torch.logsumexp(z, -1).abs() + torch.logsumexp(zr, -1).abs())
    scale[0] = scale[0] + torch.where(valid, red, 0.0)
    lse_sum = torch.logsumexp(z, -1).abs() + torch.logsumexp(zr, -1).abs()
    ddz = g_kl.double().abs()[:, None] * p * (scale[0][:, None] + u * (z.abs() + zr.abs() + lse_sum[:, None]))
    ddz = torch.where(valid[:, None], ddz, 0.0) / temperature
    dz = clean[3].abs()
    scale[1] = scale[1] + (w.shape[0] ** 0.5) * u * (dz @ w.abs()) + ddz @ w.abs()
    scale[2] = scale[2] + (h.shape[0] ** 0.5) * u * (dz.T @ h.abs()) + ddz.T @ h.abs()
    return scale


def within(got, want, scale, what, factor=2.0, floor=1e-6):
    err = (got.double() - want.double()).abs()
    excess = err - (factor * scale + floor)
    i = int(excess.flatten().argmax())
    assert excess.max() <= 0, (f"{what}: error {err.flatten()[i]:.3g} at {i} > {factor} x rounding scale "
                               f"{scale.flatten()[i]:.3g} + {floor:g}")


def problem(n, v, d, seed=0, d_ref=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3        # logits ~ N(0, 3^2): peaked, realistic
    if d_ref is None:   # a reference close to the policy, as in PPO: small KL
        hr = h + 0.1 * torch.randn(n, d, generator=g)
        wr = w + 0.03 * torch.randn(v, d, generator=g)
    else:               # an unrelated reference of another width: KL ~ 10
        hr = torch.randn(n, d_ref, generator=g)
        wr = torch.randn(v, d_ref, generator=g) * 0.3
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[: n // 5]] = -100
    t[0] = v - 1                                    # last vocab column (partial tile)
    if n > 1:
        t[1] = -100
    return h, w, hr, wr, t


def leaf(x):
    return x.detach().clone().requires_grad_()


# Sizes: N 17/97 (odd), N 600 crosses the 512-row block; V 1271 spans a full and a partial vocab
# tile of 1024.
SHAPES = [(17, 1271, 80), (97, 1271, 80), (600, 1271, 16)]


@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_fwd_bwd(n, v, d, temperature):
    h, w, _, _, t = problem(n, v, d, seed=n)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    h1, w1 = leaf(h), leaf(w)
    lp, ent = _cpp.linear_logprobs(h1, w1, t, temperature=temperature, return_entropy=True)
    h2, w2 = leaf(h.double()), leaf(w.double())
    lp_ref, ent_ref = linear_logprobs_ref(h2, w2, t, temperature=temperature, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == (n,)
    close(lp, lp_ref)
    close(ent, ent_ref)
    ign = t == -100
    assert (lp[ign] == 0).all() and (ent[ign] == 0).all()
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum().backward()
    # grads are sums of up to N*V fp32 products of size ~10: the fp32 eager path itself is
    # ~1e-5 off the fp64 oracle here, hence rtol next to atol.
    close(h1.grad, h2.grad, rtol=1e-5)
    close(w1.grad, w2.grad, rtol=1e-5)
    assert (h1.grad[ign] == 0).all()


def test_logprobs_single_output_grads():
    # only logp differentiated (entropy grad None) and only entropy (logp grad None)
    h, w, _, _, t = problem(97, 1271, 80, seed=5)
    for use in ("logp", "ent"):
        h1, w1, h2, w2 = leaf(h), leaf(w), leaf(h.double()), leaf(w.double())
        out = _cpp.linear_logprobs(h1, w1, t, return_entropy=True)
        ref = linear_logprobs_ref(h2, w2, t, return_entropy=True)
        k = 0 if use == "logp" else 1
        out[k].sum().backward()
        ref[k].sum().backward()
        close(h1.grad, h2.grad, rtol=1e-5)
        close(w1.grad, w2.grad, rtol=1e-5)
    h1 = leaf(h)
    _cpp.linear_logprobs(h1, w, t).sum().backward()       # weight frozen, return_entropy=False
    h2 = leaf(h.double())
    linear_logprobs_ref(h2, w.double(), t).sum().backward()
    close(h1.grad, h2.grad, rtol=1e-5)


@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("d_ref", [None, 48])
def test_kl_fwd_bwd(n, v, d, temperature, d_ref):
    h, w, hr, wr, t = problem(n, v, d, seed=n + 1, d_ref=d_ref)
    g = torch.Generator().manual_seed(2)
    g_lp, g_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)
    h1, w1, hr1, wr1 = leaf(h), leaf(w), leaf(hr), leaf(wr)
    lp, rlp, kl = _cpp.linear_kl(h1, w1, hr1, wr1, t, temperature=temperature)
    h2, w2 = leaf(h.double()), leaf(w.double())
    lp_r, rlp_r, kl_r = linear_kl_ref(h2, w2, hr.double(), wr.double(), t, temperature=temperature)
    close(lp, lp_r)
    close(rlp, rlp_r)
    # kl ~ 10 for the unrelated reference: there the fp32 logits' rounding alone moves it (and
    # the gradients) by ~1e-5, so tolerances come from the error analysis of the computation
    sc_kl, sc_dh, sc_dw = kl_rounding_scale(h, w, hr, wr, t, temperature, g_lp, g_kl)
    within(kl, kl_r.detach(), sc_kl, "kl")
    assert not rlp.requires_grad
    ign = t == -100
    assert (lp[ign] == 0).all() and (rlp[ign] == 0).all() and (kl[ign] == 0).all()
    assert (kl[~ign] > 0).all()
    (lp * g_lp + kl * g_kl).sum().backward()
    (lp_r * g_lp.double() + kl_r * g_kl.double()).sum().backward()
    within(h1.grad, h2.grad, sc_dh, "d hidden")
    within(w1.grad, w2.grad, sc_dw, "d weight")
    assert hr1.grad is None and wr1.grad is None          # the reference side is a constant
    assert (h1.grad[ign] == 0).all()


def test_kl_logp_only_grad_and_self_kl():
    h, w, hr, wr, t = problem(97, 1271, 80, seed=9)
    h1, h2 = leaf(h), leaf(h.double())
    lp, _, _ = _cpp.linear_kl(h1, w, hr, wr, t)
    lp.sum().backward()
    lp_r, _, _ = linear_kl_ref(h2, w.double(), hr.double(), wr.double(), t)
    lp_r.sum().backward()
    close(h1.grad, h2.grad, rtol=1e-5)
    # policy == reference: KL is 0 and logp == ref_logp
    lp, rlp, kl = _cpp.linear_kl(h, w, h, w, t)
    assert torch.equal(lp, rlp)
    close(kl, torch.zeros_like(kl), atol=1e-6)


@pytest.mark.parametrize("op", ["logprobs", "kl"])
def test_backward_bit_identical(op):
    h, w, hr, wr, t = problem(600, 1271, 16, seed=11)
    g = torch.randn(600, generator=torch.Generator().manual_seed(3))

    def grads():
        h1, w1 = leaf(h), leaf(w)
        if op == "logprobs":
            lp, ent = _cpp.linear_logprobs(h1, w1, t, temperature=0.7, return_entropy=True)
            out = lp * g + ent
        else:
            lp, _, kl = _cpp.linear_kl(h1, w1, hr, wr, t, temperature=0.7)
            out = lp * g + kl
        out.sum().backward()
        return out.detach(), h1.grad, w1.grad

    a, b = grads(), grads()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bf16_inputs():
    h, w, _, _, t = problem(33, 1271, 80, seed=4)
    hb, wb = leaf(h.bfloat16()), leaf(w.bfloat16())
    lp = _cpp.linear_logprobs(hb, wb, t)
    # the wrapper computes in fp32 from the bf16 values
    close(lp, linear_logprobs_ref(hb.detach().double(), wb.detach().double(), t))
    lp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def test_validation():
    h, w, hr, wr, t = problem(17, 101, 8)
    bad = t.clone()
    bad[3] = 101
    with pytest.raises(ValueError, match="outside"):
        _cpp.linear_logprobs(h, w, bad)
    with pytest.raises(ValueError):
        _cpp.linear_logprobs(h, w[:, :7], t)
    with pytest.raises(ValueError):
        _cpp.linear_kl(h, w, hr[:5], wr, t)
    # the C++ op itself rejects bad targets too (the path used under torch.compile)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.engine_ops.linear_logprobs_fwd(h, w, bad, 1.0)


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (0.95, 0.95), (1.0, 1.0), (1.0, 0.0)])
def test_gae(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 97
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    m[0] = False
    m[1] = True
    m[2, :40] = False
    a, ret = _cpp.gae(r, v, m, gamma=gamma, lam=lam)
    a_ref, ret_ref = gae_ref(r.double(), v.double(), m, gamma=gamma, lam=lam)
    close(a, a_ref)
    close(ret, ret_ref)
    a2, ret2 = _cpp.gae(r, v, m.float(), gamma=gamma, lam=lam)
    assert torch.equal(a, a2) and torch.equal(ret, ret2)
    a1, _ = _cpp.gae(r[:, :1], v[:, :1], m[:, :1], gamma=gamma, lam=lam)      # T = 1
    close(a1, gae_ref(r[:, :1].double(), v[:, :1].double(), m[:, :1], gamma=gamma, lam=lam)[0])


def test_opcheck():
    h, w, hr, wr, t = problem(17, 101, 8)
    ops = torch.ops.engine_ops
    g = torch.randn(17)
    cases = [
        (ops.linear_logprobs_fwd.default, (h.requires_grad_(), w.requires_grad_(), t, 0.7)),
        (ops.linear_kl_fwd.default, (leaf(h), leaf(w), hr, wr, t, 1.0)),
        (ops.gae.default, (torch.randn(3, 9), torch.randn(3, 9), torch.rand(3, 9) > 0.3, 0.9, 0.8)),
        (ops.gelu_tanh_fwd.default, (torch.randn(5, 7, requires_grad=True),)),
        (ops.gelu_tanh_bwd.default, (torch.randn(5, 7), torch.randn(5, 7))),
    ]
    lp, ent, lse = ops.linear_logprobs_fwd(h.detach(), w.detach(), t, 0.7)
    cases.append((ops.linear_logprobs_bwd.default, (g, g, h.detach(), w.detach(), t, lse, ent, 0.7)))
    _, _, _, lse2, eu = ops.linear_kl_fwd(h.detach(), w.detach(), hr, wr, t, 1.0)
    cases.append((ops.linear_kl_bwd.default, (g, g, h.detach(), w.detach(), hr, wr, t, lse2, eu, 1.0)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    h, w, hr, wr, t = problem(17, 101, 8)

    def f(h, w, hr, wr, t, r, v, m):
        lp, ent = _cpp.linear_logprobs(h, w, t, temperature=0.7, return_entropy=True)
        lp2, _, kl = _cpp.linear_kl(h, w, hr, wr, t)
        a, _ = _cpp.gae(r, v, m, gamma=0.99, lam=0.95)
        return (lp + 0.1 * ent + lp2 - kl).sum() + a.sum()

    r, v, m = torch.randn(3, 9), torch.randn(3, 9), torch.rand(3, 9) > 0.3
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    h1, w1, h2, w2 = leaf(h), leaf(w), leaf(h), leaf(w)
    out_c = cf(h1, w1, hr, wr, t, r, v, m)
    out_e = f(h2, w2, hr, wr, t, r, v, m)
    out_c.backward()
    out_e.backward()
    assert torch.equal(out_c, out_e)
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 37), (2, 5, 1031), (40000,)])
def test_gelu_fwd_bwd_against_fp64(shape):
    """Odd sizes (vector tails, several OpenMP chunks), the tails of the function (|x| up to 30,
    where fast_exp saturates) and a random upstream gradient, against the fp64 formula."""
    from kernels.gelu import gelu_ref
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    x.view(-1)[:2] = torch.tensor([-30.0, 30.0], dtype=torch.float64)[: x.numel()]
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    xf = x.float().requires_grad_()
    y = _cpp.gelu_tanh(xf)
    y.backward(up.float())
    x64 = x.clone().requires_grad_()
    gelu_ref(x64).backward(up)
    assert y.dtype == torch.float32 and y.shape == x.shape
    close(y, gelu_ref(x), atol=2e-6, rtol=2e-6)
    close(xf.grad, x64.grad, atol=2e-6, rtol=2e-6)
    # deterministic: elementwise, so any thread count gives the same bits
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = _cpp.gelu_tanh(xf.detach())
        d1 = torch.ops.engine_ops.gelu_tanh_bwd(up.float(), xf.detach())
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y.detach()) and torch.equal(d1, xf.grad)


def test_gelu_dispatch_and_model_activation(monkeypatch):
    """kernels.gelu takes the C++ op for CPU fp32 (ENGINE_KERNELS=auto), F.gelu for bf16 (dtype
    kept) and under ENGINE_KERNELS=torch; the model's MLP uses it."""
    import kernels
    from engine import GPT, GPTConfig
    x = torch.randn(4, 33)
    assert torch.equal(kernels.gelu(x), _cpp.gelu_tanh(x))
    xb = x.bfloat16()
    assert kernels.gelu(xb).dtype == torch.bfloat16
    assert torch.equal(kernels.gelu(xb), torch.nn.functional.gelu(xb, approximate="tanh"))
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    assert torch.equal(kernels.gelu(x), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=16, vocab_size=40,
                      window=None, dropout=0.0))
    idx = torch.randint(0, 40, (2, 16))
    want = m(idx[:, :-1], targets=idx[:, 1:])
    monkeypatch.setenv("ENGINE_KERNELS", "auto")
    calls = []
    monkeypatch.setattr(_cpp, "gelu_tanh", lambda t: calls.append(t.shape) or torch.ops.engine_ops.gelu_tanh_fwd(t))
    got = m(idx[:, :-1], targets=idx[:, 1:])
    assert len(calls) == 2  # one per block
    close(got, want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gae_cuda_matches_ref():
    g = torch.Generator().manual_seed(1)
    B, T = 37, 1025
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.2
    m[0] = False
    a, ret = _cpp.gae_cuda(r.cuda(), v.cuda(), m.cuda(), gamma=0.99, lam=0.95)
    a_ref, ret_ref = gae_ref(r.double(), v.double(), m, gamma=0.99, lam=0.95)
    close(a.cpu(), a_ref)
    close(ret.cpu(), ret_ref)
