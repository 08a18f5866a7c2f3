"""Hugging Face GPT-2 interop: checkpoint folders and the GPT-2 byte-level BPE tokenizer.

    model = GPT.from_hf("path/to/gpt2")          # config.json + model.safetensors | pytorch_model.bin
    model.to_hf("out/gpt2-export")               # loads in transformers.GPT2LMHeadModel
    tok = HFTokenizer.load("path/to/gpt2")       # vocab.json + merges.txt (needs `tokenizers`)

    python -m engine.hf import HF_DIR RUN_DIR    # -> RUN_DIR/model (GPT.load format) + tokenizer files
    python -m engine.hf export MODEL_DIR HF_DIR  # GPT.save folder (or run folder) -> HF folder

Mapping. GPT-2 is this engine's architecture with every layer dense (sparse_every=0):
    transformer.wte / wpe / h.{i}.ln_1 / ln_2 / ln_f   -> same names
    transformer.h.{i}.attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
        HF `Conv1D` stores weight [in, out]; nn.Linear stores [out, in]: transposed both ways.
        c_attn's output columns are q | k | v, each head-major -- the same layout as ours.
    lm_head.weight is tied to wte (an untied checkpoint is refused).
    config: n_positions (or n_ctx) -> block_size, n_embd -> d_model, n_head, d_head = n_embd /
    n_head, n_layer, vocab_size, layer_norm_epsilon -> ln_eps, resid_pdrop -> dropout.
Refused (ValueError naming the field): activation other than gelu_new / gelu_pytorch_tanh (both
tanh-approximated GELU), scale_attn_by_inverse_layer_idx, scale_attn_weights=false, n_inner !=
4 * n_embd, model types other than gpt2. attn_pdrop has no counterpart (this engine has no
attention-probability dropout); it only matters in training.

A model with locally banded layers (sparse_every > 0, window < block_size) is exported with its
`window` / `sparse_every` under the extra config keys `engine_window` / `engine_sparse_every`,
which from_hf restores; transformers ignores them and runs every layer dense, so its logits
differ from ours once a sequence is longer than the window (a warning says so).

from_hf / to_hf need only torch, safetensors and json; `transformers` is never imported here.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .config import GPTConfig

SAFE_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# (our suffix, HF suffix, HF Conv1D weight that needs a transpose)
_BLOCK = [("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
          ("attn.c_attn.weight", "attn.c_attn.weight", True), ("attn.c_attn.bias", "attn.c_attn.bias", False),
          ("attn.c_proj.weight", "attn.c_proj.weight", True), ("attn.c_proj.bias", "attn.c_proj.bias", False),
          ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
          ("mlp.c_fc.weight", "mlp.c_fc.weight", True), ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
          ("mlp.c_proj.weight", "mlp.c_proj.weight", True), ("mlp.c_proj.bias", "mlp.c_proj.bias", False)]
_TOP = [("wte.weight", "wte.weight"), ("wpe.weight", "wpe.weight"),
        ("ln_f.weight", "ln_f.weight"), ("ln_f.bias", "ln_f.bias")]
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of old checkpoints


# ----------------------------------------------------------------------------- config
def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> GPTConfig:
    """A GPTConfig from a GPT-2 config.json dict (see the module docstring for what is refused)."""
    mt = hf.get("model_type", "gpt2")
    if mt != "gpt2":
        raise ValueError(f"{where}: model_type {mt!r} is not supported (only GPT-2 checkpoints)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ValueError(f"{where}: activation_function {act!r} is not supported; this engine uses "
                         f"the tanh-approximated GELU ({' / '.join(_TANH_GELUS)})")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError(f"{where}: scale_attn_weights=false is not supported")
    if hf.get("add_cross_attention", False):
        raise ValueError(f"{where}: add_cross_attention=true is not supported")
    try:
        d, n_head = int(hf["n_embd"]), int(hf["n_head"])
        n_layer, vocab = int(hf["n_layer"]), int(hf["vocab_size"])
        block = int(hf.get("n_positions", hf.get("n_ctx", 0)))
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
    if d % n_head:
        raise ValueError(f"{where}: n_embd={d} is not divisible by n_head={n_head}")
    if hf.get("n_inner") not in (None, 4 * d):
        raise ValueError(f"{where}: n_inner={hf['n_inner']} is not supported (MLP width must be 4 * n_embd = {4 * d})")
    kw = dict(vocab_size=vocab, block_size=block, n_layer=n_layer, d_model=d, n_head=n_head,
              d_head=d // n_head, ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
              dropout=float(hf.get("resid_pdrop", 0.0)), bias=True,
              sparse_every=int(hf.get("engine_sparse_every", 0)),
              window=int(hf.get("engine_window", block)))
    return GPTConfig(**{**kw, **overrides})


def config_to_hf(cfg: GPTConfig, tok=None) -> dict:
    """GPT-2 config.json dict for a GPTConfig (raises if GPT-2 cannot express it)."""
    if cfg.n_head * cfg.d_head != cfg.d_model:
        raise ValueError(f"GPT-2 needs n_head * d_head == d_model; got {cfg.n_head} x {cfg.d_head} "
                         f"!= {cfg.d_model}")
    eos = getattr(tok, "eos_id", None)
    eos = eos if eos is not None else (cfg.vocab_size - 1)
    bos = getattr(tok, "bos_id", None)
    out = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.ln_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": bos if bos is not None else eos, "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    pad = getattr(tok, "pad_id", None)
    if pad is not None:
        out["pad_token_id"] = pad
    if cfg.sparse_every > 0:
        out["engine_sparse_every"] = cfg.sparse_every
        out["engine_window"] = cfg.window
    return out


# ----------------------------------------------------------------------------- weights
def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, pytorch_model.bin, or their sharded forms."""
    from safetensors.torch import load_file

    def load_one(f: Path):
        try:
            if f.name.endswith(".safetensors"):
                return load_file(str(f))
            return torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / corrupted / not a checkpoint
            raise ValueError(f"{f}: cannot read checkpoint tensors ({type(e).__name__}: {e})") from None

    for single, index in ((SAFE_WEIGHTS, SAFE_WEIGHTS + ".index.json"),
                          (TORCH_WEIGHTS, TORCH_WEIGHTS + ".index.json")):
        if (path / single).exists():
            return load_one(path / single)
        if (path / index).exists():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            sd = {}
            for s in shards:
                sd.update(load_one(path / s))
            return sd
    raise FileNotFoundError(f"{path}: no {SAFE_WEIGHTS} or {TORCH_WEIGHTS} (or sharded index) found")


