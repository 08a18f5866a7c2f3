"""Hugging Face GPT-2 interop: logits match transformers both ways, both weight formats, and the
GPT-2 byte-level BPE tokenizer matches transformers' GPT2TokenizerFast."""
import json
import os

import pytest
import torch

import engine
from engine.config import GPTConfig
from engine.hf import HFTokenizer, config_from_hf, from_hf

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=64)


@pytest.fixture(params=["auto", "ref"])
def kernels_env(request, monkeypatch):
    if request.param == "auto":
        monkeypatch.delenv("ENGINE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("ENGINE_KERNELS", "ref")
    return request.param


def _hf_model(**over):
    cfg = transformers.GPT2Config(**{**SMALL, **over}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values so a wrong mapping cannot hide
        for n, p in m.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _save_hf(m, path, safe: bool):
    if safe:
        m.save_pretrained(path)
    else:
        m.save_pretrained(path, safe_serialization=False)
        if not os.path.exists(os.path.join(path, "pytorch_model.bin")):
            # transformers >= 5 writes only safetensors: write the classic .bin by hand (full
            # state dict, tied lm_head.weight and all, as transformers 4 did).
            os.remove(os.path.join(path, "model.safetensors"))
            torch.save(m.state_dict(), os.path.join(path, "pytorch_model.bin"))
    assert os.path.exists(os.path.join(path, "model.safetensors" if safe else "pytorch_model.bin"))


def _ids(T=40, B=3, V=101):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_hf_logits_match(tmp_path, safe, kernels_env):
    hf = _hf_model()
    _save_hf(hf, tmp_path, safe)
    ours = engine.GPT.from_hf(tmp_path).eval()
    assert ours.cfg.sparse_every == 0 and ours.cfg.block_size == 64 and ours.cfg.d_head == 16
    idx = _ids()
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert (got - ref).abs().max().item() < 1e-4
    # the fused logprob path agrees too
    with torch.no_grad():
        lp = ours.logprobs(idx)
    ref_lp = torch.log_softmax(ref[:, :-1].double(), -1).gather(2, idx[:, 1:, None])[..., 0]
    assert (lp.double() - ref_lp).abs().max().item() < 1e-4


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_to_hf_loads_in_transformers_with_same_logits(tmp_path, safe, kernels_env):
    cfg = GPTConfig(vocab_size=101, block_size=64, n_layer=2, d_model=64, n_head=4, d_head=16,
                    sparse_every=0, ln_eps=1e-5)
    ours = engine.GPT(cfg).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("bias") or ".ln_" in n or n.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    ours.to_hf(tmp_path, safe_serialization=safe)
    assert os.path.exists(tmp_path / ("model.safetensors" if safe else "pytorch_model.bin"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = _ids()
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() < 1e-4
    # and back again, bit-exact
    back = engine.GPT.from_hf(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_banded_model_roundtrip_keeps_window_and_warns(tmp_path):
    cfg = GPTConfig(vocab_size=101, block_size=64, n_layer=2, d_model=64, n_head=4, d_head=16,
                    sparse_every=2, window=8)
    ours = engine.GPT(cfg).eval()
    with pytest.warns(UserWarning, match="dense"):
        ours.to_hf(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["engine_window"] == 8 and meta["engine_sparse_every"] == 2
    back = engine.GPT.from_hf(tmp_path).eval()
    assert back.cfg.window == 8 and back.cfg.sparse_every == 2
    idx = _ids(T=40)
    with torch.no_grad():
        assert torch.allclose(back(idx), ours(idx), atol=1e-5)
        # transformers runs it dense: same up to the window, different beyond it
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        d = (hf(idx).logits - ours(idx)).abs().amax(dim=(0, 2))
    assert d[:8].max() < 1e-4 and d[8:].max() > 1e-3


@pytest.mark.parametrize("field,value,msg", [
    ("activation_function", "relu", "activation_function"),
    ("activation_function", "gelu", "activation_function"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("n_inner", 100, "n_inner"),
    ("model_type", "gpt_neo", "model_type"),
])
def test_unsupported_configs_are_refused(field, value, msg):
    hf = {**SMALL, field: value}
    with pytest.raises(ValueError, match=msg):
        config_from_hf(hf)


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(engine.GPT, tmp_path)
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read"):
        from_hf(engine.GPT, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_hf(engine.GPT, tmp_path)
    # config says 3 layers, weights have 2
    hf.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "n_layer": 3}))
    with pytest.raises(ValueError, match="missing tensor 'h.2.ln_1.weight'"):
        from_hf(engine.GPT, tmp_path)
    # an untied lm_head is refused rather than silently dropped
    (tmp_path / "config.json").write_text(json.dumps(meta))
    sd = {**hf.state_dict(), "lm_head.weight": torch.randn(101, 64)}
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="untied"):
        from_hf(engine.GPT, tmp_path)


# ----------------------------------------------------------------------------- tokenizer
TEXTS = ["Hello world!  Tabs\tand\nnewlines\n\n", "Zwölf Boxkämpfer jagen Viktor über den großen Sylter Deich",
         "emoji 🤖 and CJK 漢字, digits 1234567", "  leading spaces", "<|endoftext|> is text here", ""]


@pytest.fixture(scope="module")
def gpt2_tok_dir(tmp_path_factory):
    """A small GPT-2-style byte-level BPE trained here on the bundled Shakespeare (no download)."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("bpe")
    text = open(os.path.join(os.path.dirname(__file__), "..", "recipes", "data",
                             "text_tinyshakespeare.txt"), encoding="utf-8").read()[:200_000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(d))
    return d


def test_hf_tokenizer_roundtrip_and_matches_transformers(gpt2_tok_dir, tmp_path):
    tok = HFTokenizer.load(gpt2_tok_dir)
    assert tok.vocab_size == 600 and tok.eos_id == tok.pad_id == tok.bos_id == 0
    for s in TEXTS:
        assert tok.decode(tok.encode(s)) == s
    ref = transformers.AutoTokenizer.from_pretrained(gpt2_tok_dir, tokenizer_type="gpt2")
    for s in TEXTS[:4]:  # transformers maps a literal "<|endoftext|>" to the special id; we do not
        assert tok.encode(s) == ref(s)["input_ids"]
    assert tok.encode_batch(TEXTS, eos=True) == [tok.encode(s) + [tok.eos_id] for s in TEXTS]
    assert tok.decode(tok.encode("abc", bos=True, eos=True)) == "abc"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([600])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    # save / load / pickle
    tok.save(tmp_path)
    assert HFTokenizer.load(tmp_path).encode(TEXTS[1]) == tok.encode(TEXTS[1])
    import pickle
    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_tokenizer_export_with_model(gpt2_tok_dir, tmp_path):
    """to_hf(tokenizer=...) writes a folder transformers' pipeline pieces can load as a unit."""
    tok = HFTokenizer.load(gpt2_tok_dir)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, d_model=32, n_head=2,
                    d_head=16, sparse_every=0)
    m = engine.GPT(cfg).eval()
    m.to_hf(tmp_path, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = hf_tok("To be, or not to be", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tok.encode("To be, or not to be")
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)).abs().max() < 1e-4
    assert hf.config.eos_token_id == tok.eos_id
