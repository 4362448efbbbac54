"""Looking inside a model, for notebooks: attention weights, per-token log-probabilities, and how well a
model predicts a text (loss, bits per character, perplexity).

Everything here runs the model's own code (``model.py`` and ``attention.attention_xla``), not a copy:
the attention weights are the ones the layers compute, recorded through Flax's "intermediates"
collection. Shapes: L layers, B batch, H heads, T time, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.model import build_model, logits_fn, unstack_layers
from gpt_jax.tokenizer import check_ids

_SCORE_ROWS = 64  # windows scored at once by score_text (padded to a power of two: few compiled shapes)
_LARGEST_EXP = math.log(np.finfo(np.float64).max)  # exp of more overflows: the perplexity is infinite


def _observable(cfg: Config) -> Config:
    """``cfg`` as the analysis runs it: unrolled layers (one name per layer), no dropout, float32."""
    return dataclasses.replace(cfg, scan_layers=False, remat=False, dropout=0.0, dtype="float32",
                               attention="xla")


def _check_tokens(tokens_BxT: Any, cfg: Config, shortest: int, longest: int, what: str) -> jax.Array:
    """``tokens`` ([T] or [B, T]) as int32 [B, T], shortest <= T <= longest, ids in the vocabulary."""
    try:
        tokens = np.asarray(tokens_BxT)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} takes token ids [B, T] (tok.encode of a text), not "
                          f"{type(tokens_BxT).__name__} ({e})") from None
    tokens_BxT = tokens[None] if tokens.ndim == 1 else tokens
    if tokens_BxT.ndim != 2 or not shortest <= tokens_BxT.shape[1] <= longest:
        raise ConfigError(f"{what} takes token ids of shape [T] or [B, T] with {shortest} <= T <= "
                          f"{longest}, got shape {tokens.shape}")
    return jnp.asarray(check_ids(tokens_BxT, cfg.vocab_size, f"the tokens given to {what}"))


def attention_weights(params: dict, cfg: Config, tokens_BxT: Any) -> jax.Array:
    """The attention weights of every layer and head for ``tokens``: float32 [L, B, H, T, T].

    ``weights[l, b, h, i, j]`` is how much token i attends to token j in head h of layer l: each row
    sums to 1 and is 0 above the diagonal (causal). ``tokens`` are int ids in [0, vocab_size), [B, T]
    (or [T], taken as B = 1) with T <= block_size. Computed in float32 whatever ``cfg.dtype``, with the
    XLA kernel (fused kernels never form the weights) and without dropout.

    Raises ConfigError for a bigram model (it has no attention), tokens of another shape or ids outside
    the vocabulary.
    """
    if cfg.model != "gpt":
        raise ConfigError(f"a {cfg.model} model has no attention; attention_weights needs model=gpt")
    tokens_BxT = _check_tokens(tokens_BxT, cfg, 1, cfg.block_size, "attention_weights")
    return _attention_weights(unstack_layers(params, cfg), _observable(cfg), tokens_BxT)


@functools.partial(jax.jit, static_argnums=1)
def _attention_weights(params: dict, cfg: Config, tokens_BxT: jax.Array) -> jax.Array:
    _, state = build_model(cfg).apply({"params": params}, tokens_BxT, mutable=["intermediates"])
    layers = state["intermediates"]
    return jnp.stack([layers[f"h_{i}"]["attn"]["attention_weights"][0] for i in range(cfg.n_layer)])


def token_logprobs(params: dict, cfg: Config, tokens_BxT: Any) -> jax.Array:
    """The log-probability (nats) the model gives each next token: float32 [B, T - 1].

    ``out[b, t] = log p(tokens[b, t + 1] | tokens[b, :t + 1])``. ``tokens`` are int ids in
    [0, vocab_size), [B, T] (or [T], taken as B = 1), 2 <= T <= block_size + 1. The mean of ``-out`` is
    the loss of ``loss_fn`` on the same tokens. Raises ConfigError for tokens of another shape or ids
    outside the vocabulary.
    """
    tokens_BxT = _check_tokens(tokens_BxT, cfg, 2, cfg.block_size + 1, "token_logprobs")
    return _token_logprobs(params, cfg, tokens_BxT)


@functools.partial(jax.jit, static_argnums=1)
def _token_logprobs(params: dict, cfg: Config, tokens_BxT: jax.Array) -> jax.Array:
    logits_BxTxV = logits_fn(params, cfg, tokens_BxT[:, :-1]).astype(jnp.float32)
    logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    return jnp.take_along_axis(logprobs_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


class TextScore(NamedTuple):
    """How well a model predicts a text (``score_text``)."""

    loss: float  # mean cross-entropy per predicted token, nats
    bits_per_char: float  # total cross-entropy in bits / predicted characters
    perplexity: float  # exp(loss): the effective number of equally likely next tokens
    tokens: int  # predicted tokens (all but the first)
    chars: int  # characters of the predicted tokens


def score_text(params: dict, cfg: Config, tokenizer: Any, text: str) -> TextScore:
    """Loss, bits per character and perplexity of the model on ``text``.

    The text is tokenised (``tokenizer.encode``, which normalises it as in training) and cut into
    consecutive windows of ``block_size + 1`` tokens that overlap by one, so every token but the first
    is predicted exactly once, from the tokens before it in its window (at most ``block_size``).
    Bits per character = total nats / ln 2 / characters predicted (Graves 2013, "Generating Sequences
    With Recurrent Neural Networks", sec. 3.1); for a character tokenizer it is loss / ln 2.

    The perplexity of a model that puts (almost) no probability on the text is ``math.inf``. Raises
    DataError for a text shorter than two tokens or not a str, TokenizerError for characters outside
    the vocabulary.
    """
    if not isinstance(text, str):
        raise DataError(f"score_text takes the text as a str, got {type(text).__name__}")
    tokens = check_ids(np.asarray(tokenizer.encode(text)), cfg.vocab_size,
                       "the text's tokens (is the tokenizer the model's own?)")
    if len(tokens) < 2:
        raise DataError(f"score_text needs a text of at least 2 tokens, got {len(tokens)}")
    W, n = cfg.block_size, len(tokens)
    starts = np.arange(0, n - 1, W)  # window k predicts tokens starts[k] + 1 .. starts[k] + W
    total_nats = 0.0
    for first in range(0, len(starts), _SCORE_ROWS):
        rows = starts[first:first + _SCORE_ROWS]
        R = min(_SCORE_ROWS, 1 << (len(rows) - 1).bit_length())  # a power of two: few compiled shapes
        index_RxW1 = np.pad(rows, (0, R - len(rows)), constant_values=n)[:, None] + np.arange(W + 1)
        inside_RxW1 = index_RxW1 < n  # the last window may be short; padding rows are empty
        windows_RxW1 = np.where(inside_RxW1, tokens[np.minimum(index_RxW1, n - 1)], 0)
        total_nats += float(_window_nats(params, cfg, jnp.asarray(windows_RxW1),
                                         jnp.asarray(inside_RxW1[:, 1:])))
    predicted = n - 1
    chars = len(tokenizer.decode(tokens)) - len(tokenizer.decode(tokens[:1]))
    loss = total_nats / predicted
    return TextScore(loss=loss, bits_per_char=total_nats / math.log(2) / max(chars, 1),
                     perplexity=math.exp(loss) if loss < _LARGEST_EXP else math.inf, tokens=predicted,
                     chars=chars)


@functools.partial(jax.jit, static_argnums=1)
def _window_nats(params: dict, cfg: Config, windows_RxW1: jax.Array, predicted_RxW: jax.Array) -> jax.Array:
    """The summed cross-entropy (nats) of the predicted positions of each window."""
    return -jnp.sum(jnp.where(predicted_RxW, _token_logprobs(params, cfg, windows_RxW1), 0.0))
