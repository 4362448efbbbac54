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


def _configs_dir() -> Path:
    """The presets: the repository's configs/, installed as gpt_jax/configs/. Found by path rather
    than by importing ``gpt_jax.configs``: an editable install maps that name with an import hook that
    a Python process started before the install (a notebook kernel) does not have."""
    package = Path(__file__).resolve().parent
    installed, checkout = package / "configs", package.parent / "configs"
    return installed if installed.is_dir() else checkout


CONFIGS_DIR = _configs_dir()
PRESETS_FOLDER = "configs"  # `configs/NAME.py` names a bundled preset from any working directory


def _field(default: Any, help: str) -> Any:
    """A Config field with its one-line description (shown by ``train.py --help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run. Frozen and hashable, so it can be a static argument of ``jax.jit``."""

    # model
    model: str = _field("gpt", "gpt, or the course's first model: bigram")
    n_layer: int = _field(6, "transformer blocks")
    n_head: int = _field(6, "attention heads per block")
    n_embd: int = _field(384, "width of the residual stream (embedding size)")
    block_size: int = _field(256, "context length in tokens")
    dropout: float = _field(0.2, "dropout rate while training (0 = none)")
    bias: bool = _field(False, "biases in linear layers and layer norms")
    vocab_size: int = _field(0, "vocabulary size; 0 takes it from the tokenizer (bpe: the size to train, "
                             "0 = 4096)")
    pos_encoding: str = _field("learned", "learned (GPT-2, the course) or sinusoidal (the paper)")
    norm_position: str = _field("pre", "layer norm before (pre: GPT-2, nanoGPT) or after (post: the course)")
    tie_embeddings: bool = _field(True, "share the token embedding with the output layer (lm_head)")
    # how the model is computed (none of these changes the function it computes)
    dtype: str = _field("auto", "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 "
                        "or bfloat16")
    attention: str = _field("auto", "attention kernel: auto, xla, cudnn (NVIDIA) or pallas (TPU)")
    remat: bool = _field(False, "recompute each block's activations in the backward pass (less memory)")
    scan_layers: bool = _field(False, "one lax.scan over stacked layers (faster compiles of deep models)")
    # data
    dataset: str = _field("tiny_shakespeare", "tiny_shakespeare, a text file, a folder, .jsonl or archive "
                          "of documents, or tfds:NAME[:FEATURE]")
    data_dir: str = _field("~/.cache/gpt_jax", "where tokenised data is cached")
    source_file: str = _field("", "a local copy of tiny_shakespeare's input.txt (instead of the bundled one)")
    val_fraction: float = _field(0.1, "validation share: the end of one text, else documents picked by "
                                 "their name's hash")
    tokenizer: str = _field("char", "char (the corpus's characters), byte (UTF-8), bpe (trained on the "
                            "training split) or gpt2")
    encoding_file: str = _field("", "gpt2 tokenizer: a local tiktoken ranks file, for a machine without "
                                "network")
    text_field: str = _field("text", "the field of a .jsonl line (or tfds example) that holds the text")
    errors: str = _field("strict", "a document that is not UTF-8, JSON or has no text: strict (stop) or skip")
    num_proc: int = _field(0, "worker processes that tokenise a corpus; 0 = one per core")
    # optimisation
    batch_size: int = _field(64, "sequences per micro-batch over all devices")
    gradient_accumulation_steps: int = _field(1, "micro-batches summed into one update")
    learning_rate: float = _field(1e-3, "peak learning rate")
    max_iters: int = _field(5000, "total optimizer steps")
    warmup_iters: int = _field(100, "steps of linear warmup")
    lr_decay_iters: int = _field(0, "step where cosine decay reaches min_lr; 0 = max_iters")
    min_lr: float = _field(1e-4, "learning rate at the end of the decay")
    decay_lr: bool = _field(True, "warmup and cosine decay; False keeps learning_rate constant")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.99, "AdamW beta2")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = _field(1.0, "clip gradients to this global norm; 0 = no clipping")
    # evaluation, logging, checkpoints
    eval_interval: int = _field(250, "steps between evaluations (and checkpoint saves)")
    eval_iters: int = _field(200, "batches per split in each evaluation")
    log_interval: int = _field(10, "steps between log lines")
    out_dir: str = _field("out", "directory for checkpoints and metrics.jsonl")
    init_from: str = _field("scratch", "scratch, resume, auto (resume if there is one), "
                            "gpt2(-medium, -large, -xl) or a model folder")
    always_save_checkpoint: bool = _field(False, "save at every evaluation, not only when val loss improves")
    keep_checkpoints: int = _field(2, "newest checkpoints kept in out_dir")
    progress: bool = _field(True, "show a progress bar")
    seed: int = _field(1337, "random seed of initialisation, batches and dropout (0 <= seed < 2**32)")
    # devices and hosts
    fsdp: bool = _field(False, "shard parameters and optimizer state over the devices, not only the batch")
    distributed: bool = _field(False, "start JAX's multi-process runtime (also when "
                               "JAX_COORDINATOR_ADDRESS is set)")

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
    "tokenizer": ("char", "byte", "bpe", "gpt2"),
    "errors": ("strict", "skip"),
    "dtype": ("auto", "float32", "bfloat16"),
    "attention": ("auto", "xla", "cudnn", "pallas"),
}
_POSITIVE = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
             "eval_interval", "eval_iters", "log_interval", "keep_checkpoints",
             "gradient_accumulation_steps")