def state_from_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig, where: str = "") -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict (with or without the `transformer.` prefix) -> GPT.state_dict() names."""
    src = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in sd.items()}
    lm_head = src.pop("lm_head.weight", None)
    out, used = {}, set()

    def take(hf_key, ours, transpose=False):
        if hf_key not in src:
            raise ValueError(f"{where}: missing tensor {hf_key!r}")
        t = src[hf_key]
        used.add(hf_key)
        out[ours] = t.t().contiguous() if transpose else t

    for ours, theirs in _TOP:
        take(theirs, ours)
    for i in range(cfg.n_layer):
        for ours, theirs, tr in _BLOCK:
            take(f"h.{i}.{theirs}", f"h.{i}.{ours}", tr)
    extra = [k for k in src if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"{where}: unexpected tensors {extra[:5]} (is n_layer right? cross-attention?)")
    if lm_head is not None and not torch.equal(lm_head, out["wte.weight"]):
        raise ValueError(f"{where}: lm_head.weight differs from wte.weight; untied output "
                         "embeddings are not supported")
    return out


def state_to_hf(model) -> dict[str, torch.Tensor]:
    """GPT.state_dict() -> HF GPT2LMHeadModel names (lm_head omitted: tied, as save_pretrained does)."""
    sd = model.state_dict()
    cfg = model.cfg
    out = {}
    for ours, theirs in _TOP:
        out[f"transformer.{theirs}"] = sd[ours]
    for i in range(cfg.n_layer):
        for ours, theirs, tr in _BLOCK:
            t = sd.get(f"h.{i}.{ours}")
            if t is None:  # bias=False model: GPT-2 always has biases, zeros are equivalent
                t = torch.zeros(sd[f"h.{i}.{ours[:-4]}weight"].shape[0])
            out[f"transformer.h.{i}.{theirs}"] = t.t() if tr else t
    if "ln_f.bias" not in sd:
        out["transformer.ln_f.bias"] = torch.zeros(cfg.d_model)
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


# ----------------------------------------------------------------------------- public API
def from_hf(cls, path, *, dtype: torch.dtype = torch.float32, device="cpu", **overrides):
    """Load a Hugging Face GPT-2 folder into `cls` (engine.GPT). `overrides` go to GPTConfig
    (e.g. dropout=0.0)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = config_from_hf(hf, str(cfg_path), **overrides)
    if "bias" in overrides and not overrides["bias"]:
        raise ValueError("from_hf: GPT-2 has biases; bias=False is not supported")
    sd = state_from_hf(_read_state(path), cfg, str(path))
    sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = cls(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatch against config.json
        raise ValueError(f"{path}: tensors do not match config.json: {e}") from None
    return model.to(device)


def to_hf(model, path, *, tokenizer=None, safe_serialization: bool = True) -> None:
    """Write `model` (engine.GPT) as a GPT-2 folder: config.json + model.safetensors (or
    pytorch_model.bin), plus the tokenizer's files when one is given."""
    from safetensors.torch import save_file

    cfg = model.cfg
    hf = config_to_hf(cfg, tokenizer)
    if cfg.sparse_every > 0 and cfg.window < cfg.block_size:
        warnings.warn(f"to_hf: this model has locally banded layers (window={cfg.window}, "
                      f"sparse_every={cfg.sparse_every}); transformers ignores the engine_* keys and "
                      f"runs every layer dense, so its outputs differ beyond {cfg.window} tokens",
                      stacklevel=2)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_to_hf(model)
    if safe_serialization:
        save_file(sd, str(path / SAFE_WEIGHTS), metadata={"format": "pt"})
        (path / TORCH_WEIGHTS).unlink(missing_ok=True)
    else:
        torch.save(sd, str(path / TORCH_WEIGHTS))
        (path / SAFE_WEIGHTS).unlink(missing_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)


def is_hf_model_dir(path) -> bool:
    p = Path(path) if path else None
    if p is None or not (p / "config.json").exists():
        return False
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "gpt2"
    except ValueError:
        return False


def has_hf_tokenizer(path) -> bool:
    p = Path(path) if path else None
    return p is not None and (p / "vocab.json").exists() and (p / "merges.txt").exists()


# ----------------------------------------------------------------------------- tokenizer
class HFTokenizer:
    """GPT-2 byte-level BPE from vocab.json + merges.txt, with engine.tokenizer.Tokenizer's
    interface. Needs the optional `tokenizers` package (imported lazily).

    GPT-2 has one special token, <|endoftext|>: it is eos, bos and pad (as with transformers'
    `pad_token = eos_token`). Text is encoded literally -- a "<|endoftext|>" inside a string is
    ordinary text, never the special id -- and decode(encode(s)) == s for every str.
    """

    def __init__(self, vocab_json: str, merges_txt: str, eos_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers

        self._vocab_json, self._merges_txt, self.eos_token = vocab_json, merges_txt, eos_token
        vocab = json.loads(vocab_json)
        merges = [tuple(line.split(" ")) for line in merges_txt.splitlines()
                  if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"merges.txt: malformed merge line {' '.join(bad[0])!r}")
        if eos_token not in vocab:
            raise ValueError(f"vocab.json has no {eos_token!r} token")
        self._tk = _Tok(models.BPE(vocab=vocab, merges=merges))
        self._tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tk.decoder = decoders.ByteLevel()
        self._eos = int(vocab[eos_token])
        self._n = max(vocab.values()) + 1
        self._id_to_tok = {v: k for k, v in vocab.items()}

    @classmethod
    def load(cls, path, **kw) -> "HFTokenizer":
        """From a folder holding vocab.json and merges.txt."""
        p = Path(path)
        if not has_hf_tokenizer(p):
            raise FileNotFoundError(f"{p}: needs vocab.json and merges.txt")
        return cls((p / "vocab.json").read_text(encoding="utf-8"),
                   (p / "merges.txt").read_text(encoding="utf-8"), **kw)

    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, text in (("vocab.json", self._vocab_json), ("merges.txt", self._merges_txt)):
            tmp = d / (name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, d / name)
        return d / "vocab.json"

    @property
    def model_proto(self) -> bytes:  # identity of the tokenizer (TokenStream caches hash it)
        return (self._vocab_json + "\0" + self._merges_txt).encode("utf-8")

    def __getstate__(self):
        return {"vocab": self._vocab_json, "merges": self._merges_txt, "eos": self.eos_token}

    def __setstate__(self, s):
        self.__init__(s["vocab"], s["merges"], s["eos"])

    vocab_size = property(lambda self: self._n)
    pad_id = property(lambda self: self._eos)
    bos_id = property(lambda self: self._eos)
    eos_id = property(lambda self: self._eos)
    unk_id = property(lambda self: None)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self._n})"

    def id_to_piece(self, i: int) -> str:
        return self._id_to_tok[int(i)]

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"HFTokenizer.encode expects str, got {type(s).__name__}")
        return self.encode_batch([s], bos, eos)[0]

    def encode_batch(self, texts, bos: bool = False, eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        for i, s in enumerate(texts):
            if not isinstance(s, str):
                raise TypeError(f"HFTokenizer.encode_batch: item {i} is {type(s).__name__}, expected str")
        out = [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)] if texts else []
        if bos or eos:
            out = [([self._eos] if bos else []) + ids + ([self._eos] if eos else []) for ids in out]
        return out

    def decode(self, ids) -> str:
        """Decode ids (list / numpy / torch 1-D); the special <|endoftext|> is skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self._n:
                raise ValueError(f"HFTokenizer.decode: id {i} out of range [0, {self._n})")
        return self._tk.decode([i for i in ids if i != self._eos], skip_special_tokens=False)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


# ----------------------------------------------------------------------------- command line
def _main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engine.hf", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("import", help="HF GPT-2 folder -> RUN_DIR/model (GPT.load format) + tokenizer files")
    a.add_argument("hf_dir")
    a.add_argument("run_dir")
    b = sub.add_parser("export", help="GPT.save folder or run folder -> HF GPT-2 folder")
    b.add_argument("model_dir")
    b.add_argument("hf_dir")
    args = ap.parse_args(argv)
    from .model import GPT

    if args.cmd == "import":
        model = from_hf(GPT, args.hf_dir)
        model.save(os.path.join(args.run_dir, "model"))
        if has_hf_tokenizer(args.hf_dir):
            HFTokenizer.load(args.hf_dir).save(args.run_dir)
        print(f"{args.hf_dir} -> {args.run_dir}/model ({model.num_params() / 1e6:.1f}M params, {model.cfg})")
    else:
        src = Path(args.model_dir)
        mdir = src / "model" if (src / "model" / "config.json").exists() else src
        tok = HFTokenizer.load(src) if has_hf_tokenizer(src) else None
        to_hf(GPT.load(str(mdir)), args.hf_dir, tokenizer=tok)
        print(f"{mdir} -> {args.hf_dir}" + ("" if tok else " (no vocab.json/merges.txt beside it: "
                                                        "tokenizer not exported)"))


if __name__ == "__main__":
    _main()
