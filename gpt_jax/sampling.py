"""Text generation: sampling controls and the autoregressive loop, compiled as one call.

This loop recomputes the model over its whole window for every new token, as nanoGPT's ``generate``
does; it is the simple reference that a cached generator must match token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError
from gpt_jax.model import logits_fn


def check_sampling(cfg: Config, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError for sampling settings that mean nothing."""
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ConfigError(f"top_k must be in [1, {cfg.vocab_size}] (the vocabulary size), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature: float,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """One token per row [B] from logits [B, V]: greedy at temperature 0, else filtered sampling."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_k is not None and top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p is not None and top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass before it
        # is below top_p, so the most likely token always stays.
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        kept_BxV = jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf)
        cutoff_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_recompute(params, cfg: Config, prompt_BxP: jax.Array, key: jax.Array, max_new_tokens: int,
                        temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    B, P = prompt_BxP.shape
    W = cfg.block_size
    L = max(P + max_new_tokens, W)
    buf_BxL = jnp.zeros((B, L), jnp.int32).at[:, :P].set(prompt_BxP)

    def step(i, buf_BxL):
        t = P + i  # position of the token being chosen
        # The last W tokens, or the first W when fewer exist: the model is causal, so the logits at
        # t - 1 do not see the padding after it.
        start = jnp.maximum(t - W, 0)
        window_BxW = jax.lax.dynamic_slice_in_dim(buf_BxL, start, W, axis=1)
        logits_BxWxV = logits_fn(params, cfg, window_BxW)
        logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, t - 1 - start, axis=1, keepdims=False)
        token_B = sample_logits(logits_BxV, jax.random.fold_in(key, i), temperature, top_k, top_p)
        return jax.lax.dynamic_update_slice_in_dim(buf_BxL, token_B[:, None], t, axis=1)

    buf_BxL = jax.lax.fori_loop(0, max_new_tokens, step, buf_BxL)
    return buf_BxL[:, P:P + max_new_tokens]


def generate(params, cfg: Config, prompt_tokens, key: jax.Array, max_new_tokens: int = 500,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_samples: int = 1) -> np.ndarray:
    """``num_samples`` continuations of ``prompt_tokens`` ([P] ints, P >= 1): int32 [num_samples, N].

    A prompt longer than ``block_size`` is fine: the model always sees its last ``block_size``
    tokens, as in nanoGPT.
    """
    prompt_P = np.asarray(prompt_tokens, dtype=np.int32).reshape(-1)
    if prompt_P.size == 0:
        raise ConfigError("the prompt is empty; give at least one character (e.g. --start='\\n')")
    if max_new_tokens < 0 or num_samples < 1:
        raise ConfigError(f"need max_new_tokens >= 0 and num_samples >= 1, got {max_new_tokens}, "
                          f"{num_samples}")
    check_sampling(cfg, temperature, top_k, top_p)
    prompt_BxP = jnp.asarray(np.broadcast_to(prompt_P, (num_samples, prompt_P.size)))
    out = _generate_recompute(params, cfg, prompt_BxP, key, max_new_tokens, float(temperature),
                              top_k, top_p)
    return np.asarray(out)
