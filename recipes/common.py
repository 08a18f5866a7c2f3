"""What every recipe shares: the command line, run folders, tokenizer and model set-up.

Command line (all stages):
    python -m recipes.<stage> [--config FILE.toml] [--out DIR] [--section.key=value ...]
Run folder DIR: config.toml (resolved), metrics.jsonl, ckpt/ (latest checkpoint, resumed by
rerunning the same command), tokenizer.model, model/ (final weights, `GPT.load` format).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from engine import dist
from engine.checkpoint import CheckpointError, atomic_write_bytes, load_weights
from engine.config import ConfigError, load_config, to_toml

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parent / "configs"


def parse(cfg_cls, argv: list[str] | None, stage: str):
    """-> (cfg, out_dir). Unknown flags and keys raise with the list of valid ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, out, overrides = None, None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(__doc__.strip())
            print(f"\n[{stage}] defaults:\n" + to_toml(cfg_cls()))
            raise SystemExit(0)
        key, _, val = a.partition("=")
        if key in ("--config", "--out"):
            if not val:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{key} needs a value")
                i, val = i + 1, argv[i + 1]
            config_path, out = (val, out) if key == "--config" else (config_path, val)
        elif a.startswith("--") and "=" in a:
            overrides.append(a)
        else:
            raise SystemExit(f"unexpected argument {a!r}; use --config FILE, --out DIR, --section.key=value")
        i += 1
    try:
        cfg = load_config(cfg_cls, config_path, overrides)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"config error: {e.args[0] if e.args else e}") from None
    return cfg, out or os.path.join("runs", stage)


def cli(main, argv=None) -> None:
    """Run a recipe's main() as a command: bad data, config and checkpoints end in one line on
    stderr (`error: file.jsonl:3: ranking: ...`) and exit status 2, without a traceback;
    ENGINE_DEBUG=1 shows the traceback instead."""
    from engine.config import ConfigError
    from engine.data import DataError
    from engine.trainer import NonFiniteError
    try:
        main(argv)
        # Every rank leaves together and tears its process group down: a rank that exits with a
        # live gloo/NCCL group can abort in the group's destructor ("terminate called without an
        # active exception", SIGABRT) while another rank is still saving.
        was_dist = dist.is_dist()
        dist.barrier()
        dist.cleanup()
        if was_dist:
            # ... and a rank can still abort after that, in the interpreter's teardown (traced: the
            # rank got past destroy_process_group, then SIGABRT; about 1 in 15 runs of the 2-rank
            # FSDP SFT test on 2 cores). Everything is written and flushed by now: skip teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except (DataError, ConfigError, CheckpointError, NonFiniteError) as e:
        if os.environ.get("ENGINE_DEBUG", "0") not in ("", "0"):
            raise
        msg = str(e.args[0]) if e.args else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        dist.cleanup()
        raise SystemExit(2) from None


def setup(cfg, out_dir: str) -> torch.device:
    """Init (torchrun-aware), seed, thread count; write the resolved config into out_dir."""
    device = dist.init(cfg.train.device)
    if device.type == "cpu" and cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(out_dir, "config.toml"), to_toml(cfg).encode())
    return device


def find_tokenizer(path: str):
    """The tokenizer stored in a run / model folder (or a .model file), or None."""
    from engine.hf import HFTokenizer, has_hf_tokenizer
    from engine.tokenizer import Tokenizer

    if not path:
        return None
    if has_hf_tokenizer(path) and not (Path(path) / "tokenizer.model").exists():
        return HFTokenizer.load(path)  # GPT-2 byte-level BPE: vocab.json + merges.txt
    if (Path(path) / "tokenizer.model").exists() or path.endswith(".model"):
        return Tokenizer.load(path)
    return None


