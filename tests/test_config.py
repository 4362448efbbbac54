import dataclasses

import pytest

from gpt_jax.config import FIELDS, Config, make_config, parse_overrides, preset_path, presets, read_preset
from gpt_jax.errors import ConfigError


def test_presets_hold_nanogpts_recipes():
    gpu = make_config("shakespeare_char")
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size, gpu.batch_size) == (6, 6, 384, 256, 64)
    assert (gpu.dropout, gpu.learning_rate, gpu.max_iters, gpu.warmup_iters) == (0.2, 1e-3, 5000, 100)
    assert (gpu.min_lr, gpu.beta2, gpu.eval_interval, gpu.eval_iters) == (1e-4, 0.99, 250, 200)
    cpu = make_config("configs/shakespeare_char_cpu.py")
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size, cpu.batch_size) == (4, 4, 128, 64, 12)
    assert (cpu.max_iters, cpu.lr_decay_iters, cpu.dropout, cpu.eval_iters) == (2000, 2000, 0.0, 20)
    course = make_config("course_gpt")
    assert (course.n_layer, course.n_head, course.n_embd, course.block_size) == (4, 4, 384, 128)
    assert (course.batch_size, course.dropout, course.learning_rate) == (32, 0.2, 3e-4)
    assert course.norm_position == "post" and not course.tie_embeddings  # the course's own lm_head
    assert make_config("bigram").model == "bigram"


def test_every_preset_is_valid():
    names = presets()
    assert {"bigram", "shakespeare_char", "shakespeare_char_cpu", "course_gpt",
            "finetune_shakespeare"} == set(names)
    for name in names:
        make_config(name)


def test_overrides_are_typed():
    values = parse_overrides(["--n_layer=3", "--bias=True", "--learning_rate=6e-4", "--dataset=x.txt"])
    assert values == {"n_layer": 3, "bias": True, "learning_rate": 6e-4, "dataset": "x.txt"}
    assert make_config("bigram", max_iters="7").max_iters == 7


def test_config_is_frozen_and_hashable():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 1
    assert hash(cfg) == hash(Config())


@pytest.mark.parametrize("overrides, message", [
    ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
    ({"learning_rate": -1.0}, "learning_rate must be a finite number >= 0"),
    ({"n_layer": 0}, "n_layer must be positive"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ({"norm_position": "middle"}, "norm_position must be one of pre, post"),
    ({"min_lr": 1.0}, "min_lr .* must not exceed learning_rate"),
    ({"batch_size": "many"}, "batch_size must be an integer"),
    ({"bias": "maybe"}, "bias must be True or False"),
    ({"n_layr": 2}, "unknown config key 'n_layr'; did you mean 'n_layer'"),
])
def test_impossible_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(**overrides)


def test_preset_files_hold_only_assignments(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    with pytest.raises(ConfigError, match="only `name = value` lines"):
        read_preset(str(bad))
    unknown = tmp_path / "unknown.py"
    unknown.write_text("n_layers = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'"):
        read_preset(str(unknown))


def test_presets_are_found_from_any_directory_but_a_mistyped_path_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert preset_path("configs/bigram.py") == preset_path("bigram")
    assert preset_path("bigram").read_text().startswith('"""The course\'s first model')
    for missing in ("my_experiments/bigram.py", "configs/nope.py", "nope"):
        with pytest.raises(ConfigError, match=f"config file {missing!r} not found; give an existing file"):
            preset_path(missing)
    mine = tmp_path / "my_experiments" / "bigram.py"
    mine.parent.mkdir()
    mine.write_text("n_layer = 3\n")
    assert read_preset("my_experiments/bigram.py") == {"n_layer": 3}


def test_every_key_has_a_one_line_description():
    for name, field in FIELDS.items():
        help_text = field.metadata.get("help", "")
        assert help_text and "\n" not in help_text and len(help_text) < 100, name


@pytest.mark.parametrize("key", ["device", "compile", "wandb_log", "backend"])
def test_nanogpt_habits_get_the_jax_way(key):
    with pytest.raises(ConfigError, match=f"{key} is a nanoGPT setting with no counterpart here: "):
        parse_overrides([f"--{key}=x"])


def test_course_gpt_starts_at_chance():
    """An untied output layer: the first loss is about ln V, as in the course (tied, it was 5.63 on a
    63-character corpus)."""
    import math

    import jax
    import numpy as np

    from gpt_jax.model import init_params, loss_fn

    cfg = make_config("course_gpt", vocab_size=63, dropout=0.0, block_size=32)  # its width and depth
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, 63, (4, cfg.block_size + 1), dtype=np.int32)
    loss = float(loss_fn(params, cfg, tokens[:, :-1], tokens[:, 1:]))
    assert abs(loss - math.log(63)) < 0.15, loss


def test_presets_are_found_without_importing_gpt_jax_configs():
    """A notebook kernel started before ``pip install -e .`` lacks the editable install's import hook
    that maps gpt_jax.configs onto configs/: the presets must still be found."""
    import subprocess
    import sys

    from conftest import ROOT

    code = """
import importlib.abc, sys
class NoConfigsPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gpt_jax.configs":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoConfigsPackage())
from gpt_jax.config import make_config
print(make_config("bigram").block_size)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "8", result.stderr[-2000:]


@pytest.mark.parametrize("name", ["warmup_iters", "lr_decay_iters", "eval_iters", "batch_size",
                                  "gradient_accumulation_steps"])
def test_sizes_and_steps_beyond_int32_are_refused(name):
    with pytest.raises(ConfigError, match=f"{name} must be below 2\\*\\*31, got 3000000000"):
        make_config(**{name: 3_000_000_000})
