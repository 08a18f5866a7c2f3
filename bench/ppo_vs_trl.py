"""One PPO iteration of recipes.ppo against TRL's PPOTrainer (TRL 1.12, the last release with one),
on the same shapes, on CPU: episodes/s of each, the ratio, and each side's split.

    BENCH_TRL_PYTHON=/path/to/trl-venv/bin/python python -m bench ppo_vs_trl --threads 1

Shapes (both sides): the engine's `tiny` preset (4 layers x 128 wide, 4 heads of 32, 128
positions, vocab 512) with random weights for the policy, the frozen reference, the value model
and the reward model (a transformer trunk of the same shape + a scalar head); 64 prompts of 32
characters through one in-memory character tokenizer (the same ids on both sides, no padding);
batch 64, 32 sampled response tokens at temperature 0.7, 4 PPO epochs of one minibatch of 64,
no ptx, no EMA, fp32. TRL's side is GPT2LMHeadModel (policy, ref) and
GPT2ForSequenceClassification (value, RM) with the preset's sizes; `gradient_checkpointing`
and `bf16` (TRL's defaults on) are turned off so both sides compute in fp32 without recompute.
Differences that stay, and belong to each implementation: the tiny preset's odd layers are
banded (window 32: a query sees 32 keys, a GPT-2 layer sees all of them; prompt + response is
64 tokens); our experience pass recomputes the policy logprobs with a full forward (TRL reuses
the sampler's logits) and steps policy and value with two AdamW optimizers (TRL: one backward of
policy + value loss, one optimizer over both); each side uses its own optimizer defaults.
Both always generate 32 tokens: TRL runs with stop_token=None; ours stops only when every row
has sampled EOS (1/512 per token at random init: not within 32 tokens); the `gen_tokens`
column records the generated length of every timed iteration.

Method: the two sides run alternately, A B A B ..., each run in a fresh subprocess (ours in
this interpreter, TRL in BENCH_TRL_PYTHON, default this one), so neither warms the other's
caches or allocator; each subprocess builds its models, runs 1 warm-up iteration (excluded) and
then the timed iterations, with torch.set_num_threads = --threads of `python -m bench` (default
torch's) on both sides. Time per iteration is measured between consecutive iteration ends
(ours: Trainer.log of the recipe's row; TRL: the on_step_end callback), and split at hooks
around each side's own functions, without changing them:
  generate  recipes.ppo.sample_episodes            | trl ... ppo_trainer.batch_generation
  score     its end -> end of make_experience      | its end -> first forward with grad
            (policy/ref logprobs, values, RM scores, KL-shaped rewards, GAE, whitening)
  train     -> the iteration's end (4 epochs of updates)
  other     previous iteration's end -> generation (data loading, gc, logging)
Reported per side: median iteration time over all timed iterations of all rounds, episodes/s =
batch / median, p20/p80, the median of each phase; the ratio is ours / TRL in episodes/s
(speedup_vs_baseline, baseline trl), and per round (the two adjacent runs' medians: the figure
least exposed to load that drifts between rounds) in paired_ratios / paired_ratio_median.
Without TRL importable, the benchmark prints how to install it and writes no row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = "PPO iteration, recipes.ppo vs TRL 1.12 PPOTrainer (CPU, tiny preset): episodes/s and split"

ROOT = Path(__file__).resolve().parent.parent
PAD, EOS = 0, 1
VOCAB = 512
TRL_VERSION = "1.12.0"  # the last TRL release with a PPO trainer
PHASES = ("gen", "score", "train", "other")


def shapes(run) -> dict:
    """The issue's shapes; --tiny shrinks everything for the smoke test."""
    if run.tiny:
        return dict(batch=4, prompt_len=8, resp_len=4, epochs=1, minibatches=1, temperature=0.7,
                    rounds=1, warmup=1, iters=1)
    return dict(batch=64, prompt_len=32, resp_len=32, epochs=4, minibatches=1, temperature=0.7,
                rounds=2 if run.quick else 3, warmup=1, iters=2)


def trl_python() -> str:
    return os.environ.get("BENCH_TRL_PYTHON") or sys.executable


def trl_status(py: str) -> tuple[bool, str]:
    """(importable, version or the reason) of trl's PPOTrainer in interpreter `py`."""
    code = ("import trl; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)")
    try:
        p = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{py}: {e}"
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, f"{py}: {last}"
    return True, p.stdout.strip().splitlines()[-1]


def skip_message(why: str) -> str:
    import torch
    return (f"ppo_vs_trl skipped: trl is not importable ({why}). Install TRL {TRL_VERSION} in its own "
            f"venv on this torch: python3 -m venv V && V/bin/pip install torch=={torch.__version__.split('+')[0]} "
            f"trl=={TRL_VERSION} transformers accelerate datasets; then "
            f"BENCH_TRL_PYTHON=V/bin/python python -m bench ppo_vs_trl")


