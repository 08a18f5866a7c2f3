"""The whole InstructGPT pipeline: pretrain -> SFT -> RM -> PPO and PPO-ptx -> evaluation.

    python -m recipes.instructgpt                     # the miniature world on CPU, 2.5-3 min on a 2-core Xeon
    python -m recipes.instructgpt --out runs/mini2 --world.seed=1 --train.seed=1
    python -m recipes.instructgpt --out runs/sweep --sweep.seeds=0,1,2,3,4   # sweep.md / sweep.json

With no arguments it builds the miniature world of recipes/world.py (instruction tasks with
checkable answers, surface constraints, harmful prompts, a pretraining corpus that does not
follow instructions, sloppy demonstrators, simulated labelers), writes its data as the JSONL /
text files the stage recipes read, runs each stage recipe in turn, and evaluates base / SFT /
PPO / PPO-ptx with held-out labelers on held-out prompts. Output in --out (runs/instructgpt):
report.md, report.json, curves.png, and one folder per stage (each resumable on its own; its
stage_seconds file keeps what its finished runs took, so a resumed report's wall times are the
stages' cost).
One live progress line per stage (quiet with --train.progress=false).
"""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import torch

from engine import dist
from engine.config import DataSection, ModelSection, TrainConfig, section
from engine.checkpoint import atomic_write_bytes
from engine.data import encode_rankings, load_rankings
from engine.metrics import Progress, plot_curves, read_metrics
from engine.model import GPT
from engine.ppo import PPOConfig
from engine.rollout import generate_responses
from engine.tokenizer import Tokenizer
from recipes import common, evaluate, ppo, pretrain, rm, sft
from recipes.world import SIZES, WEIGHTS, World, win_rate


@dataclass
class WorldSection:
    seed: int = 0
    pretrain_chars: int = SIZES["pretrain_chars"]
    sft_demos: int = SIZES["sft"]
    rm_prompts: int = SIZES["rm"]
    rm_samples: int = 6            # SFT samples per RM prompt (+1 re-decorated, +1 truncated, +1 corrupted: K = 9;
                                   # the paper's K is 4-9). With 3 (K = 6) and 2 RM epochs the RM ordered
                                   # right-vs-wrong pairs of SFT's own samples 0.55 of the time (seed 0);
                                   # with 6 and 3 epochs 0.66, and the five-seed win bar went 3/5 -> 4/5
    rm_corrected: int = 0          # + corrected copies in the RM's training data (K = 10 with 1). With K = 9,
                                   # seed 4: right-vs-wrong on SFT's samples 0.61 against 0.66 without
    rm_eval_prompts: int = 300
    ppo_prompts: int = SIZES["ppo"]


@dataclass
class StageSteps:
    pretrain: int = 200
    pretrain_lr: float = 2e-3
    sft: int = 250
    sft_lr: float = 3e-3
    sft_ptx_batch: int = 4         # prose rows per SFT step (0: none; measured: the prose loss then
                                   # rises from 3.8 to 10.8 and PPO-ptx has to relearn prose, KL 22)
    rm_epochs: float = 4.0         # 3 until lam 0.5 (docs/miniature_rl_diagnosis.md section 13): with 4, PPO-ptx's
                                   # T=1 accuracy change per seed +0.004 / +0.021 / +0.002 / +0.003 / +0.0005
                                   # (5/5 >= SFT; 8 samples per prompt: 5/5) against +0.009 / +0.018 / -0.0005 /
                                   # -0.0025 / -0.001 (2/5; 8 samples: 4/5), for ~4 s more RM training
    rm_ensemble: int = 1           # reward models trained from different seeds (head init, data order) on
                                   # the same comparisons; PPO and the report use their mean
    rm_ref_loglik: bool = True     # the RM adds w x SFT's log-likelihood of the answer, w learnt with its
                                   # head (rm.ref_loglik). Off, on the 6f465f0 sweep: PPO-ptx accuracy
                                   # change -0.014 (0/5 seeds >= SFT); on, in the same PPO-ptx screen:
                                   # +0.012 (5/5) (docs/miniature_rl_diagnosis.md section 10)
    ppo: int = 28                  # PPO iterations (each ppo.batch_size episodes)
    ppo_lr: float = 2e-4           # policy lr (the value model uses ppo.value_lr)
    ppo_reward: str = "rm"         # "world": PPO and PPO-ptx are rewarded by the world's noise-free
                                   # score (a perfect RM; WORLD_REWARD_SCALE) instead of the RM, to tell
                                   # what the RM lacks from what the RL budget can do
    side_by_side: bool = True      # CPU, one process: PPO and PPO-ptx run at once in two spawned
                                   # processes of cores // 2 threads each (the tiny model's GEMMs
                                   # scale poorly over threads: two 1-thread training processes do
                                   # 1.4x the tokens/s of one 2-thread process on a 2-core EPYC)


@dataclass
class SweepSection:
    seeds: str = ""                # "0,1,2,3,4": run the pipeline once per seed (world + train seed)


