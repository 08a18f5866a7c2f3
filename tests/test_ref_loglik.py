"""The reward model's reference term: r(x, y) = head(h_last) + w * log pi_ref(y | x)
(RewardModel.loglik_weight, recipes.rm rm.ref_loglik), against brute-force log-softmax sums."""
import pytest
import torch
import torch.nn.functional as F

from engine.config import GPTConfig
from engine.data import collate_rankings
from engine.model import GPT, RewardModel
from recipes import rm as rm_recipe

CFG = dict(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32, vocab_size=64, dropout=0.0)


def _groups(seed=1, n=5):
    """Ranking groups of 2-4 completions sharing a prompt of 1-5 tokens (token 2 = EOS)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        p = torch.randint(3, 64, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        ids = [p + torch.randint(3, 64, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() + [2]
               for _ in range(2 + k % 3)]
        out.append({"ids": ids, "last_idx": [len(s) - 1 for s in ids], "ranking": list(range(len(ids))),
                    "prompt_len": len(p)})
    return out


def _brute_loglik(ref, seq, P):
    """sum_{t >= P} log softmax(logits[t-1])[seq[t]] from the full logits."""
    with torch.no_grad():
        logp = F.log_softmax(ref(torch.tensor([seq])).double(), -1)[0]
    return sum(float(logp[t - 1, seq[t]]) for t in range(P, len(seq)))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return GPT(GPTConfig(**CFG)).eval(), RewardModel(GPTConfig(**CFG)).eval()


def test_reference_logliks_are_the_completion_log_probs(models):
    ref, _ = models
    groups = _groups()
    rm_recipe.add_reference_logliks(ref, groups, pad_id=0, device="cpu", batch_size=3)  # batches cut groups
    for item in groups:
        for seq, got in zip(item["ids"], item["ref_loglik"]):
            assert got == pytest.approx(_brute_loglik(ref, seq, item["prompt_len"]), abs=1e-4)
            assert got < 0


def test_group_rewards_add_the_weighted_term_padded_and_packed(models):
    ref, rm = models
    groups = _groups()
    with torch.no_grad():
        head = rm_recipe.group_rewards(rm, collate_rankings(groups, 0))
    rm_recipe.add_reference_logliks(ref, groups, 0, "cpu")
    lik = [x for item in groups for x in item["ref_loglik"]]
    with torch.no_grad():
        rm.loglik_weight.fill_(0.7)
        padded = rm_recipe.group_rewards(rm, collate_rankings(groups, 0))
        packed = rm_recipe.group_rewards(rm, collate_rankings(groups, 0, pack_len=32))
        rm.loglik_weight.zero_()
        assert torch.equal(rm_recipe.group_rewards(rm, collate_rankings(groups, 0)), head)  # w = 0: the head
    want = head.clone()
    i = 0
    for b, item in enumerate(groups):
        for j in range(len(item["ids"])):
            want[b, j] += 0.7 * lik[i]
            i += 1
    torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-5)


def test_evaluate_refuses_groups_without_the_reference_term(models):
    _, rm = models
    with torch.no_grad():
        rm.loglik_weight.fill_(0.5)
    try:
        with pytest.raises(ValueError, match="add_reference_logliks"):
            rm_recipe.evaluate(rm, _groups(), 0, "cpu")
    finally:
        with torch.no_grad():
            rm.loglik_weight.zero_()


def test_reward_model_without_loglik_weight_in_its_checkpoint_loads_with_zero(tmp_path):
    from safetensors.torch import load_file, save_file
    rm = RewardModel(GPTConfig(**CFG))
    with torch.no_grad():
        rm.loglik_weight.fill_(0.3)
    rm.save(str(tmp_path / "rm"))
    assert RewardModel.load(str(tmp_path / "rm")).ref_weight == pytest.approx(0.3)
    sd = load_file(str(tmp_path / "rm" / "model.safetensors"))
    del sd["loglik_weight"]  # a checkpoint from before the reference term existed
    save_file(sd, str(tmp_path / "rm" / "model.safetensors"))
    old = RewardModel.load(str(tmp_path / "rm"))
    assert old.ref_weight == 0.0 and not old.loglik_weight.requires_grad
    assert torch.equal(old.head.weight, rm.head.weight)


def test_score_responses_adds_the_reference_term(models):
    from engine.rollout import generate_responses, policy_logprobs, score_responses
    ref, rm = models
    roll = generate_responses(ref, _Tok(), [[5, 6, 7], [9]], max_new_tokens=5, seed=3)
    head = score_responses(rm, roll)
    with torch.no_grad():
        rm.loglik_weight.fill_(0.25)
    try:
        with pytest.raises(ValueError, match="pass ref="):
            score_responses(rm, roll)
        assert torch.equal(score_responses(rm, roll, head_only=True), head)
        with torch.no_grad():
            lp = policy_logprobs(ref, roll).sum(1)
        torch.testing.assert_close(score_responses(rm, roll, ref), head + 0.25 * lp)
    finally:
        with torch.no_grad():
            rm.loglik_weight.zero_()


class _Tok:
    """The least a rollout needs from a tokenizer: pad / EOS ids and decode."""
    pad_id, eos_id = 0, 2

    def decode(self, ids):
        return " ".join(map(str, ids))
