"""train.tensorboard: metrics.jsonl rows mirrored as TensorBoard scalars under <run>/tb/."""
import math
import os
import sys

import numpy as np
import pytest

from engine.config import ConfigError, TrainConfig, load_config
from engine.metrics import MetricsWriter, read_metrics


def _rows(steps, scale=1.0):
    return [{"step": s, "loss": scale * (3.0 - 0.1 * s), "lr": 1e-4 * s, "tokens_per_s": 1234.5 + s,
             "skipped": s == 2, "note": "text is not a scalar", "nan_metric": float("nan"),
             **({"eval_loss": 2.5 + s} if s % 2 == 0 else {})}  # eval rows: every other step
            for s in steps]


def _scalars(log_dir):
    """{tag: {step: value}} read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every event
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def _same(tb_value, json_value):
    # events store float32: the jsonl value rounded to float32 must come back bit for bit
    want = float(np.float32(float(json_value)))
    return (math.isnan(want) and math.isnan(tb_value)) or tb_value == want


def _check_equal(run_dir):
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    tb = _scalars(os.path.join(run_dir, "tb"))
    numeric = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert set(tb) == numeric  # every numeric field, nothing else ("note" is a string)
    for r in rows:
        for k in numeric & set(r):  # eval_* fields are in some rows only
            assert _same(tb[k][r["step"]], r[k]), (k, r["step"], tb[k][r["step"]], r[k])
    for k in numeric:
        assert sorted(tb[k]) == [r["step"] for r in rows if k in r]
    return rows, tb


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    w = MetricsWriter(str(tmp_path / "metrics.jsonl"), tensorboard=True)
    for r in _rows(range(1, 6)):
        w.write(r)
        # flushed with each row: readable before the writer is closed (a killed run keeps them)
        assert _scalars(str(tmp_path / "tb"))["loss"][r["step"]] == pytest.approx(r["loss"])
    w.close()
    rows, tb = _check_equal(str(tmp_path))
    assert len(rows) == 5 and tb["skipped"][2] == 1.0 and tb["skipped"][1] == 0.0


def test_tensorboard_resume_drops_recomputed_steps(tmp_path):
    pytest.importorskip("tensorboard")
    path = str(tmp_path / "metrics.jsonl")
    w = MetricsWriter(path, tensorboard=True)
    for r in _rows(range(1, 6)):
        w.write(r)
    w.close()
    # resumed from the checkpoint of step 3: steps 4, 5 are recomputed (other values here)
    w = MetricsWriter(path, truncate_after=3, tensorboard=True)
    for r in _rows(range(4, 7), scale=2.0):
        w.write(r)
    w.close()
    rows, tb = _check_equal(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert _same(tb["loss"][3], 3.0 - 0.3) and _same(tb["loss"][5], 2.0 * (3.0 - 0.5))
    # a fresh run (no checkpoint) starts fresh event files too
    w = MetricsWriter(path, tensorboard=True)
    w.write(_rows([1], scale=5.0)[0])
    w.close()
    rows, tb = _check_equal(str(tmp_path))
    assert len(rows) == 1 and sorted(tb["loss"]) == [1]
    assert len([f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents.")]) == 1


def test_tensorboard_off_by_default_and_rank0_only(tmp_path):
    assert TrainConfig().tensorboard is False
    assert load_config(TrainConfig, None, ["tensorboard=true"]).tensorboard is True
    w = MetricsWriter(str(tmp_path / "a" / "metrics.jsonl"))
    w.write(_rows([1])[0])
    assert not (tmp_path / "a" / "tb").exists()
    w = MetricsWriter(str(tmp_path / "b" / "metrics.jsonl"), enabled=False, tensorboard=True)
    w.write(_rows([1])[0])  # other ranks: nothing written, and no tensorboard needed
    assert not (tmp_path / "b").exists()


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ConfigError) as e:
        MetricsWriter(str(tmp_path / "metrics.jsonl"), tensorboard=True)
    msg = str(e.value)
    assert "\n" not in msg and "pip install tensorboard" in msg and "train.tensorboard" in msg


def test_recipe_writes_tensorboard_when_asked(tmp_path):
    """The flag reaches the writer through the Trainer: a 2-step pretraining run leaves events
    whose loss scalars are the metrics.jsonl losses."""
    pytest.importorskip("tensorboard")
    from tests.test_dist import losses, run
    run("pretrain", tmp_path / "pt", ["--train.max_steps=2", "--train.batch_size=2", "--train.tensorboard=true"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "pt" / "tb"))
    acc.Reload()
    got = [e.value for e in acc.Scalars("loss")]
    assert got == pytest.approx(losses(tmp_path / "pt"), rel=1e-6)
