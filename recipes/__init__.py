"""Recipes: one thin script per InstructGPT stage, plus the end-to-end pipeline.

    python -m recipes.<stage> [--config FILE.toml] [--out DIR] [--section.key=value ...]
"""