# ----------------------------------------------------------------------------- shared set-up

def prompts(n: int, length: int) -> list[str]:
    """n distinct prompts of exactly `length` characters (no padding on either side)."""
    words = ["sort", "reverse", "count", "copy", "add", "upper", "the", "words", "letters", "list",
             "of", "numbers", "please", "answer", "briefly", "kindly"]
    out = []
    for i in range(n):
        s, k = f"{i:03d} ", i
        while len(s) < length:
            s += words[k % len(words)] + " "
            k = k * 7 + 3
        out.append(s[:length])
    return out


def char_ids(s: str) -> list[int]:
    """The character tokenizer both sides use: printable ASCII -> 2..96 (0 = pad, 1 = EOS)."""
    return [2 + (ord(c) - 32 if 32 <= ord(c) < 127 else 0) for c in s]


def char_text(ids) -> str:
    return "".join(chr(32 + i - 2) if 2 <= i < 97 else "?" for i in ids)


class _Clock:
    """Timestamps of one worker: iteration ends and the phase boundaries inside iterations."""

    def __init__(self):
        self.iters: list[dict] = []
        self.cur: dict = {}
        self.last_end = None

    def mark(self, key: str):
        self.cur.setdefault(key, time.perf_counter())

    def end_iteration(self, **info):
        t = time.perf_counter()
        c = self.cur
        if self.last_end is not None and {"gen0", "gen1", "score1"} <= set(c):
            self.iters.append({"total": t - self.last_end, "other": c["gen0"] - self.last_end,
                               "gen": c["gen1"] - c["gen0"], "score": c["score1"] - c["gen1"],
                               "train": t - c["score1"], **info})
        elif self.last_end is None:  # the first iteration has no previous end: warm-up only
            self.iters.append({"total": float("nan"), **info})
        self.cur, self.last_end = {}, t


# ----------------------------------------------------------------------------- our side

