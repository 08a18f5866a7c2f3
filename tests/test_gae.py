"""GAE: gae_torch and gae_triton (interpreted on CPU) against the fp64 reference loop."""
import pytest
import torch

from kernels.gae import gae_ref, gae_torch, gae_triton

GAMMA_LAM = [(g, l) for g in (0.0, 0.95, 1.0) for l in (0.0, 0.95, 1.0)]
IMPLS = {"torch": gae_torch, "triton": gae_triton}


def ragged(T, seed=0):
    """rewards, values (fp32) and a bool mask [8, T] covering the layouts PPO produces."""
    g = torch.Generator().manual_seed(seed)
    B = 8
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0] = True                                   # no padding at all
    m[1, T // 3:] = True                          # leading (prompt) padding, ends at the last step
    m[2, : max(1, T // 2)] = True                 # trailing padding
    m[3, T // 4: max(T // 4 + 1, 3 * T // 4)] = True   # padding on both sides
    # row 4 stays fully masked
    m[5, T - 1] = True                            # a single token at the end
    m[6, :T // 3] = True                          # two segments separated by padding (a hole)
    m[6, T // 2:] = True
    m[7] = torch.rand(T, generator=g) > 0.3       # random holes
    return r, v, m


def check_close(impl, r, v, m, gamma, lam, **kw):
    a_ref, ret_ref = gae_ref(r.double(), v.double(), m, gamma=gamma, lam=lam)
    a, ret = IMPLS[impl](r, v, m, gamma=gamma, lam=lam, **kw)
    assert a.dtype == torch.float32 and ret.dtype == torch.float32
    assert a.shape == r.shape and ret.shape == r.shape
    torch.testing.assert_close(a.double(), a_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret.double(), ret_ref, atol=1e-5, rtol=0)
    return a, ret


def test_ref_matches_hand_computed():
    # independent check of the oracle's formula on a tiny case: [pad, x, x, pad, x]
    r = torch.tensor([[9.0, 1.0, 2.0, 9.0, 3.0]], dtype=torch.float64)
    v = torch.tensor([[9.0, 0.5, -1.0, 9.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([[0, 1, 1, 0, 1]])
    g, lam = 0.9, 0.8
    a4 = 3.0 - 2.0                                # last step: no bootstrap
    a2 = 2.0 - (-1.0)                             # next step is padding: no V_{t+1}, no carry
    a1 = (1.0 + g * -1.0 - 0.5) + g * lam * a2
    want = torch.tensor([[0.0, a1, a2, 0.0, a4]], dtype=torch.float64)
    a, ret = gae_ref(r, v, m, gamma=g, lam=lam)
    torch.testing.assert_close(a, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, (want + v) * m, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_matches_ref_odd_T(impl, gamma, lam):
    check_close(impl, *ragged(97), gamma, lam)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("T", [1, 2, 300])
def test_matches_ref_other_T(impl, T):
    # T = 300 spans several gae_torch blocks (16) and Triton tiles (128) with partial ends
    check_close(impl, *ragged(T, seed=T), 0.99, 0.95)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_small_blocks_and_tiles(impl):
    # many carries across tiny blocks/tiles, B not a multiple of the program block
    r, v, m = ragged(97, seed=3)
    kw = {"block": 5} if impl == "torch" else {"block_t": 8, "block_b": 4}
    check_close(impl, r[:7], v[:7], m[:7], 0.95, 0.9, **kw)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_padding_is_never_read(impl):
    # garbage at padded positions must not change anything (the scan never crosses padding)
    r, v, m = ragged(97, seed=1)
    a0, ret0 = IMPLS[impl](r, v, m, gamma=0.95, lam=0.95)
    r2, v2 = r.clone(), v.clone()
    r2[~m] = 1e3
    v2[~m] = -1e3
    a1, ret1 = IMPLS[impl](r2, v2, m, gamma=0.95, lam=0.95)
    assert torch.equal(a0, a1) and torch.equal(ret0, ret1)
    assert (a0[~m] == 0).all() and (ret0[~m] == 0).all()
    assert (a0[4] == 0).all()                     # fully masked row


@pytest.mark.parametrize("impl", list(IMPLS))
def test_segments_are_independent(impl):
    # row 6 has two segments; each must equal GAE of that segment alone
    r, v, m = ragged(97, seed=2)
    a, _ = IMPLS[impl](r, v, m, gamma=0.95, lam=0.9)
    T = 97
    first = slice(0, T // 3)
    second = slice(T // 2, T)
    for sl in (first, second):
        ones = torch.ones(1, sl.stop - sl.start, dtype=torch.bool)
        alone, _ = IMPLS[impl](r[6:7, sl], v[6:7, sl], ones, gamma=0.95, lam=0.9)
        torch.testing.assert_close(a[6:7, sl], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_deterministic(impl):
    r, v, m = ragged(97, seed=4)
    a0, ret0 = IMPLS[impl](r, v, m, gamma=0.95, lam=0.95)
    a1, ret1 = IMPLS[impl](r, v, m, gamma=0.95, lam=0.95)
    assert torch.equal(a0, a1) and torch.equal(ret0, ret1)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_dtypes_and_mask_kinds(impl):
    r, v, m = ragged(33, seed=5)
    ref_a, ref_ret = IMPLS[impl](r, v, m, gamma=0.9, lam=0.9)
    for mm in (m.float(), m.long(), m.to(torch.uint8)):
        a, ret = IMPLS[impl](r, v, mm, gamma=0.9, lam=0.9)
        assert torch.equal(a, ref_a) and torch.equal(ret, ref_ret)
    # bf16 inputs: fp32 outputs equal to the fp32 computation on the bf16-rounded values
    rb, vb = r.bfloat16(), v.bfloat16()
    a, ret = IMPLS[impl](rb, vb, m, gamma=0.9, lam=0.9)
    assert a.dtype == torch.float32
    a_ref, _ = gae_ref(rb.double(), vb.double(), m, gamma=0.9, lam=0.9)
    torch.testing.assert_close(a.double(), a_ref, atol=1e-5, rtol=0)
    # non-contiguous inputs (a column slice)
    r2, v2, m2 = ragged(80, seed=6)
    check_close(impl, r2[:, ::2], v2[:, ::2], m2[:, ::2], 0.95, 0.95)


def test_ref_fp64_and_requires_grad():
    r, v, m = ragged(9)
    a, ret = gae_ref(r.double(), v.double().requires_grad_(), m, gamma=1.0, lam=1.0)
    assert a.dtype == torch.float64 and not a.requires_grad
    a, ret = gae_torch(r, v.requires_grad_(), m, gamma=1.0, lam=1.0)
    assert a.dtype == torch.float32 and not a.requires_grad


@pytest.mark.parametrize("fn", [gae_ref, gae_torch, gae_triton])
def test_validation(fn):
    r, v, m = ragged(5)
    with pytest.raises(ValueError, match="shapes differ"):
        fn(r, v[:, :4], m, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        fn(r[0], v[0], m[0], gamma=1.0, lam=1.0)
    with pytest.raises(TypeError, match="floating point"):
        fn(r.long(), v, m, gamma=1.0, lam=1.0)
    with pytest.raises(TypeError, match="gamma"):
        fn(r, v, m, gamma=torch.tensor(1.0), lam=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_gpu_matches_ref():
    r, v, m = ragged(1025, seed=7)
    a_ref, ret_ref = gae_ref(r.double(), v.double(), m, gamma=0.99, lam=0.95)
    a, ret = gae_triton(r.cuda(), v.cuda(), m.cuda(), gamma=0.99, lam=0.95)
    torch.testing.assert_close(a.cpu().double(), a_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret.cpu().double(), ret_ref, atol=1e-5, rtol=0)
    a2, _ = gae_triton(r.cuda(), v.cuda(), m.cuda(), gamma=0.99, lam=0.95)
    assert torch.equal(a, a2)
