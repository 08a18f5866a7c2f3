"""Atomic checkpoints.

Model folders (`model.save(dir)` / `GPT.load(dir)`): config.json + model.safetensors.

Training checkpoints: `<run>/ckpt/step_XXXXXXXX/` holding model.safetensors (+ extra models),
state.pt (optimizers + trainer state + RNG states, tensors and plain containers only: it
is read with torch.load(weights_only=True), so a checkpoint folder cannot run code) and meta.json -- or, for FSDP-sharded
models, dcp/ (torch.distributed.checkpoint shards of models and optimizers, loadable at any
world size) + state.pt + meta.json; `<run>/ckpt/latest`
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


def _state_bytes(module: torch.nn.Module, state_dict: dict | None = None) -> bytes:
    from safetensors.torch import save

    sd = module.state_dict() if state_dict is None else state_dict
    return save({k: v.detach().contiguous().cpu() for k, v in sd.items()})


def _load_state(module: torch.nn.Module, path: str, map_location="cpu"):
    from safetensors.torch import load_file

    try:
        sd = load_file(path, device=str(map_location))
    except Exception as e:  # truncated / corrupted file
        raise CheckpointError(f"{path}: cannot read checkpoint tensors ({e})") from None
    from . import dist
    if dist.is_sharded(module):  # FSDP2: every rank holds the full file; each keeps its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        keys = set(module.state_dict())
        for k in keys - set(sd):  # an RM saved before RewardModel.loglik_weight existed: 0
            if k.endswith("loglik_weight"):
                sd[k] = torch.zeros(1, device=str(map_location))
        missing, unexpected = sorted(keys - set(sd)), sorted(set(sd) - keys)
        if not missing and not unexpected:
            try:
                set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{path}: does not match the model: {_first_line(e)}") from None
        sd = None
    try:
        if sd is not None:
            missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path}: does not match the model: {_first_line(e)}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return module


def _first_line(e: Exception) -> str:
    """One line of an error from deep inside torch (load_state_dict lists every tensor)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    more = f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else ""
    return " ".join(lines[:2])[:400] + more


def save_model(module: torch.nn.Module, path: str, state_dict: dict | None = None) -> None:
    """config.json + model.safetensors; `state_dict` (e.g. dist.full_state_dict of an FSDP
    model, gathered on every rank) replaces module.state_dict()."""
    from dataclasses import asdict

    os.makedirs(path, exist_ok=True)
    atomic_write_bytes(os.path.join(path, "model.safetensors"), _state_bytes(module, state_dict))
    cfg = {**asdict(module.cfg), "model_class": type(module).__name__}
    atomic_write_bytes(os.path.join(path, "config.json"), json.dumps(cfg, indent=1).encode())


def read_model_config(path: str, **overrides):
    """GPTConfig of a model folder (config.json written by `save_model`), with overrides."""
    from dataclasses import fields

    from .config import GPTConfig

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a model folder)")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    d.pop("model_class", None)
    valid = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown GPTConfig keys {unknown} (a Hugging Face folder? "
                              "use engine.GPT.from_hf)")
    return GPTConfig(**{**d, **overrides})


def load_model(cls, path: str, map_location="cpu", **overrides):
    from .model import build  # allocated on the target device, not initialised: loaded next
    model = build(cls, read_model_config(path, **overrides), map_location, init=False)
    return _load_state(model, os.path.join(path, "model.safetensors"), map_location)


def load_weights(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load model weights from a model folder or a training run/ckpt folder (latest step)."""
    for cand in (path, latest_step_dir(os.path.join(path, "ckpt")), latest_step_dir(path)):
        if cand and os.path.exists(os.path.join(cand, "model.safetensors")):
            dev = next(module.parameters()).device
            return _load_state(module, os.path.join(cand, "model.safetensors"), dev)
        if cand and os.path.exists(os.path.join(cand, "dcp", ".metadata")):  # sharded training ckpt
            _load_sharded(os.path.join(cand, "dcp"), {"model": module}, {})
            return module
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
    """RNG states as tensors, ints, strings and tuples only, so that state.pt loads with
    torch.load(weights_only=True) (no pickled objects, no code run on resume)."""
    import random

    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _opt_owner(opt, models: dict):
    """The model (of `models`) whose parameters `opt` optimizes."""
    first = next((p for g in opt.param_groups for p in g["params"]), None)
    for module in models.values():
        if any(p is first for p in module.parameters()):
            return module
    raise CheckpointError("optimizer parameters belong to none of the checkpointed models")


def _sharded_state(models: dict, optimizers: dict) -> dict:
    """{"models": {name: sd}, "optimizers": {name: sd}} keyed by parameter names (FQNs), the form
    torch.distributed.checkpoint reshards across world sizes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"models": {n: get_model_state_dict(m) for n, m in models.items()},
            "optimizers": {n: get_optimizer_state_dict(_opt_owner(o, models), o)
                           for n, o in optimizers.items()}}