def tokenizer(cfg, out_dir: str, train_texts=None):
    """The run's tokenizer: data.tokenizer, else the init model's, else this run's (resume),
    else one trained here on `train_texts()` (sentencepiece data.tokenizer_type, data.vocab_size)."""
    from engine.tokenizer import Tokenizer

    for cand in (cfg.data.tokenizer, cfg.model.init, out_dir):
        tok = find_tokenizer(cand)
        if tok is not None:
            break
    else:
        if train_texts is None:
            raise SystemExit("no tokenizer: set --data.tokenizer or --model.init to a run with one")
        if cfg.data.tokenizer_type not in ("bpe", "char"):
            raise ConfigError(f"data.tokenizer_type={cfg.data.tokenizer_type!r}: expected bpe or char")
        if dist.is_main():
            # char: every character its own piece (vocab = the text's characters, at most
            # data.vocab_size; others fall back to bytes), so a small model sees every letter
            Tokenizer.train(train_texts(), out_dir, vocab_size=cfg.data.vocab_size,
                            model_type=cfg.data.tokenizer_type)
        if dist.is_dist():
            torch.distributed.barrier()
        tok = Tokenizer.load(out_dir)
    if dist.is_main() and not (Path(out_dir) / "tokenizer.model").exists():
        tok.save(out_dir)
    return tok


def check_same_tokenizer(tok, model, path: str, what: str) -> None:
    """Refuse a model (e.g. a reward model) whose tokenizer is not `tok`: the same vocabulary
    size with other ids would give garbage scores without any error.

    Looks for the tokenizer in `path` and its parent (run folder / run/model); the ids must map
    to the same pieces. A folder without a tokenizer is checked by vocabulary size only.
    """
    import hashlib
    vocab = model.cfg.vocab_size
    if vocab < tok.vocab_size:
        raise SystemExit(f"error: {what} {path}: vocabulary of {vocab} ids < the tokenizer's "
                         f"{tok.vocab_size}; it was trained with another tokenizer")
    p = Path(path)
    other = find_tokenizer(str(p)) or (find_tokenizer(str(p.parent)) if p.name == "model" else None)
    if other is None:
        dist.print0(f"[warning] {what} {path}: no tokenizer stored beside it; only the vocabulary "
                    f"size ({vocab}) could be checked")
        return
    digest = lambda t: hashlib.sha256(t.model_proto).hexdigest()  # noqa: E731
    if digest(other) != digest(tok):
        same = "same" if other.vocab_size == tok.vocab_size else "different"
        raise SystemExit(f"error: {what} {path}: its tokenizer differs from this run's ({same} vocabulary "
                         f"size {other.vocab_size} vs {tok.vocab_size}, other ids); train it from the "
                         f"same tokenizer (e.g. --data.tokenizer=<policy run>)")


def build_model(cfg, tok, device, cls=None, compile: bool = True):
    """GPT (or RewardModel via `cls`) with weights from model.init (see `_build_model`), its
    Blocks compiled when train.compile is set (and `compile`)."""
    model = _build_model(cfg, tok, device, cls)
    if compile and getattr(cfg.train, "compile", False):
        from engine.model import compile_blocks
        compile_blocks(model)
    return model


def model_class(src: str) -> str:
    """"GPT" or "RewardModel" for a run or model folder written by this engine (its config.json),
    "" for anything else (a Hugging Face folder counts as "GPT")."""
    import json

    from engine.hf import is_hf_model_dir
    if (Path(src) / "model").is_dir():
        src = str(Path(src) / "model")
    if is_hf_model_dir(src):
        return "GPT"
    try:
        return json.loads((Path(src) / "config.json").read_text()).get("model_class", "GPT")
    except (OSError, ValueError):
        return ""


