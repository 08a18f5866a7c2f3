"""Training checkpoints: round trip (models, optimizers, RNG, state), the atomic `latest` protocol,
and clear CheckpointErrors for truncated, garbage, missing and mismatched checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from engine import GPT, GPTConfig
from engine.checkpoint import (CheckpointError, latest_step_dir, load_training, load_weights, rng_state,
                               save_training)


def _model(d_model=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=40, block_size=16, d_model=d_model, n_layer=2))


def _trained(seed=0):
    m = _model(seed=seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 40, (2, 8))
    (-m(x, targets=x).mean()).backward()
    opt.step()
    return m, opt


def _save(tmp_path, step=3, m=None, opt=None):
    if m is None:
        m, opt = _trained()
    save_training(str(tmp_path / "ckpt"), step, {"model": m}, {"rng": rng_state(), "extra": {"k": 1}},
                  optimizers={"model": opt})
    return m, opt


def test_round_trip(tmp_path):
    m, opt = _save(tmp_path)
    m2 = _model(seed=1)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    st = load_training(str(tmp_path / "ckpt"), {"model": m2}, optimizers={"model": opt2})
    assert st["step"] == 3 and st["extra"] == {"k": 1}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])
    # model.init from a run folder reads the latest step's weights
    m3 = _model(seed=2)
    load_weights(m3, str(tmp_path))
    assert torch.equal(m3.wte.weight, m.wte.weight)


def test_no_checkpoint_is_none(tmp_path):
    assert load_training(str(tmp_path / "ckpt"), {"model": _model()}) is None


def test_latest_moves_last_and_old_steps_are_pruned(tmp_path):
    m, opt = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, m, opt)
    ck = tmp_path / "ckpt"
    assert (ck / "latest").read_text() == "step_00000003"
    assert sorted(os.listdir(ck)) == ["latest", "step_00000002", "step_00000003"]
    # A save killed half way leaves a temp folder: ignored by load, removed by the next save.
    (ck / ".tmp-step_00000004").mkdir()
    (ck / ".tmp-step_00000004" / "model.safetensors").write_bytes(b"partial")
    assert load_training(str(ck), {"model": _model()})["step"] == 3
    _save(tmp_path, 5, m, opt)
    assert not any(n.startswith(".tmp") for n in os.listdir(ck))


def test_truncated_safetensors(tmp_path):
    _save(tmp_path)
    f = tmp_path / "ckpt" / "step_00000003" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read checkpoint tensors"):
        load_training(str(tmp_path / "ckpt"), {"model": _model()})


def test_garbage_state_pt(tmp_path):
    _save(tmp_path)
    (tmp_path / "ckpt" / "step_00000003" / "state.pt").write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot load"):
        load_training(str(tmp_path / "ckpt"), {"model": _model()})


def test_pointer_to_missing_folder(tmp_path):
    _save(tmp_path)
    (tmp_path / "ckpt" / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match="points to missing checkpoint 'step_00000099'"):
        latest_step_dir(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="missing checkpoint"):
        load_training(str(tmp_path / "ckpt"), {"model": _model()})


def test_different_model_size(tmp_path):
    _save(tmp_path)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_training(str(tmp_path / "ckpt"), {"model": _model(d_model=64)})


def test_different_model_set_and_optimizer(tmp_path):
    _save(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds models \['model'\]"):
        load_training(str(tmp_path / "ckpt"), {"policy": _model()})
    m = _model()
    with pytest.raises(CheckpointError, match="no state for optimizer 'value'"):
        load_training(str(tmp_path / "ckpt"), {"model": m},
                      optimizers={"value": torch.optim.AdamW(m.parameters())})


def test_garbage_meta_and_incomplete_sharded(tmp_path):
    _save(tmp_path)
    d = tmp_path / "ckpt" / "step_00000003"
    meta = (d / "meta.json").read_text()
    (d / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable meta.json"):
        load_training(str(tmp_path / "ckpt"), {"model": _model()})
    (d / "meta.json").write_text(meta.replace('"safetensors"', '"dcp"'))
    with pytest.raises(CheckpointError, match="incomplete sharded checkpoint"):
        load_training(str(tmp_path / "ckpt"), {"model": _model()})