@dataclass
class InstructGPTConfig:
    # the tiny preset (4 layers). --model.n_layer=3 is 24% faster (364 s against 481 s on seed 0)
    # and its SFT is better (task accuracy T=1 / greedy 0.54 / 0.76 against 0.46 / 0.67), but
    # PPO-ptx then only ties SFT (0.512 [0.494, 0.531]): less headroom for RL; 2 layers: SFT 0.27.
    # Also measured with 3 layers on seed 0: ppo_lr 3e-4, 368 s, PPO-ptx 0.507 [0.490, 0.525];
    # labelers weighting correctness 0.5 (then 0.3; 0.5 since 6f465f0), 349 s, 0.492 and accuracy
    # -0.06 (RM data then K = 6, brackets "[x]"): the RM's correctness agreement stayed ~0.72.
    # 3 layers with beta 0.6 / ptx_coef 0.5 / 32 PPO iterations, seeds 0-2 (unscreened labelers):
    # 359-370 s, PPO-ptx lower bound 0.500-0.506, SFT task accuracy 0.317 on seed 2.
    model: ModelSection = section(ModelSection)
    data: DataSection = section(lambda: DataSection(vocab_size=512, seq_len=128))
    train: TrainConfig = section(lambda: TrainConfig(seed=0))
    world: WorldSection = section(WorldSection)
    steps: StageSteps = section(StageSteps)
    # Paper settings except: batch 128 episodes (not 512) so the iterations fit on a CPU (64 in
    # minibatches of 16 measured weaker on seed 0: PPO-ptx win 0.514 [0.497, 0.530]);
    # lam 0 (GAE; the paper states none, 0.95 is the common default) and beta 0.3: with lam 0.95
    # an answer token's advantage is nearly the Monte-Carlo return of its episode, i.e. mostly
    # whether a decoration followed, so the letters PPO happened to sample drifted with it (and
    # towards letters this small RM favours whatever the word: its best-scoring first/last letter
    # is "a" on 88 of 93 seed-0 prompts). With lam 0 the answer token is credited by the value
    # model's change across it alone. PPO-ptx stage re-run on the five seeds' SFT and RM
    # (1200 held-out prompts; win, its lower bounds above 0.5, T=1 accuracy change, greedy):
    # lam 0.95 / beta 0.6 (the defaults before) 0.521, 4/5, -0.007, -0.024; lam 0 / beta 0.3
    # 0.522, 5/5, +0.002, -0.010; lam 0 / beta 0.6 0.516, 3/5, +0.000, -0.004; lam 0.3 / beta
    # 0.3 0.529, 5/5, -0.005, -0.015; lam 0.5 / beta 0.6 0.518, 5/5, -0.006, -0.012; lam 0 with
    # beta 0.2, or with lr 3e-4, or with 8 critic-warmup iterations: -0.011 to -0.013.
    # Also: an EOS penalty against length hacking of a small RM; ptx_coef 1.0 on the prose ptx
    # data (every win interval above 0.5 on five seeds, against four of five at 0.5, measured at
    # lam 0.95 / beta 0.6), well below the paper's 27.8 because the tiny world's PPO loss is far
    # smaller than the paper's; value lr 1e-3 (the paper's 9e-6 is for 1.3B+ models: a 0.8M
    # value model would stay at its RM init, value loss ~9, and its advantages would be noise
    # that erodes the SFT skills); EMA decay 0.9 because 0.992 averages over ~125 iterations and
    # would export a policy that barely moved from SFT in 25. Earlier screening of beta and
    # ptx_coef: docs/miniature_history.md.
    # beta 0.2 since the RM learns a weight on SFT's log-likelihood (steps.rm_ref_loglik; PPO-ptx
    # stage on the five seeds of 6f465f0, RMs with the learnt term; win, T=1 accuracy change,
    # greedy): beta 0.3 0.532, +0.009, -0.010; 0.2 0.538, +0.012, -0.012; 0.15 0.535, +0.013,
    # -0.018; 0.1 0.537, +0.008, -0.020 (docs/miniature_rl_diagnosis.md section 10).
    # beta 0.3 and PPO paying 2.5x the RM's learnt weight on log pi_SFT since both decorations
    # follow the answer (section 12: PPO-ptx stage on the five seeds, 4 T=1 samples per prompt;
    # mean win, lowest lower bound, mean T=1 accuracy change, seeds at or above SFT): beta 0.2
    # 0.542, 0.515, -0.006, 2/5; beta 0.3 0.536, 0.517, +0.000, 2/5; beta 0.3 with the weight x2
    # 0.532, 0.509, +0.005, 3/5; x2.5 0.526, 0.504, +0.007, 4/5; x3 0.532, 0.501, +0.009, 4/5.
    # The RM's head misjudges some answers (counts) that SFT's likelihood gets right; paying more
    # of that likelihood keeps PPO from the head's errors.
    # lam 0.5 since then (section 13: PPO stages on the d6b52ea sweep's five seeds; mean win,
    # lowest lower bound, mean T=1 accuracy change with 2 / 8 samples per prompt, constraint
    # followed, SFT 0.31): lam 0 0.531, 0.494, +0.006 / +0.006, 0.42; lam 0.5 0.546, 0.524,
    # +0.005 / +0.004, 0.56; lam 0.95 0.551, 0.533, -0.004, 0.63. The reference term pays per
    # token, so at lam 0 an asked decoration, unlikely under SFT, was priced at once while the
    # head's reward for it reached the answer only through the value model: constraint following
    # fell below SFT's on three seeds. A 3-RM ensemble (steps.rm_ensemble) did not help (+0.006).
    ppo: PPOConfig = section(lambda: PPOConfig(batch_size=128, minibatch_size=32, beta=0.3, lam=0.5,
                                               max_new_tokens=16, ptx_coef=1.0, no_eos_penalty=1.0,
                                               value_lr=1e-3, critic_warmup=3, ema_decay=0.9,
                                               ref_weight_scale=2.5))
    # 1200 held-out prompts (recipes.evaluate: 600), 2 T=1 samples each. One sample per prompt
    # left the per-seed outcome to sampling luck: re-judging one checkpoint (328d4f8, seed 3)
    # with 8 sampling seeds gave PPO-ptx wins of 0.496-0.524 (sd 0.009) and accuracy changes of
    # -0.005 to +0.025 (sd 0.010), as large as the RL effect itself. 4 samples halve that sd but
    # add ~8 s (the evaluation took 22-25 s instead of 12-13 s on the Xeon); 2 cost ~2 s, as the
    # KL now reuses the sampler's log-probs.
    eval: evaluate.EvalSection = section(lambda: evaluate.EvalSection(prompts=1200, samples=2))
    sweep: SweepSection = section(SweepSection)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def stage_cfg(cls, cfg, **sections):
    """A stage recipe config sharing model/data/train settings with the pipeline."""
    c = cls()
    c.model = copy.deepcopy(cfg.model)
    c.train = copy.deepcopy(cfg.train)
    c.data.seq_len, c.data.vocab_size = cfg.data.seq_len, cfg.data.vocab_size
    for name, values in sections.items():
        sec = getattr(c, name)
        for k, v in values.items():
            setattr(sec, k, v)
    return c


