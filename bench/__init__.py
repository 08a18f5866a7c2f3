"""Benchmarks: every kernel and training step side by side with its baselines.

    python -m bench                              # list the benchmarks
    python -m bench gae --quick --device cpu     # one benchmark, small shapes
    python -m bench all --quick --plot           # everything, plus PNGs of the sweeps
    python -m bench aot [--arch 90]              # compile-only resource check of every kernel config

Each benchmark module exposes `DESCRIPTION` and `run(run: bench.common.Run)`; rows go to
bench/results/<name>.csv (see bench/common.py for how time and memory are measured).
"""

# name -> (module, one-line description); `python -m bench all` runs them in this order.
BENCHMARKS = {
    "attention": ("bench.attention", "flash attention fwd / fwd+bwd, causal and banded: ours vs SDPA "
                                     "(flash, efficient), flash-attn, eager"),
    "logprob": ("bench.logprob", "fused linear -> log-softmax -> gather: ours (Triton / C++) vs "
                                 "chunked torch, eager, torch.compile, Liger FLCE"),
    "kl": ("bench.kl", "fused policy/ref logprobs + exact per-token KL: ours vs chunked torch, "
                       "eager, torch.compile"),
    "gae": ("bench.gae", "masked GAE: ours (Triton, CUDA, C++) vs the per-timestep Python loop "
                         "and a vectorized torch scan"),
    "steps": ("bench.steps", "end-to-end SFT / RM / PPO (rollout + update) steps: tokens/s, MFU, "
                             "peak memory, PPO generation/training split"),
    "ppo_vs_trl": ("bench.ppo_vs_trl", "one PPO iteration, recipes.ppo vs TRL 1.12 PPOTrainer on the "
                                       "same shapes (CPU): episodes/s, ratio, generate/score/train split"),
    "ppo_profile": ("bench.ppo_profile", "torch.profiler split of one recipes.ppo iteration (ppo_vs_trl "
                                         "shapes): GEMM / attention / engine ops / other ops / overhead"),
    "ceilings": ("bench.ceilings", "device ceilings: a large bf16 (CPU: fp32) matmul in TFLOP/s and a "
                                   "device-to-device copy in GB/s"),
}

# Tools that are not timings (own command line; not part of `all`).
COMMANDS = {
    "aot": ("bench.aot", "compile every Triton kernel config for sm_90 on any machine (no GPU "
                         "needed): shared memory, registers, spills; non-zero exit if one misfits"),
}

__all__ = ["BENCHMARKS", "COMMANDS"]