_NON_NEGATIVE = ("vocab_size", "num_proc", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr",
                 "weight_decay", "grad_clip")


# Keys nanoGPT users type out of habit, with what to do instead here.
_JAX_DEVICES = ("JAX uses every GPU or TPU it finds, else the CPU; to force the CPU run with the "
                "environment variable JAX_PLATFORMS=cpu")
NANOGPT_KEYS = {
    "device": _JAX_DEVICES,
    "device_type": _JAX_DEVICES,
    "compile": "functions are always compiled with jax.jit here; drop --compile",
    "backend": "JAX's multi-process runtime needs no communication backend; see --distributed",
    "ddp": "data parallelism is always on over every device JAX finds; see --fsdp and --distributed",
    "wandb_log": "metrics go to <out_dir>/metrics.jsonl (one JSON object per line); drop --wandb_log",
    "wandb_project": "metrics go to <out_dir>/metrics.jsonl; drop --wandb_project",
    "wandb_run_name": "metrics go to <out_dir>/metrics.jsonl; drop --wandb_run_name",
    "eval_only": ("evaluate a checkpoint from Python: gpt_jax.evaluate(params, cfg, "
                  "gpt_jax.load_data(cfg))"),
}


def coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (a string from the command line, or a Python value) to field ``name``'s type.

    Raises ConfigError for an unknown key (with the nearest known one, or what to do instead of a
    nanoGPT-only key) or a value of the wrong type.
    """
    if name in NANOGPT_KEYS:
        raise ConfigError(f"{name} is a nanoGPT setting with no counterpart here: {NANOGPT_KEYS[name]}")
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
    if not cfg.init_from:
        raise ConfigError("init_from is empty; give scratch, resume, auto, gpt2 (or gpt2-medium, gpt2-large, "
                          "gpt2-xl) or a Hugging Face model folder")
    if cfg.dtype == "float16":
        raise ConfigError("dtype=float16 is not offered: use auto (bfloat16 on GPU/TPU, which needs no "
                          "loss scaling) or float32")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    for name, kind in _TYPES.items():  # steps and sizes are int32 on the device
        if kind is int and name != "seed" and getattr(cfg, name) >= 2**31:
            raise ConfigError(f"{name} must be below 2**31, got {getattr(cfg, name)}")
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
        raise ConfigError("dataset is empty; give tiny_shakespeare, a path to a text file or folder, or "
                          "tfds:NAME")
    if not cfg.text_field:
        raise ConfigError("text_field is empty; give the name of the field that holds the text")
    return cfg


def presets() -> list[str]:
    """The names of the bundled presets."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


def preset_path(name_or_path: str) -> Path:
    """The preset file named by ``name_or_path``: a path as given, else a bundled preset named ``NAME``
    or ``configs/NAME.py`` (from any working directory). Any other path with a folder in it must exist:
    a mistyped path never falls back to a bundled preset of the same name.

    Raises ConfigError when there is no such file.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = CONFIGS_DIR / f"{path.stem}.py"
    names_a_preset = path.parent == Path(".") or path.parent == Path(PRESETS_FOLDER)
    if names_a_preset and path.suffix in ("", ".py") and path.stem in presets():
        return bundled
    raise ConfigError(f"config file {name_or_path!r} not found; give an existing file or a preset: "
                      f"{', '.join(presets())}")


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


INIT_FROM_RUNS = ("scratch", "resume", "auto")  # the init_from values that are not pretrained weights
# What pretrained weights decide (hf.pretrained_config reads them from the weights' config.json).
PRETRAINED_FIELDS = ("model", "n_layer", "n_head", "n_embd", "bias", "vocab_size", "pos_encoding",
                     "norm_position", "tie_embeddings", "tokenizer")


def is_pretrained(init_from: str) -> bool:
    """Whether ``init_from`` names pretrained weights (a GPT-2 name or a model folder)."""
    return init_from not in INIT_FROM_RUNS


def make_config(preset: str | None = None, **overrides: Any) -> Config:
    """A validated Config from an optional preset and keyword overrides (the notebook entry point).

    Raises ConfigError for a bad value, or for a field of PRETRAINED_FIELDS set next to a pretrained
    ``init_from`` (the weights decide it).
    """
    values = read_preset(preset) if preset else {}
    values.update({k: coerce(k, v) for k, v in overrides.items()})
    fixed = [k for k in PRETRAINED_FIELDS if k in values]
    if fixed and is_pretrained(values.get("init_from", "scratch")):
        in_preset = [k for k in fixed if k not in overrides]
        where = (f" ({preset} sets {', '.join(in_preset)}: use a preset without them, such as "
                 "finetune_shakespeare)") if in_preset else ""
        raise ConfigError(f"init_from={values['init_from']} takes {', '.join(fixed)} from the pretrained "
                          f"weights; drop those settings{where}")
    return validate(Config(**values))


def default_preset() -> str:
    """nanoGPT's GPU recipe on an accelerator, its CPU recipe otherwise."""
    import jax

    return "shakespeare_char" if jax.default_backend() != "cpu" else "shakespeare_char_cpu"


def expand(path: str) -> Path:
    return Path(os.path.expandvars(path)).expanduser()