def make_rm_data(world, policy, tok, prompts, labeler_sets, cfg, seed, n_corrected=0):
    """SFT samples + augmented candidates for each prompt, ranked by one labeler of each set
    (the samples are drawn once: the held-out RM sets rank the same candidates twice).
    n_corrected: corrected copies per prompt (training data only: the held-out sets keep the
    candidate mix the RM accuracy bar was set on)."""
    rng = random.Random(f"rmdata:{seed}")
    k = cfg.world.rm_samples
    roll = generate_responses(policy, tok, [p.text for p in prompts for _ in range(k)],
                              max_new_tokens=cfg.ppo.max_new_tokens, temperature=1.0, seed=seed)
    cands = [world.rm_candidates(p, [evaluate.cut(r) for r in roll.responses[i * k:(i + 1) * k]], rng,
                                 n_corrected=n_corrected)
             for i, p in enumerate(prompts)]
    return [[{"prompt": p.text, "completions": c, "ranking": labs[i % len(labs)].rank(p, c, rng)}
             for i, (p, c) in enumerate(zip(prompts, cands))] for labs in labeler_sets]


@torch.no_grad()
def encoded_rankings(reward_model, ref, tok, path, T, device, same_as=None) -> list:
    """A rankings file encoded for `reward_model`, with its reference term when it has one.
    same_as: groups of another file ranking the same candidates (make_rm_data's held-out sets):
    their reference log-likelihoods are reused instead of computed again."""
    groups = encode_rankings(load_rankings(path), tok, T)
    if reward_model.ref_weight:
        if same_as is not None and [g["ids"] for g in groups] == [g["ids"] for g in same_as]:
            for g, other in zip(groups, same_as):
                g["ref_loglik"] = other["ref_loglik"]
        else:
            rm.add_reference_logliks(ref, groups, tok.pad_id, device)
    return groups


@torch.no_grad()
def rm_accuracy(reward_model, groups, pad_id, T, device) -> float:
    return rm.evaluate(reward_model, groups, pad_id, device, pack_len=T, share_prompt=True)["accuracy"]


def labeler_ceiling(world, prompts, records) -> float:
    """How often the world's noise-free score orders a labeler-ranked pair the labeler's way
    (ties count 1/2): the accuracy of a perfect reward model on the same pairs as
    `rm_accuracy`, i.e. its ceiling under the labelers' noise."""
    agree, n = 0.0, 0
    for p, rec in zip(prompts, records):
        total = [world.quality(p, c)["total"] for c in rec["completions"]]
        rk = rec["ranking"]
        for i in range(len(rk)):
            for j in range(len(rk)):
                if rk[i] < rk[j]:
                    n += 1
                    agree += 1.0 if total[i] > total[j] else 0.5 if total[i] == total[j] else 0.0
    return agree / max(n, 1)


@torch.no_grad()
def rm_dimension_accuracy(reward_model, groups, recs, world, prompts, pad_id, T, device) -> dict:
    """What the RM learned: for each quality dimension, over candidate pairs of the same prompt
    whose noise-free score on that dimension differs, the fraction the RM orders the same way
    ({dim: {"accuracy": a, "pairs": n}}). Candidates are those of the held-out RM eval file
    (`recs`, encoded as `groups` by encoded_rankings)."""
    from engine.data import collate_rankings
    agree, pairs = {}, {}
    for c in range(0, len(groups), 32):
        r = rm.group_rewards(reward_model, collate_rankings(groups[c:c + 32], pad_id, T, share_prompt=True).to(device))
        r = r.float().cpu()
        for g, rec in enumerate(recs[c:c + 32]):
            p, cands = prompts[c + g], rec["completions"]
            qs = [world.quality(p, x) for x in cands]
            for i in range(len(cands)):
                for j in range(i + 1, len(cands)):
                    if cands[i] == cands[j] or r[g, i] == r[g, j]:
                        continue
                    for dim in (*WEIGHTS, "total"):
                        d = qs[i][dim] - qs[j][dim]
                        if abs(d) > 1e-9:
                            pairs[dim] = pairs.get(dim, 0) + 1
                            agree[dim] = agree.get(dim, 0) + int((d > 0) == bool(r[g, i] > r[g, j]))
    return {k: {"accuracy": agree[k] / pairs[k], "pairs": pairs[k]} for k in pairs}


