"""Text generation: a KV-cached loop compiled as one call, and the full-recompute reference it must match.

How a sample is produced. The prompt (at most ``block_size`` = W tokens; longer ones keep their last
W) is prefilled in one call, then each new token is one step of a ``lax.while_loop``: sample from the
last logits, append the token, compute the next logits. The model sees a *context* of the most recent
tokens, never more than W, at positions 0..:

- while the context holds fewer than W tokens, the new token is appended to it: one cached step, its
  keys and values written at the next position;
- when the context is full, it restarts from its last ``window_keep`` tokens, which are prefilled into
  a fresh cache at positions 0..window_keep-1 (the "re-prefill").

With ``window_keep = W`` every step past the window is a full forward over the last W tokens, which
is exactly nanoGPT's crop. With the default ``W // 2`` a re-prefill of W/2 tokens buys W/2 cached
steps, so long samples cost about one token's forward per token; the context then spans W/2..W tokens.

Why it is exact: the logits of a step depend only on the context tokens and their positions, which the
rule above fixes independently of how they are computed. ``generate_reference`` recomputes the model
over the whole context at every step under the same rule; the cached loop gives the same tokens for
the same key (tested within and past the window, greedy and sampled, batch 1 and more).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError
from gpt_jax.model import cached_logits_fn, for_decoding, init_cache, logits_fn


class Generation(NamedTuple):
    tokens: list[np.ndarray]  # per sample: int32 [n], cut before the first stop sequence
    logprobs: list[np.ndarray]  # per sample: float32 [n], the model's log-probability of each token
    steps: int  # loop steps run (tokens produced per sample, stop sequences included)


class Settings(NamedTuple):
    """Everything that shapes the compiled loop: one compile per distinct value."""

    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stops: tuple[tuple[int, ...], ...]
    window_keep: int
    stream: bool


def check_sampling(cfg: Config, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError for sampling settings that mean nothing."""
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ConfigError(f"top_k must be in [1, {cfg.vocab_size}] (the vocabulary size), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def make_settings(cfg: Config, *, num_samples: int = 1, max_new_tokens: int = 500,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  stops: Sequence[Sequence[int]] = (), window_keep: int | None = None,
                  stream: bool = False) -> Settings:
    """Validated settings; ConfigError names any impossible value."""
    check_sampling(cfg, temperature, top_k, top_p)
    if max_new_tokens < 1 or num_samples < 1:
        raise ConfigError(f"max_new_tokens and num_samples must be >= 1, got {max_new_tokens} and "
                          f"{num_samples}")
    keep = cfg.block_size // 2 if window_keep is None else window_keep
    if not 1 <= keep <= cfg.block_size:
        raise ConfigError(f"window_keep must be in [1, block_size={cfg.block_size}], got {keep}")
    stops = tuple(tuple(int(t) for t in s) for s in stops)
    if any(len(s) == 0 for s in stops):
        raise ConfigError("a stop sequence is empty; give at least one character")
    return Settings(num_samples, max_new_tokens, float(temperature), top_k, top_p, stops, keep, stream)


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


# --- the two ways of computing the next logits ----------------------------------------------------
# Each is (start, advance): start(params, buf, prompt_len) -> (logits_BxV, ctx);
# advance(params, buf, t, token_B, ctx) -> (logits_BxV, ctx), after token t was written into buf.


def _cached(cfg: Config, keep: int):
    W = cfg.block_size

    def start(params, buf_BxL, prompt_len):
        # One prefill over a fixed [B, W] window, whatever the prompt's length, so that prompts of
        # any length share one compiled loop. Keys and values past the prompt are garbage that no
        # query sees: each later step overwrites its position before attending to it.
        B = buf_BxL.shape[0]
        logits_BxWxV, cache = cached_logits_fn(params, cfg, buf_BxL[:, :W], init_cache(cfg, B))
        cache = {**cache, "pos": prompt_len}
        return jax.lax.dynamic_index_in_dim(logits_BxWxV, prompt_len - 1, 1, keepdims=False), cache

    def advance(params, buf_BxL, t, token_B, cache):
        def append(cache):
            logits_Bx1xV, cache = cached_logits_fn(params, cfg, token_B[:, None], cache)
            return logits_Bx1xV[:, 0], cache

        def refill(cache):
            context_BxK = jax.lax.dynamic_slice_in_dim(buf_BxL, t + 1 - keep, keep, axis=1)
            fresh = init_cache(cfg, buf_BxL.shape[0])
            logits_BxKxV, cache = cached_logits_fn(params, cfg, context_BxK, fresh)
            return logits_BxKxV[:, -1], cache

        return jax.lax.cond(cache["pos"] < W, append, refill, cache)

    return start, advance


