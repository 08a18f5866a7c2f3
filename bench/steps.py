"""End-to-end training steps of each stage, built directly from engine APIs.

  sft   engine.GPT, logprobs via model(idx, targets=...) (kernels.linear_logprobs), sft_loss,
        one engine.trainer.Trainer.update (bf16 autocast on CUDA, grad clip, AdamW step)
  rm    engine.RewardModel, K = 4 completions per prompt, score_at + engine.ranking_loss, one update
  rm_shared  the rm step on prompt + K completion groups packed as recipes/rm.py packs them: each
        completion after its own copy of the prompt, or after one shared copy (share_prompt)
  ppo   one iteration: engine.rollout.generate_responses (KV cache) from the policy, then the
        experience (policy / ref logprobs, values, RM scores, shaped rewards, GAE via
        engine.ppo.compute_advantages) and one epoch of minibatch updates (ppo_policy_loss for the
        policy, value_loss for the value model). Precision as recipes/ppo.py: generation and
        experience without autocast, updates under the trainer's autocast.
Presets: tiny on CPU; gpt3-125m and gpt3-1.3b on GPU. Random weights and random tokens (the
throughput of a step does not depend on what the tokens say; PPO responses run to max_new_tokens
unless a row samples EOS).
Reported: step time (median, p20, p80 over the timed steps), tokens/s (sequence tokens per step /
median step time), model TFLOP/s and MFU on GPU (CPU: n/a), peak memory, and for PPO the time
split between generation and training (experience + updates).
FLOPs per token (written here): train = 6*N + 12*sum_layers(inner * ctx_l), forward = 2*N +
4*sum_layers(inner * ctx_l), N = non-embedding parameters + the LM head (V*d; the RM / value head:
d), ctx_l = visible keys per query averaged over the sequence (T/2 for dense causal layers, the
exact band count / T for banded ones). PPO generation is counted as a forward over the prompt and
response tokens. MFU = model FLOP/s / dense bf16 peak (bench.common.PEAK_BF16_TFLOPS).
"""
import copy
import tempfile
import types

import torch

import engine
from engine.config import GPTConfig, TrainConfig
from engine.model import build, compile_blocks
from engine.losses import ppo_policy_loss, ranking_loss, sft_loss, value_loss
from engine.ppo import compute_advantages, shaped_rewards
from engine.rollout import generate_responses, policy_logprobs, score_responses, values
from engine.trainer import Trainer, make_optimizer

from .attention import pairs
from .common import free_memory, peak_mem, peak_tflops, quantiles_ms, sync, time_calls

DESCRIPTION = "end-to-end steps"


def configs(run):
    """[(preset, {stage: shape dict})]"""
    if run.tiny:
        return [("tiny", {"sft": dict(B=2, T=32), "rm": dict(B=1, K=4, T=32),
                          "ppo": dict(B=4, P=8, R=8, mb=2)})]
    if run.device == "cuda":
        return [("gpt3-125m", {"sft": dict(B=8, T=2048), "rm": dict(B=4, K=4, T=1024),
                               "ppo": dict(B=64, P=256, R=256, mb=16)}),
                ("gpt3-1.3b", {"sft": dict(B=4, T=2048), "rm": dict(B=2, K=4, T=1024),
                               "ppo": dict(B=32, P=256, R=256, mb=8)})]
    if run.quick:
        return [("tiny", {"sft": dict(B=8, T=128), "rm": dict(B=4, K=4, T=128),
                          "ppo": dict(B=16, P=32, R=64, mb=8)})]
    return [("tiny", {"sft": dict(B=16, T=128), "rm": dict(B=8, K=4, T=128),
                      "ppo": dict(B=32, P=32, R=96, mb=8)})]


def n_steps(run, ppo=False):
    """(warmup, timed) steps; a PPO iteration is several optimizer steps long."""
    if run.tiny:
        return 1, 2
    if run.device == "cuda":
        return (1, 3) if ppo else (2, 5)
    return (1, 3) if ppo else (1, 5)


# ----------------------------------------------------------------------------- FLOPs

