"""Document masking for packed rows: pack() segment ids, EOS segments, and a packed SFT batch
that gives every example exactly the per-token losses it gets alone (SDPA path and the Triton
kernels, which run in the interpreter without a GPU)."""
import importlib

import pytest
import torch

import kernels
from engine import GPT, GPTConfig
from engine.data import pack, segments_from_eos
from recipes.sft import masked_nll

A = importlib.import_module("kernels.attention")
BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or A._interpreted() else [])


def test_pack_segment_ids():
    seqs = [([10 * i + 5] * n, [0] + [1] * (n - 1)) for i, n in enumerate((3, 7, 4, 2, 6, 1))]
    ids, mask = pack(seqs, seq_len=8, pad_id=0)
    ids2, mask2, seg = pack(seqs, seq_len=8, pad_id=0, return_segments=True)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    assert seg.dtype == torch.long and seg.shape == ids.shape
    assert (seg[ids == 0] == 0).all() and (seg[ids != 0] > 0).all()
    for r in range(ids.shape[0]):                   # one segment per example, numbered 1, 2, ...
        for s_id in seg[r].unique().tolist():
            if s_id:
                assert ids[r][seg[r] == s_id].unique().numel() == 1
        real = seg[r][seg[r] > 0]
        assert real.tolist() == sorted(real.tolist()) and real.min() == 1


def test_segments_from_eos():
    x = torch.tensor([[4, 5, 2, 6, 2, 2, 7], [2, 3, 3, 3, 3, 3, 3]])
    assert segments_from_eos(x, 2).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert kernels.segment_positions(segments_from_eos(x, 2)).tolist() == \
        [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]]


def _model(seed=0):
    torch.manual_seed(seed)
    # tiny preset: dense and banded layers alternate; window 8 < some examples' length
    cfg = GPTConfig.from_preset("tiny", vocab_size=97, block_size=64, n_layer=2, window=8)
    return GPT(cfg).eval()


def _examples(seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (9, 23, 3, 14, 30, 6, 17):
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        k = max(1, n // 3)
        out.append((ids, [0] * k + [1] * (n - k)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sft_batch_equals_examples_one_by_one(monkeypatch, backend):
    monkeypatch.setenv("ENGINE_KERNELS", backend)
    model = _model()
    exs = _examples()
    ids, mask, seg = pack(exs, seq_len=48, pad_id=0, return_segments=True)
    assert ids.shape[0] < len(exs)                   # several examples share rows
    with torch.no_grad():
        logp = model(ids[:, :-1], targets=ids[:, 1:], segment_ids=seg[:, :-1])
        for r in range(ids.shape[0]):
            for s_id in seg[r].unique().tolist():
                if s_id == 0:
                    continue
                cols = (seg[r] == s_id).nonzero()[:, 0]
                a, n = int(cols[0]), len(cols)
                x = ids[r, a:a + n][None]
                alone = model(x[:, :-1], targets=x[:, 1:])[0]
                # the example's own predictions: positions a .. a+n-2 of the packed row
                torch.testing.assert_close(logp[r, a:a + n - 1], alone, rtol=0, atol=2e-5)
        # per-example SFT losses (the recipe's masked_nll) agree as well
        packed_loss = masked_nll(model, ids, mask, seg)
        tot = sum(-model(torch.tensor([i[:-1]]), targets=torch.tensor([i[1:]]))[0]
                  [torch.tensor(m[1:]).bool()].sum() for i, m in exs)
        n_tok = sum(sum(m[1:]) for _, m in exs)
        torch.testing.assert_close(packed_loss, tot / n_tok, rtol=1e-5, atol=1e-6)
        # without segment ids the packed rows do attend across examples: results differ
        unmasked = model(ids[:, :-1], targets=ids[:, 1:])
        assert not torch.allclose(unmasked, logp, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_backward_equals_sum_of_examples(monkeypatch, backend):
    """Gradients of the packed loss equal the sum over examples run alone (segment-id attention
    backward through the whole model)."""
    monkeypatch.setenv("ENGINE_KERNELS", backend)
    model = _model(seed=2)
    exs = _examples(seed=3)[:4]
    ids, mask, seg = pack(exs, seq_len=64, pad_id=0, return_segments=True)
    logp = model(ids[:, :-1], targets=ids[:, 1:], segment_ids=seg[:, :-1])
    (logp * mask[:, 1:]).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i, m in exs:
        x = torch.tensor([i])
        lp = model(x[:, :-1], targets=x[:, 1:])
        (lp * torch.tensor([m[1:]])).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")


def test_rollout_trim_drops_shared_padding_and_keeps_every_token_quantity():
    """A PPO minibatch trimmed of its all-padding columns gives the same logprobs, values and
    RM scores as the full-width rollout (positions come from kv_start, pads are masked)."""
    from engine.model import RewardModel
    from engine.rollout import Rollout, policy_logprobs, score_responses, values
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32, vocab_size=50,
                    window=4, dropout=0.0)
    policy, rm = GPT(cfg).eval(), RewardModel(cfg).eval()
    P, R, pad = 7, 6, 0
    prompt_lens, resp_lens = [5, 3, 6], [2, 4, 3]  # every row has >= 1 left pad; R - 4 columns unused
    seq = torch.full((3, P + R), pad, dtype=torch.long)
    mask = torch.zeros(3, R)
    for b, (pl, rl) in enumerate(zip(prompt_lens, resp_lens)):
        seq[b, P - pl:P + rl] = torch.randint(3, 50, (pl + rl,))
        mask[b, :rl] = 1
    roll = Rollout(seq, torch.tensor([P - n for n in prompt_lens]), P, mask, torch.zeros(3, R),
                   ["p"] * 3, ["r"] * 3, torch.zeros(3, dtype=torch.bool))
    t = roll.trim()
    assert t.seq.shape == (3, 6 + 4) and t.prompt_len == 6 and t.kv_start.tolist() == [1, 3, 0]
    assert torch.equal(t.mask, mask[:, :4]) and torch.equal(t.last_idx - t.prompt_len, roll.last_idx - P)
    with torch.no_grad():
        torch.testing.assert_close(policy_logprobs(policy, t), policy_logprobs(policy, roll)[:, :4])
        torch.testing.assert_close(values(rm, t), values(rm, roll)[:, :4])
        torch.testing.assert_close(score_responses(rm, t), score_responses(rm, roll))
    assert t.trim() is t  # nothing left to trim
