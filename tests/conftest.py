"""Shared fixtures: the reference corpus, a tiny model config and a prepared Tiny Shakespeare."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.0,
            max_iters=20, warmup_iters=2, lr_decay_iters=20, eval_interval=10, eval_iters=2,
            log_interval=5, progress=False, learning_rate=3e-3, min_lr=3e-4)


def pytest_configure(config):
    """One JAX compilation cache per test run, shared by the xdist workers and every subprocess; no
    Hugging Face downloads.

    Many tests compile the same small programs (the tiny model's steps, the CLIs' subprocesses); the
    cache makes the second and later compiles cheap. Set here, in the controlling process, before any
    import of jax: workers and subprocesses inherit the environment. A cache of your own is kept.
    """
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config._jax_cache = tempfile.mkdtemp(prefix="gpt_jax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jax_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # Tests never reach the network, and never see the GPT-2 models a developer downloaded.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = os.path.join(config._jax_cache, "empty-hugging-face-cache")


def pytest_unconfigure(config):
    if getattr(config, "_jax_cache", None):
        shutil.rmtree(config._jax_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def shakespeare_file() -> Path:
    """The Tiny Shakespeare input.txt shipped inside the package."""
    from gpt_jax.prepare import packaged_tiny_shakespeare

    return packaged_tiny_shakespeare()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data directory per test session, so tfds prepares Tiny Shakespeare once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def shakespeare(shakespeare_file, data_dir):
    """Tiny Shakespeare through the tfds path, tokenised."""
    from gpt_jax.config import make_config
    from gpt_jax.data import load_data

    return load_data(make_config(source_file=str(shakespeare_file), data_dir=str(data_dir)))


@pytest.fixture
def tiny_cfg(shakespeare_file, data_dir, tmp_path):
    """A small GPT on Tiny Shakespeare, writing into this test's own out_dir."""
    from gpt_jax.config import make_config

    return make_config(source_file=str(shakespeare_file), data_dir=str(data_dir),
                       out_dir=str(tmp_path / "out"), **TINY)


def cli_args(shakespeare_file, data_dir, out_dir, values: dict) -> list[str]:
    """``--key=value`` options for train.py: ``values`` on Tiny Shakespeare, writing into ``out_dir``."""
    values = {**values, "source_file": shakespeare_file, "data_dir": data_dir, "out_dir": out_dir}
    return [f"--{k}={v}" for k, v in values.items()]


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 300):
    """Run ``python script args`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def load_script(script: str):
    """A command-line script (``sample.py``) imported as a module, to test its functions directly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.removesuffix(".py") + "_under_test", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
