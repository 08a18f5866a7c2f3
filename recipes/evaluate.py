"""Evaluate policies in the miniature InstructGPT world with held-out labelers and prompts.

    python -m recipes.evaluate --eval.models=base:runs/instructgpt/pretrain,sft:runs/instructgpt/sft,ppo_ptx:runs/instructgpt/ppo_ptx

For each model: samples on the held-out eval prompts (temperature 1 and greedy), win rate against
the baseline (default: the model named "sft") judged by held-out labelers with 95% intervals,
task accuracy, constraint following, toxicity rate on harmful prompts, refusal rate, KL from the
baseline (nats per response, on the model's own samples), and held-out prose loss (the
pretraining-distribution measure of the alignment tax).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

import torch

from engine import dist
from engine.config import DataSection, ModelSection, TrainConfig, section
from engine.data import TokenStream
from engine.model import GPT
from engine.rollout import generate_responses, policy_logprobs, score_responses
from recipes import common
from recipes.world import World, is_refusal, mean_interval, win_rate


@dataclass
class EvalSection:
    models: str = ""             # name:run_dir,... (run dirs of pretrain/sft/ppo recipes)
    baseline: str = "sft"
    prompts: int = 600
    samples: int = 1             # T=1 samples per prompt (greedy is one): more shrink sampling noise
    max_new_tokens: int = 16
    world_seed: int = 0
    labelers: int = 4
    prose_tokens: int = 16384    # held-out prose tokens for the alignment-tax loss


@dataclass
class EvalConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    train: TrainConfig = section(lambda: TrainConfig(seed=0))
    eval: EvalSection = section(EvalSection)


def cut(text: str) -> str:
    """Responses end at EOS or at the first newline (the stop sequence of the Q/A format), so
    a base model that never learned EOS is judged on its first line, like the others."""
    return text.split("\n", 1)[0]


def load_policy(run_dir: str, device) -> GPT:
    return GPT.load(os.path.join(run_dir, "model"), map_location=device).eval()


@torch.no_grad()
def sample(model, tok, prompts, ev: EvalSection, temperature: float, seed: int):
    roll = generate_responses(model, tok, [p.text for p in prompts], max_new_tokens=ev.max_new_tokens,
                              temperature=temperature, seed=seed)
    return roll, [cut(r) for r in roll.responses]


@torch.no_grad()
def kl_to(model, base, roll) -> float:
    """Mean over responses of sum_t log pi(y_t) - log pi_base(y_t) on the model's own samples.
    log pi is the sampler's own (KV cache, temperature 1: the same as a full forward up to
    rounding), so only the base model runs again."""
    if model is base:
        return 0.0
    return float((roll.sample_logprobs - policy_logprobs(base, roll)).sum(1).mean())


@torch.no_grad()
def prose_loss(model, stream: TokenStream, n_tokens: int, T: int = 128) -> float:
    rows = max(1, min(n_tokens, len(stream) - 1) // T)
    x = torch.as_tensor(stream.tokens[: rows * T + 1].astype("int64"))
    inp, tgt = x[:-1].view(rows, T), x[1:].view(rows, T)
    # 32 rows per forward: every row has T tokens, so the mean of the chunk sums is the token mean
    total = sum(float(-model(inp[i:i + 32], targets=tgt[i:i + 32]).sum()) for i in range(0, rows, 32))
    return total / (rows * T)


def evaluate_models(models: dict, tok, world: World, ev: EvalSection, seed: int = 0,
                    progress: bool = False) -> dict:
    """models: {name: GPT}. Returns a dict of per-model metrics (see module docstring).

    T=1 metrics use ev.samples samples per prompt. Every model samples with the same seed, so
    row i of two models draws the same uniforms (common random numbers: where the two
    distributions agree, so do the samples), which is what makes the paired comparisons tight.
    The KL uses each prompt's first sample."""
    from engine.metrics import Progress
    bar = Progress(len(models), 0, "eval", progress and dist.is_main())
    prompts = world.prompts(ev.prompts, "eval")
    k = ev.samples
    if k < 1:
        raise ValueError(f"eval.samples must be >= 1, got {k}")
    rep = [p for p in prompts for _ in range(k)]  # prompt-major: rep[i * k + j] is prompts[i]
    judges = world.labelers(heldout=True, n=ev.labelers)
    prose = TokenStream.from_text(world.heldout_prose(), tok)
    base = models[ev.baseline]
    benign = [i for i, p in enumerate(prompts) if not p.harmful]
    harmful = [i for i, p in enumerate(prompts) if p.harmful]
    constrained = [i for i in benign if prompts[i].constraint]
    first = torch.arange(0, len(rep), k)
    out, samples, right = {}, {}, {}
    for name, m in models.items():
        roll, resp = sample(m, tok, rep, ev, 1.0, seed)
        _, greedy = sample(m, tok, prompts, ev, 0.0, seed)
        samples[name] = (resp, greedy)

        def mean_k(f, idx):
            return _mean(per_prompt_means(f, prompts, resp, k, idx))
        right[name] = per_prompt_means(world.correct, prompts, resp, k, benign)
        out[name] = {
            "accuracy": _mean(right[name]),
            "accuracy_greedy": _frac(world.correct(prompts[i], greedy[i]) for i in benign),
            "accuracy_heldout_templates": mean_k(world.correct, [i for i in benign if prompts[i].heldout_template]),
            "constraint_followed": mean_k(world.followed_constraint, constrained),
            "toxicity_rate": mean_k(lambda p, r: world.is_toxic(r), harmful),
            "refusal_rate_harmful": mean_k(lambda p, r: is_refusal(r), harmful),
            "refusal_rate_benign": mean_k(lambda p, r: is_refusal(r), benign),
            "kl_from_baseline": kl_to(m, base, roll.select(first)),
            "response_chars": sum(len(r) for r in resp) / len(resp),
            "prose_loss": prose_loss(m, prose, ev.prose_tokens),
            "per_task": per_task_accuracy(world, prompts, resp, greedy, k),
            "samples_per_prompt": k,
        }
        bar.update(len(out), model=name, acc=out[name]["accuracy"])
    bar.close()
    for name in models:
        for key, idx, kk in (("win_rate", 0, k), ("win_rate_greedy", 1, 1)):
            mean, lo, hi = win_rate(world, judges, prompts, samples[name][idx], samples[ev.baseline][idx],
                                    seed=seed, k=kk)
            out[name][key] = {"mean": mean, "lo": lo, "hi": hi}
        # T=1 correctness on the benign prompts (per-prompt means), paired with the baseline's
        out[name]["accuracy_vs_baseline"] = paired_delta(right[name], right[ev.baseline])
    out["_examples"] = [{"prompt": prompts[i].text, **{n: samples[n][0][i * k] for n in models}}
                        for i in range(0, len(prompts), max(1, len(prompts) // 8))]
    out["_changed"] = changed_answers(world, prompts, samples, ev.baseline, [n for n in models if n != ev.baseline])
    return out


def per_task_accuracy(world: World, prompts, resp, greedy, k: int = 1) -> dict:
    """{task: {"seen": acc, "heldout": acc, "seen_greedy": acc, "heldout_greedy": acc, "n_seen": n,
    "n_heldout": n}}: T=1 and greedy accuracy, split by phrasings seen in SFT and held out.
    resp holds k T=1 samples per prompt (prompt-major), greedy one."""
    out = {}
    for task in sorted({p.task for p in prompts if not p.harmful}):
        row = {}
        for split, held in (("seen", False), ("heldout", True)):
            idx = [i for i, p in enumerate(prompts) if p.task == task and p.heldout_template == held]
            row[split] = _mean(per_prompt_means(world.correct, prompts, resp, k, idx))
            row[f"{split}_greedy"] = _frac(world.correct(prompts[i], greedy[i]) for i in idx)
            row[f"n_{split}"] = len(idx)
        out[task] = row
    return out


def changed_answers(world: World, prompts, samples, baseline: str, others, k: int = 4) -> dict:
    """Greedy answers that changed between the baseline and each other model: up to k that
    became correct, k that became wrong and k that changed but stayed wrong."""
    out = {}
    base = samples[baseline][1]
    for name in others:
        new = samples[name][1]
        kinds = {"became_correct": [], "became_wrong": [], "still_wrong": []}
        for i, p in enumerate(prompts):
            if p.harmful or base[i] == new[i]:
                continue
            was, now = world.correct(p, base[i]), world.correct(p, new[i])
            kind = "became_correct" if now and not was else "became_wrong" if was and not now else (
                "still_wrong" if not now else None)
            if kind:
                kinds[kind].append({"prompt": p.text, baseline: base[i], name: new[i]})
        out[name] = {kind: {"count": len(v), "examples": v[:k]} for kind, v in kinds.items()}
    return out


def paired_delta(a: list[bool], b: list[bool]) -> dict:
    """Mean of a_i - b_i over paired observations (two models on the same prompts) with a
    normal-approximation 95% interval: {"mean", "lo", "hi"}."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_delta needs two equally long, non-empty lists")
    mean, lo, hi = mean_interval([float(x) - float(y) for x, y in zip(a, b)])
    return {"mean": mean, "lo": lo, "hi": hi}


def right_over_wrong(scores: torch.Tensor, correct: torch.Tensor) -> tuple[float, int]:
    """scores, correct: [P, K] (K samples of each of P prompts). Over every same-prompt pair of
    a right and a wrong sample: the fraction the scores put the right one above (ties count
    0.5), and the number of such pairs. 0.5 is chance; the pairs a policy's own samples make
    are what PPO's gradient compares."""
    ds = scores[:, :, None] - scores[:, None, :]            # [P, K, K]: score of i minus j
    mixed = (correct[:, :, None] > correct[:, None, :])     # i right, j wrong
    n = int(mixed.sum())
    hits = ((ds > 0).float() + 0.5 * (ds == 0).float())[mixed].sum()
    return (float(hits) / n if n else float("nan")), n


def within_prompt_corr(scores: torch.Tensor, quality: torch.Tensor) -> float:
    """Pearson correlation over [P, K] samples after removing each prompt's mean from both: a
    per-prompt offset in the scores (which a ranking loss cannot see) does not count."""
    a, b = scores - scores.mean(1, keepdim=True), quality - quality.mean(1, keepdim=True)
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@torch.no_grad()
def rm_on_policy_samples(reward_model, policy, tok, world: World, prompts, max_new_tokens: int,
                         k: int = 4, seed: int = 5) -> dict:
    """How the RM scores the policy's own answers (k samples per prompt at T=1) against the
    world's noise-free quality: Pearson r over all samples (`r`), right above wrong of the same
    prompt (`right_over_wrong`), and the within-prompt correlation with the quality total.
    The RM's reference term, if it has one, is read under `policy` (the SFT model it was
    trained beside)."""
    roll = generate_responses(policy, tok, [p.text for p in prompts for _ in range(k)],
                              max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    s = score_responses(reward_model, roll, policy).float().cpu().view(-1, k)
    qs = [world.quality(prompts[i // k], cut(r)) for i, r in enumerate(roll.responses)]
    q = torch.tensor([x["total"] for x in qs]).view(-1, k)
    c = torch.tensor([x["correct"] for x in qs]).view(-1, k)
    row, pairs = right_over_wrong(s, c)
    r = float(torch.corrcoef(torch.stack([s.flatten(), q.flatten()]))[0, 1])
    return {"r": r, "right_over_wrong": row, "pairs": pairs, "r_within": within_prompt_corr(s, q), "k": k}


def per_prompt_means(f, prompts, resp, k: int, idx) -> list[float]:
    """For each prompt index i in idx, the mean of f(prompts[i], r) over its k responses
    resp[i * k:(i + 1) * k] (prompt-major, as evaluate_models samples them)."""
    return [statistics.fmean(float(f(prompts[i], r)) for r in resp[i * k:(i + 1) * k]) for i in idx]


def _mean(v: list[float]) -> float:
    return statistics.fmean(v) if v else float("nan")


def _frac(it) -> float:
    v = [bool(x) for x in it if x is not None]
    return sum(v) / len(v) if v else float("nan")


def main(argv=None):
    cfg, out = common.parse(EvalConfig, argv, "evaluate")
    device = common.setup(cfg, out)
    pairs = [x.split(":", 1) for x in cfg.eval.models.split(",") if x]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise SystemExit("--eval.models=name:run_dir,name:run_dir,... is required")
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.load(pairs[0][1])
    models = {n: load_policy(d, device) for n, d in pairs}
    if cfg.eval.baseline not in models:
        raise SystemExit(f"--eval.baseline={cfg.eval.baseline!r} is not one of {list(models)}")
    res = evaluate_models(models, tok, World(cfg.eval.world_seed), cfg.eval, cfg.train.seed)
    if dist.is_main():
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
        for n in models:
            r = res[n]
            print(f"{n:>8}: win vs {cfg.eval.baseline} {r['win_rate']['mean']:.3f} "
                  f"[{r['win_rate']['lo']:.3f}, {r['win_rate']['hi']:.3f}]  acc {r['accuracy']:.3f}  "
                  f"constraint {r['constraint_followed']:.3f}  toxic {r['toxicity_rate']:.3f}  "
                  f"kl {r['kl_from_baseline']:.3f}  prose {r['prose_loss']:.3f}")
    return res


if __name__ == "__main__":
    common.cli(main)
