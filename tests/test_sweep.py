"""Seed sweep bookkeeping (recipes/sweep.py), the report's per-task / changed-answer tables
(recipes/evaluate.py) and the progress line (engine/metrics.py): pure Python, fast."""
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import pytest
import torch

from engine.metrics import Progress
from recipes import evaluate, sweep
from recipes.instructgpt import WORLD_REWARD_SCALE, InstructGPTConfig, side_by_side, world_score_fn
from recipes.world import World


def _report(seed, ptx_lo, rm_acc, tax_ptx, acc_sft=0.4, acc_ptx=0.45, wall=300.0):
    w = lambda m, lo, hi: {"mean": m, "lo": lo, "hi": hi}  # noqa: E731
    model = lambda acc: {"accuracy": acc, "accuracy_greedy": acc + 0.01}  # noqa: E731
    return {
        "win_rate_vs_sft": {"base": w(0.2, 0.17, 0.23), "sft": w(0.5, 0.5, 0.5), "ppo": w(0.56, 0.53, 0.59),
                            "ppo_ptx": w(ptx_lo + 0.03, ptx_lo, ptx_lo + 0.06)},
        "win_rate_vs_sft_greedy": {"ppo_ptx": w(0.55, 0.52, 0.58)},
        "rm_accuracy": {"heldout_labelers": rm_acc, "train_labelers": rm_acc + 0.01},
        "per_model": {"sft": model(acc_sft), "ppo": model(0.4), "ppo_ptx": model(acc_ptx)},
        "alignment_tax": {"ppo": {"prose_loss_delta": 0.05}, "ppo_ptx": {"prose_loss_delta": tax_ptx}},
        "kl_from_sft": {"ppo_ptx": 1.0},
        "wall_time_s": {"total": wall, "sft": 40.0},
        "machine": f"test machine {seed}",
    }


def test_summary_counts_bars_and_intervals():
    reports = {0: _report(0, 0.52, 0.70, -0.01), 1: _report(1, 0.49, 0.66, 0.08, acc_ptx=0.3), 2: _report(2, 0.53, 0.71, 0.0)}
    reports[2]["side_by_side"] = ["ppo", "ppo_ptx"]  # reports before it have no such key
    s = sweep.summarize(reports)
    bars = s["bars"]
    assert bars["PPO-ptx beats SFT (95% interval above 0.5)"] == {"met": 2, "of": 3, "failed_seeds": [1]}
    assert bars["RM accuracy (held-out labelers) >= 0.68"]["failed_seeds"] == [1]
    assert bars["alignment tax PPO-ptx < PPO"]["failed_seeds"] == [1]
    assert bars["PPO-ptx task accuracy >= SFT's (T=1)"]["failed_seeds"] == [1]
    assert bars["SFT beats base (base's interval below 0.5)"]["met"] == 3
    rm = [0.70, 0.66, 0.71]
    a = s["across_seeds"]["rm_acc_heldout_labelers"]
    half = 4.303 * statistics.stdev(rm) / math.sqrt(3)
    assert a["mean"] == pytest.approx(statistics.fmean(rm)) and a["hi"] - a["mean"] == pytest.approx(half)
    md = sweep.markdown(s)
    assert "| rm_acc_heldout_labelers | 0.700 | 0.660 | 0.710 |" in md and "| 2/3 | [1] |" in md
    assert "- seed 2: {'total': 300.0, 'sft': 40.0} (ppo and ppo_ptx ran side by side)" in md
    assert "- seed 0: {'total': 300.0, 'sft': 40.0}\n" in md
    one = sweep.interval([0.5])
    assert one["n"] == 1 and math.isnan(one["lo"])


