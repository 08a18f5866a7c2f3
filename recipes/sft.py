"""Supervised fine-tuning on demonstrations: loss on response tokens only (InstructGPT stage 1).

    python -m recipes.sft --model.init=runs/pretrain             # bundled self-instruct demos
    python -m recipes.sft --data.path=demos.jsonl --sft.ptx_path=corpus.txt --sft.ptx_weight=0.5
    torchrun --nproc_per_node 8 -m recipes.sft --config recipes/configs/sft_gpt3_1.3b.toml

Paper defaults: cosine decay to 10% of the LR, no warmup, residual dropout 0.2, and (given
--sft.rm=RUN) the checkpoint with the best reward-model score on held-out prompts is kept.
An optional pretraining LM term (sft.ptx_weight) keeps the base model's text distribution
("SFT w/ ptx" in the paper, which mixed 10% pretraining data).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from engine import dist
from engine.config import DataSection, DistSection, ModelSection, TrainConfig, section
from engine.data import TokenStream, encode_sft, load_sft, load_text, pack
from engine.losses import sft_loss
from engine.trainer import Trainer
from recipes import common


@dataclass
class SFTSection:
    ptx_path: str = ""           # plain text / {"text"} JSONL for an optional LM term
    ptx_weight: float = 0.0      # loss = sft + ptx_weight * lm_nll(ptx batch)
    ptx_batch_size: int = 8
    rm: str = ""                 # reward-model run: keep the eval checkpoint the RM scores best
    rm_prompts: int = 64         # held-out prompts scored at each eval when rm is set
    max_new_tokens: int = 48


@dataclass
class SFTConfig:
    model: ModelSection = section(lambda: ModelSection(dropout=0.2))
    data: DataSection = section(lambda: DataSection(path=str(common.DATA / "sft_selfinstruct_seed.jsonl"),
                                                    eval_fraction=0.1))
    train: TrainConfig = section(lambda: TrainConfig(max_steps=200, batch_size=16, lr=3e-4,
                                                     warmup_steps=0, weight_decay=0.0))
    sft: SFTSection = section(SFTSection)
    dist: DistSection = section(DistSection)


def masked_nll(m, ids, mask, seg=None):
    """Response-token NLL of packed rows: predict ids[:, 1:] from ids[:, :-1]; with segment ids
    seg [B, T] each packed demonstration attends only to itself."""
    logp = m(ids[:, :-1], targets=ids[:, 1:], segment_ids=None if seg is None else seg[:, :-1])
    return sft_loss(logp, mask[:, 1:].float())


def main(argv=None):
    cfg, out = common.parse(SFTConfig, argv, "sft")
    return run(cfg, out)


def run(cfg: SFTConfig, out: str) -> dict:
    device = common.setup(cfg, out)
    examples = load_sft(cfg.data.path)
    tok = common.tokenizer(cfg, out, lambda: [e["prompt"] + "\n" + e["response"] for e in examples])
    model = common.build_model(cfg, tok, device)
    T = min(cfg.data.seq_len, model.cfg.block_size)
    n_eval = max(1, int(len(examples) * cfg.data.eval_fraction)) if len(examples) > 1 else 0
    g = torch.Generator().manual_seed(cfg.train.seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    eval_ex = [examples[i] for i in perm[:n_eval]]
    train_ex = [examples[i] for i in perm[n_eval:]]
    enc = encode_sft(train_ex, tok, T)
    if not enc:
        raise SystemExit(f"{cfg.data.path}: no example fits data.seq_len={T}")
    ids, mask, seg = pack(enc, T, tok.pad_id, return_segments=True)
    eval_rows = (pack(encode_sft(eval_ex, tok, T), T, tok.pad_id, return_segments=True)
                 if eval_ex else None)
    if not cfg.data.mask_packed:  # packed demonstrations see their earlier neighbours
        seg = None
        eval_rows = eval_rows and eval_rows[:2] + (None,)
    dist.print0(f"[sft] {len(train_ex)} demos -> {ids.shape[0]} packed rows of {T} tokens "
                f"({enc.dropped} dropped, {enc.truncated} prompts truncated); {n_eval} held out")
    ptx = None
    if cfg.sft.ptx_path and cfg.sft.ptx_weight > 0:
        ptx = TokenStream.from_text(load_text(cfg.sft.ptx_path), tok)
    wrapped = common.wrap(cfg, model, device)

    n_trained = mask[:, 1:].sum(1)  # trained (response) tokens per packed row, on the host

    @functools.lru_cache(maxsize=2)
    def step_tokens(step: int) -> int:  # of the whole global batch; once per step, not per micro
        return int(n_trained[common.step_rows(cfg, ids.shape[0], step, trainer.micro_batch_size,
                                              trainer.accum)].sum())

    def batch_fn(step, micro):
        rows = common.rows_for(cfg, ids.shape[0], step, micro, trainer.micro_batch_size, trainer.accum)
        b = {"ids": ids[rows].to(device), "mask": mask[rows].to(device), "n": int(n_trained[rows].sum()),
             "seg": None if seg is None else seg[rows].to(device)}
        if ptx is not None:
            x, y = ptx.batch(cfg.sft.ptx_batch_size, T, common.step_generator(cfg, step, micro, salt=1))
            # The trainer weighs each micro batch by its response tokens (count_fn); the ptx
            # term, a mean over equal-sized batches, is rescaled so it stays a plain mean.
            mean_n = step_tokens(step) / (trainer.accum * dist.world_size())
            b["ptx"] = (x.to(device), y.to(device), mean_n / max(b["n"], 1))
        return b

    def loss_fn(m, b):
        loss = masked_nll(m, b["ids"], b["mask"], b["seg"])
        info = {"sft_loss": loss.detach(), "tokens": float(b["n"])}
        if "ptx" in b:
            x, y, scale = b["ptx"]
            ptx_nll = -m(x, targets=y).mean()
            loss = loss + cfg.sft.ptx_weight * scale * ptx_nll
            info["ptx_loss"] = ptx_nll.detach()
        return loss, info

    best = {"score": -float("inf")}
    rm, rm_prompts = _load_rm(cfg, eval_ex, tok, device)

    def eval_fn(m):
        res = {}
        if eval_rows is not None:
            res["loss"] = float(masked_nll(m, *(None if t is None else t.to(device) for t in eval_rows)))
        if rm is not None:  # paper: select the SFT model by RM score, not validation loss
            with dist.gathered(m):  # generate() bypasses an FSDP root's forward
                score = _rm_score(dist.unwrap(m), rm, tok, rm_prompts, cfg, device)
            res["rm_score"] = dist.reduce_floats([score])[0]  # one decision on every rank
            if res["rm_score"] > best["score"]:
                best["score"] = res["rm_score"]
                common.save_full(m, os.path.join(out, "best"))  # collective: full weights under FSDP
        return res

    trainer = Trainer(wrapped, cfg.train, out, loss_fn=loss_fn, batch_fn=batch_fn,
                      eval_fn=eval_fn if (eval_rows is not None or rm is not None) else None,
                      models={"model": model}, device=device, desc="sft", count_fn=lambda b: b["n"])
    info = trainer.fit()
    if rm is not None and os.path.exists(os.path.join(out, "best", "config.json")):
        from engine.checkpoint import load_weights
        load_weights(model, os.path.join(out, "best"))  # export the RM-selected checkpoint
    common.export(model, tok, out)
    dist.print0(f"[sft] done: step {trainer.step} loss {info.get('loss', float('nan')):.4f} -> {out}/model")
    return info


def _load_rm(cfg, eval_ex, tok, device):
    if not cfg.sft.rm:
        return None, None
    from recipes.rm import load_reward_model
    rm = load_reward_model(cfg.sft.rm, device, tok=tok).eval().requires_grad_(False)
    return rm, [e["prompt"] for e in eval_ex[: cfg.sft.rm_prompts]]


@torch.no_grad()
def _rm_score(model, rm, tok, prompts, cfg, device) -> float:
    """Mean RM score of greedy responses to held-out prompts."""
    from engine.rollout import generate_responses, score_responses
    roll = generate_responses(model, tok, prompts, max_new_tokens=cfg.sft.max_new_tokens, temperature=0.0)
    # head only: an RM with a reference term refers to the finished SFT policy, not to this one
    return float(score_responses(rm, roll, head_only=True).mean())


if __name__ == "__main__":
    common.cli(main)