def _recompute(cfg: Config, keep: int):
    W = cfg.block_size

    def window_logits(params, buf_BxL, context_start, last):
        # The context sits left-aligned in a [B, W] window; what follows it is invisible to a causal
        # model at position ``last``.
        window_BxW = jax.lax.dynamic_slice_in_dim(buf_BxL, context_start, W, axis=1)
        logits_BxWxV = logits_fn(params, cfg, window_BxW)
        return jax.lax.dynamic_index_in_dim(logits_BxWxV, last, 1, keepdims=False)

    def start(params, buf_BxL, prompt_len):
        return window_logits(params, buf_BxL, 0, prompt_len - 1), jnp.zeros((), jnp.int32)

    def advance(params, buf_BxL, t, token_B, context_start):
        full = t + 1 - context_start > W
        context_start = jnp.where(full, t + 1 - keep, context_start)
        return window_logits(params, buf_BxL, context_start, t - context_start), context_start

    return start, advance


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "cached", "emit"))
def _generate(params, buf_BxL: jax.Array, prompt_len: jax.Array, key: jax.Array, *, cfg: Config,
              settings: Settings, cached: bool, emit: Callable | None):
    """The whole generation as one compiled call; returns (buf, logprobs, lengths, steps)."""
    s = settings
    B, N = buf_BxL.shape[0], s.max_new_tokens
    if cached:  # scanned layers are unstacked once here, not at every step of the loop
        params, cfg = for_decoding(params, cfg)
    start, advance = (_cached if cached else _recompute)(cfg, s.window_keep)
    logits_BxV, ctx = start(params, buf_BxL, prompt_len)

    def step(carry):
        i, buf_BxL, logits_BxV, ctx, logprobs_BxN, lengths_B = carry
        t = prompt_len + i
        token_B = sample_logits(logits_BxV, jax.random.fold_in(key, i), s.temperature, s.top_k, s.top_p)
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32)),
                                        token_B[:, None], axis=-1)[:, 0]
        buf_BxL = jax.lax.dynamic_update_slice_in_dim(buf_BxL, token_B[:, None], t, axis=1)
        logprobs_BxN = jax.lax.dynamic_update_slice_in_dim(logprobs_BxN, logprob_B[:, None], i, axis=1)
        lengths_B = _note_stops(buf_BxL, t, i, prompt_len, lengths_B, s.stops)
        if emit is not None:
            io_callback(emit, None, i, token_B, lengths_B <= i, ordered=True)
        logits_BxV, ctx = advance(params, buf_BxL, t, token_B, ctx)
        return i + 1, buf_BxL, logits_BxV, ctx, logprobs_BxN, lengths_B

    def running(carry):
        i, lengths_B = carry[0], carry[-1]
        return (i < N) & jnp.any(lengths_B > i)  # some sample has not stopped yet

    carry = (jnp.zeros((), jnp.int32), buf_BxL, logits_BxV, ctx, jnp.zeros((B, N), jnp.float32),
             jnp.full((B,), N, jnp.int32))
    steps, buf_BxL, _, _, logprobs_BxN, lengths_B = jax.lax.while_loop(running, step, carry)
    new_BxN = jax.lax.dynamic_slice_in_dim(buf_BxL, prompt_len, N, axis=1)
    return new_BxN, logprobs_BxN, lengths_B, steps


def _note_stops(buf_BxL, t, i, prompt_len, lengths_B, stops):
    """Samples whose generated text now ends with a stop sequence get their length: up to the stop."""
    for stop in stops:
        m = len(stop)
        tail_Bxm = jax.lax.dynamic_slice_in_dim(buf_BxL, jnp.maximum(t + 1 - m, 0), m, axis=1)
        hit_B = jnp.all(tail_Bxm == jnp.asarray(stop, jnp.int32), axis=1) & (t + 1 - m >= prompt_len)
        lengths_B = jnp.where(hit_B & (lengths_B > i), i + 1 - m, lengths_B)
    return lengths_B