def test_sweep_runs_missing_seeds_only(tmp_path):
    calls = []

    def fake_run(cfg, out):
        assert cfg.world.seed == cfg.train.seed and not cfg.sweep.seeds
        calls.append(cfg.world.seed)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(_report(cfg.world.seed, 0.51 + 0.01 * cfg.world.seed, 0.7, 0.0), f)

    cfg = InstructGPTConfig()
    cfg.sweep.seeds = "0,1,2"
    out = sweep.sweep(cfg, str(tmp_path), fake_run)
    assert calls == [0, 1, 2] and out["seeds"] == [0, 1, 2]
    cfg.sweep.seeds = "0,1,2,3"
    sweep.sweep(cfg, str(tmp_path), fake_run)  # resumes: only seed 3 runs
    assert calls == [0, 1, 2, 3]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["seeds"] == [0, 1, 2, 3] and (tmp_path / "sweep.md").read_text().count("seed 3") >= 2
    cfg.sweep.seeds = "0,x"
    with pytest.raises(SystemExit):
        sweep.sweep(cfg, str(tmp_path), fake_run)


def test_per_task_accuracy_and_changed_answers():
    world = World(0)
    prompts = [p for p in world.prompts(300, "eval")]
    rng = random.Random(0)
    right = [" " + (p.answer or "Sorry, I can't help.") for p in prompts]
    wrong = [" " + world._corrupt(p.answer, rng) if p.answer else " no" for p in prompts]
    mixed = [r if i % 2 else w for i, (r, w) in enumerate(zip(right, wrong))]
    table = evaluate.per_task_accuracy(world, prompts, right, wrong)
    assert set(table) == {"reverse", "first", "last", "count", "copy", "upper"}
    for t, row in table.items():
        n = row["n_seen"] + row["n_heldout"]
        assert n == sum(p.task == t for p in prompts) and row["seen"] == 1.0 and row["seen_greedy"] == 0.0
        assert row["heldout"] in (1.0,) or math.isnan(row["heldout"])
    samples = {"sft": (None, mixed), "ppo_ptx": (None, right)}
    ch = evaluate.changed_answers(world, prompts, samples, "sft", ["ppo_ptx"], k=2)["ppo_ptx"]
    benign_wrong = sum(1 for i, p in enumerate(prompts) if not p.harmful and i % 2 == 0)
    assert ch["became_correct"]["count"] == benign_wrong and len(ch["became_correct"]["examples"]) == 2
    assert ch["became_wrong"]["count"] == 0
    ex = ch["became_correct"]["examples"][0]
    assert not world.correct(next(p for p in prompts if p.text == ex["prompt"]), ex["sft"])


def test_paired_delta_mean_and_interval():
    a = [True] * 60 + [False] * 40
    b = [True] * 50 + [False] * 50  # a is right wherever b is, and on 10 more prompts
    d = evaluate.paired_delta(a, b)
    diffs = [1.0] * 10 + [0.0] * 90
    half = 1.96 * statistics.pstdev(diffs) / 10
    assert d["mean"] == pytest.approx(0.10) and d["hi"] - d["mean"] == pytest.approx(half)
    assert d["lo"] > 0  # paired: far tighter than two independent 100-sample proportions
    same = evaluate.paired_delta(a, a)
    assert same == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError):
        evaluate.paired_delta(a, b[:-1])


def test_progress_line_has_step_elapsed_and_eta():
    buf = io.StringIO()
    bar = Progress(10, 0, "sft", True, stream=buf)
    bar.t0 -= 20  # 20 s elapsed after 4 of 10 steps -> ETA 30 s
    bar.update(4, loss=1.5)
    line = buf.getvalue().strip()
    assert line.startswith("[sft] 4/10 loss 1.5 | 20s, ETA 30s"), line
    bar.update(5, loss=1.4)  # within every_s of the last line: nothing printed
    assert buf.getvalue().count("\n") == 1
    bar.update(10, loss=1.0)  # the last step always prints
    assert buf.getvalue().strip().splitlines()[-1].startswith("[sft] 10/10 loss 1 | ")
    quiet = io.StringIO()
    off = Progress(10, 0, "sft", False, stream=quiet)
    off.update(10, loss=1.0)
    off.close()
    assert quiet.getvalue() == ""
    resumed = Progress(100, 50, "ppo", True, stream=io.StringIO())
    resumed.t0 = time.time() - 100
    resumed.update(60)
    assert "ETA 6m40s" in resumed.line()  # 10 steps in 100 s, 40 left


