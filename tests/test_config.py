import pytest

from engine.config import GPTConfig, TrainConfig, load_config, to_toml
from recipes.sft import SFTConfig

# GPT-3 paper Table 2.1 (n_params, n_layer, d_model, n_head, d_head); rows 1.3B and 13B are
# internally inconsistent in the paper and use the corrected reading documented in config.py.
TABLE = {
    "gpt3-125m": (125e6, 12, 768, 12, 64),
    "gpt3-350m": (350e6, 24, 1024, 16, 64),
    "gpt3-760m": (760e6, 24, 1536, 16, 96),
    "gpt3-1.3b": (1.3e9, 24, 2048, 16, 128),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128),
    "gpt3-13b": (13.0e9, 40, 5120, 40, 128),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_match_paper_on_meta(name):
    import torch

    from engine import GPT
    n, L, d, h, dh = TABLE[name]
    cfg = GPTConfig.from_preset(name)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_head, cfg.block_size) == (L, d, h, dh, 2048)
    with torch.device("meta"):
        model = GPT(cfg)
    count = model.num_params()
    assert count == cfg.num_params()
    assert abs(count - n) / n < 0.03, f"{name}: {count / 1e9:.3f}B params vs paper {n / 1e9}B"


def test_unknown_preset_and_field():
    with pytest.raises(KeyError, match="valid: gpt3-125m"):
        GPTConfig.from_preset("gpt4")
    with pytest.raises(KeyError, match="n_layers"):
        GPTConfig.from_preset("tiny", n_layers=3)


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nlr = 1e-3\nmax_steps = 7\n[model]\npreset = "gpt3-125m"\n')
    cfg = load_config(SFTConfig, str(p), ["--train.lr=3", "--model.dropout=0.1", "--train.progress=false"])
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.preset == "gpt3-125m" and cfg.model.dropout == 0.1
    assert cfg.train.progress is False
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_config(SFTConfig, str(again)) == cfg


def test_override_errors_list_valid_keys():
    with pytest.raises(KeyError, match="valid keys in train: .*max_steps"):
        load_config(SFTConfig, None, ["--train.max_step=3"])
    with pytest.raises(KeyError, match="unknown section 'trian'"):
        load_config(SFTConfig, None, ["--trian.lr=3"])
    with pytest.raises(ValueError, match="train.max_steps: expected int"):
        load_config(SFTConfig, None, ["--train.max_steps=1.5"])
    with pytest.raises(ValueError, match="expected bool"):
        load_config(SFTConfig, None, ["--train.progress=maybe"])


def test_bad_toml_names_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train\nlr=1")
    with pytest.raises(ValueError, match="bad.toml: invalid TOML"):
        load_config(SFTConfig, str(p))
    p.write_text("[train]\nlearning_rate = 1.0\n")
    with pytest.raises(KeyError, match="bad.toml: unknown key 'train.learning_rate'"):
        load_config(SFTConfig, str(p))


def test_lr_schedule_warmup_cosine():
    from engine.trainer import lr_at
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
