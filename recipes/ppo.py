"""PPO-ptx (InstructGPT stage 3): policy from SFT, value from the RM, KL-shaped reward, GAE,
clipped PPO, and a pretraining LM term accumulated into the same gradient buffer.

    python -m recipes.ppo --model.init=runs/sft --rl.rm=runs/rm   # bundled self-instruct prompts
    python -m recipes.ppo ... --ppo.ptx_coef=0                     # "PPO" (no ptx) baseline
    torchrun --nproc_per_node 8 -m recipes.ppo --config recipes/configs/ppo_gpt3_1.3b.toml

One iteration (= one train step): sample ppo.batch_size episodes (split over ranks) with the KV
cache; score them with the RM; per-token reward -beta * KL(pi || pi_SFT) plus the score at the
last token; GAE with gamma 1; advantages whitened over all ranks; then ppo.ppo_epochs passes of
minibatches, each one optimizer step of  policy_loss + ptx_coef * ptx_nll  (ptx_ratio
pretraining sequences per episode) and one value-model step; then the policy EMA is updated.

Precision (engine/precision.py): sampling, the experience pass and the updates all run under the
same compute context (bf16 autocast on CUDA, or with train.dtype=bf16), and the frozen reference
model and RM are wrapped like the policy (FSDP2 with the same mixed precision), so the first
ratio is exactly 1 and the reference KL compares like with like.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
from torch.profiler import record_function

import kernels
from engine import dist, precision
from engine.config import DataSection, DistSection, ModelSection, TrainConfig, section
from engine.data import TokenStream, load_prompts, load_text
from engine.losses import ppo_policy_loss, ptx_loss, value_loss
from engine.metrics import Progress
from engine.model import compile_blocks
from engine.ppo import (AdaptiveKLController, FixedKLController, PPOConfig, RunningMoments,
                        compute_advantages, ema_decay_at, ema_update, loo_center, shaped_rewards)
from engine.rollout import Rollout, generate_responses, policy_logprobs, score_responses, values
from engine.trainer import Trainer, make_optimizer
from recipes import common
from recipes.rm import load_reward_model


@dataclass
class RLSection:
    rm: str = ""                  # reward-model run (recipes.rm output); "a,b,c": the mean of several
                                  # (engine.model.RewardEnsemble), e.g. one RM trained from 3 seeds
    value_init: str = ""          # default: the (first) RM (paper: value model initialised from the RM)
    ptx_path: str = ""            # pretraining text for ptx (plain .txt or {"text"} JSONL)
    ptx_per_minibatch: int = 0    # 0: ppo.ptx_ratio x minibatch_size (paper: 8x episodes)
    ptx_seq_len: int = 0          # 0: data.seq_len
    exact_kl: bool = False        # penalise the exact per-token KL (kernels.linear_kl), not k1/k2/k3
    ema: bool = True              # export the EMA of the policy weights (paper: decay 0.992), bias-
                                  # corrected (ppo.ema_bias_correction) so short runs export trained weights
    compile_decode: bool = True   # CUDA: the fixed-shape decode step as a CUDA graph (torch.compile
                                  # mode="reduce-overhead"); ignored on CPU
    gen_group: int = 0            # episodes per sampling call, each call seeded by (seed, iteration,
                                  # global group index); 0 = all of a rank's episodes. With a fixed
                                  # gen_group that divides batch_size / ranks, rollouts, minibatches
                                  # and losses do not depend on the number of ranks.


@dataclass
class PPORecipeConfig:
    model: ModelSection = section(lambda: ModelSection(dropout=0.0))  # dropout off: ratio 1 at start
    data: DataSection = section(lambda: DataSection(path=str(common.DATA / "prompts_selfinstruct_user_oriented.jsonl")))
    train: TrainConfig = section(lambda: TrainConfig(max_steps=20, lr=5e-6, weight_decay=0.0, grad_clip=1.0))
    ppo: PPOConfig = section(lambda: PPOConfig(max_new_tokens=64))
    rl: RLSection = section(RLSection)
    dist: DistSection = section(DistSection)


def lr_factor(it: int, p: PPOConfig) -> float:
    """Constant LR after a linear warmup from warmup_from x over warmup_iters (paper App. C.4)."""
    if it >= p.warmup_iters:
        return 1.0
    return p.warmup_from + (1 - p.warmup_from) * it / max(1, p.warmup_iters)


def global_whiten(x, mask):
    """Whiten x over the masked entries of all ranks (mean 0, unbiased var 1), in two passes
    (mean, then squared deviations from it) in float64: the one-pass E[x^2] - E[x]^2 cancels
    catastrophically when |mean| >> std and can go negative (NaN advantages)."""
    m = mask.bool()
    xd = torch.where(m, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    s = torch.stack([xd.sum(), m.sum().double()])
    if dist.is_dist():
        torch.distributed.all_reduce(s)
    n = s[1].clamp_min(1)
    mean = s[0] / n
    sq = torch.where(m, (xd - mean).square(), torch.zeros_like(xd)).sum()
    if dist.is_dist():
        torch.distributed.all_reduce(sq)
    var = (sq / (s[1] - 1).clamp_min(1)).clamp_min(0)
    y = ((xd - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype)
    return torch.where(m, y, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def exact_kl(policy, ref, roll: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Exact per-token KL(pi_T || pi_ref,T) over the vocabulary, [B, R], via kernels.linear_kl,
    between the temperature-scaled distributions that were sampled (ppo.temperature), as the
    sampled-token estimators k1/k2/k3 see them. Collective under FSDP (gathers both models)."""
    P = roll.prompt_len
    x, y = roll.seq[:, :-1], roll.seq[:, 1:]
    with dist.gathered(policy), dist.gathered(ref):  # hidden_states() bypasses an FSDP root's forward
        h = policy.hidden_states(x, kv_start=roll.kv_start)[:, P - 1:]
        hr = ref.hidden_states(x, kv_start=roll.kv_start)[:, P - 1:]
        B, R, d = h.shape
        _, _, kl = kernels.linear_kl(h.reshape(-1, d), policy.lm_head_weight, hr.reshape(-1, d),
                                     ref.lm_head_weight, y[:, P - 1:].reshape(-1), temperature=temperature)
    return kl.view(B, R) * roll.mask


