"""Smoke runs of every recipe on the tiny preset (20 steps), loss going down on real text, and
resume giving the same loss curve. The full default pipeline is not run here."""
import json
import os

import pytest
import torch

from engine.metrics import read_metrics
from recipes import instructgpt, pretrain, ppo, rm, sft
from recipes.common import DATA

def losses(run):
    return [r["loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pretrain -> sft -> rm -> ppo on bundled real data, 20 steps each, in one process."""
    root = tmp_path_factory.mktemp("runs")
    out = {k: str(root / k) for k in ("pt", "sft", "rm", "ppo")}
    common = ["--train.progress=false", "--data.seq_len=64", "--train.threads=1"]
    pretrain.main(common + ["--train.max_steps=40", "--train.batch_size=8", "--train.eval_every=20",
                            "--train.ckpt_every=20", "--out", out["pt"]])
    sft.main(common + [f"--model.init={out['pt']}", "--train.max_steps=20", "--train.batch_size=4",
                       "--out", out["sft"]])
    rm.main(common + [f"--model.init={out['sft']}", "--train.max_steps=20", "--train.batch_size=4",
                      f"--rm.demos={DATA / 'sft_selfinstruct_seed.jsonl'}", "--out", out["rm"]])
    ppo.main(common + [f"--model.init={out['sft']}", f"--rl.rm={out['rm']}", "--train.max_steps=3",
                       "--ppo.batch_size=8", "--ppo.minibatch_size=4", "--ppo.max_new_tokens=8",
                       f"--rl.ptx_path={DATA / 'text_tinyshakespeare.txt'}", "--rl.ptx_per_minibatch=2",
                       "--rl.ptx_seq_len=32", "--out", out["ppo"]])
    return out


def test_pretrain_loss_goes_down_on_real_text(runs):
    ls = losses(runs["pt"])
    assert len(ls) == 40
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.5, ls
    rows = read_metrics(os.path.join(runs["pt"], "metrics.jsonl"))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert "eval_loss" in rows[19] and rows[39]["eval_loss"] < rows[19]["eval_loss"] + 0.5


def test_every_stage_writes_its_run_folder(runs):
    for name in ("pt", "sft", "rm", "ppo"):
        d = runs[name]
        for f in ("config.toml", "metrics.jsonl", "tokenizer.model", "model/config.json", "ckpt/latest"):
            assert os.path.exists(os.path.join(d, f)), (name, f)
    assert len(losses(runs["sft"])) == 20 and len(losses(runs["rm"])) == 20
    assert all(l == l for l in losses(runs["rm"]))  # no NaN


def test_ppo_first_ratio_is_exactly_one(runs):
    rows = read_metrics(os.path.join(runs["ppo"], "metrics.jsonl"))
    assert len(rows) == 3
    assert rows[0]["first_ratio"] == 1.0
    assert rows[0]["approx_kl"] < 1e-3 and "ptx_loss" in rows[0] and "value_loss" in rows[0]


class Crash(Exception):
    pass


def test_crash_then_rerun_continues_the_same_curve(tmp_path, monkeypatch):
    from engine.trainer import Trainer
    base = ["--train.progress=false", "--data.seq_len=32", "--train.threads=1", "--train.batch_size=4",
            "--train.eval_every=0", "--train.ckpt_every=3", "--model.dropout=0.1", "--train.max_steps=8"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pretrain.main(base + ["--out", a])
    log = Trainer.log

    def crash_at_7(self, row, progress=None):
        log(self, row, progress)
        if row["step"] == 7:  # logged step 7, last checkpoint is step 6
            raise Crash()
    monkeypatch.setattr(Trainer, "log", crash_at_7)
    with pytest.raises(Crash):
        pretrain.main(base + ["--out", b])
    assert len(losses(b)) == 7
    monkeypatch.setattr(Trainer, "log", log)
    pretrain.main(base + ["--out", b])  # the same command resumes from step 6
    assert losses(b) == losses(a)  # bit for bit, dropout included


def test_unknown_key_lists_valid_ones(capsys):
    with pytest.raises(SystemExit, match="valid keys in train"):
        sft.main(["--train.learning_rate=1"])


def test_instructgpt_pipeline_smoke(tmp_path):
    out = str(tmp_path / "mini")
    args = ["--steps.pretrain=20", "--steps.sft=20", "--steps.rm_epochs=0.5", "--steps.ppo=2",
            "--world.pretrain_chars=100000", "--world.sft_demos=100", "--world.rm_prompts=32",
            "--world.rm_eval_prompts=16", "--world.ppo_prompts=32", "--eval.prompts=24",
            "--ppo.batch_size=8", "--ppo.minibatch_size=4", "--ppo.max_new_tokens=8", "--eval.max_new_tokens=8",
            "--eval.prose_tokens=512", "--steps.rm_ensemble=2"]
    rep = instructgpt.main(["--out", out] + args)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    for key in ("win_rate_vs_sft", "rm_accuracy", "kl_from_sft", "toxicity_rate", "alignment_tax", "wall_time_s"):
        assert key in report
    for m in ("base", "ppo", "ppo_ptx"):
        w = report["win_rate_vs_sft"][m]
        assert 0 <= w["lo"] <= w["mean"] <= w["hi"] <= 1
    assert report["win_rate_vs_sft"]["sft"]["mean"] == 0.5
    assert set(report["rm_accuracy"]) == {"train_labelers", "heldout_labelers"}
    assert os.path.exists(os.path.join(out, "report.md")) and os.path.exists(os.path.join(out, "curves.png"))
    assert rep["wall_time_s"]["total"] > 0
    # on a multi-core CPU the two RL stages ran at once, in processes of cores // 2 threads
    together = (os.cpu_count() or 1) >= 2
    assert report["side_by_side"] == (["ppo", "ppo_ptx"] if together else [])
    for stage in ("ppo", "ppo_ptx"):
        threads = max(1, (os.cpu_count() or 1) // 2) if together else 0
        conf = open(os.path.join(out, stage, "config.toml")).read()
        assert f"threads = {threads}\n" in conf
        assert f'rm = "{os.path.join(out, "rm")},{os.path.join(out, "rm2")}"' in conf  # steps.rm_ensemble=2
    # the two reward models were trained from different seeds
    from recipes.rm import load_reward_model
    heads = [load_reward_model(os.path.join(out, n), "cpu").head.weight for n in ("rm", "rm2")]
    assert not torch.equal(*heads)
    assert {"data", "rm", "rm2", "rm_eval", "eval"} <= set(report["wall_time_s"])
    # the reader's tables: per-task accuracy, what the RM learned, what changed under PPO-ptx
    tasks = report["per_model"]["sft"]["per_task"]
    assert tasks and all({"seen", "heldout", "seen_greedy", "heldout_greedy"} <= set(v) for v in tasks.values())
    dims = report["rm_accuracy_by_dimension"]
    assert "total" in dims and all(0 <= v["accuracy"] <= 1 and v["pairs"] > 0 for v in dims.values())
    assert set(report["changed_vs_sft"]["ppo_ptx"]) == {"became_correct", "became_wrong", "still_wrong"}
    ci = report["per_model"]["ppo_ptx"]["accuracy_vs_baseline"]
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert ci["mean"] == pytest.approx(report["alignment_tax"]["ppo_ptx"]["accuracy_delta"])
    # the LM terms of SFT and PPO-ptx read the corpus's prose, not its Q/A items
    ptx_path = os.path.join(out, "data", "ptx.txt")
    ptx_text = open(ptx_path).read()
    assert ptx_text and "\nA:" not in ptx_text and ptx_text.split("\n\n")[0] in open(os.path.join(out, "data", "pretrain.txt")).read()
    for stage in ("sft", "ppo_ptx"):
        assert f'ptx_path = "{ptx_path}"' in open(os.path.join(out, stage, "config.toml")).read()
    assert -1.0 <= report["rm_world_correlation"] <= 1.0 and report["ppo_reward"] == "rm"
    text = open(os.path.join(out, "report.md")).read()
    assert "## Task accuracy on held-out instances" in text and "## What the reward model learned" in text
    assert "correlates r = " in text
    pol = report["rm_on_policy_samples"]
    assert pol["k"] == 4 and pol["pairs"] >= 0 and -1.0 <= pol["r_within"] <= 1.0
    assert pol["pairs"] == 0 or 0.0 <= pol["right_over_wrong"] <= 1.0
    assert "puts a right answer above a wrong one" in text
    with pytest.raises(SystemExit, match="steps.ppo_reward='oracle': expected one of rm, world"):
        instructgpt.main(["--out", str(tmp_path / "bad"), "--steps.ppo_reward=oracle"] + args)
    # a rerun resumes every stage and still reports what each one cost (stage_seconds)
    rep2 = instructgpt.main(["--out", out] + args)
    w1, w2 = report["wall_time_s"], rep2["wall_time_s"]
    for stage in (*instructgpt.RESUMABLE, "rm2"):  # rm2: the second reward model of the ensemble
        assert w2[stage] >= w1[stage] > 0, stage
        assert float(open(os.path.join(out, stage, "stage_seconds")).read()) == pytest.approx(w2[stage], abs=0.06)
    # the rerun's total carries what the resumed stages cost (side-by-side ones overlapped: once)
    assert w2["total"] + 0.3 >= w2["pretrain"] + w2["sft"] + w2["rm"] + max(w2["ppo"], w2["ppo_ptx"])
    # the tokenizer keeps one piece per letter (the letter drill), and the pipeline used it
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.load(os.path.join(out, "pretrain"))
    assert [len(tok._sp.id_to_piece(i).strip("\u2581")) for i in tok.encode(" q x j Z")] == [1, 1, 1, 1]


def test_sft_keeps_the_checkpoint_the_rm_scores_best(runs, tmp_path):
    out = str(tmp_path / "sft_rm")
    sft.main(["--train.progress=false", "--data.seq_len=64", "--train.threads=1",
              f"--model.init={runs['pt']}", "--train.max_steps=4", "--train.batch_size=4",
              "--train.eval_every=2", f"--sft.rm={runs['rm']}", "--sft.rm_prompts=4",
              "--sft.max_new_tokens=4", "--out", out])
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "eval_rm_score" in r]
    assert [r["step"] for r in rows] == [2, 4]
    best = max(rows, key=lambda r: r["eval_rm_score"])
    from engine import GPT
    exported, kept = GPT.load(os.path.join(out, "model")), GPT.load(os.path.join(out, "best"))
    for a, b in zip(exported.parameters(), kept.parameters()):
        assert torch.equal(a, b)
    assert best["eval_rm_score"] == max(r["eval_rm_score"] for r in rows)


def test_ppo_exact_kl_and_k3_estimator(runs, tmp_path):
    rows = {}
    for name, extra in (("k3", ["--ppo.kl_estimator=k3"]), ("exact", ["--rl.exact_kl=true"])):
        out = str(tmp_path / name)
        ppo.main(["--train.progress=false", "--data.seq_len=64", "--train.threads=1",
                  f"--model.init={runs['sft']}", f"--rl.rm={runs['rm']}", "--train.max_steps=2",
                  "--ppo.batch_size=8", "--ppo.minibatch_size=4", "--ppo.max_new_tokens=8",
                  "--out", out, *extra])
        rows[name] = read_metrics(os.path.join(out, "metrics.jsonl"))
    # Both penalties are >= 0 per token (k3 and the exact KL), and 0 before any update.
    for name, r in rows.items():
        assert r[0]["kl"] == pytest.approx(0.0, abs=1e-6), name
        assert r[1]["kl"] >= -1e-6, name


def test_ppo_score_fn_replaces_the_reward_model(runs, tmp_path):
    """ppo.run(score_fn=...) rewards each episode with score_fn's value, not the RM's: the logged
    reward is exactly the given score, and score_fn sees the episodes' prompts and responses."""
    from recipes import common
    seen = []

    def score_fn(roll):
        seen.extend(zip(roll.prompts, roll.responses))
        return torch.full((len(roll.prompts),), 7.0)
    cfg, out = common.parse(ppo.PPORecipeConfig, [
        "--train.progress=false", "--data.seq_len=64", "--train.threads=1", f"--model.init={runs['sft']}",
        f"--rl.rm={runs['rm']}", "--train.max_steps=2", "--ppo.batch_size=8", "--ppo.minibatch_size=4",
        "--ppo.max_new_tokens=8", "--out", str(tmp_path / "scored")], "ppo")
    ppo.run(cfg, out, score_fn=score_fn)
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["reward"] for r in rows] == [7.0, 7.0]
    prompts = set(ppo.load_prompts(cfg.data.path))
    assert len(seen) == 16 and all(p in prompts and isinstance(r, str) for p, r in seen)


def test_ppo_critic_warmup_trains_only_the_value_model(runs, tmp_path):
    """ppo.critic_warmup=2: the first two iterations leave the policy at its init (lr 0, exported
    weights unchanged without EMA) while the value model trains; the third updates the policy."""
    from engine import GPT
    from recipes.rm import load_reward_model
    base = ["--train.progress=false", "--data.seq_len=64", "--train.threads=1",
            f"--model.init={runs['sft']}", f"--rl.rm={runs['rm']}", "--ppo.batch_size=8",
            "--ppo.minibatch_size=4", "--ppo.max_new_tokens=8", "--rl.ema=false", "--ppo.critic_warmup=2"]
    init = GPT.load(os.path.join(runs["sft"], "model"))
    rm0 = load_reward_model(runs["rm"], "cpu")
    for steps, moved in ((2, False), (3, True)):
        out = str(tmp_path / f"w{steps}")
        ppo.main(base + [f"--train.max_steps={steps}", "--out", out])
        rows = read_metrics(os.path.join(out, "metrics.jsonl"))
        assert [r["lr"] for r in rows[:2]] == [0.0, 0.0]
        pol = GPT.load(os.path.join(out, "model"))
        same = all(torch.equal(a, b) for a, b in zip(pol.parameters(), init.parameters()))
        assert same != moved, steps
        value = load_reward_model(os.path.join(out, "value"), "cpu")
        assert not all(torch.equal(a, b) for a, b in zip(value.parameters(), rm0.parameters()))
    assert rows[2]["lr"] > 0 and rows[2]["first_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_ppo_samples_per_prompt_centres_scores_and_critic_off(runs, tmp_path):
    """ppo.samples_per_prompt=4: each drawn prompt is sampled 4 times in a row, and its scores are
    centred within the group, so a reward that only depends on the prompt (a per-prompt offset)
    gives zero advantages: with beta 0, no EOS penalty and no EMA the policy does not move. The
    same reward with one sample per prompt moves it. ppo.critic=false builds no value model."""
    from engine import GPT
    from engine.tokenizer import Tokenizer
    from recipes import common

    def offset(roll):  # integer-valued, so the centred scores are exactly 0
        return torch.tensor([float(len(p) % 7) for p in roll.prompts])
    init = GPT.load(os.path.join(runs["sft"], "model"))
    moved = {}
    for k in (4, 1):
        cfg, out = common.parse(ppo.PPORecipeConfig, [
            "--train.progress=false", "--data.seq_len=64", "--train.threads=1", f"--model.init={runs['sft']}",
            f"--rl.rm={runs['rm']}", "--train.max_steps=2", "--ppo.batch_size=8", "--ppo.minibatch_size=4",
            "--ppo.max_new_tokens=8", "--ppo.beta=0", "--ppo.no_eos_penalty=0", "--ppo.lam=1",
            "--ppo.critic=false", f"--ppo.samples_per_prompt={k}", "--rl.ema=false",
            "--out", str(tmp_path / f"k{k}")], "ppo")
        if k == 4:
            tok = Tokenizer.load(runs["sft"])
            roll = ppo.sample_episodes(init, tok, ppo.load_prompts(cfg.data.path), cfg, 0, 8, 8)
            assert [roll.prompts[i // 4 * 4] for i in range(8)] == roll.prompts
            assert roll.prompts[0] != roll.prompts[4] or len(set(ppo.load_prompts(cfg.data.path))) == 1
        ppo.run(cfg, out, score_fn=offset)
        pol = GPT.load(os.path.join(out, "model"))
        moved[k] = not all(torch.equal(a, b) for a, b in zip(pol.parameters(), init.parameters()))
        assert not os.path.exists(os.path.join(out, "value")), k  # no value model was built or saved
    assert moved == {4: False, 1: True}


def test_rm_ref_loglik_learns_the_weight_the_rankings_ask_for(runs, tmp_path):
    """rm.ref_loglik: with rankings that follow the SFT model's log-likelihood of each completion,
    the RM learns a positive weight on it; with the reverse order, a negative one. It is saved
    with the RM, and the held-out accuracy counts it."""
    from engine import GPT
    from engine.data import encode_rankings, load_sft
    from engine.tokenizer import Tokenizer
    from recipes.rm import add_reference_logliks, load_reward_model

    tok = Tokenizer.load(runs["sft"])
    ref = GPT.load(os.path.join(runs["sft"], "model")).eval()
    ex = load_sft(DATA / "sft_selfinstruct_seed.jsonl")
    g = torch.Generator().manual_seed(0)
    recs = [{"prompt": ex[i]["prompt"][:80],
             "completions": [ex[int(j)]["response"][:40] for j in torch.randint(0, len(ex), (4,), generator=g)]}
            for i in range(48)]
    groups = encode_rankings([{**r, "ranking": [0, 1, 2, 3]} for r in recs], tok, 64)
    add_reference_logliks(ref, groups, tok.pad_id, "cpu")
    weights = {}
    for sign in (1, -1):
        path = tmp_path / f"ranked{sign}.jsonl"
        with open(path, "w") as f:
            for r, grp in zip(recs, groups):
                order = sorted(range(4), key=lambda k: -sign * grp["ref_loglik"][k])
                f.write(json.dumps({**r, "ranking": [order.index(k) for k in range(4)]}) + "\n")
        out = str(tmp_path / f"rm{sign}")
        res = rm.main(["--train.progress=false", "--data.seq_len=64", "--train.threads=1",
                       f"--model.init={runs['sft']}", f"--data.path={path}", "--data.eval_fraction=0.25",
                       "--train.max_steps=12", "--train.batch_size=4", "--train.lr=3e-3",
                       "--rm.ref_loglik=true", "--out", out])
        weights[sign] = load_reward_model(out, "cpu").ref_weight
        assert res["eval_ref_weight"] == pytest.approx(weights[sign])
    assert weights[1] > 0.01 and weights[-1] < -0.01, weights
    with pytest.raises(SystemExit, match="rm.ref_loglik needs model.init"):
        rm.main(["--train.progress=false", "--data.seq_len=64", f"--model.init={runs['rm']}",
                 f"--data.path={tmp_path / 'ranked1.jsonl'}", "--train.max_steps=1", "--train.batch_size=4",
                 "--rm.ref_loglik=true", "--out", str(tmp_path / "bad")])


def test_ppo_pays_the_reward_models_reference_term(runs, tmp_path):
    """An RM whose head is zero and whose reference weight is 1 scores log pi_SFT(y | x): PPO's
    logged reward of its first iteration is the mean of that over the episodes it sampled."""
    from engine import GPT
    from engine.rollout import policy_logprobs
    from engine.tokenizer import Tokenizer
    from recipes import common
    from recipes.rm import load_reward_model

    rmz = load_reward_model(runs["rm"], "cpu")
    with torch.no_grad():
        rmz.head.weight.zero_(), rmz.head.bias.zero_(), rmz.loglik_weight.fill_(1.0)
    common.export(rmz, Tokenizer.load(runs["rm"]), str(tmp_path / "rmz"))
    cfg_args = [
        "--train.progress=false", "--data.seq_len=64", "--train.threads=1", f"--model.init={runs['sft']}",
        f"--rl.rm={tmp_path / 'rmz'}", "--train.max_steps=1", "--ppo.batch_size=8", "--ppo.minibatch_size=4",
        "--ppo.max_new_tokens=8", "--ppo.beta=0", "--ppo.no_eos_penalty=0", "--out", str(tmp_path / "p")]
    cfg, out = common.parse(ppo.PPORecipeConfig, cfg_args, "ppo")
    ppo.run(cfg, out)
    init, tok = GPT.load(os.path.join(runs["sft"], "model")).eval(), Tokenizer.load(runs["sft"])
    roll = ppo.sample_episodes(init, tok, ppo.load_prompts(cfg.data.path), cfg, 0, 8, 8)
    with torch.no_grad():
        want = float(policy_logprobs(init, roll).sum(1).mean())
    got = read_metrics(os.path.join(out, "metrics.jsonl"))[0]["reward"]
    assert want < -1 and got == pytest.approx(want, rel=1e-4, abs=1e-4)
    # ppo.ref_weight_scale multiplies the weight PPO pays (same episodes: same seed and policy)
    cfg2, out2 = common.parse(ppo.PPORecipeConfig, cfg_args[:-2]
                              + ["--ppo.ref_weight_scale=2.5", "--out", str(tmp_path / "p2")], "ppo")
    ppo.run(cfg2, out2)
    got2 = read_metrics(os.path.join(out2, "metrics.jsonl"))[0]["reward"]
    assert got2 == pytest.approx(2.5 * want, rel=1e-4, abs=1e-4)



def test_reward_ensemble_is_the_mean_of_its_members(runs, tmp_path):
    """rl.rm="a,b" (load_reward_model with comma-separated runs): a RewardEnsemble whose score
    is the members' mean, reference term included, in every way an RM is read (per-token
    forward, score_at, ranking-group scores); PPO's logged reward with it is the mean of what it
    logs with each member alone (same episodes), and the value model starts from the first."""
    from engine import RewardEnsemble
    from engine.data import collate_rankings, encode_rankings, load_rankings
    from engine.tokenizer import Tokenizer
    from recipes import common
    from recipes.rm import group_rewards, load_reward_model

    tok = Tokenizer.load(runs["rm"])
    a = load_reward_model(runs["rm"], "cpu")
    b = load_reward_model(runs["rm"], "cpu")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
        b.head.bias.add_(2.0), b.loglik_weight.fill_(0.7)
    common.export(b, tok, str(tmp_path / "rmb"))
    ens = load_reward_model(f"{runs['rm']},{tmp_path / 'rmb'}", "cpu", tok=tok)
    assert isinstance(ens, RewardEnsemble) and len(ens.members) == 2
    assert ens.ref_weight == pytest.approx((a.ref_weight + 0.7) / 2)
    idx = torch.randint(0, tok.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    ref = torch.randn(3, 17)
    with torch.no_grad():
        want = (a(idx, ref_loglik=ref) + b(idx, ref_loglik=ref)) / 2
        torch.testing.assert_close(ens(idx, ref_loglik=ref), want)
        last = torch.tensor([16, 4, 9])
        torch.testing.assert_close(ens.score_at(idx, last), (a.score_at(idx, last) + b.score_at(idx, last)) / 2)
        groups = encode_rankings(load_rankings(DATA / "rankings_oasst_en.jsonl")[:4], tok, 64)
        batch = collate_rankings(groups, tok.pad_id, 64, True)
        torch.testing.assert_close(group_rewards(ens, batch), (group_rewards(a, batch) + group_rewards(b, batch)) / 2)

    def logged_reward(rm_arg, name):
        cfg, out = common.parse(ppo.PPORecipeConfig, [
            "--train.progress=false", "--data.seq_len=64", "--train.threads=1", f"--model.init={runs['sft']}",
            f"--rl.rm={rm_arg}", "--train.max_steps=1", "--ppo.batch_size=8", "--ppo.minibatch_size=4",
            "--ppo.max_new_tokens=8", "--ppo.critic_warmup=1", "--out", str(tmp_path / name)], "ppo")
        ppo.run(cfg, out)
        return read_metrics(os.path.join(out, "metrics.jsonl"))[0]["reward"], out
    ra, _ = logged_reward(runs["rm"], "pa")
    rb, _ = logged_reward(tmp_path / "rmb", "pb")
    rab, out = logged_reward(f"{runs['rm']},{tmp_path / 'rmb'}", "pab")
    assert abs(ra - rb) > 0.5 and rab == pytest.approx((ra + rb) / 2, rel=1e-4, abs=1e-4)
    # the value model was initialised from the first member (critic warmup: only it trained)
    value = load_reward_model(os.path.join(out, "value"), "cpu")
    assert torch.equal(value.loglik_weight, a.loglik_weight)
    assert float((value.head.bias - a.head.bias).abs().detach()) < 0.5 < float((value.head.bias - b.head.bias).abs().detach())
    with pytest.raises(SystemExit, match="reward model"):
        load_reward_model(f"{runs['rm']},{tmp_path / 'missing'}", "cpu")

def test_evaluate_models_k_samples_per_prompt(runs):
    """k T=1 samples per prompt: every T=1 metric averages them, the KL reads the sampler's own
    log-probs (equal to a full forward's), and two copies of one model sample identical answers
    (same seed: common random numbers), so they tie exactly."""
    import copy
    from engine.rollout import policy_logprobs
    from engine.tokenizer import Tokenizer
    from recipes import evaluate
    from recipes.world import World
    tok = Tokenizer.load(runs["sft"])
    a = evaluate.load_policy(runs["sft"], "cpu")
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ev = evaluate.EvalSection(prompts=20, samples=3, max_new_tokens=6, prose_tokens=256)
    world = World(0)
    res = evaluate.evaluate_models({"sft": a, "copy": b, "noisy": c}, tok, world, ev, seed=1)
    assert res["copy"]["win_rate"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert res["copy"]["accuracy_vs_baseline"]["mean"] == 0.0
    assert abs(res["copy"]["kl_from_baseline"]) < 1e-3 and res["noisy"]["kl_from_baseline"] > 0.01
    assert res["noisy"]["samples_per_prompt"] == 3
    # the sampler's log-probs are the full forward's, and accuracy is the mean over all k samples
    prompts = world.prompts(20, "eval")
    rep = [p for p in prompts for _ in range(3)]
    roll, resp = evaluate.sample(c, tok, rep, ev, 1.0, 1)
    torch.testing.assert_close(roll.sample_logprobs, policy_logprobs(c, roll).detach(), atol=1e-4, rtol=1e-4)
    benign = [p for p in rep if not p.harmful]
    acc = sum(world.correct(p, r) for p, r in zip(rep, resp) if not p.harmful) / len(benign)
    assert res["noisy"]["accuracy"] == pytest.approx(acc)
    assert len({resp[i] for i in range(0, 60, 3)} | {resp[i] for i in range(1, 60, 3)}) > 1
