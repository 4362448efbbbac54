"""gpt_jax: a GPT language model built from scratch in JAX/Flax.

The names a notebook needs::

    params, cfg, tok, meta = gpt_jax.load_checkpoint("out-shakespeare-char-cpu")
    out = gpt_jax.generate(params, cfg, tok.encode("ROMEO:"), jax.random.PRNGKey(0), 200)
    print(tok.decode(out.tokens[0]))
"""

from gpt_jax.analysis import TextScore, attention_weights, score_text, token_logprobs
from gpt_jax.checkpoint import Checkpointer, load_checkpoint
from gpt_jax.config import Config, make_config
from gpt_jax.data import TokenData, load_data
from gpt_jax.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenerationTooLargeError,
    GptJaxError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    NoCheckpointError,
    NonFiniteLossError,
    NonFiniteModelError,
    RunLockedError,
    TokenizerError,
)
from gpt_jax.model import (
    cached_logits_fn,
    compute_dtype,
    count_params,
    cross_entropy,
    init_cache,
    init_params,
    logits_fn,
    loss_fn,
)
from gpt_jax.sampling import Generation, Generator, generate, generate_reference, sample_logits
from gpt_jax.state import TrainState, abstract_state, init_state, lr_schedule, make_optimizer
from gpt_jax.tokenizer import (
    BpeTokenizer,
    ByteTokenizer,
    CharTokenizer,
    Gpt2Tokenizer,
    Tokenizer,
    normalize_text,
    tokenizer_from_json,
)
from gpt_jax.training import TrainResult, evaluate, make_train_step, read_metrics, setup_data, train

__all__ = [
    "BpeTokenizer", "ByteTokenizer", "Gpt2Tokenizer", "Tokenizer", "tokenizer_from_json",
    "CharTokenizer", "CheckpointError", "Checkpointer", "Config", "ConfigError", "DataError",
    "Generation", "GenerationTooLargeError", "TextScore", "attention_weights", "read_metrics",
    "score_text", "token_logprobs", "Generator", "GptJaxError", "IncompatibleCheckpointError",
    "MissingDependencyError", "NoCheckpointError", "NonFiniteLossError",
    "NonFiniteModelError", "RunLockedError", "TokenData",
    "TokenizerError", "TrainResult", "TrainState", "cached_logits_fn", "compute_dtype",
    "count_params", "cross_entropy", "evaluate", "generate", "generate_reference",
    "abstract_state", "init_cache", "init_params", "init_state", "load_checkpoint", "load_data",
    "logits_fn", "loss_fn", "lr_schedule", "make_config", "make_optimizer", "make_train_step",
    "normalize_text", "sample_logits", "setup_data", "train",
]
__version__ = "0.1.0"
