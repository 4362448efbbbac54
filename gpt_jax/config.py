"""One typed, frozen configuration with nanoGPT's names; presets, command-line overrides, checks.

A preset is a small Python file of assignments (``n_layer = 4``), as in nanoGPT. The command line
overrides any field with ``--name=value``. Everything is validated in one place, and a wrong name or
an impossible value raises :class:`ConfigError` naming the field and what would be accepted.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any

from gpt_jax.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run. Frozen and hashable, so it can be a static argument of ``jax.jit``."""

    # model
    model: str = "gpt"  # "gpt" or "bigram"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.2
    bias: bool = False
    vocab_size: int = 0  # 0: taken from the tokenizer
    pos_encoding: str = "learned"  # "learned" (GPT-2, the course) or "sinusoidal" (the paper)
    norm_position: str = "pre"  # "pre" (GPT-2, nanoGPT) or "post" (the course's Block)
    tie_embeddings: bool = True
    # how the model is computed (none of these changes the function it computes)
    dtype: str = "auto"  # compute dtype: "auto" (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16
    attention: str = "auto"  # "auto", "xla", "cudnn" (NVIDIA flash attention) or "pallas" (TPU kernel)
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    scan_layers: bool = False  # one lax.scan over stacked layers (compile time of deep models)
    # data
    dataset: str = "tiny_shakespeare"  # "tiny_shakespeare" or a path to a .txt file or folder
    data_dir: str = "~/.cache/gpt_jax"  # tfds data and token caches
    source_file: str = ""  # a local copy of a tfds dataset's download (offline use)
    val_fraction: float = 0.1  # last fraction of a local corpus used for validation
    # optimisation
    batch_size: int = 64  # sequences per micro-batch over all devices
    gradient_accumulation_steps: int = 1  # micro-batches summed into one update
    learning_rate: float = 1e-3
    max_iters: int = 5000
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: max_iters
    min_lr: float = 1e-4
    decay_lr: bool = True
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: no clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    out_dir: str = "out"
    init_from: str = "scratch"  # "scratch" or "resume"
    always_save_checkpoint: bool = False
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm progress bar
    seed: int = 1337
    # devices and hosts
    fsdp: bool = False  # shard parameters and optimizer state over the devices, not only the batch
    distributed: bool = False  # call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)
_CHOICES = {
    "model": ("gpt", "bigram"),
    "pos_encoding": ("learned", "sinusoidal"),
    "norm_position": ("pre", "post"),
    "init_from": ("scratch", "resume"),
    "dtype": ("auto", "float32", "bfloat16"),
    "attention": ("auto", "xla", "cudnn", "pallas"),
}
_POSITIVE = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
             "eval_interval", "eval_iters", "log_interval", "keep_checkpoints",
             "gradient_accumulation_steps")
_NON_NEGATIVE = ("vocab_size", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr",
                 "weight_decay", "grad_clip")


def coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (a string from the command line, or a Python value) to field ``name``'s type."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(FIELDS)}"
        raise ConfigError(f"unknown config key {name!r}; {hint}")
    kind = _TYPES[name]
    if isinstance(value, str) and kind is not str:
        value = _parse_literal(name, value, kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _parse_literal(name: str, text: str, kind: type) -> Any:
    if kind is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
        return text.lower() in ("true", "1", "yes")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        expected = {bool: "True or False", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{name} must be {expected}, got {text!r}") from None


def validate(cfg: Config) -> Config:
    """Return ``cfg`` if every value is possible, else raise ConfigError saying which and why."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        value = getattr(cfg, name)
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}); "
            f"try n_head in {[h for h in range(1, 17) if cfg.n_embd % h == 0]}"
        )
    if cfg.pos_encoding == "sinusoidal" and cfg.n_embd % 2:
        raise ConfigError(f"sinusoidal positions need an even n_embd, got {cfg.n_embd}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"min_lr ({cfg.min_lr}) must not exceed learning_rate ({cfg.learning_rate})")
    if not cfg.dataset:
        raise ConfigError("dataset is empty; give tiny_shakespeare or a path to a .txt file or folder")
    return cfg


def preset_path(name_or_path: str) -> Path:
    """Resolve ``configs/NAME.py``, ``NAME`` or any path to a preset file."""
    path = Path(name_or_path).expanduser()
    # As given; then as a preset name, so `configs/NAME.py` works from any directory.
    candidates = [path, CONFIGS_DIR / f"{path.stem}.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py")) if CONFIGS_DIR.is_dir() else []
    raise ConfigError(f"config file {name_or_path!r} not found; presets: {', '.join(known)}")


def read_preset(name_or_path: str) -> dict[str, Any]:
    """The assignments of a preset file, as {field: value}. Only literal values are accepted."""
    path = preset_path(name_or_path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: a config file holds only `name = value` lines")
        name = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: {name} must be a literal value") from None
        values[name] = coerce(name, value)
    return values


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--n_layer=4", "--bias=True"]`` -> {"n_layer": 4, "bias": True}."""
    values: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --name=value, got {arg!r}")
        name, _, text = arg[2:].partition("=")
        values[name] = coerce(name, text)
    return values


def make_config(preset: str | None = None, **overrides: Any) -> Config:
    """A validated Config from an optional preset and keyword overrides (the notebook entry point)."""
    values = read_preset(preset) if preset else {}
    values.update({k: coerce(k, v) for k, v in overrides.items()})
    return validate(Config(**values))


def default_preset() -> str:
    """nanoGPT's GPU recipe on an accelerator, its CPU recipe otherwise."""
    import jax

    return "shakespeare_char" if jax.default_backend() != "cpu" else "shakespeare_char_cpu"


def expand(path: str) -> Path:
    return Path(os.path.expandvars(path)).expanduser()


# Fields that fix the parameters' shapes or layout: a checkpoint resumes only with the same values.
MODEL_FIELDS = ("model", "n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "pos_encoding",
                "norm_position", "tie_embeddings", "scan_layers")
# Fields that never matter to a resume (how it was started, where it was written).
_RUN_FIELDS = ("init_from", "out_dir", "progress")


def resume_differences(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """(model changes, other changes) from ``saved`` to ``new``, each as "name old -> new"."""
    model, other = [], []
    for name in FIELDS:
        old, value = getattr(saved, name), getattr(new, name)
        if old == value or name in _RUN_FIELDS:
            continue
        (model if name in MODEL_FIELDS else other).append(f"{name} {old!r} -> {value!r}")
    return model, other
