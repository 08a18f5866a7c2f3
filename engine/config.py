"""Configuration: the GPT-3 model presets, and typed TOML + `--section.key=value` overrides.

    cfg = GPTConfig.from_preset("gpt3-125m", dropout=0.1)
    run = load_config(SFTConfig, "recipes/configs/sft.toml", ["--train.lr=1e-4"])

Every recipe config is a dataclass of section dataclasses; an unknown section or key is an error
that lists the valid ones, and values are converted to the declared type (so `--train.lr=3`
becomes 3.0 and `--train.max_steps=1e3` is rejected rather than silently truncated).
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields


@dataclass
class GPTConfig:
    vocab_size: int = 50257    # GPT-2/3 BPE
    block_size: int = 2048     # context length n_ctx
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_head: int = 64           # attention inner width is n_head * d_head
    window: int = 256          # band of the locally banded ("sparse") layers: i - window < j <= i
    sparse_every: int = 2      # layer l is banded iff l % sparse_every == sparse_every - 1 (0: all dense)
    dropout: float = 0.0       # residual + embedding dropout (InstructGPT SFT used 0.2)
    bias: bool = True
    ln_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "n_head", "d_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    def is_banded(self, layer: int) -> bool:
        return self.sparse_every > 0 and layer % self.sparse_every == self.sparse_every - 1

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise KeyError(f"unknown GPTConfig field(s) {bad}; valid: {sorted(valid)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, embeddings: bool = True) -> int:
        """Exact parameter count of engine.GPT(self) (tied output embedding counted once)."""
        d, inner, L = self.d_model, self.n_head * self.d_head, self.n_layer
        b = 1 if self.bias else 0
        attn = d * 3 * inner + 3 * inner * b + inner * d + d * b
        mlp = d * 4 * d + 4 * d * b + 4 * d * d + d * b
        ln = 2 * d * (1 + b)
        n = L * (attn + mlp + ln) + d * (1 + b)
        return n + (self.vocab_size * d + self.block_size * d if embeddings else 0)


# GPT-3 paper (Brown et al. 2020) Table 2.1: n_layer, d_model, n_head, d_head; context 2048.
# Two rows of the table are internally inconsistent and we use the consistent reading:
#  - 1.3B lists 24 heads x 128 = 3072 != d_model 2048; 24 x 128 would give 1.52B parameters,
#    so we use 16 heads x 128 (= 2048), which gives the stated 1.3B.
#  - 13B lists d_model 5140, not divisible by 40 heads x 128; we use 5120 = 40 x 128.
def _g(n_layer, d_model, n_head, d_head):
    return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, d_head=d_head, block_size=2048,
                vocab_size=50257, window=256)


PRESETS: dict[str, dict] = {
    "gpt3-125m": _g(12, 768, 12, 64),
    "gpt3-350m": _g(24, 1024, 16, 64),
    "gpt3-760m": _g(24, 1536, 16, 96),
    "gpt3-1.3b": _g(24, 2048, 16, 128),
    "gpt3-2.7b": _g(32, 2560, 32, 80),
    "gpt3-6.7b": _g(32, 4096, 32, 128),
    "gpt3-13b": _g(40, 5120, 40, 128),
    "gpt3-175b": _g(96, 12288, 96, 128),
    # CPU-sized model of the embedded miniature pipeline; vocab_size is set from the tokenizer.
    "tiny": dict(n_layer=4, d_model=128, n_head=4, d_head=32, block_size=128, vocab_size=512,
                 window=32),
}


# ----------------------------------------------------------------------------- recipe configs
@dataclass
class ModelSection:
    preset: str = "tiny"
    init: str = ""                   # checkpoint dir (GPT.save format or trainer ckpt) to start from
    dropout: float | None = None     # None: the preset's value
    n_layer: int | None = None       # None: the preset's depth
    block_size: int | None = None
    vocab_size: int | None = None    # None: taken from the tokenizer when there is one
    window: int | None = None

    def gpt_config(self, **extra) -> GPTConfig:
        over = {k: getattr(self, k) for k in ("dropout", "n_layer", "block_size", "vocab_size", "window")
                if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.preset, **{**over, **extra})


@dataclass
class DataSection:
    path: str = ""                   # dataset file (format depends on the stage)
    eval_path: str = ""
    tokenizer: str = ""              # tokenizer .model file or dir; "" = train one on the data
    vocab_size: int = 512            # when a tokenizer is trained here
    tokenizer_type: str = "bpe"      # when trained here: bpe | char (one piece per character)
    seq_len: int = 128
    eval_fraction: float = 0.05
    mask_packed: bool = True         # packed rows: each document attends only to itself


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16             # sequences per optimizer step (global, across ranks)
    micro_batch_size: int = 0        # 0: = batch_size (no accumulation)
    lr: float = 6e-4
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95              # GPT-3 / InstructGPT Adam betas
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 100            # steps; 0 = only at the end
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    device: str = ""                 # "": cuda if available else cpu
    dtype: str = "auto"              # auto: bf16 on cuda, fp32 on cpu; bf16 | fp32 (engine/precision.py)
    max_bad_steps: int = 5           # consecutive non-finite steps before giving up
    progress: bool = True
    threads: int = 0                 # CPU threads per process; 0 = cores // local processes
    tensorboard: bool = False        # also write metrics.jsonl rows as TensorBoard scalars (<run>/tb/)
    compile: bool = False            # torch.compile each Block (engine.model.compile_blocks); off by
                                     # default: measured no faster on CPU (bench steps --compile)


@dataclass
class DistSection:
    strategy: str = "ddp"            # ddp | fsdp
    activation_checkpointing: bool = False


class ConfigError(ValueError):
    """A setting (or a combination of settings) that cannot run; the message says what to change."""


# ----------------------------------------------------------------------------- loading / overrides
def _convert(value, typ, where):
    """Convert a TOML or command-line value to the annotated type, or raise naming `where`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], where)
    if origin is list:
        (inner,) = typing.get_args(typ) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        return [_convert(v, inner, where) for v in value]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                return int(value, 0)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return str(value)
    except ValueError:
        pass
    else:
        return value
    raise ValueError(f"{where}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _hints(cls):
    return typing.get_type_hints(cls)


def set_dotted(cfg, key: str, value, source: str = "override") -> None:
    """cfg.section.key = value with type conversion; unknown names raise listing valid ones."""
    parts = key.split(".")
    obj, path = cfg, []
    for p in parts[:-1]:
        names = [f.name for f in fields(obj)]
        if p not in names or not dataclasses.is_dataclass(getattr(obj, p)):
            sections = [n for n in names if dataclasses.is_dataclass(getattr(obj, n))]
            raise KeyError(f"{source}: unknown section {'.'.join(path + [p])!r}; valid: {sections}")
        obj, path = getattr(obj, p), path + [p]
    name = parts[-1]
    hints = _hints(type(obj))
    valid = [f.name for f in fields(obj)]
    if name not in valid or dataclasses.is_dataclass(getattr(obj, name)):
        scope = ".".join(path) or "top level"
        raise KeyError(f"{source}: unknown key {key!r}; valid keys in {scope}: {valid}")
    setattr(obj, name, _convert(value, hints[name], f"{source}: {key}"))


def _apply_table(cfg, table: dict, prefix: str, source: str):
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _apply_table(cfg, v, key + ".", source)
        else:
            set_dotted(cfg, key, v, source)


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """Defaults of `cls`, then the TOML file, then `--a.b=value` (or `a.b=value`) overrides."""
    cfg = cls()
    if path:
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: invalid TOML: {e}") from None
        _apply_table(cfg, table, "", path)
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected --section.key=value")
        k, v = item.split("=", 1)
        set_dotted(cfg, k, v, "command line")
    # a section's own checks (its __post_init__) ran on its defaults; run them again on the values
    # the file and the command line set, so e.g. --ppo.minibatch_size=48 fails here, in one line
    for f in fields(cfg):
        sec = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sec) and hasattr(sec, "__post_init__"):
            try:
                sec.__post_init__()
            except ValueError as e:
                raise ValueError(f"[{f.name}] {e}") from None
    return cfg


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def to_toml(cfg) -> str:
    """Serialise a recipe config (dataclass of sections) to TOML; None values are omitted."""
    lines, tail = [], []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            tail.append(f"\n[{f.name}]")
            tail += [f"{g.name} = {_toml_value(getattr(v, g.name))}" for g in fields(v)
                     if getattr(v, g.name) is not None]
        elif v is not None:
            lines.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(lines + tail).strip() + "\n"


def section(factory):
    """Shorthand for a dataclass field holding a section: `train: TrainConfig = section(TrainConfig)`."""
    return field(default_factory=factory)