def cat_rollouts(rolls: list, pad_id: int) -> Rollout:
    """Concatenate rollouts of different prompt / response lengths (left-pad prompts, right-pad
    responses with mask 0)."""
    if len(rolls) == 1:
        return rolls[0]
    P = max(r.prompt_len for r in rolls)
    R = max(r.mask.shape[1] for r in rolls)
    seqs, ks, masks, lps = [], [], [], []
    for r in rolls:
        lp, rp = P - r.prompt_len, R - r.mask.shape[1]
        seqs.append(torch.nn.functional.pad(r.seq, (lp, rp), value=pad_id))
        ks.append(r.kv_start + lp)
        masks.append(torch.nn.functional.pad(r.mask, (0, rp)))
        lps.append(torch.nn.functional.pad(r.sample_logprobs, (0, rp)))
    return Rollout(torch.cat(seqs), torch.cat(ks), P, torch.cat(masks), torch.cat(lps),
                   [x for r in rolls for x in r.prompts], [x for r in rolls for x in r.responses],
                   torch.cat([r.no_eos for r in rolls]))


def sample_episodes(policy, tok, prompts, cfg, it: int, B: int, G: int) -> Rollout:
    """This rank's B episodes of iteration `it`: prompts drawn for the global batch with a
    rank-independent generator, then sampled in groups of G, each seeded by its global index."""
    p, r0 = cfg.ppo, dist.rank() * B
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + it)
    k = p.samples_per_prompt  # each drawn prompt k times in a row (B % k == 0: groups stay on one rank)
    chosen = torch.randint(0, len(prompts), (B * dist.world_size() // k,), generator=g)
    chosen = chosen.repeat_interleave(k)[r0:r0 + B].tolist()
    rolls = []
    device = next(policy.parameters()).device
    # generate() bypasses an FSDP root's forward; sampling runs in the policy's compute dtype
    with dist.gathered(policy), precision.autocast(cfg.train.dtype, device):
        for k in range(0, B, G):
            seed = (cfg.train.seed * 1_000_003 + it) * 7919 + (r0 + k) // G
            rolls.append(generate_responses(policy, tok, [prompts[i] for i in chosen[k:k + G]],
                                            max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                            seed=seed, compile_decode=cfg.rl.compile_decode))
    return cat_rollouts(rolls, tok.eos_id)


def minibatch_order(cfg, it: int, epoch: int, B: int, G: int, mbs: int) -> list:
    """Minibatches of one PPO epoch: each sampling group is permuted by its own generator
    (seed, iteration, epoch, global group index) and minibatch j takes the j-th slice of every
    group this rank holds, so a global minibatch is the same set of episodes at any world size."""
    n_groups = B // G
    if mbs % n_groups:
        raise SystemExit(f"ppo.minibatch_size per rank ({mbs}) must be a multiple of the "
                         f"{n_groups} sampling groups per rank (rl.gen_group={G})")
    per, first = mbs // n_groups, dist.rank() * n_groups
    perms = [k * G + torch.randperm(G, generator=torch.Generator().manual_seed(
        ((cfg.train.seed * 1_000_003 + it) * 31 + epoch) * 7919 + first + k)) for k in range(n_groups)]
    return [torch.cat([q[j:j + per] for q in perms]) for j in range(0, G, per)]


def make_experience(policy, ref, rm, value_model, roll, cfg, kl_coef, minibatches, moments, score_fn=None,
                    ref_weight=0.0):
    """Everything PPO needs from a rollout, without gradients. old logprobs and values are
    computed per minibatch exactly as the update will compute them, so the first ratio is 1.
    score_fn(rollout) -> [B] scores replaces the reward model's (see `run`). ref_weight: the RM's
    weight on log pi_ref (RewardModel.ref_weight), paid per token by shaped_rewards."""
    p = cfg.ppo
    device = roll.seq.device
    with torch.no_grad(), precision.autocast(cfg.train.dtype, device):  # as Trainer.update
        old_logp, old_values, ref_logp, ref_lp1 = (torch.zeros_like(roll.mask) for _ in range(4))
        scores = torch.zeros(roll.mask.shape[0], device=device)
        # per minibatch, trimmed exactly as the update will see it (so the first ratio is 1);
        # the frozen models' passes ride on the same trimmed minibatches
        for idx in minibatches:
            mb = roll.select(idx).trim()
            r = mb.mask.shape[1]
            old_logp[idx, :r] = policy_logprobs(policy, mb, temperature=p.temperature)
            if p.critic:
                old_values[idx, :r] = values(value_model, mb)
            ref_logp[idx, :r] = policy_logprobs(ref, mb, temperature=p.temperature)
            scores[idx] = (score_fn(mb) if score_fn else score_responses(rm, mb, head_only=True)).float().to(device)
            if ref_weight and p.temperature != 1.0:  # the RM's term is log pi_SFT at temperature 1
                ref_lp1[idx, :r] = policy_logprobs(ref, mb)
        if p.normalize_reward:
            moments.update(dist.all_gather_cat(scores))  # same statistics on every rank
            scores = moments.normalize(scores)
        kl = exact_kl(policy, ref, roll, p.temperature) if cfg.rl.exact_kl else None
        ref_term = ref_lp1 if p.temperature != 1.0 else ref_logp  # what the RM's term reads
        rewards, kl_sum = shaped_rewards(loo_center(scores, p.samples_per_prompt), old_logp, ref_logp,
                                         roll.mask, beta=kl_coef,
                                         kind=p.kl_estimator, kl=kl, no_eos=roll.no_eos,
                                         no_eos_penalty=p.no_eos_penalty, ref_weight=ref_weight,
                                         ref_term_logp=ref_term)
        adv, returns = compute_advantages(rewards, old_values, roll.mask, gamma=p.gamma, lam=p.lam,
                                          whiten=False)
        if p.whiten_advantages:
            adv = global_whiten(adv, roll.mask)
    if ref_weight:  # logged reward: the head plus the reference term PPO pays (ppo.ref_weight_scale x w)
        scores = scores + ref_weight * (ref_term * roll.mask).sum(1)
    return dict(old_logp=old_logp, old_values=old_values, adv=adv, returns=returns, scores=scores,
                kl_sum=kl_sum)


def main(argv=None):
    cfg, out = common.parse(PPORecipeConfig, argv, "ppo")
    return run(cfg, out)


def run(cfg: PPORecipeConfig, out: str, eval_hook=None, score_fn=None) -> dict:
    """eval_hook(policy) -> dict of extra metrics, called every train.eval_every iterations.
    score_fn(rollout) -> [B] scores: rewards the episodes instead of the RM (the RM still
    initialises the value model). A diagnostic: a known reward, e.g. the miniature world's
    noise-free score, tells what the PPO budget could gain with a perfect reward model."""
    p = cfg.ppo
    device = common.setup(cfg, out)
    if not cfg.model.init or not cfg.rl.rm:
        raise SystemExit("ppo needs --model.init=<SFT run> and --rl.rm=<RM run>")
    tok = common.tokenizer(cfg, out)
    prompts = load_prompts(cfg.data.path)
    policy = common.build_model(cfg, tok, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.rl.ema else None
    rm = load_reward_model(cfg.rl.rm, device, tok=tok).eval().requires_grad_(False)
    ref_weight = 0.0 if score_fn else rm.ref_weight * p.ref_weight_scale
    # ppo.critic=false: no value model at all (V = 0), so nothing is trained, kept or saved for it
    value_model = load_reward_model(cfg.rl.value_init or cfg.rl.rm.split(",")[0], device, tok=tok) if p.critic else None
    if cfg.train.compile:  # the policy (and its copies) came compiled from build_model
        compile_blocks(rm)
        if value_model is not None:
            compile_blocks(value_model)
    ptx = None
    if cfg.rl.ptx_path and p.ptx_coef > 0:
        ptx = TokenStream.from_text(load_text(cfg.rl.ptx_path), tok)
    ptx_T = min(cfg.rl.ptx_seq_len or cfg.data.seq_len, policy.cfg.block_size)
    ptx_n = cfg.rl.ptx_per_minibatch or p.ptx_ratio * p.minibatch_size
    world = dist.world_size()
    if p.batch_size % world or p.minibatch_size % world:
        raise SystemExit(f"ppo.batch_size and ppo.minibatch_size must be divisible by {world} ranks")
    B, mbs = p.batch_size // world, p.minibatch_size // world
    G = cfg.rl.gen_group or B
    if B % p.samples_per_prompt:
        raise SystemExit(f"ppo.samples_per_prompt={p.samples_per_prompt} must divide the {B} episodes per rank")
    if B % G:
        raise SystemExit(f"rl.gen_group={G} must divide the {B} episodes per rank")

    pw = common.wrap(cfg, policy, device)
    vw = common.wrap(cfg, value_model, device) if value_model is not None else None
    if cfg.dist.strategy == "fsdp":
        # frozen models sharded and cast like the policy: the KL reference and the RM compute in
        # the policy's precision, and only their shards stay resident
        ref = common.wrap(cfg, ref, device, trained=False)
        for m in getattr(rm, "members", [rm]):  # an ensemble: each member sharded like one RM
            common.wrap(cfg, m, device, trained=False)
        if ema is not None:
            ema = common.wrap(cfg, ema, device, trained=False)  # sharded like the policy: ema_update is local
    opt_v_cfg = copy.copy(cfg.train)
    opt_v_cfg.lr = p.value_lr
    kl_ctl = (AdaptiveKLController(p.beta, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.beta))
    moments = RunningMoments()
    models = {"policy": policy, **({"value": value_model} if vw is not None else {}),
              **({"ema": ema} if ema is not None else {})}
    optimizers = {"model": make_optimizer(policy, cfg.train),
                  **({"value": make_optimizer(value_model, opt_v_cfg)} if vw is not None else {})}
    trainer = Trainer(pw, cfg.train, out, models=models, device=device, desc="ppo", optimizers=optimizers,
                      state_fn=lambda: {"kl": kl_ctl.state_dict(), "moments": moments.state_dict()},
                      load_state_fn=lambda s: (kl_ctl.load_state_dict(s["kl"]), moments.load_state_dict(s["moments"])))
    trainer.resume()

    def token_shares(roll, epochs) -> list:
        """Per minibatch: local tokens x ranks / global tokens, so the per-rank token means,
        averaged over ranks by DDP/FSDP, equal the token mean over the whole minibatch. All
        minibatches of an iteration in one host transfer and one all-reduce."""
        if world == 1:
            return [[1.0] * len(order) for order in epochs]
        per_row = roll.mask.sum(1).cpu()
        local = [float(per_row[idx].sum()) for order in epochs for idx in order]
        total = dist.reduce_floats(local, "sum")
        flat = iter([n * world / max(t, 1.0) for n, t in zip(local, total)])
        return [[next(flat) for _ in order] for order in epochs]

    def policy_step(m, mb):
        roll, exp, ptx_batch, share = mb
        logp = policy_logprobs(m, roll, temperature=p.temperature)
        loss, st = ppo_policy_loss(logp, exp["old_logp"], exp["adv"], roll.mask, clip=p.clip)
        loss = loss * share
        info = {"policy_loss": loss.detach(), **st}
        if ptx_batch is not None:  # same backward, same gradient buffer as the PPO loss
            x, y = ptx_batch
            nll = ptx_loss(m(x, targets=y), torch.ones_like(y, dtype=torch.float32))
            loss = loss + p.ptx_coef * nll
            info["ptx_loss"] = nll.detach()
        return loss, info

    def value_step(m, mb):
        roll, exp, _, share = mb
        v = values(m, roll)
        loss = value_loss(v, exp["old_values"], exp["returns"], roll.mask, clip=p.value_clip)
        loss = loss * share
        return p.vf_coef * loss, {"value_loss": loss.detach()}

    info = {}
    progress = Progress(cfg.train.max_steps, trainer.step, "ppo_ptx" if p.ptx_coef > 0 else "ppo",
                        cfg.train.progress and dist.is_main())
    with trainer.signals():
        while trainer.step < cfg.train.max_steps:
            it, t0 = trainer.step, time.perf_counter()
            trainer.seed_step(it)
            g = common.step_generator(cfg, it, 0)  # ptx batches
            with record_function("ppo/generate"):  # regions of bench ppo_profile's split
                roll = sample_episodes(policy, tok, prompts, cfg, it, B, G)
            t_gen = time.perf_counter() - t0
            epochs = [minibatch_order(cfg, it, e, B, G, mbs) for e in range(p.ppo_epochs)]
            with record_function("ppo/experience"):
                exp = make_experience(policy, ref, rm, value_model, roll, cfg, kl_ctl.value, epochs[0],
                                      moments, score_fn, ref_weight)
            t_exp = time.perf_counter() - t0 - t_gen  # includes the wait for the device (it syncs)
            # critic warmup: the first iterations train only the value model, so the policy's first
            # updates see advantages from a fitted critic instead of the RM-initialised one
            warm = it < p.critic_warmup
            pit = max(0, it - p.critic_warmup)  # policy iterations: lr warmup and EMA count these
            lr = 0.0 if warm else cfg.train.lr * lr_factor(pit, p)
            stats: dict = {"loss": []}
            shares = token_shares(roll, epochs)
            for order, order_shares in zip(epochs, shares):
                for idx, share in zip(order, order_shares):
                    mb_roll = roll.select(idx).trim()  # as make_experience: same shapes, same numbers
                    r = mb_roll.mask.shape[1]
                    mb_exp = {k: exp[k][idx, :r] for k in ("old_logp", "old_values", "adv", "returns")}
                    ptx_batch = None
                    if ptx is not None:
                        x, y = ptx.batch(ptx_n // world, ptx_T, g)
                        ptx_batch = (x.to(device), y.to(device))
                    mb = (mb_roll, mb_exp, ptx_batch, share)
                    with record_function("ppo/policy_update"):
                        s1 = {} if warm else trainer.update([mb], policy_step, model=pw,
                                                            optimizer=trainer.optimizers["model"], lr=lr)
                    with record_function("ppo/value_update"):
                        s2 = {} if not p.critic else trainer.update(
                            [mb], value_step, model=vw, optimizer=trainer.optimizers["value"],
                            lr=p.value_lr * (1.0 if warm else lr_factor(pit, p)))
                    stats.setdefault("first_ratio", s1.get("ratio", float("nan")))
                    for k, v in {**s1, **{f"value_{k}": v for k, v in s2.items()}}.items():
                        stats.setdefault(k, []).append(v)
            if ema is not None and not warm:
                ema_update(ema, policy, ema_decay_at(pit + 1, p.ema_decay, p.ema_bias_correction))
            kl_mean = float(dist.all_reduce_mean(exp["kl_sum"].mean()))
            kl_ctl.update(kl_mean, B * world)
            trainer.step += 1
            dt = time.perf_counter() - t0
            n_tok, resp_len, no_eos = dist.reduce_floats(
                [float(roll.mask.sum()), float(roll.mask.sum(1).mean()), float(roll.no_eos.float().mean())])
            n_tok *= world
            first_ratio = stats.pop("first_ratio", float("nan"))
            row = {"step": trainer.step, "loss": _mean(stats.pop("loss")), "lr": lr,
                   "tokens_per_s": n_tok / max(dt, 1e-9), "step_time_s": dt, "gen_time_s": t_gen,
                   "exp_time_s": t_exp, "train_time_s": dt - t_gen - t_exp,
                   "reward": float(dist.all_reduce_mean(exp["scores"].mean())), "kl": kl_mean,
                   "kl_coef": kl_ctl.value, "response_len": resp_len,
                   "no_eos": no_eos, "first_ratio": first_ratio,
                   **{k: _mean(v) for k, v in stats.items()}}
            if eval_hook is not None and cfg.train.eval_every > 0 and (
                    trainer.step % cfg.train.eval_every == 0 or trainer.step == cfg.train.max_steps):
                target = ema if ema is not None else policy
                # the hook samples: generate() bypasses an FSDP root; same compute dtype as rollouts
                with dist.gathered(target), precision.autocast(cfg.train.dtype, device):
                    row.update(eval_hook(target))
            trainer.log(row)
            info = row
            progress.update(trainer.step, reward=row["reward"], kl=kl_mean, len=row["response_len"],
                            first_ratio=f"{first_ratio:.6f}")
            if trainer.should_stop():
                trainer.save()
                raise SystemExit(0)
            if cfg.train.ckpt_every > 0 and trainer.step % cfg.train.ckpt_every == 0:
                trainer.save()
    progress.close()
    trainer.save()
    final = ema if ema is not None else policy
    common.export(final, tok, out)
    if value_model is not None:
        common.save_full(value_model, os.path.join(out, "value"))
    return info


def _mean(v):
    if v is None:
        return float("nan")
    v = [x for x in v if x == x]
    return sum(v) / len(v) if v else float("nan")


if __name__ == "__main__":
    common.cli(main)
