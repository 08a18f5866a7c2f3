"""The training loop's hot path: models built on their device, one host transfer per step."""
from __future__ import annotations

import sys
import time

import torch

from engine import GPT, GPTConfig, RewardModel
from engine.model import build


def test_build_on_device_equals_plain_construction():
    cfg = GPTConfig.from_preset("tiny", vocab_size=64)
    for cls in (GPT, RewardModel):
        torch.manual_seed(3)
        a = cls(cfg)
        torch.manual_seed(3)
        b = build(cls, cfg, "cpu")
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), cls
    assert b.trunk.lm_head_weight is b.trunk.wte.weight  # still tied
    # no init at all when weights are loaded next; a 1.3B model on meta costs nothing
    t = time.perf_counter()
    big = build(GPT, GPTConfig.from_preset("gpt3-1.3b"), "meta")
    assert time.perf_counter() - t < 5 and big.wte.weight.is_meta


def test_one_host_transfer_per_step(monkeypatch):
    """update() moves the logged values (loss, infos, grad norm) to the host once, not once per
    micro batch or value."""
    from engine.config import TrainConfig
    from engine.trainer import Trainer
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=32, block_size=16))
    trainer = Trainer(model, TrainConfig(batch_size=4, micro_batch_size=1), "/nonexistent",
                      loss_fn=None, batch_fn=lambda s, m: None)
    x = torch.randint(0, 32, (1, 8))
    calls = []
    names = ("tolist", "item", "__float__", "__bool__")
    real = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def wrapped(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "/engine/" in caller or "/recipes/" in caller:  # the loop's own transfers
                calls.append(f"{name} {caller}:{sys._getframe(1).f_lineno}")
            return real[name](self, *a, **k)
        return wrapped
    for n in names:
        monkeypatch.setattr(torch.Tensor, n, counting(n))

    def loss_fn(m, b):
        lp = m(b[:, :-1], targets=b[:, 1:])
        return -lp.mean(), {"nll": -lp.detach().mean(), "tokens": 7.0}
    info = trainer.update([x] * 4, loss_fn)
    assert set(info) >= {"loss", "nll", "grad_norm", "tokens"} and info["tokens"] == 28.0
    assert len(calls) == 1, calls
