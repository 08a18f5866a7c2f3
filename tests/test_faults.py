"""Fault handling of the training loop: kill -9 and resume bit for bit, SIGTERM checkpoints and
exits cleanly, non-finite steps are skipped and counted (ENGINE_INJECT_NAN_STEP test hook), and
too many in a row stop the run with a clear error."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from tests.recipe_cli import ROOT, cmd, env


def losses(out) -> list:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def _steps_logged(out) -> int:
    try:
        with open(os.path.join(str(out), "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


# SFT with dropout 0.2 (exercises the RNG), 30 steps, a checkpoint every 3.
KILL = ["--train.max_steps=30", "--train.batch_size=8", "--train.micro_batch_size=4", "--train.ckpt_every=3",
        "--data.seq_len=64"]


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(cmd("sft", ref, KILL), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=300)
    want = losses(ref)
    assert len(want) == 30
    out, rng, kills = tmp_path / "killed", random.Random(1234), []
    for _ in range(3):
        target = min(_steps_logged(out) + rng.randint(2, 8), 28)
        p = subprocess.Popen(cmd("sft", out, KILL), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t0 = time.time()
        while _steps_logged(out) < target and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        kills.append(_steps_logged(out))
    last = subprocess.run(cmd("sft", out, KILL), cwd=ROOT, env=env(), check=True, capture_output=True,
                          text=True, timeout=300)
    assert "resumed from" in last.stdout  # the last run continued a checkpoint, not a fresh start
    assert kills[-1] >= 3
    got = losses(out)
    assert got == want, f"kills after steps {kills}:\n{got}\n{want}"  # exact float equality
    assert len(os.listdir(out / "ckpt")) <= 3  # latest + 2 kept steps, no leftover temp folders


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = ["--train.max_steps=100000", "--train.batch_size=4", "--train.ckpt_every=0"]
    p = subprocess.Popen(cmd("sft", out, args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _steps_logged(out) < 3 and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr[-3000:]
    assert "stopped by signal" in stdout
    from engine.checkpoint import latest_step_dir
    d = latest_step_dir(str(out / "ckpt"))
    with open(os.path.join(d, "meta.json")) as f:
        step = json.load(f)["step"]
    logged = losses(out)
    assert step == len(logged) >= 3  # the checkpoint holds exactly the last logged step
    # Rerunning resumes from it and appends step+1 (not step 1).
    p = subprocess.run(cmd("sft", out, ["--train.max_steps=" + str(step + 1), "--train.batch_size=4"]),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {step}" in p.stdout and len(losses(out)) == step + 1


# ----------------------------------------------------------------------------- non-finite steps
def _trainer(tmp_path, max_steps=6, max_bad=5):
    from engine.config import TrainConfig
    from engine.trainer import Trainer
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = TrainConfig(max_steps=max_steps, batch_size=2, lr=1e-2, warmup_steps=0, ckpt_every=0,
                      eval_every=0, progress=False, max_bad_steps=max_bad)

    def batch_fn(step, micro):
        g = torch.Generator().manual_seed(step)
        return torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1]), {"tokens": 2}

    return Trainer(model, cfg, str(tmp_path), loss_fn=loss_fn, batch_fn=batch_fn)


def _rows(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_injected_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_INJECT_NAN_STEP", "3")
    tr = _trainer(tmp_path)
    before = {}

    orig = tr.update
    def spy(micro, loss_fn, **kw):  # weights before / after each step
        w = tr.model.weight.detach().clone()
        info = orig(micro, loss_fn, **kw)
        before[tr.step + 1] = (w, tr.model.weight.detach().clone())
        return info
    tr.update = spy
    tr.fit()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the run finishes
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[2]["loss"] != rows[2]["loss"]  # NaN logged as such
    w0, w1 = before[3]
    assert torch.equal(w0, w1)  # the skipped step did not touch the weights
    assert not torch.equal(*before[4])
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_too_many_bad_steps_in_a_row_stop_with_a_clear_error(tmp_path, monkeypatch):
    from engine.trainer import NonFiniteError
    monkeypatch.setenv("ENGINE_INJECT_NAN_STEP", "2,3,4")
    tr = _trainer(tmp_path, max_bad=2)
    with pytest.raises(NonFiniteError, match=r"step 4: 3 non-finite steps in a row .* > train\.max_bad_steps=2; stopping"):
        tr.fit()
    # Two bad steps in a row are tolerated.
    monkeypatch.setenv("ENGINE_INJECT_NAN_STEP", "2,3")
    tr = _trainer(tmp_path / "ok", max_bad=2)
    tr.fit()
    assert [r["skipped"] for r in _rows(tmp_path / "ok")] == [0, 1, 1, 0, 0, 0]


def test_nan_hook_end_to_end_in_a_recipe(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(cmd("sft", out, ["--train.max_steps=4", "--train.batch_size=4"]), cwd=ROOT,
                       env=env(ENGINE_INJECT_NAN_STEP=2), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0] and rows[-1]["bad_steps"] == 1
    assert "step 2: non-finite loss" in p.stdout