def worker_ours(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import engine
    import engine.trainer
    import recipes.ppo as rp
    from engine.config import GPTConfig
    from recipes import common

    class CharTokenizer:  # in memory, the same ids as TRL's side
        pad_id, eos_id, vocab_size = PAD, EOS, VOCAB

        def encode(self, s):
            return char_ids(s)

        def decode(self, ids):
            return char_text(ids)

        def save(self, out_dir):  # the recipe exports it beside the final weights: nothing to keep
            pass

    tmp = Path(a.tmp)
    torch.manual_seed(a.seed)
    gcfg = GPTConfig.from_preset("tiny", dropout=0.0, vocab_size=VOCAB)
    engine.GPT(gcfg).save(str(tmp / "policy"))
    engine.RewardModel(gcfg).save(str(tmp / "rm"))  # the value model starts from it (recipe default)
    with open(tmp / "prompts.jsonl", "w") as f:
        for p in prompts(a.batch, a.prompt_len):
            f.write(json.dumps({"prompt": p}) + "\n")
    tok = CharTokenizer()
    common.tokenizer = lambda cfg, out, train_texts=None: tok

    clock = _Clock()
    last_roll = {}
    sample, experience, log = rp.sample_episodes, rp.make_experience, engine.trainer.Trainer.log

    def timed_sample(*args, **kw):
        clock.mark("gen0")
        roll = sample(*args, **kw)
        clock.mark("gen1")
        last_roll["gen_tokens"] = roll.seq.shape[1] - roll.prompt_len
        last_roll["resp_len"] = float(roll.mask.sum(1).mean())
        return roll

    def timed_experience(*args, **kw):
        out = experience(*args, **kw)
        clock.mark("score1")
        return out

    prof = {"n": 0}

    def timed_log(self, row, progress=None):
        log(self, row, progress)
        clock.end_iteration(**last_roll)
        prof["n"] += 1
        if a.profile and prof["n"] == a.warmup:  # bench.ppo_profile: profile the next iteration
            from .ppo_profile import start
            prof["stop"] = start()
        elif "stop" in prof and "split" not in prof:
            prof["split"] = prof["stop"]()

    rp.sample_episodes, rp.make_experience = timed_sample, timed_experience
    engine.trainer.Trainer.log = timed_log

    cfg = rp.PPORecipeConfig()
    cfg.model.init, cfg.data.path = str(tmp / "policy"), str(tmp / "prompts.jsonl")
    cfg.rl.rm, cfg.rl.ema, cfg.rl.ptx_path = str(tmp / "rm"), False, ""
    t = cfg.train
    t.max_steps, t.ckpt_every, t.progress, t.threads, t.device, t.seed, t.dtype = (
        a.warmup + a.iters, 0, False, a.threads, "cpu", a.seed, "fp32")
    p = cfg.ppo
    p.batch_size, p.minibatch_size, p.ppo_epochs = a.batch, a.batch // a.minibatches, a.epochs
    p.max_new_tokens, p.temperature, p.ptx_coef = a.resp_len, a.temperature, 0.0
    clock.last_end = time.perf_counter()  # the warm-up iteration's "other" includes set-up: dropped
    rp.run(cfg, str(tmp / "run"))
    return {"iters": clock.iters[a.warmup:], "threads_used": torch.get_num_threads(),
            "torch": torch.__version__, "impl": "recipes.ppo", "optimizer": "2x torch.optim.AdamW",
            "profile": prof.get("split")}


# ----------------------------------------------------------------------------- TRL's side

def worker_trl(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import datasets
    import tokenizers
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as pt
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
                              PreTrainedTokenizerFast, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    # The same character ids as ours; the tokenizer object is only asked for padding and the
    # special ids (the dataset is tokenized here).
    vocab = {"<pad>": PAD, "<eos>": EOS, **{chr(32 + i): 2 + i for i in range(95)}}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB)})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  padding_side="left")
    torch.manual_seed(a.seed)
    # the engine's tiny preset in GPT-2's terms (GELU MLP of 4 x d, tied embeddings), no dropout
    gcfg = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS,
                      eos_token_id=EOS, pad_token_id=PAD, num_labels=1)
    policy, ref = GPT2LMHeadModel(gcfg), GPT2LMHeadModel(gcfg)
    value, rm = GPT2ForSequenceClassification(gcfg), GPT2ForSequenceClassification(gcfg)
    ds = datasets.Dataset.from_dict({"input_ids": [char_ids(p) for p in prompts(a.batch, a.prompt_len)]})

    clock = _Clock()
    last = {}
    gen, fwd = pt.batch_generation, pt.forward

    def timed_generation(*args, **kw):
        clock.mark("gen0")
        qr, logits = gen(*args, **kw)
        clock.mark("gen1")
        last["gen_tokens"] = qr.shape[1] - args[1].shape[1]
        return qr, logits

    def timed_forward(*args, **kw):
        if torch.is_grad_enabled() and "gen1" in clock.cur:  # the first training forward
            clock.mark("score1")
        return fwd(*args, **kw)

    pt.batch_generation, pt.forward = timed_generation, timed_forward

    class IterationEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.end_iteration(**last)

    tmp = a.tmp
    import dataclasses
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    # TRL turns recompute on by default; newer transformers call the field activation_checkpointing
    recompute = {"activation_checkpointing" if "activation_checkpointing" in names
                 else "gradient_checkpointing": False}
    args = PPOConfig(
        output_dir=tmp, report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        **recompute, disable_tqdm=True, logging_steps=1, seed=a.seed,
        dataloader_num_workers=0, learning_rate=5e-6,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        num_mini_batches=a.minibatches, num_ppo_epochs=a.epochs, response_length=a.resp_len,
        temperature=a.temperature, local_rollout_forward_batch_size=a.batch,
        total_episodes=a.batch * (a.warmup + a.iters), num_sample_generations=0,
        stop_token=None, missing_eos_penalty=None)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=rm, value_model=value, train_dataset=ds, eval_dataset=ds,
                         callbacks=[IterationEnd()])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = bool(getattr(policy, "is_gradient_checkpointing", False))
    if ckpt:
        raise RuntimeError("TRL's policy has activation recompute on: not the fp32 no-recompute set-up")
    clock.last_end = time.perf_counter()
    trainer.train()
    return {"iters": clock.iters[a.warmup:], "threads_used": torch.get_num_threads(),
            "torch": torch.__version__, "impl": f"trl {trl.__version__} PPOTrainer "
            f"(transformers {transformers.__version__})", "optimizer": f"HF {getattr(args.optim, 'value', args.optim)}"}


# ----------------------------------------------------------------------------- the driver