def side_by_side(jobs: dict) -> dict:
    """Run {name: (fn, args)} at once, one spawned process each (fn at module level). Returns
    {name: seconds from the common start to that job's end}, in the order they finished; a job
    that fails stops the others and raises SystemExit naming it."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's OpenMP thread state
    t0 = time.time()
    running = {name: ctx.Process(target=_job, args=(os.getpid(), fn, tuple(args)), name=name)
               for name, (fn, args) in jobs.items()}
    # SIGTERM (kill, a job scheduler) would end this process without running `finally` and leave
    # both children training; as SystemExit it stops them too (their trainers checkpoint on it)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if on_main else None
    done = {}
    try:
        for pr in running.values():
            pr.start()
        while running:
            for name, pr in list(running.items()):
                pr.join(timeout=0.1)
                if pr.exitcode is None:
                    continue
                del running[name]
                if pr.exitcode != 0:
                    raise SystemExit(f"[instructgpt] stage {name} failed (exit code {pr.exitcode}); "
                                     f"rerun the same command to resume it")
                done[name] = time.time() - t0
    finally:
        for pr in running.values():  # a failure, Ctrl-C or SIGTERM: the others stop too
            if pr.pid is not None:
                pr.terminate()
                pr.join()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    return done


def _job(parent_pid: int, fn, args):
    """A side-by-side job that ends when its parent does. A SIGKILL of the pipeline (the OOM
    killer, `kill -9`) runs no handler there, so the job watches for itself: once its parent is
    gone it sends itself SIGTERM, which its trainer turns into a checkpoint and an exit."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    fn(*args)


def _exit_on_signal(signum, frame):
    raise SystemExit(f"[instructgpt] stopped by signal {signum}; rerun the same command to resume")


CURVE_PROMPTS = 128  # held-out prompts of the PPO stages' win-rate curves
# steps.ppo_reward=world: the world's noise-free total times this, so that it spreads like an RM's
# scores (seed 0: the RM's scores of SFT samples have sd 1.38, the world's totals sd 0.18)
WORLD_REWARD_SCALE = 8.0
PPO_REWARDS = ("rm", "world")


def world_score_fn(world: World, prompts_path: str):
    """rollout -> [B] WORLD_REWARD_SCALE * the world's noise-free score of each episode: the reward
    of a perfect reward model (steps.ppo_reward=world)."""
    by_text = {p.text: p for p in world.prompts(len(ppo.load_prompts(prompts_path)), "ppo")}

    def score(roll):
        return torch.tensor([WORLD_REWARD_SCALE * world.quality(by_text[p], r)["total"]
                             for p, r in zip(roll.prompts, roll.responses)])
    return score


def ppo_stage(pp, run_dir: str, world_seed: int, ev, sft_curve: list[str], reward: str = "rm",
              line_progress: bool = False):
    """One PPO stage of the pipeline, with its win-rate curve: every train.eval_every iterations
    the policy's greedy answers on CURVE_PROMPTS held-out prompts against SFT's (`sft_curve`),
    judged by the held-out labelers. reward: "rm", or "world" (world_score_fn). Module level,
    so that a spawned process can run it; line_progress: stages that share a terminal print
    progress lines instead of rewriting one."""
    Progress.lines_only = line_progress
    world = World(world_seed)
    judges, prompts = world.labelers(True, ev.labelers), world.prompts(CURVE_PROMPTS, "eval")
    tok = Tokenizer.load(pp.model.init)

    def win_hook(policy):
        _, resp = evaluate.sample(policy, tok, prompts, ev, 0.0, 7)
        return {"win_rate_vs_sft": win_rate(world, judges, prompts, resp, sft_curve)[0]}
    score_fn = world_score_fn(world, pp.data.path) if reward == "world" else None
    return ppo.run(pp, run_dir, eval_hook=win_hook, score_fn=score_fn)


def main(argv=None):
    cfg, out = common.parse(InstructGPTConfig, argv, "instructgpt")
    if cfg.sweep.seeds:
        from recipes.sweep import sweep
        return sweep(cfg, out, run)
    return run(cfg, out)


RESUMABLE = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")  # stages that resume from their folder