def save_training(ckpt_dir: str, step: int, models: dict, state: dict, keep: int = 2,
                  optimizers: dict | None = None) -> str:
    """Write models ({name: module}), optimizers ({name: optimizer}) and `state` (any
    torch.save-able dict of rank 0) for `step`. Call it on every rank.

    Unsharded models: rank 0 writes <name>.safetensors and state.pt (optimizer states inside).
    FSDP-sharded models: every rank writes its shards of models and optimizers with
    torch.distributed.checkpoint into the step's temp folder (dcp/), which a run with another
    world size can load; rank 0 writes state.pt. Either way the folder is renamed into place and
    `latest` moved by rank 0 only after every rank has written (the folder must be on a shared
    file system for multi-node runs).
    """
    from . import dist
    optimizers = optimizers or {}
    sharded = any(dist.is_sharded(m) for m in models.values())
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".tmp-{name}")
    if dist.is_main():
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        os.makedirs(tmp)
    dist.barrier()
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp
            dcp.save(_sharded_state(models, optimizers), checkpoint_id=os.path.join(tmp, "dcp"))
        if dist.is_main():
            if not sharded:
                for mname, module in models.items():
                    atomic_write_bytes(os.path.join(tmp, f"{mname}.safetensors"), _state_bytes(module))
                state = {**state, "optimizers": {n: o.state_dict() for n, o in optimizers.items()}}
            buf = io.BytesIO()
            torch.save({**state, "version": CKPT_VERSION, "step": step}, buf)
            atomic_write_bytes(os.path.join(tmp, "state.pt"), buf.getvalue())
            meta = {"step": step, "models": sorted(models), "version": CKPT_VERSION,
                    "format": "dcp" if sharded else "safetensors", "world_size": dist.world_size()}
            atomic_write_bytes(os.path.join(tmp, "meta.json"), json.dumps(meta).encode())
        dist.barrier()  # every rank's shards are on disk before the folder becomes visible
        if dist.is_main():
            if os.path.exists(final):  # re-saving the same step (e.g. signal right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(ckpt_dir)
    except BaseException:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_main():
        atomic_write_bytes(os.path.join(ckpt_dir, "latest"), name.encode())
        steps = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_"))
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        for junk in os.listdir(ckpt_dir):  # temp folders of a run killed mid-save
            if junk.startswith(".tmp-step_"):
                shutil.rmtree(os.path.join(ckpt_dir, junk), ignore_errors=True)
    dist.barrier()
    return final


def load_training(ckpt_dir: str, models: dict, map_location="cpu",
                  optimizers: dict | None = None) -> dict | None:
    """Load the latest checkpoint into `models` (and `optimizers`); return its state dict, or None
    if there is none. Call it on every rank. A sharded (dcp) checkpoint loads at any world size
    and into sharded or unsharded models. Unreadable, truncated or mismatched checkpoints raise
    CheckpointError naming the file."""
    d = latest_step_dir(ckpt_dir)
    if d is None:
        return None
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: unreadable meta.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{d}: checkpoint version {meta.get('version') if isinstance(meta, dict) else meta!r}"
                              f" != {CKPT_VERSION}")
    if sorted(models) != meta["models"]:
        raise CheckpointError(f"{d}: holds models {meta['models']}, this run has {sorted(models)}")
    try:
        # weights_only: tensors and plain containers only; a crafted state.pt cannot run code
        state = torch.load(os.path.join(d, "state.pt"), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{d}/state.pt: cannot load safely ({type(e).__name__}: {_first_line(e)}); "
                              f"only tensors and plain containers are accepted") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{d}/state.pt: not a training state (got {type(state).__name__})")
    optimizers = optimizers or {}
    if meta.get("format", "safetensors") == "dcp":
        _load_sharded(os.path.join(d, "dcp"), models, optimizers)
        return state
    from . import dist
    for mname, module in models.items():
        if dist.is_sharded(module):
            raise CheckpointError(f"{d}: an unsharded (ddp / single-process) checkpoint cannot resume an "
                                  f"fsdp run; resume with --dist.strategy=ddp or start from --model.init")
        _load_state(module, os.path.join(d, f"{mname}.safetensors"), map_location)
    saved = state.get("optimizers", {})
    for oname, opt in optimizers.items():
        if oname not in saved:
            raise CheckpointError(f"{d}/state.pt: no state for optimizer {oname!r}")
        try:
            opt.load_state_dict(saved[oname])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{d}/state.pt: optimizer {oname!r} does not match ({e})") from None
    return state


def _load_sharded(path: str, models: dict, optimizers: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: no .metadata (incomplete sharded checkpoint)")
    target = _sharded_state(models, optimizers)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(target, checkpoint_id=path)
        for n, m in models.items():
            set_model_state_dict(m, target["models"][n])
        for n, o in optimizers.items():
            set_optimizer_state_dict(_opt_owner(o, models), o, target["optimizers"][n])
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # missing keys, other model size, bad shards
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        why = lines[-1].strip() if lines else type(e).__name__  # DCP wraps each rank's traceback
        raise CheckpointError(f"{path}: cannot load sharded checkpoint into this run ({why[:400]})") from None
