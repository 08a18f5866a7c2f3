"""Seed sweep of the miniature pipeline: `python -m recipes.instructgpt --sweep.seeds=0,1,2,3,4`.

Runs the pipeline once per seed s (world.seed = train.seed = s) into <out>/seed<s>, skipping
seeds whose report.json exists (and each stage resumes on its own), then writes <out>/sweep.json
and <out>/sweep.md: every metric per seed, the mean over seeds with a 95% t-interval, and how
many seeds meet each bar. Win rates inside a seed are paired: both models answer the same
held-out prompts and each prompt's labeler preference is one observation.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics

from engine import dist

# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}

# metric name -> (path in report.json, higher is better?)
METRICS = {
    "win_ppo_ptx_vs_sft": ("win_rate_vs_sft.ppo_ptx.mean", True),
    "win_ppo_ptx_vs_sft_lo": ("win_rate_vs_sft.ppo_ptx.lo", True),
    "win_ppo_vs_sft": ("win_rate_vs_sft.ppo.mean", True),
    "win_base_vs_sft": ("win_rate_vs_sft.base.mean", False),
    "win_base_vs_sft_hi": ("win_rate_vs_sft.base.hi", False),
    "win_ppo_ptx_vs_sft_greedy": ("win_rate_vs_sft_greedy.ppo_ptx.mean", True),
    "rm_acc_heldout_labelers": ("rm_accuracy.heldout_labelers", True),
    "rm_acc_train_labelers": ("rm_accuracy.train_labelers", True),
    "rm_ceiling_heldout_labelers": ("rm_ceiling.heldout_labelers", True),
    "acc_sft": ("per_model.sft.accuracy", True),
    "acc_sft_greedy": ("per_model.sft.accuracy_greedy", True),
    "acc_ppo": ("per_model.ppo.accuracy", True),
    "acc_ppo_ptx": ("per_model.ppo_ptx.accuracy", True),
    "acc_ppo_ptx_greedy": ("per_model.ppo_ptx.accuracy_greedy", True),
    "acc_ppo_ptx_minus_sft": ("per_model.ppo_ptx.accuracy_vs_baseline.mean", True),
    "acc_ppo_ptx_minus_sft_lo": ("per_model.ppo_ptx.accuracy_vs_baseline.lo", True),
    "acc_ppo_ptx_minus_sft_hi": ("per_model.ppo_ptx.accuracy_vs_baseline.hi", True),
    "tax_ppo": ("alignment_tax.ppo.prose_loss_delta", False),
    "tax_ppo_ptx": ("alignment_tax.ppo_ptx.prose_loss_delta", False),
    "kl_ppo_ptx": ("kl_from_sft.ppo_ptx", False),
    "wall_s": ("wall_time_s.total", False),
}

# bar name -> test on one seed's metrics
BARS = {
    "PPO-ptx beats SFT (95% interval above 0.5)": lambda m: m["win_ppo_ptx_vs_sft_lo"] > 0.5,
    "SFT beats base (base's interval below 0.5)": lambda m: m["win_base_vs_sft_hi"] < 0.5,
    "RM accuracy (held-out labelers) >= 0.68": lambda m: m["rm_acc_heldout_labelers"] >= 0.68,
    "alignment tax PPO-ptx < PPO": lambda m: m["tax_ppo_ptx"] < m["tax_ppo"],
    "SFT task accuracy >= 0.30 (T=1 and greedy)": lambda m: min(m["acc_sft"], m["acc_sft_greedy"]) >= 0.30,
    "PPO-ptx task accuracy >= SFT's (T=1)": lambda m: m["acc_ppo_ptx"] >= m["acc_sft"],
    "wall time <= 360 s": lambda m: m["wall_s"] <= 360,
}


def _get(d: dict, path: str):
    """The value at a dotted path; NaN when a report predates that metric."""
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return math.nan
        d = d[k]
    return d


def interval(xs: list[float]) -> dict:
    """Mean and 95% t-interval of the per-seed values (no interval for one seed)."""
    n, mean = len(xs), statistics.fmean(xs)
    if n < 2 or any(math.isnan(x) for x in xs):
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    t = _T95.get(n - 1) or _T95[max(k for k in _T95 if k <= n - 1)]
    half = t * statistics.stdev(xs) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def summarize(reports: dict[int, dict]) -> dict:
    per_seed = {s: {k: float(_get(r, path)) for k, (path, _) in METRICS.items()} for s, r in reports.items()}
    return {
        "seeds": sorted(per_seed),
        "per_seed": per_seed,
        "across_seeds": {k: interval([m[k] for m in per_seed.values()]) for k in METRICS},
        "bars": {name: {"met": sum(bool(ok(m)) for m in per_seed.values()), "of": len(per_seed),
                        "failed_seeds": [s for s, m in per_seed.items() if not ok(m)]}
                 for name, ok in BARS.items()},
        "wall_time_s": {s: r["wall_time_s"] for s, r in reports.items()},
        "side_by_side": {s: r.get("side_by_side", []) for s, r in reports.items()},
        "machine": next(iter(reports.values()))["machine"] if reports else "",
    }


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = ["# Miniature InstructGPT: seed sweep", "", f"{summary['machine']}; seeds {seeds}.", "",
             "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [95% t-interval] |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for k in METRICS:
        a = summary["across_seeds"][k]
        cells = " | ".join(f"{summary['per_seed'][s][k]:.3f}" for s in seeds)
        ci = f"{a['mean']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]" if a["n"] > 1 else f"{a['mean']:.3f}"
        lines.append(f"| {k} | {cells} | {ci} |")
    lines += ["", "| bar | seeds meeting it | failed seeds |", "|---|---|---|"]
    for name, b in summary["bars"].items():
        lines.append(f"| {name} | {b['met']}/{b['of']} | {b['failed_seeds'] or '-'} |")
    lines += ["", "Wall time per stage (s):", ""]
    together = summary.get("side_by_side", {})
    lines += [f"- seed {s}: {w}" + (f" ({' and '.join(together[s])} ran side by side)" if together.get(s) else "")
              for s, w in summary["wall_time_s"].items()]
    return "\n".join(lines) + "\n"


def sweep(cfg, out: str, run) -> dict:
    """Run `run(cfg_s, out/seed<s>)` for each seed not yet done, then summarise all of them."""
    try:
        seeds = [int(x) for x in cfg.sweep.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--sweep.seeds={cfg.sweep.seeds!r}: expected comma-separated integers") from None
    reports = {}
    for s in seeds:
        d = os.path.join(out, f"seed{s}")
        path = os.path.join(d, "report.json")
        if not os.path.exists(path):
            c = copy.deepcopy(cfg)
            c.sweep.seeds = ""
            c.world.seed = c.train.seed = s
            dist.print0(f"[sweep] seed {s} -> {d}")
            run(c, d)
        with open(path) as f:
            reports[s] = json.load(f)
    summary = summarize(reports)
    if dist.is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump(summary, f, indent=1)
        text = markdown(summary)
        with open(os.path.join(out, "sweep.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
    return summary