def test_progress_lines_only_never_rewrites_a_terminal_line(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    live = Tty()
    Progress(10, 0, "ppo", True, stream=live).update(10, reward=1.0)
    assert live.getvalue().startswith("\r")  # a terminal: the line is rewritten in place
    monkeypatch.setattr(Progress, "lines_only", True)  # as in the PPO stages run side by side
    shared = Tty()
    bar = Progress(10, 0, "ppo", True, stream=shared)
    bar.update(10, reward=1.0)
    bar.close()
    assert "\r" not in shared.getvalue() and shared.getvalue().startswith("[ppo] 10/10 reward 1 |")


def test_side_by_side_overlaps_the_jobs_and_names_a_failure(tmp_path):
    stamp = "python3 -c 'import time; print(time.time())' >> {f}; sleep 1.5; python3 -c 'import time; print(time.time())' >> {f}"
    jobs = {n: (subprocess.check_call, [["sh", "-c", stamp.format(f=tmp_path / n)]]) for n in ("a", "b")}
    took = side_by_side(jobs)
    assert set(took) == {"a", "b"} and all(t >= 1.5 for t in took.values())
    (a0, a1), (b0, b1) = ([float(x) for x in open(tmp_path / n).read().split()] for n in ("a", "b"))
    assert a0 < b1 and b0 < a1  # the two ran at the same time, not one after the other
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"stage bad failed \(exit code 3\)"):
        side_by_side({"slow": (time.sleep, [30]), "bad": (sys.exit, [3])})
    assert time.time() - t0 < 20  # the failure stopped the slow job instead of waiting for it


def _stat(pid) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; [] if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(pid) -> bool:
    st = _stat(pid)
    return bool(st) and st[0] != "Z"


def _children(pid: int) -> list[int]:
    """PIDs of the live processes whose parent is `pid` (Linux /proc)."""
    stats = {d: _stat(d) for d in os.listdir("/proc") if d.isdigit()}
    return [int(d) for d, st in stats.items() if len(st) > 1 and st[0] != "Z" and st[1] == str(pid)]