def _spawn(side: str, py: str, sh: dict, threads: int, seed: int, out: Path, timeout: float,
           extra=()):
    cmd = [py, "-m", "bench.ppo_vs_trl", "--worker", side, "--json", str(out), "--threads", str(threads),
           "--seed", str(seed)] + [f"--{k.replace('_', '-')}={sh[k]}" for k in
                                   ("batch", "prompt_len", "resp_len", "epochs", "minibatches",
                                    "temperature", "warmup", "iters")] + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{side} worker exited {p.returncode}: {tail[:200]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def run(run):
    from .common import quantiles_ms
    if run.device != "cpu":
        print("ppo_vs_trl: a CPU comparison (--device cpu); skipped on", run.device)
        return
    sh = shapes(run)
    py = trl_python()
    ok, ver = trl_status(py)
    if not ok:
        print(skip_message(ver), flush=True)
        return
    import torch
    threads = torch.get_num_threads()
    print(f"  TRL {ver} in {py}; ours in {sys.executable}; {threads} thread(s) per side; "
          f"{sh['rounds']} rounds x ({sh['warmup']} warm-up + {sh['iters']} timed) iterations per side",
          flush=True)
    results = {"engine": [], "trl": []}
    meta, errors, per_round = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(sh["rounds"]):
            for side, interp in (("engine", sys.executable), ("trl", py)):  # A B A B ...
                if side in errors:
                    continue
                try:
                    res = _spawn("ours" if side == "engine" else "trl", interp, sh, threads, r,
                                 Path(tmp) / f"{side}_{r}.json", timeout=1800)
                except Exception as e:  # noqa: BLE001 - report it as the side's status
                    errors[side] = f"error: {str(e)[:200]}".replace("\n", " ")
                    continue
                meta[side] = res
                results[side] += res["iters"]
                per_round.setdefault(r, {})[side] = _median([i["total"] for i in res["iters"]])
                tot = [i["total"] for i in res["iters"]]
                print(f"  round {r + 1} {side:<6} iterations " + " ".join(f"{t:.2f}s" for t in tot)
                      + f" (process {res['wall_s']:.0f}s)", flush=True)
    case = {k: sh[k] for k in ("batch", "prompt_len", "resp_len", "epochs", "minibatches", "temperature")}
    case = {"preset": "tiny", **case}
    rows = []
    for side in ("engine", "trl"):
        its = results[side]
        if side in errors and not its:
            rows.append({**case, "provider": side, "status": errors[side]})
            continue
        totals = [i["total"] for i in its]
        med, p20, p80 = quantiles_ms(totals)
        ph = {k: _median([i[k] for i in its]) for k in PHASES}
        m = meta[side]
        row = {**case, "provider": side, "status": "ok" if side not in errors else errors[side],
               "median_ms": med, "p20_ms": p20, "p80_ms": p80, "mem_method": "n/a",
               "work": sh["batch"], "work_unit": "episodes", "rate": sh["batch"] / (med * 1e-3),
               "rate_unit": "episodes/s", "impl": m["impl"], "side_torch": m["torch"],
               "optimizer": m["optimizer"], "threads_used": m["threads_used"],
               "timed_iters": len(its), "rounds": sh["rounds"],
               "gen_tokens": "/".join(str(i.get("gen_tokens")) for i in its),
               **{f"{k}_ms": ph[k] * 1e3 for k in PHASES},
               **{f"{k}_frac": ph[k] / sum(ph.values()) for k in PHASES},
               "iter_s": "/".join(f"{t:.3f}" for t in totals)}
        if side == "engine":
            row["resp_len_mean"] = sum(i["resp_len"] for i in its) / len(its)
            # the two runs of a round are adjacent in time: their ratio is the least exposed to a
            # machine whose load drifts between rounds
            paired = [v["trl"] / v["engine"] for v in per_round.values() if len(v) == 2]
            if paired:
                row["paired_ratio_median"] = _median(paired)
                row["paired_ratios"] = "/".join(f"{x:.3f}" for x in paired)
        rows.append(row)
    run.rows += rows  # printed below: the generic one-line row print would be unreadably wide
    run.finish_case(rows, "trl")
    print("\nppo_vs_trl: episodes/s, split (generate / score / train / other)")
    for r in rows:
        if r.get("rate") is None:
            print(f"  {r['provider']:<7} {r['status']}")
            continue
        split = " / ".join(f"{r[k + '_frac'] * 100:.0f}%" for k in PHASES)
        print(f"  {r['provider']:<7} {r['rate']:8.2f} episodes/s  ({r['median_ms'] / 1e3:.2f} s/iteration)  "
              f"split {split}  [{r['impl']}]")
    ours = next((r for r in rows if r["provider"] == "engine"), {})
    if ours.get("speedup_vs_baseline"):
        print(f"  ratio ours / TRL: {ours['speedup_vs_baseline']:.2f}x (episodes/s, medians over all "
              f"timed iterations); per round " + ", ".join(f"{x}x" for x in ours.get("paired_ratios", "").split("/"))
              + f", median {ours.get('paired_ratio_median', float('nan')):.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="worker of bench.ppo_vs_trl (run `python -m bench ppo_vs_trl`)")
    p.add_argument("--worker", choices=["ours", "trl"], required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    for k in ("batch", "prompt-len", "resp-len", "epochs", "minibatches", "warmup", "iters"):
        p.add_argument(f"--{k}", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True)
    p.add_argument("--profile", action="store_true", help="ours: torch.profiler split (bench.ppo_profile)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl_") as tmp:
        a.tmp = tmp
        res = (worker_ours if a.worker == "ours" else worker_trl)(a)
    Path(a.json).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
