"""Presets: literal-only Python files of ``name = value`` lines, installed as ``gpt_jax.configs``."""
