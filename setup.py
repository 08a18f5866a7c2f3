"""Install: pip install -e .[dev]

The C++/CUDA ops in csrc/ are compiled on first use (torch.utils.cpp_extension JIT, cached),
so this file never imports torch: pip's isolated build environment would otherwise fetch a
second multi-GB torch. Set ENGINE_NO_CSRC=1 to never build them (pure-PyTorch fallback).
"""
import sys

from setuptools import find_packages, setup

triton = [] if sys.platform in ("darwin", "win32") else ["triton>=3.0"]

setup(
    name="instructgpt-engine",
    version="0.1.0",
    description="A small, fast GPT-3 / InstructGPT (SFT, K-wise RM, PPO-ptx) training engine",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "recipes", "recipes.*", "bench", "bench.*"]),
    # csrc/ is compiled from the source tree (pip install -e .); without it kernels fall back to PyTorch.
    package_data={"recipes": ["configs/*.toml", "data/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5,<=2.14.1",
        *triton,
        "numpy",
        "sentencepiece",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],
        # transformers 5.25 made Hugging Face's `kernels` package a dependency: its top-level
        # name is this project's `kernels`, and from site-packages it shadows ours
        "hf": ["transformers<5.25", "tokenizers"],
        # tensorboard: train.tensorboard=true (torch.utils.tensorboard needs it) and its test
        "tensorboard": ["tensorboard"],
        "dev": ["pytest", "ninja", "matplotlib", "transformers<5.25", "tokenizers", "tensorboard"],
    },
)
