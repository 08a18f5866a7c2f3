"""engine: GPT-3 model, data, losses, PPO math, and the training loop of the InstructGPT stages.

    import engine
    model = engine.GPT(engine.GPTConfig.from_preset("gpt3-125m"))
"""
from .config import GPTConfig, load_config
from .model import GPT, KVCache, RewardEnsemble, RewardModel

_LAZY = {
    "ranking_loss": ("losses", "ranking_loss"),
    "sft_loss": ("losses", "sft_loss"),
    "ppo_policy_loss": ("losses", "ppo_policy_loss"),
    "value_loss": ("losses", "value_loss"),
    "Tokenizer": ("tokenizer", "Tokenizer"),
    "Trainer": ("trainer", "Trainer"),
    "DataError": ("data", "DataError"),
}

__all__ = ["GPTConfig", "GPT", "KVCache", "RewardModel", "RewardEnsemble", "load_config", "gae", *_LAZY]


def gae(rewards, values, mask, *, gamma, lam):
    """Alias of kernels.gae: masked GAE -> (advantages, returns)."""
    import kernels
    return kernels.gae(rewards, values, mask, gamma=gamma, lam=lam)


def __getattr__(name):  # lazy: `import engine` stays cheap and free of optional deps
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