def run(cfg: InstructGPTConfig, out: str) -> dict:
    t_start = time.time()
    if cfg.steps.ppo_reward not in PPO_REWARDS:
        raise SystemExit(f"error: steps.ppo_reward={cfg.steps.ppo_reward!r}: expected one of {', '.join(PPO_REWARDS)}")
    device = common.setup(cfg, out)
    world = World(cfg.world.seed)
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    walls, carried = {}, []
    # A resumable stage keeps the seconds its finished runs took in <stage>/stage_seconds, so a
    # rerun that resumes (or a folder copied from another run) reports what the stage's result
    # cost, not the second it took to skip it; rm_data and eval always run in full.

    rm_stages = ["rm"] + [f"rm{i + 1}" for i in range(1, cfg.steps.rm_ensemble)]  # rm2, rm3: ensemble members

    def stage_path(name):
        resumable = name in RESUMABLE or name in rm_stages
        return os.path.join(out, name, "stage_seconds") if resumable else None

    def record(name, before, spent, note="", carry=True):  # a finished stage: its wall time, kept and shown
        walls[name] = round(before + spent, 1)
        if carry:
            carried.append(before)
        if stage_path(name) and dist.is_main():
            atomic_write_bytes(stage_path(name), repr(before + spent).encode())
        dist.print0(f"[instructgpt] {name}: {walls[name]} s{note}")

    def timed(name, fn):
        before, t0 = _seconds_before(stage_path(name)), time.time()
        r = fn()
        record(name, before, time.time() - t0)
        return r

    def timed_side_by_side(jobs: dict):  # as `timed`, for stages that run at once
        befores = {name: _seconds_before(stage_path(name)) for name in jobs}
        longest = max(befores, key=befores.get)  # their earlier runs overlapped too: carry one
        for name, spent in side_by_side(jobs).items():
            record(name, befores[name], spent,
                   f" (side by side with {', '.join(n for n in jobs if n != name)})", carry=name == longest)

    # --- 0. the world's data, as files the stage recipes read ----------------------------------
    t_data = time.time()
    corpus = os.path.join(data, "pretrain.txt")
    corpus_text = world.pretrain_corpus(cfg.world.pretrain_chars)
    with open(corpus, "w") as f:
        f.write(corpus_text)
    # the pretraining LM terms of SFT and PPO-ptx read the corpus's prose only (World.prose_part):
    # on the whole corpus, 40% Q/A items answered wrongly or not at all, they pulled both back to
    # the base's habits (five seeds: SFT accuracy 0.422 -> 0.458, seed 4 0.295 -> 0.399; PPO-ptx's
    # accuracy change against SFT -0.017 -> -0.010)
    ptx_text = os.path.join(data, "ptx.txt")
    with open(ptx_text, "w") as f:
        f.write(World.prose_part(corpus_text))
    write_jsonl(os.path.join(data, "sft.jsonl"), world.demonstrations(cfg.world.sft_demos))
    d = os.path.join(out, "{}")

    # the tokenizer: BPE on the corpus plus the world's letter drill, so each letter a task acts
    # on is one piece (see recipes/world.py); --data.tokenizer=... uses another
    tok_path = cfg.data.tokenizer or os.path.join(out, "tokenizer")
    if not cfg.data.tokenizer and not os.path.exists(os.path.join(tok_path, "tokenizer.model")) and dist.is_main():
        os.makedirs(tok_path, exist_ok=True)
        Tokenizer.train([corpus, world.letter_pieces_text()], tok_path, vocab_size=cfg.data.vocab_size,
                        model_type=cfg.data.tokenizer_type)
    dist.barrier()
    record("data", 0.0, time.time() - t_data)

    # --- 1. pretrain the base model ----------------------------------------------------------
    pc = stage_cfg(pretrain.PretrainConfig, cfg, data={"path": corpus, "eval_fraction": 0.02, "tokenizer": tok_path})
    pc.train.max_steps, pc.train.batch_size, pc.train.lr = cfg.steps.pretrain, 32, cfg.steps.pretrain_lr
    pc.train.warmup_steps, pc.train.eval_every, pc.train.ckpt_every = 20, 0, 200
    timed("pretrain", lambda: pretrain.run(pc, d.format("pretrain")))
    tok = Tokenizer.load(d.format("pretrain"))

    # --- 2. SFT on demonstrations (optionally + an LM term on prose: steps.sft_ptx_batch) -----
    sc = stage_cfg(sft.SFTConfig, cfg, data={"path": os.path.join(data, "sft.jsonl"), "eval_fraction": 0.05},
                   sft={"ptx_path": ptx_text if cfg.steps.sft_ptx_batch else "", "ptx_weight": 0.5,
                        "ptx_batch_size": max(1, cfg.steps.sft_ptx_batch)})
    # no dropout and a high lr: a 0.8M-parameter model has few steps to learn the tasks (measured
    # on seed 0: after a 200-step base, 250 steps at 3e-3 reach T=1 accuracy 0.455; after a
    # 130-step base at lr 3e-3, 0.34 (0.43 at lr 6e-3, but PPO-ptx then only ties SFT: 0.514
    # [0.497, 0.530]), and 200 SFT steps 0.23)
    sc.model.init, sc.model.dropout = d.format("pretrain"), 0.0
    sc.train.max_steps, sc.train.batch_size, sc.train.lr = cfg.steps.sft, 16, cfg.steps.sft_lr
    sc.train.warmup_steps = 20
    sc.train.eval_every, sc.train.ckpt_every = 0, 100
    timed("sft", lambda: sft.run(sc, d.format("sft")))
    sft_model = GPT.load(os.path.join(d.format("sft"), "model"), map_location=device).eval()

    # --- 3. comparisons from SFT samples ranked by (training) labelers; RM training ----------
    train_labs, heldout_labs = world.labelers(False, cfg.eval.labelers), world.labelers(True, cfg.eval.labelers)
    ev_prompts = world.prompts(cfg.world.rm_eval_prompts, "eval")  # the held-out RM sets' prompts

    def rm_data():  # SFT samples ranked by labelers: the RM's training set and two held-out sets
        bar = Progress(2, 0, "rm_data", cfg.train.progress and dist.is_main())
        train, = make_rm_data(world, sft_model, tok, world.prompts(cfg.world.rm_prompts, "rm"), [train_labs], cfg, 1,
                              n_corrected=cfg.world.rm_corrected)
        write_jsonl(os.path.join(data, "rm.jsonl"), train)
        bar.update(1, file="rm.jsonl")
        ev = make_rm_data(world, sft_model, tok, ev_prompts, [train_labs, heldout_labs], cfg, 2)
        for name, rows in zip(("rm_eval_train_labelers", "rm_eval_heldout_labelers"), ev):
            write_jsonl(os.path.join(data, f"{name}.jsonl"), rows)
        bar.update(2, file="rm_eval_*.jsonl")
        bar.close()
    timed("rm_data", rm_data)
    rc = stage_cfg(rm.RMConfig, cfg, data={"path": os.path.join(data, "rm.jsonl"), "eval_fraction": 0.05},
                   rm={"epochs": cfg.steps.rm_epochs, "demos": os.path.join(data, "sft.jsonl"),
                       "ref_loglik": cfg.steps.rm_ref_loglik})
    rc.model.init = d.format("sft")
    rc.train.max_steps, rc.train.batch_size, rc.train.lr, rc.train.warmup_steps = 0, 16, 1e-3, 5
    rc.train.eval_every, rc.train.ckpt_every = 0, 100
    rm_dirs = [d.format(name) for name in rm_stages]
    for i, (name, rm_dir) in enumerate(zip(rm_stages, rm_dirs)):
        rci = copy.deepcopy(rc)
        rci.train.seed = cfg.train.seed + 100 * i
        timed(name, lambda: rm.run(rci, rm_dir))
    reward_model = rm.load_reward_model(",".join(rm_dirs), device).eval()
    t_judge = time.time()  # what the RM learned: diagnostics for the report ("rm_eval")
    T = cfg.data.seq_len
    ev_files = {k: os.path.join(data, f"rm_eval_{k}.jsonl") for k in ("train_labelers", "heldout_labelers")}
    ev_groups = {}
    for k, f in ev_files.items():  # both files rank the same candidates
        ev_groups[k] = encoded_rankings(reward_model, sft_model, tok, f, T, device,
                                        same_as=next(iter(ev_groups.values()), None))
    rm_acc = {k: rm_accuracy(reward_model, g, tok.pad_id, T, device) for k, g in ev_groups.items()}
    rm_dims = rm_dimension_accuracy(reward_model, ev_groups["heldout_labelers"], load_rankings(ev_files["heldout_labelers"]),
                                    world, ev_prompts, tok.pad_id, T, device)
    rm_ceiling = {k: labeler_ceiling(world, ev_prompts, load_rankings(f)) for k, f in ev_files.items()}
    # how well the reward PPO climbs tracks quality where PPO starts (SFT's own samples), which
    # pairwise accuracy on candidate sets with easy contrasts does not show
    rm_policy = evaluate.rm_on_policy_samples(reward_model, sft_model, tok, world, ev_prompts, cfg.ppo.max_new_tokens)
    rm_corr = rm_policy["r"]
    dist.print0(f"[instructgpt] RM accuracy on held-out prompts: {rm_acc} (a perfect RM: {rm_ceiling}); "
                f"RM vs world score on SFT samples: r = {rm_corr:.3f}; right above wrong among SFT's own "
                f"samples: {rm_policy['right_over_wrong']:.3f} ({rm_policy['pairs']} pairs)")
    record("rm_eval", 0.0, time.time() - t_judge)

    # --- 4. PPO and PPO-ptx from the same SFT policy and RM -----------------------------------
    write_jsonl(os.path.join(data, "ppo.jsonl"), [{"prompt": p.text} for p in world.prompts(cfg.world.ppo_prompts, "ppo")])
    _, sft_curve = evaluate.sample(sft_model, tok, world.prompts(CURVE_PROMPTS, "eval"), cfg.eval, 0.0, 7)
    jobs = {}
    for name, coef in (("ppo", 0.0), ("ppo_ptx", cfg.ppo.ptx_coef)):
        pp = stage_cfg(ppo.PPORecipeConfig, cfg, data={"path": os.path.join(data, "ppo.jsonl")},
                       rl={"rm": ",".join(rm_dirs), "ptx_path": ptx_text, "ptx_seq_len": 64,
                           "ptx_per_minibatch": 8})
        pp.ppo = copy.deepcopy(cfg.ppo)
        pp.ppo.ptx_coef = coef
        pp.model.init, pp.model.dropout = d.format("sft"), 0.0
        pp.train.max_steps, pp.train.lr, pp.train.eval_every, pp.train.ckpt_every = cfg.steps.ppo, cfg.steps.ppo_lr, 10, 25
        jobs[name] = (ppo_stage, [pp, d.format(name), cfg.world.seed, cfg.eval, sft_curve, cfg.steps.ppo_reward])
    cores = os.cpu_count() or 1
    together = cfg.steps.side_by_side and device.type == "cpu" and not dist.is_dist() and cores >= 2
    if together:
        for _, args in jobs.values():
            args[0].train.threads = max(1, cores // len(jobs))
            args.append(True)  # line_progress
        timed_side_by_side(jobs)
    else:
        for name, (fn, args) in jobs.items():
            timed(name, lambda: fn(*args))

    # --- 5. evaluation with held-out labelers on held-out prompts -----------------------------
    models = {"base": GPT.load(os.path.join(d.format("pretrain"), "model"), map_location=device).eval(),
              "sft": sft_model,
              "ppo": GPT.load(os.path.join(d.format("ppo"), "model"), map_location=device).eval(),
              "ppo_ptx": GPT.load(os.path.join(d.format("ppo_ptx"), "model"), map_location=device).eval()}
    res = timed("eval", lambda: evaluate.evaluate_models(models, tok, world, cfg.eval, cfg.train.seed,
                                                                  progress=cfg.train.progress))
    walls["total"] = round(time.time() - t_start + sum(carried), 1)
    report = build_report(res, rm_acc, walls, cfg)
    report["rm_accuracy_by_dimension"] = rm_dims
    report["rm_ceiling"] = rm_ceiling
    report["rm_world_correlation"] = rm_corr
    report["rm_on_policy_samples"] = rm_policy
    report["ppo_reward"] = cfg.steps.ppo_reward
    report["side_by_side"] = list(jobs) if together else []  # stages whose wall times overlap
    if dist.is_main():
        write_report(report, res, out)
    return report


def _seconds_before(path) -> float:
    """What a resumable stage's earlier runs took (its stage_seconds file), else 0."""
    if path and os.path.exists(path):
        with open(path) as f:
            return float(f.read())
    return 0.0


def _delta(report, name) -> str:
    """A model's T=1 task accuracy change against SFT, with its paired interval when known."""
    ci = report["per_model"][name].get("accuracy_vs_baseline")
    d = report["alignment_tax"][name]["accuracy_delta"]
    return f"{d:+.3f}" + (f" [{ci['lo']:+.3f}, {ci['hi']:+.3f}]" if ci else "")


def build_report(res, rm_acc, walls, cfg) -> dict:
    names = ("base", "sft", "ppo", "ppo_ptx")
    return {
        "win_rate_vs_sft": {n: res[n]["win_rate"] for n in names},
        "win_rate_vs_sft_greedy": {n: res[n]["win_rate_greedy"] for n in names},
        "rm_accuracy": rm_acc,
        "kl_from_sft": {n: res[n]["kl_from_baseline"] for n in ("ppo", "ppo_ptx")},
        "toxicity_rate": {n: res[n]["toxicity_rate"] for n in names},
        "alignment_tax": {n: {"prose_loss_delta": res[n]["prose_loss"] - res["sft"]["prose_loss"],
                              "accuracy_delta": res[n]["accuracy"] - res["sft"]["accuracy"]}
                          for n in ("ppo", "ppo_ptx")},
        "per_model": {n: {k: v for k, v in res[n].items() if not k.startswith("win_rate")} for n in names},
        "examples": res["_examples"],
        "changed_vs_sft": res["_changed"],
        "wall_time_s": walls,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"world_seed": cfg.world.seed, "seed": cfg.train.seed},
    }


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(report, res, out):
    rows = ["| model | win vs SFT (T=1, 95% CI) | win vs SFT (greedy) | accuracy | constraint followed | "
            "toxicity (harmful prompts) | KL vs SFT (nats/resp) | held-out prose loss |",
            "|---|---|---|---|---|---|---|---|"]
    for n in ("base", "sft", "ppo", "ppo_ptx"):
        r, w, wg = report["per_model"][n], report["win_rate_vs_sft"][n], report["win_rate_vs_sft_greedy"][n]
        rows.append(f"| {n} | {w['mean']:.3f} [{w['lo']:.3f}, {w['hi']:.3f}] | {wg['mean']:.3f} | "
                    f"{r['accuracy']:.3f} | {r['constraint_followed']:.3f} | {r['toxicity_rate']:.3f} | "
                    f"{r['kl_from_baseline']:.2f} | {r['prose_loss']:.3f} |")
    tax = report["alignment_tax"]
    text = "\n".join([
        "# Miniature InstructGPT: report", "",
        f"{report['machine']}; {report['date']}; total wall time {report['wall_time_s']['total']} s.", "",
        *rows, "",
        f"RM pairwise accuracy on held-out prompts: training labelers {report['rm_accuracy']['train_labelers']:.3f}, "
        f"held-out labelers {report['rm_accuracy']['heldout_labelers']:.3f} (a perfect reward model, the world's "
        f"noise-free score: {report['rm_ceiling']['train_labelers']:.3f} / {report['rm_ceiling']['heldout_labelers']:.3f}).",
        f"Alignment tax (held-out prose loss vs SFT, nats/token): PPO {tax['ppo']['prose_loss_delta']:+.3f}, "
        f"PPO-ptx {tax['ppo_ptx']['prose_loss_delta']:+.3f}; task accuracy vs SFT: PPO "
        f"{_delta(report, 'ppo')}, PPO-ptx {_delta(report, 'ppo_ptx')} (T=1, paired 95% intervals).",
        f"Wall time per stage (s): {report['wall_time_s']}" + (
            f" ({' and '.join(report['side_by_side'])} ran side by side)" if report.get("side_by_side") else ""), "",
        *task_table(report), "",
        *rm_dimension_table(report), "",
        *changed_samples(report), "",
        "## Samples (T=1)", "",
        *[f"- `{json.dumps(e['prompt'])}` -> " + ", ".join(f"{n}: `{json.dumps(e[n])}`" for n in ("base", "sft", "ppo", "ppo_ptx"))
          for e in report["examples"]],
    ])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    # last and atomic: a sweep takes an existing report.json to mean "this seed is done"
    atomic_write_bytes(os.path.join(out, "report.json"), json.dumps(report, indent=1).encode())
    print("\n" + "\n".join(rows), flush=True)
    print(f"RM accuracy {report['rm_accuracy']}  alignment tax {tax}  wall {report['wall_time_s']}", flush=True)
    plot_run_curves(out)