class Generator:
    """Generation with fixed settings for one model: compiles once, then serves any prompt.

    ``prepare(params, prompt)`` compiles ahead of time (so a caller can time compile and generation
    apart); calls after that never recompile, whatever the prompt's length.
    """

    def __init__(self, cfg: Config, settings: Settings, cached: bool = True,
                 on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None):
        if settings.stream != (on_token is not None):
            raise ConfigError("streaming needs an on_token callback, and on_token needs stream=True")
        self.cfg, self.settings, self.cached = cfg, settings, cached
        self._emit = None if on_token is None else _Emitter(on_token)
        self._compiled = None

    def crop(self, prompt_tokens: Any) -> np.ndarray:
        """The prompt as int32 [P], 1 <= P <= block_size: its last block_size tokens."""
        prompt_P = np.asarray(prompt_tokens, dtype=np.int32).reshape(-1)
        if prompt_P.size == 0:
            raise ConfigError("the prompt is empty; give at least one character (e.g. --start='\\n')")
        if prompt_P.min() < 0 or prompt_P.max() >= self.cfg.vocab_size:
            raise ConfigError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        return prompt_P[-self.cfg.block_size:]

    def _inputs(self, params, prompt_tokens, key) -> tuple:
        """The compiled loop's arguments: params, the token buffer [B, W + N], prompt length, key."""
        s, W = self.settings, self.cfg.block_size
        prompt_P = self.crop(prompt_tokens)
        buf_BxL = np.zeros((s.num_samples, W + s.max_new_tokens), np.int32)
        buf_BxL[:, :prompt_P.size] = prompt_P
        return params, jnp.asarray(buf_BxL), jnp.asarray(prompt_P.size, jnp.int32), key

    def prepare(self, params, prompt_tokens=(0,), key: jax.Array | None = None, warm_up: bool = False
                ) -> None:
        """Compile (once); ``warm_up`` also runs the executable once without streaming, so that a
        caller timing later calls measures generation alone."""
        if self._compiled is None:
            inputs = self._inputs(params, prompt_tokens, jax.random.PRNGKey(0) if key is None else key)
            self._compiled = _generate.lower(*inputs, cfg=self.cfg, settings=self.settings,
                                             cached=self.cached, emit=self._emit).compile()
            if warm_up and self._emit is None:
                jax.block_until_ready(self._compiled(*inputs))

    def __call__(self, params, prompt_tokens, key: jax.Array) -> Generation:
        self.prepare(params, prompt_tokens, key)
        outputs = self._compiled(*self._inputs(params, prompt_tokens, key))
        new_BxN, logprobs_BxN, lengths_B, steps = jax.device_get(outputs)
        return Generation([row[:n] for row, n in zip(new_BxN, lengths_B, strict=True)],
                          [row[:n] for row, n in zip(logprobs_BxN, lengths_B, strict=True)], int(steps))


class _Emitter:
    """Hashable wrapper of a user callback (a static argument of the compiled loop)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, i, tokens_B, done_B):
        self.fn(int(i), np.asarray(tokens_B), np.asarray(done_B))


def generate(params, cfg: Config, prompt_tokens, key: jax.Array, max_new_tokens: int = 500,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_samples: int = 1, stops: Sequence[Sequence[int]] = (), window_keep: int | None = None,
             on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> Generation:
    """``num_samples`` continuations of ``prompt_tokens`` ([P] ints) with a KV cache, in one compiled call.

    Returns a Generation: per sample the new tokens (cut before any of ``stops``, token sequences)
    and their log-probabilities under the model. ``on_token(step, tokens_B, done_B)`` is called as
    each token is produced (streaming). ``window_keep``: see the module docstring.
    """
    settings = make_settings(cfg, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, stops=stops,
                             window_keep=window_keep, stream=on_token is not None)
    generator = (_shared_generator(cfg, settings, True) if on_token is None
                 else Generator(cfg, settings, cached=True, on_token=on_token))
    return generator(params, prompt_tokens, key)


def generate_reference(params, cfg: Config, prompt_tokens, key: jax.Array, max_new_tokens: int = 500,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       num_samples: int = 1, stops: Sequence[Sequence[int]] = (),
                       window_keep: int | None = None) -> Generation:
    """``generate`` without a cache: the model runs over the whole context at every step."""
    settings = make_settings(cfg, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, stops=stops,
                             window_keep=window_keep)
    return _shared_generator(cfg, settings, False)(params, prompt_tokens, key)


@functools.lru_cache(maxsize=16)
def _shared_generator(cfg: Config, settings: Settings, cached: bool) -> Generator:
    """One Generator (one compile) per model config and settings, reused across calls."""
    return Generator(cfg, settings, cached)