def _sleepers_side_by_side(stop, seconds: int, **popen):
    """A pipeline stand-in running two sleeping jobs side by side; once both jobs run, stop(p)
    ends it. Returns (p, the jobs still alive up to 20 s later); the jobs are killed whatever
    happens, so a failing test leaves none behind."""
    import signal
    code = ("import time\nfrom recipes.instructgpt import side_by_side\n"
            f"side_by_side({{'a': (time.sleep, [{seconds}]), 'b': (time.sleep, [{seconds}])}})")
    p = subprocess.Popen([sys.executable, "-c", code], **popen)
    kids = []
    try:
        deadline = time.time() + 60
        while len(kids := _children(p.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(kids) >= 2, kids
        time.sleep(1.0)
        stop(p)
        p.wait(timeout=30)
        deadline = time.time() + 20
        while (alive := [k for k in kids if _alive(k)]) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        p.kill()
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
    return p, alive


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_side_by_side_sigterm_stops_the_jobs_too():
    """A SIGTERM to the pipeline while the RL stages run side by side exits with one line and
    stops both jobs (by default it would end the parent alone and leave them running)."""
    import signal
    p, alive = _sleepers_side_by_side(lambda p: p.send_signal(signal.SIGTERM), 60,
                                      stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    assert p.returncode != 0 and "stopped by signal 15" in err and "Traceback" not in err, err
    assert alive == [], alive


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_side_by_side_jobs_end_when_the_pipeline_is_killed():
    """SIGKILL (no handler runs) of the pipeline while the RL stages run side by side: the jobs
    notice their parent is gone and end within seconds instead of training on unattended."""
    p, alive = _sleepers_side_by_side(lambda p: p.kill(), 120)
    assert p.returncode == -9 and alive == [], alive


def test_prose_loss_is_the_token_mean_over_whole_rows():
    """The alignment-tax loss: batched rows give the mean of the row-by-row NLLs (all rows have
    T tokens), on rows = min(n_tokens, len - 1) // T windows of the held-out stream."""
    import numpy as np
    import torch
    from engine.config import GPTConfig
    from engine.data import TokenStream
    from engine.model import GPT
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, d_model=16, n_head=2, d_head=8, block_size=8, vocab_size=30,
                      window=None, dropout=0.0)).eval()
    toks = np.random.default_rng(0).integers(0, 30, 8 * 37 + 5).astype(np.uint16)
    x = torch.as_tensor(toks.astype("int64"))
    with torch.no_grad():
        got = evaluate.prose_loss(m, TokenStream(toks), n_tokens=10_000, T=8)
        want = torch.stack([-m(x[i * 8:(i + 1) * 8][None], targets=x[i * 8 + 1:(i + 1) * 8 + 1][None]).mean()
                            for i in range(37)]).mean()
        assert got == pytest.approx(float(want), rel=1e-5)
        two = torch.stack([-m(x[i * 8:(i + 1) * 8][None], targets=x[i * 8 + 1:(i + 1) * 8 + 1][None]).mean()
                           for i in range(2)]).mean()
        assert evaluate.prose_loss(m, TokenStream(toks), n_tokens=16, T=8) == pytest.approx(float(two), rel=1e-5)


def test_world_score_fn_is_the_scaled_noise_free_score(tmp_path):
    """steps.ppo_reward=world: each episode's reward is WORLD_REWARD_SCALE x the world's noise-free
    total of its (PPO-split) prompt and response; right answers outscore wrong ones."""
    from types import SimpleNamespace
    world = World(1)
    ps = world.prompts(40, "ppo")
    path = tmp_path / "ppo.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in ps))
    score = world_score_fn(world, str(path))
    rng = random.Random(0)
    resp = [world.sample_response(p, rng) for p in ps]
    got = score(SimpleNamespace(prompts=[p.text for p in ps], responses=resp))
    want = [WORLD_REWARD_SCALE * world.quality(p, r)["total"] for p, r in zip(ps, resp)]
    assert got.tolist() == pytest.approx(want)
    benign = [p for p in ps if not p.harmful]
    right = score(SimpleNamespace(prompts=[p.text for p in benign], responses=[" " + p.answer for p in benign]))
    wrong = score(SimpleNamespace(prompts=[p.text for p in benign],
                                  responses=[" " + world._corrupt(p.answer, rng) for p in benign]))
    assert bool((right > wrong).all())


def test_right_over_wrong_counts_same_prompt_pairs_only():
    """Only pairs of a right and a wrong sample of the same prompt count; ties are half."""
    correct = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    scores = torch.tensor([[2.0, 1.0, 3.0],    # right beats one of its two wrongs
                           [0.0, 5.0, 0.0],    # a tie (0.5) and a win
                           [9.0, -9.0, 0.0]])  # no right sample: no pairs
    frac, n = evaluate.right_over_wrong(scores, correct)
    assert n == 4 and frac == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # a score that ranks by correctness, shifted by a huge per-prompt offset, is perfect
    # within prompts though its correlation across prompts is poor
    g = torch.Generator().manual_seed(0)
    q = torch.rand(50, 4, generator=g)
    s = q + 100.0 * torch.randn(50, 1, generator=g)
    assert evaluate.within_prompt_corr(s, q) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(torch.corrcoef(torch.stack([s.flatten(), q.flatten()]))[0, 1])) < 0.3
    assert evaluate.right_over_wrong(-q, q > 0.5)[0] == 0.0 and evaluate.right_over_wrong(q, q > 0.5)[0] == 1.0