def _build_model(cfg, tok, device, cls=None):
    """GPT (or RewardModel via `cls`) with weights from model.init.

    model.init may be a run folder (its model/ is used), a model folder written by `.save()`, a
    training checkpoint folder, or a Hugging Face GPT-2 folder. The architecture comes from the
    init model's config.json (model.window overrides it); without an init
    it comes from model.preset and the tokenizer's vocabulary.
    """
    import json

    from engine.hf import from_hf, is_hf_model_dir
    from engine.model import GPT, build, read_config

    cls = cls or GPT
    # The init's training-time dropout is not inherited (SFT's 0.2 must not leak into the RM or
    # PPO): dropout is this run's model.dropout, 0 when unset.
    over = {k: getattr(cfg.model, k) for k in ("dropout", "window") if getattr(cfg.model, k) is not None}
    over.setdefault("dropout", 0.0)
    src = cfg.model.init
    if src and (Path(src) / "model").is_dir():
        src = str(Path(src) / "model")
    if src and is_hf_model_dir(src):
        lm = from_hf(GPT, src, **over)
        model = cls(lm.cfg) if cls is not GPT else lm
        if cls is not GPT:
            model.trunk.load_state_dict(lm.state_dict())
        return model.to(device)
    if src and (Path(src) / "config.json").exists():
        gcfg = read_config(src)
        for k, v in over.items():
            setattr(gcfg, k, v)
        kind = json.loads((Path(src) / "config.json").read_text()).get("model_class", "GPT")
        whole = not (kind == "GPT" and cls is not GPT)  # else: a new RM head on a GPT trunk
        model = build(cls, gcfg, device, init=not whole)  # on the device, no init for loaded weights
        target = model if whole else model.trunk
        try:
            load_weights(target, src)
        except CheckpointError as e:
            raise SystemExit(f"model.init: {e}") from None
        return model
    vocab = cfg.model.vocab_size or tok.vocab_size
    model = build(cls, cfg.model.gpt_config(vocab_size=vocab), device)  # meta -> init on the device
    if src:  # a training checkpoint folder (run/ckpt/step_N) of the same architecture
        try:
            load_weights(model, src)
        except CheckpointError as e:
            raise SystemExit(f"model.init: {e}") from None
    return model


def wrap(cfg, model, device, *, trained: bool = True):
    """dist.wrap with the run's strategy, precision policy and (for trained models) activation
    checkpointing."""
    from engine import precision
    return dist.wrap(model, cfg.dist.strategy, device, compute_dtype=precision.compute_dtype(cfg.train.dtype, device),
                     activation_checkpointing=trained and cfg.dist.activation_checkpointing)


def export(model, tok, out_dir: str) -> None:
    """Final weights into out_dir/model (GPT.load format) beside out_dir/tokenizer.model.
    Every rank calls it (FSDP-sharded weights are gathered first)."""
    save_full(model, os.path.join(out_dir, "model"))
    if dist.is_main():
        tok.save(out_dir)


def save_full(model, path: str) -> None:
    """model.save(path) on rank 0 with full weights, also for FSDP-sharded models (collective)."""
    from engine.checkpoint import save_model
    sd = dist.full_state_dict(model) if dist.is_sharded(dist.unwrap(model)) else None
    if dist.is_main():
        save_model(dist.unwrap(model), path, state_dict=sd)


def step_generator(cfg, step: int, micro: int, salt: int = 0) -> torch.Generator:
    """A generator determined by (seed, step, micro, rank): batches are a pure function of the
    step, so a resumed run draws exactly the batches the uninterrupted run would have."""
    g = torch.Generator()
    g.manual_seed(((cfg.train.seed * 1_000_003 + step) * 131 + micro) * 17 + salt * 7 + dist.rank())
    return g


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return torch.randperm(n, generator=g)


def _positions(cfg, n: int, start: int, count: int) -> torch.Tensor:
    idx = []
    for k in range(start, start + count):
        epoch, pos = divmod(k, n)
        idx.append(int(epoch_order(n, cfg.train.seed, epoch)[pos]))
    return torch.tensor(idx, dtype=torch.long)


def rows_for(cfg, n: int, step: int, micro: int, micro_bs: int, accum: int) -> torch.Tensor:
    """Indices into an n-row dataset for this rank's micro batch of `step`: epochs are seeded
    permutations; a step takes the next batch_size rows, split into micro batches across ranks."""
    gb = micro_bs * accum * dist.world_size()
    return _positions(cfg, n, step * gb + (dist.rank() * accum + micro) * micro_bs, micro_bs)


def step_rows(cfg, n: int, step: int, micro_bs: int, accum: int) -> torch.Tensor:
    """All rows of `step` over every micro batch of every rank (the global batch)."""
    gb = micro_bs * accum * dist.world_size()
    return _positions(cfg, n, step * gb, gb)