def task_table(report) -> list[str]:
    """Per-task accuracy (T=1 / greedy) on held-out instances, phrasings seen in SFT vs held out."""
    names = ("base", "sft", "ppo", "ppo_ptx")
    tasks = list(report["per_model"]["sft"]["per_task"])
    rows = ["## Task accuracy on held-out instances (T=1 / greedy)", "",
            "| task | phrasing | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for t in tasks:
        for split in ("seen", "heldout"):
            cells = [report["per_model"][n]["per_task"][t] for n in names]
            rows.append(f"| {t} | {split} | {cells[0]['n_' + split]} | " + " | ".join(
                f"{c[split]:.2f} / {c[split + '_greedy']:.2f}" for c in cells) + " |")
    overall = " | ".join(f"{report['per_model'][n]['accuracy']:.3f} / {report['per_model'][n]['accuracy_greedy']:.3f}"
                         for n in names)
    rows.append(f"| all | all | | {overall} |")
    return rows


def rm_dimension_table(report) -> list[str]:
    dims = report.get("rm_accuracy_by_dimension") or {}
    rows = ["## What the reward model learned", "",
            "Pairs of candidates (held-out prompts) that differ on one quality dimension of the world's "
            "noise-free score: how often the RM orders them the same way.", "",
            "| dimension | RM agrees | pairs |", "|---|---|---|"]
    rows += [f"| {k} | {v['accuracy']:.3f} | {v['pairs']} |" for k, v in dims.items()]
    if "rm_world_correlation" in report:
        rows += ["", f"On SFT's own samples (T=1) of the same prompts, where PPO starts, the RM's score correlates "
                     f"r = {report['rm_world_correlation']:.3f} with the world's noise-free score."]
    pol = report.get("rm_on_policy_samples")
    if pol:
        rows += ["", f"Among {pol['k']} SFT samples of each prompt, the RM puts a right answer above a wrong one "
                     f"{pol['right_over_wrong']:.3f} of the time ({pol['pairs']} pairs; 0.5 is chance), and its score "
                     f"correlates r = {pol['r_within']:.3f} with the noise-free score within a prompt."]
    if report.get("ppo_reward") == "world":
        rows += ["", f"PPO and PPO-ptx were rewarded by the world's noise-free score (x{WORLD_REWARD_SCALE}), "
                     "not by this RM (steps.ppo_reward=world)."]
    return rows


def changed_samples(report) -> list[str]:
    ch = report["changed_vs_sft"].get("ppo_ptx", {})
    rows = ["## What changed between SFT and PPO-ptx (greedy answers)", ""]
    for kind, v in ch.items():
        rows.append(f"- {kind.replace('_', ' ')}: {v['count']} prompts")
        rows += [f"  - `{json.dumps(e['prompt'])}`: SFT `{json.dumps(e['sft'])}` -> PPO-ptx `{json.dumps(e['ppo_ptx'])}`"
                 for e in v["examples"]]
    return rows


def plot_run_curves(out):
    def series(stage, key):
        path = os.path.join(out, stage, "metrics.jsonl")
        rows = [r for r in read_metrics(path) if key in r] if os.path.exists(path) else []
        return [r["step"] for r in rows], [r[key] for r in rows]
    panels = {
        "pretrain / SFT loss": {"pretrain": series("pretrain", "loss"), "sft": series("sft", "sft_loss")},
        "RM ranking loss": {"rm": series("rm", "loss")},
        "PPO reward (RM score)": {n: series(n, "reward") for n in ("ppo", "ppo_ptx")},
        "KL(pi || SFT) per response": {n: series(n, "kl") for n in ("ppo", "ppo_ptx")},
        "win rate vs SFT (greedy, held-out labelers)": {n: series(n, "win_rate_vs_sft") for n in ("ppo", "ppo_ptx")},
        "ptx loss": {"ppo_ptx": series("ppo_ptx", "ptx_loss")},
    }
    plot_curves(panels, os.path.join(out, "curves.png"), "miniature InstructGPT")


if __name__ == "__main__":
    common.cli(main)
