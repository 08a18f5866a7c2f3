"""Defects of the training path that fp32 single-process runs did not show, one test each: batch
splitting, global-token loss normalisation, PPO math edge cases, the RM tokenizer check, safe
resume, and the FSDP paths that bypass a sharded model's forward."""
from __future__ import annotations

import math
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from engine import GPT, GPTConfig, RewardModel
from engine.config import ConfigError, TrainConfig, load_config
from tests.recipe_cli import ROOT
from tests.test_dist import metrics, run

CONFIGS = Path(ROOT) / "recipes" / "configs"


# ----------------------------------------------------------------------------- batch splitting
def test_batch_that_does_not_split_is_refused():
    from engine.trainer import split_batch
    with pytest.raises(ConfigError, match=r"train.batch_size=64 is not a multiple of train.micro_batch_size=16 "
                                          r"x 8 ranks = 128.*one of \[1, 2, 4, 8\]"):
        split_batch(TrainConfig(batch_size=64, micro_batch_size=16), 8)
    with pytest.raises(ConfigError, match="not divisible by 3 ranks"):
        split_batch(TrainConfig(batch_size=16, micro_batch_size=0), 3)
    assert split_batch(TrainConfig(batch_size=64, micro_batch_size=8), 4) == (8, 2)
    assert split_batch(TrainConfig(batch_size=16, micro_batch_size=0), 2) == (8, 1)


@pytest.mark.parametrize("name", ["sft", "rm", "pretrain"])
def test_shipped_configs_split_at_1_to_8_ranks(name):
    import importlib
    from engine.trainer import split_batch
    mod = importlib.import_module(f"recipes.{name}")
    cls = {"sft": "SFTConfig", "rm": "RMConfig", "pretrain": "PretrainConfig"}[name]
    files = sorted(CONFIGS.glob(f"{name}_*.toml"))
    assert files
    for f in files:
        cfg = load_config(getattr(mod, cls), str(f))
        for world in ((1, 2, 4, 8) if "gpt3" in f.name else (1, 2)):
            mb, acc = split_batch(cfg.train, world)
            assert mb * acc * world == cfg.train.batch_size, (f.name, world)


# ----------------------------------------------------------------------------- loss normalisation
def _ragged_sft_batch(n=8, T=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    mask = torch.zeros(n, T)
    for i, L in enumerate([1, 11, 3, 9, 2, 6, 10, 4][:n]):  # trained tokens per row: very ragged
        mask[i, T - L:] = 1
    return ids, mask


def _one_step_delta(micro_batch_size, count):
    """Weight change of one SGD(lr=1) step (= -gradient) for a global batch of 8 ragged rows."""
    from engine.losses import sft_loss
    from engine.trainer import Trainer
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50, block_size=16, dropout=0.0))
    before = [p.detach().clone() for p in model.parameters()]
    ids, mask = _ragged_sft_batch()
    cfg = TrainConfig(batch_size=8, micro_batch_size=micro_batch_size, grad_clip=0.0)
    trainer = Trainer(model, cfg, "/nonexistent", loss_fn=None, batch_fn=lambda s, m: None,
                      optimizers={"model": torch.optim.SGD(model.parameters(), lr=1.0)},
                      count_fn=(lambda b: int(b[1][:, 1:].sum())) if count else None)
    micro = [(ids[i:i + micro_batch_size], mask[i:i + micro_batch_size])
             for i in range(0, 8, micro_batch_size)]

    def loss_fn(m, b):
        x, msk = b
        return sft_loss(m(x[:, :-1], targets=x[:, 1:]), msk[:, 1:]), {}
    info = trainer.update(micro, loss_fn)
    return [p.detach() - b for p, b in zip(model.parameters(), before)], info["loss"]


def test_gradient_is_the_global_token_mean_however_the_batch_is_split():
    one, l1 = _one_step_delta(8, count=True)
    four, l4 = _one_step_delta(2, count=True)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert math.isclose(l1, l4, rel_tol=1e-6)
    # the old per-micro-batch mean gives another gradient on ragged rows
    old, _ = _one_step_delta(2, count=False)
    assert max(float((a - b).abs().max()) for a, b in zip(one, old)) > 1e-4


def test_sft_gradient_same_for_accum_micro_and_ranks(tmp_path):
    """accum 4 x micro 2, one micro batch of 8, and 2 ranks x accum 2 x micro 2: the same
    gradient (grad norm of step 1) and so the same loss at step 2, on packed ragged rows."""
    base = ["--train.max_steps=2", "--train.batch_size=8", "--model.dropout=0.0", "--train.lr=1e-3"]
    run("sft", tmp_path / "m8", base + ["--train.micro_batch_size=8"])
    run("sft", tmp_path / "m2", base + ["--train.micro_batch_size=2"])
    run("sft", tmp_path / "r2", base + ["--train.micro_batch_size=2"], nproc=2)
    rows = [metrics(tmp_path / d) for d in ("m8", "m2", "r2")]
    for key in ("grad_norm", "loss"):
        vals = [r[i][key] for r in rows for i in range(2)]
        for r in rows[1:]:
            for i in range(2):
                assert math.isclose(rows[0][i][key], r[i][key], rel_tol=1e-5), (key, vals)


