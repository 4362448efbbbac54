"""gpt_jax: a GPT language model built from scratch in JAX/Flax.

The names a notebook needs::

    params, cfg, tok, meta = gpt_jax.load_checkpoint("out-shakespeare-char-cpu")
    out = gpt_jax.generate(params, cfg, tok.encode("ROMEO:"), jax.random.PRNGKey(0), 200)
    print(tok.decode(out.tokens[0]))

Names are imported on first use (PEP 562), so ``import gpt_jax`` is quick and does not start JAX: the
worker processes of ``gpt_jax.prepare`` and command lines that only prepare data never load it.
"""

import importlib
from typing import Any

# the public names, by the module that defines them
_MODULES = {
    "analysis": ("TextScore", "attention_weights", "score_text", "token_logprobs"),
    "checkpoint": ("Checkpointer", "load_checkpoint"),
    "config": ("Config", "make_config"),
    "data": ("TokenData", "load_data"),
    "hf": ("load_pretrained", "save_pretrained"),
    "errors": (
        "CheckpointError", "ConfigError", "DataError", "GenerationTooLargeError", "GptJaxError",
        "IncompatibleCheckpointError", "MissingDependencyError", "NoCheckpointError", "NonFiniteLossError",
        "NonFiniteModelError", "RunLockedError", "TokenizerError"
    ),
    "model": (
        "cached_logits_fn", "compute_dtype", "count_params", "cross_entropy", "init_cache", "init_params",
        "logits_fn", "loss_fn"
    ),
    "sampling": ("Generation", "Generator", "generate", "generate_reference", "sample_logits"),
    "state": ("TrainState", "abstract_state", "init_state", "lr_schedule", "make_optimizer"),
    "tokenizer": (
        "BpeTokenizer", "ByteTokenizer", "CharTokenizer", "Gpt2Tokenizer", "Tokenizer", "normalize_text",
        "tokenizer_from_json"
    ),
    "training": ("TrainResult", "evaluate", "make_train_step", "read_metrics", "setup_data", "train"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``gpt_jax.data``), imported when first asked for."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"gpt_jax.{_EXPORTS[name]}"), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"gpt_jax.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"gpt_jax.{name}":
                raise
            raise AttributeError(f"module 'gpt_jax' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'gpt_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
