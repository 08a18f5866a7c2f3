import pytest
import torch

from engine import GPT, GPTConfig, RewardModel

CFG = dict(n_layer=2, d_model=64, n_head=2, d_head=32, block_size=64, vocab_size=97, window=8)


def model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", **{**CFG, **kw})).eval()


def test_layers_alternate_dense_and_banded():
    m = model(n_layer=4)
    assert [b.attn.window for b in m.h] == [None, 8, None, 8]


def test_banded_layer_ignores_far_tokens():
    # With every layer banded (window 4), changing token 0 cannot affect position 10 after
    # 2 layers (receptive field 2 * 3 = 6 tokens back); with dense layers it does.
    for sparse_every, affected in ((1, False), (0, True)):
        m = model(sparse_every=sparse_every, window=4)
        a = torch.randint(0, 97, (1, 12))
        b = a.clone()
        b[0, 0] = (a[0, 0] + 1) % 97
        diff = (m(a)[0, 10] - m(b)[0, 10]).abs().max().item()
        assert (diff > 1e-6) == affected


def test_tied_embeddings_and_residual_init():
    m = model()
    assert m.lm_head_weight is m.wte.weight
    assert m.h[0].attn.c_proj.weight.std().item() < m.h[0].attn.c_attn.weight.std().item()


def test_kv_cache_generation_matches_full_forward():
    m = model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [4]]
    ids, lp, ks = m.generate(prompts, 12, temperature=1.0, seed=3, return_logprobs=True)
    full = m.logprobs(ids, kv_start=ks)[:, -12:]
    torch.testing.assert_close(full, lp, atol=1e-5, rtol=0)
    # Greedy decoding must equal argmax of full forward passes token by token.
    g = m.generate([[5, 6, 7]], 8, temperature=0.0)
    for t in range(3, g.shape[1]):
        assert m(g[:, :t])[0, -1].argmax().item() == g[0, t].item()


def test_left_padding_equals_unpadded():
    m = model()
    alone = m.generate([[8, 9, 10]], 6, temperature=0.0)
    batched = m.generate([[8, 9, 10], [1, 2, 3, 4, 5, 6, 7]], 6, temperature=0.0)
    assert torch.equal(batched[0, -9:], alone[0])


def test_generate_is_deterministic_with_seed_and_stops_at_eos():
    m = model()
    a = m.generate([[3, 4]] * 4, 10, temperature=1.0, top_p=0.9, seed=7)
    b = m.generate([[3, 4]] * 4, 10, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    eos = int(a[0, 3])  # the second sampled token of row 0 as EOS: row 0 must stop there
    c = m.generate([[3, 4]] * 4, 10, temperature=1.0, top_p=0.9, seed=7, eos_id=eos)
    first = (c[0, 2:] == eos).nonzero()[0, 0].item()
    assert (c[0, 2 + first:] == eos).all()


def test_save_load_identical_logits(tmp_path):
    m = model()
    x = torch.randint(0, 97, (2, 10))
    m.save(str(tmp_path / "m"))
    m2 = GPT.load(str(tmp_path / "m")).eval()
    assert torch.equal(m(x), m2(x))
    rm = RewardModel(m.cfg).eval()
    rm.save(str(tmp_path / "rm"))
    assert torch.equal(rm(x), RewardModel.load(str(tmp_path / "rm")).eval()(x))


def test_reward_model_scores_per_token():
    rm = RewardModel(GPTConfig.from_preset("tiny", **CFG))
    x = torch.randint(0, 97, (3, 9))
    s = rm(x)
    assert s.shape == (3, 9)
    assert torch.equal(rm.score_at(x, torch.tensor([8, 0, 4])), s[[0, 1, 2], [8, 0, 4]])


def test_overfit_one_batch():
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", **CFG)).train()
    x = torch.randint(0, 97, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = -m.logprobs(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_shape_errors():
    m = model()
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        m(torch.zeros(1, 5, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))


def test_target_start_skips_the_lm_head_on_leading_positions():
    m = model()
    x = torch.randint(0, 97, (3, 13))
    y = torch.randint(0, 97, (3, 13))
    kv0 = torch.tensor([0, 2, 4])
    full, ent = m(x, y, kv_start=kv0, return_entropy=True)
    w = torch.randn(3, 8)
    (full[:, 5:] * w).sum().backward()
    g_full = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    part, ent_part = m(x, y[:, 5:], kv_start=kv0, return_entropy=True, target_start=5)
    assert part.shape == (3, 8)
    torch.testing.assert_close(part, full[:, 5:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent_part, ent[:, 5:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x, y, kv_start=kv0, target_start=5), part, rtol=0, atol=0)  # [B,T] targets
    (part * w).sum().backward()
    for a, p in zip(g_full, m.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="targets must be"):
        m(x, y[:, 4:], target_start=5)