# ----------------------------------------------------------------------------- PPO math
def test_exact_kl_uses_the_sampling_temperature():
    from engine.rollout import Rollout
    from kernels import linear_kl_ref
    from recipes.ppo import exact_kl
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=40, block_size=32)
    pol, ref = GPT(cfg).eval(), GPT(cfg).eval()
    seq = torch.randint(0, 40, (3, 10))
    mask = torch.ones(3, 6)
    roll = Rollout(seq, torch.zeros(3, dtype=torch.long), 4, mask, torch.zeros(3, 6), [""] * 3, [""] * 3,
                   torch.zeros(3, dtype=torch.bool))
    with torch.no_grad():
        h = pol.hidden_states(seq[:, :-1])[:, 3:].reshape(-1, cfg.d_model)
        hr = ref.hidden_states(seq[:, :-1])[:, 3:].reshape(-1, cfg.d_model)
        y = seq[:, 4:].reshape(-1)
        want = linear_kl_ref(h, pol.lm_head_weight, hr, ref.lm_head_weight, y, temperature=0.7)[2].view(3, 6)
        t1 = linear_kl_ref(h, pol.lm_head_weight, hr, ref.lm_head_weight, y)[2].view(3, 6)
    got = exact_kl(pol, ref, roll, temperature=0.7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - t1).abs().max() > 1e-3


def test_global_whiten_is_stable_for_a_large_mean():
    from recipes.ppo import global_whiten
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(64, 32, generator=g)   # |mean| / std = 1e6
    mask = (torch.rand(64, 32, generator=g) > 0.3).float()
    y = global_whiten(x, mask)
    m = mask.bool()
    assert torch.isfinite(y).all() and (y[~m] == 0).all()
    assert abs(float(y[m].mean())) < 1e-3 and abs(float(y[m].std()) - 1) < 1e-3


def test_running_moments_do_not_blow_up_equal_first_scores():
    from engine.ppo import RunningMoments
    rm = RunningMoments()
    rm.update(torch.full((16,), 2.0))
    out = rm.normalize(torch.tensor([2.0, 2.5]), shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.5]))  # no spread yet: no 1e8 scaling
    assert torch.equal(rm.normalize(torch.tensor([2.0])), torch.tensor([0.0]))
    rm.update(torch.tensor([0.0, 4.0]))
    assert 0 < rm.std < 2 and abs(float(rm.normalize(torch.tensor([4.0]), shift_mean=False)) - 4 / rm.std) < 1e-6


def test_bias_corrected_ema_is_the_normalised_average_of_the_iterates():
    from engine.ppo import ema_decay_at, ema_update
    d, T = 0.992, 10
    ema, p = [torch.zeros(())], [torch.zeros(())]     # init (the SFT weights) = 0
    for t in range(1, T + 1):
        p[0].fill_(float(t))                           # the policy after update t
        ema_update(ema, p, ema_decay_at(t, d))
    w = [d ** (T - i) for i in range(1, T + 1)]
    want = sum(wi * i for wi, i in zip(w, range(1, T + 1))) / sum(w)
    assert math.isclose(float(ema[0]), want, rel_tol=1e-6)   # ~5.5, where uncorrected gives ~0.4
    assert ema_decay_at(1, d) == 0.0 and abs(ema_decay_at(10_000, d) - d) < 1e-9
    assert ema_decay_at(5, d, bias_correction=False) == d
    from recipes.ppo import PPORecipeConfig
    cfg = load_config(PPORecipeConfig, str(CONFIGS / "ppo_cpu.toml"))
    assert cfg.ppo.ema_bias_correction and cfg.rl.ema


def test_truncated_responses_are_penalised_by_default():
    from engine.ppo import PPOConfig, shaped_rewards
    from recipes.ppo import PPORecipeConfig
    assert PPOConfig().no_eos_penalty > 0
    for f in sorted(CONFIGS.glob("ppo_*.toml")):
        assert load_config(PPORecipeConfig, str(f)).ppo.no_eos_penalty > 0, f.name
    mask = torch.ones(2, 3)
    r, _ = shaped_rewards(torch.tensor([1.0, 1.0]), torch.zeros(2, 3), torch.zeros(2, 3), mask, beta=0.0,
                          no_eos=torch.tensor([False, True]), no_eos_penalty=PPOConfig().no_eos_penalty)
    assert float(r[0, -1]) == 1.0 and float(r[1, -1]) == 1.0 - PPOConfig().no_eos_penalty


