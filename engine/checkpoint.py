"""Atomic checkpoints.

Model folders (`model.save(dir)` / `GPT.load(dir)`): config.json + model.safetensors.

Training checkpoints: `<run>/ckpt/step_XXXXXXXX/` holding model.safetensors (+ extra models),
optim.pt (optimizer + scheduler + trainer state + RNG states) and meta.json; `<run>/ckpt/latest`
names the newest complete one. Every file is written to a temporary name, fsynced and renamed,
and `latest` is replaced last, so a SIGKILL at any moment leaves the previous checkpoint intact
and readable. Older step folders are pruned after the pointer moves.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import torch

CKPT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def _state_bytes(module: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return save(sd)


def _load_state(module: torch.nn.Module, path: str, map_location="cpu"):
    from safetensors.torch import load_file

    try:
        sd = load_file(path, device=str(map_location))
    except Exception as e:  # truncated / corrupted file
        raise CheckpointError(f"{path}: cannot read checkpoint tensors ({e})") from None
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path}: does not match the model: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return module


def save_model(module: torch.nn.Module, path: str) -> None:
    from dataclasses import asdict

    os.makedirs(path, exist_ok=True)
    atomic_write_bytes(os.path.join(path, "model.safetensors"), _state_bytes(module))
    cfg = {**asdict(module.cfg), "model_class": type(module).__name__}
    atomic_write_bytes(os.path.join(path, "config.json"), json.dumps(cfg, indent=1).encode())


def load_model(cls, path: str, map_location="cpu", **overrides):
    from .config import GPTConfig

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a model folder)")
    with open(cfg_path) as f:
        d = json.load(f)
    d.pop("model_class", None)
    model = cls(GPTConfig(**{**d, **overrides}))
    return _load_state(model, os.path.join(path, "model.safetensors"), map_location).to(map_location)


def load_weights(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load model weights from a model folder or a training run/ckpt folder (latest step)."""
    for cand in (path, latest_step_dir(os.path.join(path, "ckpt")), latest_step_dir(path)):
        if cand and os.path.exists(os.path.join(cand, "model.safetensors")):
            dev = next(module.parameters()).device
            return _load_state(module, os.path.join(cand, "model.safetensors"), dev)
    raise CheckpointError(f"{path}: no model.safetensors found (model folder or run folder)")


# ----------------------------------------------------------------------------- training state
def latest_step_dir(ckpt_dir: str) -> str | None:
    ptr = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(ptr):
        return None
    with open(ptr) as f:
        name = f.read().strip()
    d = os.path.join(ckpt_dir, name)
    if not name or not os.path.isdir(d):
        raise CheckpointError(f"{ptr}: points to missing checkpoint {name!r}")
    return d


def rng_state() -> dict:
    import random

    import numpy as np
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_training(ckpt_dir: str, step: int, models: dict, state: dict, keep: int = 2) -> str:
    """Write models ({name: module}) and `state` (any torch.save-able dict) for `step`."""
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_dir, name)
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=ckpt_dir, prefix=f".tmp-{name}-")
    try:
        for mname, module in models.items():
            atomic_write_bytes(os.path.join(tmp, f"{mname}.safetensors"), _state_bytes(module))
        buf = io.BytesIO()
        torch.save({**state, "version": CKPT_VERSION, "step": step}, buf)
        atomic_write_bytes(os.path.join(tmp, "state.pt"), buf.getvalue())
        meta = {"step": step, "models": sorted(models), "version": CKPT_VERSION}
        atomic_write_bytes(os.path.join(tmp, "meta.json"), json.dumps(meta).encode())
        if os.path.exists(final):  # re-saving the same step (e.g. signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(os.path.join(ckpt_dir, "latest"), name.encode())
    steps = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    for junk in os.listdir(ckpt_dir):  # temp folders of a run killed mid-save
        if junk.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(ckpt_dir, junk), ignore_errors=True)
    return final


def load_training(ckpt_dir: str, models: dict, map_location="cpu") -> dict | None:
    """Load the latest checkpoint into `models`; return its state dict, or None if there is none."""
    d = latest_step_dir(ckpt_dir)
    if d is None:
        return None
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: unreadable meta.json ({e})") from None
    if meta.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{d}: checkpoint version {meta.get('version')} != {CKPT_VERSION}")
    if sorted(models) != meta["models"]:
        raise CheckpointError(f"{d}: holds models {meta['models']}, this run has {sorted(models)}")
    for mname, module in models.items():
        _load_state(module, os.path.join(d, f"{mname}.safetensors"), map_location)
    try:
        return torch.load(os.path.join(d, "state.pt"), map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{d}/state.pt: cannot load ({e})") from None
