"""Pretrain a GPT on plain text (next-token prediction over random windows of a token stream).

    python -m recipes.pretrain                                   # tiny preset, bundled text, CPU
    python -m recipes.pretrain --config recipes/configs/pretrain.toml --train.max_steps=500
    torchrun --nproc_per_node 8 -m recipes.pretrain --model.preset=gpt3-125m --data.path=corpus.txt
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine import dist
from engine.config import DataSection, DistSection, ModelSection, TrainConfig, section
from engine.data import TokenStream, load_text, segments_from_eos
from engine.trainer import Trainer
from recipes import common

DEFAULT_TEXT = ",".join(str(common.DATA / f) for f in ("text_tinyshakespeare.txt", "text_wikitext2_valid.txt"))


@dataclass
class PretrainConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(lambda: DataSection(path=DEFAULT_TEXT))
    train: TrainConfig = section(lambda: TrainConfig(max_steps=300, batch_size=16, lr=1e-3))
    dist: DistSection = section(DistSection)


def main(argv=None):
    cfg, out = common.parse(PretrainConfig, argv, "pretrain")
    return run(cfg, out)


def run(cfg: PretrainConfig, out: str) -> dict:
    device = common.setup(cfg, out)
    paths = [p for p in cfg.data.path.split(",") if p]
    texts = [load_text(p) for p in paths]
    tok = common.tokenizer(cfg, out, lambda: texts)
    # Hold out the tail of each file for evaluation; train on the rest.
    cut = [int(len(t) * (1 - cfg.data.eval_fraction)) for t in texts]
    train = TokenStream.from_text([t[:c] for t, c in zip(texts, cut)], tok,
                                  os.path.join(out, "tokens", "train.bin") if dist.is_main() else None)
    val = TokenStream.from_text([t[c:] for t, c in zip(texts, cut)], tok)
    model = common.build_model(cfg, tok, device)
    wrapped = common.wrap(cfg, model, device)
    T = min(cfg.data.seq_len, model.cfg.block_size)

    # windows of the EOS-separated stream: with data.mask_packed a document never attends
    # across an EOS into the one before it, and its positions restart at 0
    eos = tok.eos_id if cfg.data.mask_packed else None

    def batch_fn(step, micro):
        x, y = train.batch(trainer.micro_batch_size, T, common.step_generator(cfg, step, micro))
        return x.to(device), y.to(device)

    def loss_fn(m, batch):
        x, y = batch
        seg = None if eos is None else segments_from_eos(x, eos)
        return -m(x, targets=y, segment_ids=seg).mean(), {"tokens": x.numel()}

    def eval_fn(m):
        g = torch.Generator().manual_seed(1234)
        losses = [_val_nll(m, val.batch(8, T, g), device, eos)
                  for _ in range(cfg.train.eval_batches)]
        return {"loss": float(torch.stack(losses).mean())}

    trainer = Trainer(wrapped, cfg.train, out, loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn,
                      models={"model": model}, device=device, desc="pretrain")
    info = trainer.fit()
    common.export(model, tok, out)
    shown = " ".join(f"{k} {info[k]:.4f}" for k in ("loss", "eval_loss") if k in info)
    dist.print0(f"[pretrain] done: step {trainer.step} {shown} -> {out}/model")
    return info


def _val_nll(m, batch, device, eos=None):
    x, y = (t.to(device) for t in batch)
    return -m(x, targets=y, segment_ids=None if eos is None else segments_from_eos(x, eos)).mean()


if __name__ == "__main__":
    common.cli(main)