def test_value_loss_ignores_garbage_in_padding():
    from engine.losses import value_loss
    v = torch.tensor([[0.5, 1.0, float("inf")], [0.1, float("nan"), -float("inf")]], requires_grad=True)
    old = torch.tensor([[0.4, 0.9, float("nan")], [0.0, 0.0, float("inf")]])
    ret = torch.tensor([[1.0, 1.0, float("inf")], [0.5, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = value_loss(v, old, ret, mask, clip=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v.grad).all()
    assert (v.grad[mask == 0] == 0).all()
    clean = value_loss(v.detach()[:, :1].clone(), old[:, :1], ret[:, :1], mask[:, :1], clip=0.2)
    assert torch.isfinite(clean)


# ----------------------------------------------------------------------------- tokenizer check
def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    from engine.tokenizer import Tokenizer
    from recipes.rm import load_reward_model
    data = Path(ROOT) / "recipes" / "data"
    a = Tokenizer.train(data / "text_tinyshakespeare.txt", None, vocab_size=400)
    b = Tokenizer.train(data / "text_wikitext2_valid.txt", None, vocab_size=400)
    assert a.vocab_size == b.vocab_size
    rm = RewardModel(GPTConfig.from_preset("tiny", vocab_size=400, block_size=16))
    rm.save(str(tmp_path / "rm" / "model"))
    a.save(str(tmp_path / "rm"))
    assert load_reward_model(str(tmp_path / "rm"), "cpu", tok=a) is not None
    with pytest.raises(SystemExit, match="tokenizer differs from this run's.*same vocabulary size 400"):
        load_reward_model(str(tmp_path / "rm"), "cpu", tok=b)


# ----------------------------------------------------------------------------- safe resume
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/evil-marker')}",))


def test_crafted_state_pt_is_refused_without_running_code(tmp_path, monkeypatch):
    from engine.checkpoint import CheckpointError, latest_step_dir, load_training, save_training
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=32, block_size=16))
    opt = torch.optim.AdamW(model.parameters())
    from engine.checkpoint import rng_state
    save_training(str(tmp_path / "ckpt"), 3, {"model": model}, {"rng": rng_state()}, optimizers={"model": opt})
    state = load_training(str(tmp_path / "ckpt"), {"model": model}, optimizers={"model": opt})
    assert state["step"] == 3  # an honest checkpoint (RNG + optimizer) loads with weights_only
    d = latest_step_dir(str(tmp_path / "ckpt"))
    with open(os.path.join(d, "state.pt"), "wb") as f:
        pickle.dump({"step": 3, "payload": _Evil()}, f)
    with pytest.raises(CheckpointError, match="state.pt: cannot load safely"):
        load_training(str(tmp_path / "ckpt"), {"model": model}, optimizers={"model": opt})
    assert not marker.exists()


# ----------------------------------------------------------------------------- FSDP gather paths
def test_fsdp_rm_selection_and_ppo_eval_hook(tmp_path):
    """Under FSDP2 (2 gloo ranks): SFT's RM-based selection generates on the sharded model and
    saves the best checkpoint with full weights; PPO's eval hook samples from the sharded EMA."""
    base = ["--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch_size=2"]
    run("sft", tmp_path / "sft", base)
    run("rm", tmp_path / "rm", base + [f"--model.init={tmp_path / 'sft'}", "--train.max_steps=1"])
    run("sft", tmp_path / "sft_sel", base + ["--dist.strategy=fsdp", f"--sft.rm={tmp_path / 'rm'}",
                                             "--train.eval_every=1", "--sft.rm_prompts=4",
                                             "--sft.max_new_tokens=4"], nproc=2)
    rows = metrics(tmp_path / "sft_sel")
    assert all(math.isfinite(r["eval_rm_score"]) for r in rows)
    best = GPT.load(str(tmp_path / "sft_sel" / "best"))
    ref = GPT.load(str(tmp_path / "sft" / "model"))
    assert all(a.shape == b.shape for a, b in zip(best.parameters(), ref.parameters()))
    final = GPT.load(str(tmp_path / "sft_sel" / "model"))  # the export is the RM-selected checkpoint
    assert all(torch.equal(a, b) for a, b in zip(best.parameters(), final.parameters()))
    script = Path(__file__).with_name("ppo_eval_hook_run.py")
    import subprocess

    from tests.recipe_cli import env
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path / "ppo"), str(tmp_path / "sft"), str(tmp_path / "rm")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = metrics(tmp_path / "ppo")
    assert [r["hook_response_len"] > 0 for r in rows] == [True, True]
