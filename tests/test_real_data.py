"""Recipe configs for the bundled real data (recipes/configs/*.toml) and the real-data evaluation.

Reading and corrupting the data files themselves is covered by tests/test_data.py; here: every
config parses with its recipe's config class and names existing files, the GPU configs carry the
InstructGPT hyperparameters, the CPU configs run end to end (a few steps each, on the real files),
recipes.evaluate_real reproduces the RM recipe's held-out split, and a Hugging Face GPT-2 folder
(model + byte-level BPE) can start a recipe.
"""
import json
from pathlib import Path

import pytest
import torch

from engine.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.toml"))


def _cfg_class(name: str):
    stage = name.split("_")[0]
    if stage == "pretrain":
        from recipes.pretrain import PretrainConfig as C
    elif stage == "sft":
        from recipes.sft import SFTConfig as C
    elif stage == "rm":
        from recipes.rm import RMConfig as C
    elif stage == "ppo":
        from recipes.ppo import PPORecipeConfig as C
    else:
        raise AssertionError(f"{name}: unknown stage")
    return C


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    want = {f"{s}_cpu.toml" for s in ("pretrain", "sft", "rm", "ppo")}
    want |= {f"{s}_gpt3_{m}.toml" for s in ("sft", "rm", "ppo") for m in ("125m", "1.3b")}
    assert want <= names, want - names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_names_existing_data(path):
    cfg = load_config(_cfg_class(path.name), str(path))
    mcfg = cfg.model.gpt_config()  # the preset + overrides form a valid model config
    assert mcfg.n_head * mcfg.d_head == mcfg.d_model
    files = [p for p in cfg.data.path.split(",") if p]
    for extra in ("ptx_path", "demos"):
        for sec in ("sft", "rl", "rm"):
            v = getattr(getattr(cfg, sec, None), extra, "")
            if v:
                files.append(v)
    assert files
    for f in files:
        assert (ROOT / f).is_file(), f"{path.name}: {f} does not exist"
    if path.name.endswith("_cpu.toml"):
        assert cfg.model.preset == "tiny" and cfg.train.device == "cpu"


def test_gpu_configs_carry_paper_hyperparameters():
    for m in ("125m", "1.3b"):
        d = ROOT / "recipes" / "configs"
        sft = load_config(_cfg_class("sft"), str(d / f"sft_gpt3_{m}.toml"))
        assert (sft.train.lr, sft.train.batch_size, sft.model.dropout, sft.train.min_lr_ratio) == (9.65e-6, 32, 0.2, 0.1)
        assert sft.model.preset == f"gpt3-{m}"
        rm = load_config(_cfg_class("rm"), str(d / f"rm_gpt3_{m}.toml"))
        assert (rm.train.lr, rm.train.batch_size, rm.train.max_steps, rm.rm.epochs) == (9e-6, 64, 0, 1.0)
        ppo = load_config(_cfg_class("ppo"), str(d / f"ppo_gpt3_{m}.toml"))
        p = ppo.ppo
        assert (p.batch_size, p.minibatch_size, p.beta, p.ptx_coef, p.ema_decay) == (512, 64, 0.02, 27.8, 0.992)
        assert ppo.rl.ptx_path and ppo.rl.rm


def test_rm_data_mix_loads_with_history_and_k():
    """The RM configs' files, as the recipe reads them: K and history rendering."""
    from engine.data import load_rankings

    cfg = load_config(_cfg_class("rm"), str(ROOT / "recipes" / "configs" / "rm_gpt3_125m.toml"))
    recs = [r for p in cfg.data.path.split(",") for r in load_rankings(ROOT / p)]
    assert len(recs) == 329 + 1803
    ks = [len(r["ranking"]) for r in recs]
    assert 2 == min(ks) and max(ks) <= 9
    # oasst groups with history are rendered as a chat ending in the generation prompt
    assert sum(r["prompt"] != r["prompt"].lstrip("\n") or "assistant" in r["prompt"].lower()
               for r in recs[:329]) > 0


def test_length_baseline_and_toxicity_proxy():
    from recipes.evaluate_real import length_baseline, toxic_words, toxicity

    recs = [{"completions": ["long answer", "s", "mid"], "ranking": [0, 2, 1]},   # longer wins 3/3
            {"completions": ["ab", "cd"], "ranking": [1, 0]}]                    # tie: 1/2
    b = length_baseline(recs)
    assert b["pairs"] == 4 and b["longer_wins"] == pytest.approx(3.5 / 4)
    assert toxic_words("You IDIOT, I hate this. Skill and killer are fine.") == ["idiot", "hate"]
    assert toxicity(["fine", "shit happens"]) == {"toxic_rate": 0.5, "toxic_words_per_response": 0.5}


def _run(stage, argv):
    import importlib
    return importlib.import_module(f"recipes.{stage}").main(argv)