def attn_terms(cfg: GPTConfig, T: int) -> float:
    """sum over layers of inner * (average visible keys per query) for a length-T sequence."""
    inner = cfg.n_head * cfg.d_head
    tot = 0.0
    for layer in range(cfg.n_layer):
        kind = "banded" if cfg.is_banded(layer) else "causal"
        tot += inner * pairs(T, kind, cfg.window) / T
    return tot


def matmul_params(cfg: GPTConfig, head: str) -> int:
    return cfg.num_params(embeddings=False) + (cfg.vocab_size * cfg.d_model if head == "lm" else cfg.d_model)


def train_flops_per_token(cfg, T, head="lm"):
    return 6 * matmul_params(cfg, head) + 12 * attn_terms(cfg, T)


def fwd_flops_per_token(cfg, T, head="lm"):
    return 2 * matmul_params(cfg, head) + 4 * attn_terms(cfg, T)


# ----------------------------------------------------------------------------- helpers

def _trainer(model, tmp):
    cfg = TrainConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0, progress=False)
    return Trainer(model, cfg, tmp, device=next(model.parameters()).device, desc="bench")


def _row(run, preset, stage, shape, times_s, tokens, flops, mem, extra=None):
    med, p20, p80 = quantiles_ms(times_s)
    row = {"preset": preset, "stage": stage, **{k: v for k, v in shape.items()},
           "provider": "engine", "status": "ok", "median_ms": med, "p20_ms": p20, "p80_ms": p80,
           "work": tokens, "work_unit": "tokens", "rate": tokens / (med * 1e-3), "rate_unit": "tokens/s"}
    tf = flops / (med * 1e-3) / 1e12
    peak = peak_tflops(run.device)
    row["model_tflops"] = tf
    row["mfu"] = tf / peak if peak else "n/a"
    if mem is not None:
        row["peak_mem_mb"], row["mem_method"] = (None if mem[0] is None else mem[0] / 2**20), mem[1]
    row.update(extra or {})
    return row


def _record(run, preset, stage, shape, fn_or_err):
    case = {"preset": preset, "stage": stage, **shape}
    if isinstance(fn_or_err, BaseException):
        from .common import is_oom
        e = fn_or_err
        return run.add({**case, "provider": "engine",
                        "status": "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:160]}"})
    return run.add(fn_or_err)


def _timed(run, step, n):
    """Wall times of n steps and the peak memory: on CUDA the max allocated over those steps
    (weights, optimizer state and activations), on CPU the RSS high-water delta of one more step."""
    if run.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = time_calls(step, run.device, n)
        return times, (torch.cuda.max_memory_allocated(), "cuda_max_alloc_total")
    times = time_calls(step, run.device, n)
    return times, peak_mem(step, run.device)


# ----------------------------------------------------------------------------- stages

