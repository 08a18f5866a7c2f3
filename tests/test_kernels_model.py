"""Training the tiny model with the references (ENGINE_KERNELS=ref) and with the kernels gives
the same losses: the C++ CPU ops, the chunked PyTorch path, and the Triton kernels (interpreter)."""
import pytest
import torch

import kernels
from engine import GPT, GPTConfig

CFG = dict(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32, vocab_size=61, window=4)


def train_losses(monkeypatch, backend, steps=20):
    monkeypatch.setenv("ENGINE_KERNELS", backend)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", **CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(steps):  # one batch over and over: the loss must fall fast
        loss = -model.logprobs(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_tiny_training_matches_reference(monkeypatch, backend):
    if backend == "cpp":
        from kernels import _cpp
        if not _cpp.available():
            pytest.skip("C++ ops not built on this machine")
    ref = train_losses(monkeypatch, "ref")
    ours = train_losses(monkeypatch, backend)
    assert ref[-1] < ref[0] - 1.0  # it trains
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-4, atol=1e-4)


def test_backend_selection(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("ENGINE_KERNELS", "ref")
    assert kernels.backend(t) == "ref"
    monkeypatch.setenv("ENGINE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="ENGINE_KERNELS"):
        kernels.backend(t)
    monkeypatch.delenv("ENGINE_KERNELS")
    assert kernels.backend(t) in ("cpp", "torch")