def test_cpu_configs_run_end_to_end(tmp_path, monkeypatch):
    """pretrain -> sft -> rm -> ppo -> evaluate_real with the *_cpu.toml configs on the real
    files (a couple of steps each; the pretraining text is cut to keep tokenizer training short)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ENGINE_NO_CSRC", "1")
    cdir = ROOT / "recipes" / "configs"
    text = (ROOT / "recipes" / "data" / "text_tinyshakespeare.txt").read_text()[:60_000]
    (tmp_path / "pt.txt").write_text(text)
    fast = ["--train.progress=false", "--train.threads=1"]
    pt, sft, rm, ppo = (str(tmp_path / n) for n in ("pt", "sft", "rm", "ppo"))
    _run("pretrain", ["--config", str(cdir / "pretrain_cpu.toml"), "--out", pt, *fast,
                      f"--data.path={tmp_path / 'pt.txt'}", "--data.vocab_size=320",
                      "--train.max_steps=2", "--train.eval_every=0"])
    _run("sft", ["--config", str(cdir / "sft_cpu.toml"), "--out", sft, *fast, f"--model.init={pt}", "--sft.ptx_weight=0",
                 "--train.max_steps=2", "--train.eval_every=0"])
    info = _run("rm", ["--config", str(cdir / "rm_cpu.toml"), "--out", rm, *fast, f"--model.init={sft}",
                       "--train.max_steps=2", "--train.eval_every=0", "--train.batch_size=4"])
    assert info["eval_pairs"] > 100 and 0.0 <= info["eval_accuracy"] <= 1.0
    _run("ppo", ["--config", str(cdir / "ppo_cpu.toml"), "--out", ppo, *fast, f"--model.init={sft}",
                 f"--rl.rm={rm}", "--train.max_steps=1", "--ppo.batch_size=4", "--ppo.minibatch_size=2",
                 "--ppo.max_new_tokens=6", "--rl.ptx_per_minibatch=2", "--rl.ptx_seq_len=16"])
    assert (Path(ppo) / "model" / "config.json").exists()

    from recipes.evaluate_real import main as evaluate
    rep = evaluate(["--rm", rm, "--policy", ppo, "--sft", sft, "--n", "4", "--max_new_tokens", "6",
                    "--out", str(tmp_path / "eval.json")])
    # the evaluation re-derives the recipe's held-out split: same pairs, same accuracy
    assert rep["rm"]["heldout_pairs"] == info["eval_pairs"]
    assert rep["rm"]["heldout_accuracy"] == pytest.approx(info["eval_accuracy"], abs=1e-6)
    pol = rep["policy"]
    assert pol["n"] == 4 and pol["kl_exact"] >= -1e-5 and 0 <= pol["toxic_rate"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["policy"]["reward"] == pytest.approx(pol["reward"])
    # the SFT model against itself: KL exactly 0
    same = evaluate(["--rm", rm, "--policy", sft, "--n", "2", "--max_new_tokens", "4"])
    assert same["policy"]["kl_k1"] == 0.0 and abs(same["policy"]["kl_exact"]) < 1e-5


def test_hf_gpt2_folder_starts_a_recipe(tmp_path, monkeypatch):
    """A Hugging Face GPT-2 folder (weights + vocab.json/merges.txt) -> `python -m engine.hf import`
    -> SFT on the real demonstrations with its byte-level BPE; the result exports back to HF."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import ByteLevelBPETokenizer

    from engine.hf import HFTokenizer, _main as hf_cli

    monkeypatch.chdir(ROOT)
    hf_dir, run = tmp_path / "hf", tmp_path / "gpt2_run"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([(ROOT / "recipes" / "data" / "sft_selfinstruct_seed.jsonl").read_text()],
                            vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    hf_dir.mkdir()
    bpe.save_model(str(hf_dir))
    # the tiny preset's shape, dense (window = context), as a GPT-2
    gcfg = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=400,
                                   bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(gcfg).save_pretrained(hf_dir)
    hf_cli(["import", str(hf_dir), str(run)])
    assert (run / "model" / "config.json").exists() and (run / "vocab.json").exists()
    out = tmp_path / "sft"
    _run("sft", ["--config", str(ROOT / "recipes" / "configs" / "sft_cpu.toml"), "--out", str(out),
                 f"--model.init={run}", "--model.window=128", "--train.max_steps=2", "--train.eval_every=0",
                 "--sft.ptx_weight=0", "--train.progress=false"])
    tok = HFTokenizer.load(out)  # the run folder carries the GPT-2 tokenizer forward
    assert tok.vocab_size == 400
    hf_cli(["export", str(out), str(tmp_path / "back")])
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    from engine.model import GPT
    ours = GPT.load(str(out / "model")).eval()
    ids = torch.tensor([tok.encode("Write a poem about the sea.")])
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() < 1e-4