def bench_sft(run, cfg, preset, shape, dev, tmp, compiled=False):
    B, T = shape["B"], shape["T"]
    torch.manual_seed(0)
    model = build(engine.GPT, cfg, dev).train()
    if compiled:
        compile_blocks(model)
    tr = _trainer(model, tmp)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
    idx, tgt = x[:, :-1], x[:, 1:]
    mask = torch.ones(B, T, device=dev)
    mask[:, : T // 4] = 0  # prompt tokens carry no loss

    def loss_fn(m, batch):
        return sft_loss(m(idx, targets=tgt), mask), {}

    step = lambda: tr.update([None], loss_fn)  # noqa: E731
    warm, n = n_steps(run)
    t0 = _now()
    time_calls(step, dev, max(warm, 2))  # compiled: the first calls compile (fwd, then bwd)
    first_s = _now() - t0
    times, mem = _timed(run, step, n)
    extra = {"provider": "engine+compile", "compile_s": round(first_s, 2)} if compiled else None
    return _row(run, preset, "sft", shape, times, B * T, B * T * train_flops_per_token(cfg, T), mem,
                extra)


def bench_sft_compile(run, cfg, preset, shape, dev, tmp):
    """The sft step with train.compile (engine.model.compile_blocks, Inductor); compile_s is
    the time of the warm-up steps, which include compiling."""
    return bench_sft(run, cfg, preset, shape, dev, tmp, compiled=True)


def bench_rm(run, cfg, preset, shape, dev, tmp):
    B, K, T = shape["B"], shape["K"], shape["T"]
    torch.manual_seed(0)
    rm = build(engine.RewardModel, cfg, dev).train()
    tr = _trainer(rm, tmp)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B * K, T), generator=g).to(dev)
    last = torch.randint(T // 2, T, (B * K,), generator=g).to(dev)
    ranking = torch.stack([torch.randperm(K, generator=g) for _ in range(B)]).to(dev)

    def loss_fn(m, batch):
        r = m.score_at(idx, last).float().view(B, K)
        return ranking_loss(r, ranking), {}

    step = lambda: tr.update([None], loss_fn)  # noqa: E731
    warm, n = n_steps(run)
    time_calls(step, dev, warm)
    times, mem = _timed(run, step, n)
    ntok = B * K * T
    return _row(run, preset, "rm", shape, times, ntok, ntok * train_flops_per_token(cfg, T, "scalar"), mem)


def bench_rm_shared(run, cfg, preset, shape, dev, tmp):
    """The rm step on ranking groups as the recipe collates them (data.mask_packed): B groups of
    K completions of R tokens after a P-token prompt, packed into rows of T with each completion
    after its own copy of the prompt (baseline), or after one shared copy (rm.share_prompt)."""
    from engine.data import collate_rankings
    from recipes.rm import group_rewards
    B, K, P, R, T = shape["B"], shape["K"], shape["P"], shape["R"], shape["T"]
    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(B):
        p = torch.randint(3, cfg.vocab_size, (P,), generator=g).tolist()
        ids = [p + torch.randint(3, cfg.vocab_size, (R,), generator=g).tolist() for _ in range(K)]
        groups.append({"ids": ids, "last_idx": [len(x) - 1 for x in ids], "ranking": list(range(K)), "prompt_len": P})
    rows = []
    for share in (False, True):
        torch.manual_seed(0)
        rm = build(engine.RewardModel, cfg, dev).train()
        tr = _trainer(rm, tmp)
        batch = collate_rankings(groups, 0, T, share_prompt=share).to(dev)
        step = lambda: tr.update([None], lambda m, b: (ranking_loss(group_rewards(m, batch), batch.ranking), {}))  # noqa: E731
        warm, n = n_steps(run)
        time_calls(step, dev, warm)
        times, mem = _timed(run, step, n)
        ntok = B * K * (P + R)  # the sequences' tokens, whatever the layout
        rows.append(_row(run, preset, "rm_shared", shape, times, ntok, ntok * train_flops_per_token(cfg, T, "scalar"),
                         mem, {"provider": "engine+shared_prompt" if share else "engine (packed)",
                               "packed_tokens": batch.ids.numel()}))
    rows[1].update(baseline="engine (packed)", speedup_vs_baseline=rows[0]["median_ms"] / rows[1]["median_ms"])
    return rows


def bench_ppo(run, cfg, preset, shape, dev, tmp):
    B, P, R, mb = shape["B"], shape["P"], shape["R"], shape["mb"]
    torch.manual_seed(0)
    policy = build(engine.GPT, cfg, dev).train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = build(engine.RewardModel, cfg, dev).eval().requires_grad_(False)
    value_model = build(engine.RewardModel, cfg, dev).train()
    tr = _trainer(policy, tmp)
    opt_v = make_optimizer(value_model, tr.cfg)
    tok = types.SimpleNamespace(pad_id=0, eos_id=cfg.vocab_size - 1, decode=lambda ids: "",
                                encode=lambda s: [])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, cfg.vocab_size - 1, (int(torch.randint(P // 2, P + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(B)]
    phases = {}

    def step(seed=[0]):  # noqa: B006 - a counter across calls
        seed[0] += 1
        sync(dev)
        t0 = _now()
        roll = generate_responses(policy, tok, prompts, max_new_tokens=R, seed=seed[0], batch_size=B)
        sync(dev)
        t1 = _now()
        with torch.no_grad():
            old_logp = policy_logprobs(policy, roll)
            ref_logp = policy_logprobs(ref, roll)
            old_values = values(value_model, roll)
            scores = score_responses(rm, roll)
            rewards, _ = shaped_rewards(scores, old_logp, ref_logp, roll.mask, beta=0.02)
            adv, ret = compute_advantages(rewards, old_values, roll.mask, gamma=1.0, lam=0.95)
        sync(dev)
        t2 = _now()
        for idx in torch.randperm(B, generator=g).split(mb):
            idx = idx.to(dev)
            sub = roll.select(idx)

            def pol(m, _):
                loss, _st = ppo_policy_loss(policy_logprobs(m, sub), old_logp[idx], adv[idx], sub.mask)
                return loss, {}

            def val(m, _):
                return value_loss(values(m, sub), old_values[idx], ret[idx], sub.mask), {}
            tr.update([None], pol)
            tr.update([None], val, model=value_model, optimizer=opt_v)
        sync(dev)
        t3 = _now()
        phases.setdefault("gen", []).append(t1 - t0)
        phases.setdefault("exp", []).append(t2 - t1)
        phases.setdefault("upd", []).append(t3 - t2)
        phases["seq_len"] = roll.seq.shape[1]
        phases["resp_tokens"] = float(roll.mask.sum())

    warm, n = n_steps(run, ppo=True)
    time_calls(step, dev, warm)
    phases.clear()
    times, mem = _timed(run, step, n)
    k = n // 2  # median of each phase over the timed iterations
    med = {p: sorted(phases[p][:n])[k] for p in ("gen", "exp", "upd")}
    L = phases["seq_len"]
    ntok = B * L
    fl = ntok * (fwd_flops_per_token(cfg, L)                               # generation
                 + 2 * fwd_flops_per_token(cfg, L) + 2 * fwd_flops_per_token(cfg, L, "scalar")  # experience
                 + train_flops_per_token(cfg, L) + train_flops_per_token(cfg, L, "scalar"))      # updates
    gen, exp_, upd = med["gen"], med["exp"], med["upd"]
    extra = {"gen_ms": gen * 1e3, "train_ms": (exp_ + upd) * 1e3, "exp_ms": exp_ * 1e3,
             "update_ms": upd * 1e3, "gen_frac": gen / (gen + exp_ + upd),
             "gen_tokens_per_s": B * R / gen, "resp_tokens": phases["resp_tokens"]}
    return _row(run, preset, "ppo", shape, times, ntok, fl, mem, extra)


def _now():
    import time
    return time.perf_counter()


STAGES = {"sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo, "sft_compile": bench_sft_compile,
          "rm_shared": bench_rm_shared}
OPT_IN = {"sft_compile"}  # cold torch.compile costs minutes on a GPU machine: only when named


def run(run):
    dev = run.device
    for preset, stages in configs(run):
        cfg = GPTConfig.from_preset(preset, dropout=0.0)
        # rm_shared: the miniature RM data's shape (K = 9 completions of ~5 tokens after ~18)
        stages = {**stages, "sft_compile": stages["sft"],
                  "rm_shared": dict(B=2, K=3, P=6, R=3, T=32) if run.tiny else dict(B=16, K=9, P=18, R=5, T=128)}
        for stage, shape in stages.items():
            if not run.want(stage) or (stage in OPT_IN and not run.providers):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    res = STAGES[stage](run, cfg, preset, shape, dev, tmp)
                except Exception as e:  # noqa: BLE001 - one stage failing must not hide the others
                    res = e
            eager = next((r for r in run.rows if r.get("stage") == "sft" and r.get("provider") == "engine"
                          and r.get("preset") == preset and r.get("status") == "ok"), None)
            if stage == "sft_compile" and isinstance(res, dict) and eager is not None:
                res.update(baseline="engine", speedup_vs_baseline=eager["median_ms"] / res["median_ms"])
            for r in (res if isinstance(res, list) else [res]):
                run.write([_record(run, preset, stage, shape, r)])
            free_memory(dev)
    print("\nsteps: tokens/s, MFU (GPU), PPO generation share")
    for r in run.rows:
        if r["status"] != "ok":
            continue
        mfu = r["mfu"]
        mfu_s = f"{mfu * 100:.1f}%" if isinstance(mfu, float) else mfu
        ppo = f" gen {r['gen_frac'] * 100:.0f}% of the iteration" if r["stage"] == "ppo" else ""
        print(f"  {r['preset']:<10} {r['stage']:<4} {r['rate']:12.0f} tokens/s  MFU {mfu_s}{ppo}")
