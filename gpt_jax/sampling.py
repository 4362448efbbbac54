"""Text generation: a KV-cached loop compiled once, and the full-recompute reference it must match.

What a call takes and gives. ``generate(params, cfg, prompt_tokens, key, ...)`` takes one prompt ([P]
token ids), a batch of prompts of one length ([B, P]) or a list of prompts of any lengths, and returns
one row per (prompt, sample), prompt-major: all samples of prompt 0, then of prompt 1, ... Prompts of
one length run together as one batch of rows; groups of different lengths run one after another
through the same compiled code (the prompt length is an argument, not a constant), each group padded
with rows that stop at once to the size of the largest, then the rows are put back in input order.

How a row is produced. The prompt (at most ``block_size`` = W tokens; longer ones keep their last W)
is prefilled (in chunks of ``PREFILL_CHUNK`` tokens, as many as it needs, so a short prompt costs
little), then each new token is one step of a loop: sample from the last logits, append the token,
compute the next logits. The model sees a *context* of the most recent tokens,
never more than W, at positions 0..:

- while the context holds fewer than W tokens, the new token is appended to it: one cached step, its
  keys and values written at the next position;
- when the context is full, it restarts from its last ``window_keep`` tokens, which are prefilled into
  a fresh cache at positions 0..window_keep-1 (the "re-prefill").

With ``window_keep = W`` every step past the window is a full forward over the last W tokens, which
is exactly nanoGPT's crop. With the default ``W // 2`` a re-prefill of W/2 tokens buys W/2 cached
steps, so long samples cost about one token's forward per token; the context then spans W/2..W tokens.

Chunks. The loop runs on the device ``chunk`` steps at a time (256 by default), one compiled call per
chunk; between calls the host copies the chunk's tokens into the output. The device holds the KV cache,
the last max(W, longest stop) tokens, which every later step may still read, and one chunk, whatever
``max_new_tokens`` is; one compile serves every ``max_new_tokens``. A request whose output or loop state
cannot fit in memory is refused before anything is allocated (GenerationTooLargeError). The loop stops
at logits that are NaN or infinite, and the host raises NonFiniteModelError instead of returning them.

Randomness. Sample s of every prompt draws step i from ``fold_in(fold_in(key, s), i)``: a prompt's
samples do not depend on the other prompts of the batch, on padding or on chunking.

Why it is exact: the logits of a step depend only on the context tokens and their positions, which the
rule above fixes independently of how they are computed. ``generate_reference`` recomputes the model
over the whole context at every step under the same rule; the cached loop gives the same tokens for
the same key (tested within and past the window, across chunk boundaries, greedy and sampled, for one
prompt or several).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from gpt_jax import sharding
from gpt_jax.config import Config
from gpt_jax.errors import ConfigError, GenerationTooLargeError, NonFiniteModelError
from gpt_jax.model import cached_logits_fn, compute_dtype, for_decoding, init_cache, logits_fn
from gpt_jax.tokenizer import check_ids

CHUNK = 256  # loop steps per compiled call
MAX_NEW_TOKENS = 2**30  # the loop counts positions in int32
OUTPUT_BYTES_PER_TOKEN = 8  # an int32 token and its float32 log-probability


class Generation(NamedTuple):
    tokens: list[np.ndarray]  # per (prompt, sample), prompt-major: int32 [n], cut before the first stop
    logprobs: list[np.ndarray]  # likewise: float32 [n], the model's log-probability of each token
    steps: int  # loop steps run: the most tokens a row produced, stop sequences included


class LoopSettings(NamedTuple):
    """What shapes the compiled loop: one compile per distinct value (and number of rows)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    stops: tuple[tuple[int, ...], ...]
    window_keep: int
    chunk: int


class Settings(NamedTuple):
    """A generation request: how many tokens and samples, and how they are drawn."""

    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stops: tuple[tuple[int, ...], ...]
    window_keep: int
    stream: bool
    chunk: int = CHUNK

    @property
    def loop(self) -> LoopSettings:
        return LoopSettings(self.temperature, self.top_k, self.top_p, self.stops, self.window_keep,
                            self.chunk)


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
                  stream: bool = False, chunk: int = CHUNK) -> Settings:
    """Validated settings; ConfigError names any impossible value. ``chunk``: loop steps per compiled
    call (changes how the loop runs, never what it produces)."""
    check_sampling(cfg, temperature, top_k, top_p)
    if max_new_tokens < 1 or num_samples < 1:
        raise ConfigError(f"max_new_tokens and num_samples must be >= 1, got {max_new_tokens} and "
                          f"{num_samples}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be at most {MAX_NEW_TOKENS:,}, got {max_new_tokens:,}")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    keep = cfg.block_size // 2 if window_keep is None else window_keep
    if not 1 <= keep <= cfg.block_size:
        raise ConfigError(f"window_keep must be in [1, block_size={cfg.block_size}], got {keep}")
    stops = tuple(tuple(int(t) for t in s) for s in stops)
    if any(len(s) == 0 for s in stops):
        raise ConfigError("a stop sequence is empty; give at least one character")
    return Settings(num_samples, max_new_tokens, float(temperature), top_k, top_p, stops, keep, stream,
                    chunk)


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


PREFILL_CHUNK = 64  # prompt tokens one prefill step computes (the cached path)


# --- the two ways of computing the next logits ----------------------------------------------------
# Each is (start, advance): start(params, buf, prompt_len) -> (logits_RxV, ctx) with the prompt at
# columns 0..prompt_len-1; advance(params, buf, t, base, token_R, ctx) -> (logits_RxV, ctx), after the
# token of sequence index t was written into buf at column t - base. The cached path's advance is a
# pair, (append, refill): append while the cache has room, refill when it is full. The loop chooses
# between them outside the step (a branch on the cache inside every step would copy the whole cache
# at every step, as XLA's conditionals do).


def _cached(cfg: Config, keep: int):
    W = cfg.block_size

    def start(params, buf_RxL, prompt_len):
        # The prompt goes through in chunks of P tokens, as many as it needs (a loop of dynamic length:
        # one compiled program serves prompts of any length, at a cost in proportion to the length).
        # A last chunk that would pass the window starts earlier: positions computed again get the
        # same keys and values. Keys and values past the prompt are garbage that no query sees: each
        # later step overwrites its position before attending to it.
        R, P = buf_RxL.shape[0], min(PREFILL_CHUNK, W)

        def prefill(c, carry):
            _, cache = carry
            first = jnp.minimum(c * P, W - P)
            chunk_RxP = jax.lax.dynamic_slice_in_dim(buf_RxL, first, P, axis=1)
            logits_RxPxV, cache = cached_logits_fn(params, cfg, chunk_RxP, {**cache, "pos": first})
            last = jnp.clip(prompt_len - 1 - first, 0, P - 1)
            logits_RxV = jax.lax.dynamic_index_in_dim(logits_RxPxV, last, 1, keepdims=False)
            return logits_RxV.astype(jnp.float32), cache

        empty = (jnp.zeros((R, cfg.vocab_size), jnp.float32), init_cache(cfg, R))
        logits_RxV, cache = jax.lax.fori_loop(0, (prompt_len + P - 1) // P, prefill, empty)
        return logits_RxV, {**cache, "pos": prompt_len}

    def append(params, buf_RxL, t, base, token_R, cache):
        logits_Rx1xV, cache = cached_logits_fn(params, cfg, token_R[:, None], cache)
        return logits_Rx1xV[:, 0], cache

    def refill(params, buf_RxL, t, base, token_R, cache):
        context_RxK = jax.lax.dynamic_slice_in_dim(buf_RxL, t + 1 - keep - base, keep, axis=1)
        logits_RxKxV, cache = cached_logits_fn(params, cfg, context_RxK, init_cache(cfg, buf_RxL.shape[0]))
        return logits_RxKxV[:, -1], cache

    return start, (append, refill)


def _recompute(cfg: Config, keep: int):
    W = cfg.block_size

    def window_logits(params, buf_RxL, first_column, last):
        # The context sits left-aligned in a [R, W] window; what follows it is invisible to a causal
        # model at position ``last``.
        window_RxW = jax.lax.dynamic_slice_in_dim(buf_RxL, first_column, W, axis=1)
        logits_RxWxV = logits_fn(params, cfg, window_RxW)
        return jax.lax.dynamic_index_in_dim(logits_RxWxV, last, 1, keepdims=False)

    def start(params, buf_RxL, prompt_len):
        return window_logits(params, buf_RxL, 0, prompt_len - 1), jnp.zeros((), jnp.int32)

    def advance(params, buf_RxL, t, base, token_R, context_start):
        full = t + 1 - context_start > W
        context_start = jnp.where(full, t + 1 - keep, context_start)
        return window_logits(params, buf_RxL, context_start - base, t - context_start), context_start

    return start, advance


def _history(cfg: Config, loop: LoopSettings) -> int:
    """Tokens a chunk may read from before it: a context, or the longest stop sequence."""
    return max([cfg.block_size, *(len(s) for s in loop.stops)])


def _buffer_len(cfg: Config, loop: LoopSettings) -> int:
    # The history, the chunk's new tokens, and room for a window of W read from the last of them.
    return _history(cfg, loop) + loop.chunk + cfg.block_size


class _State(NamedTuple):
    """The loop's state between chunks (a pytree)."""

    buf_RxL: jax.Array  # the latest tokens: sequence index t sits at column t - base
    base: jax.Array  # int32: the sequence index of column 0
    prompt_len: jax.Array  # int32
    i: jax.Array  # int32: new tokens produced so far, the same for every row
    logits_RxV: jax.Array  # float32: the logits the next token is drawn from
    ctx: Any  # the context: a KV cache, or the sequence index where the context starts (reference)
    lengths_R: jax.Array  # int32: a stopped row's kept tokens; max_new_tokens while it runs


@functools.partial(jax.jit, static_argnames=("cfg", "loop", "cached"))
def _start(params, buf_RxL: jax.Array, prompt_len: jax.Array, lengths_R: jax.Array, *, cfg: Config,
           loop: LoopSettings, cached: bool) -> _State:
    """Prefill the prompts (columns 0..prompt_len-1 of ``buf``): the state before the first step."""
    if cached:  # scanned layers are unstacked here, not at every step of the loop
        params, cfg = for_decoding(params, cfg)
    start, _ = (_cached if cached else _recompute)(cfg, loop.window_keep)
    logits_RxV, ctx = start(params, buf_RxL, prompt_len)
    zero = jnp.zeros((), jnp.int32)
    return _State(buf_RxL, zero, prompt_len, zero, logits_RxV.astype(jnp.float32), ctx, lengths_R)


@functools.partial(jax.jit, static_argnames=("cfg", "loop", "cached", "emit"), donate_argnums=1)
def _chunk(params, state: _State, key: jax.Array, samples_R: jax.Array, rows_R: jax.Array,
           max_new: jax.Array, *, cfg: Config, loop: LoopSettings, cached: bool, emit: Callable | None):
    """Up to ``loop.chunk`` more steps. Returns (state, tokens [R, chunk], log-probs [R, chunk],
    whether a running row met non-finite logits); column j holds the step ``i + j`` of the old state."""
    if cached:
        params, cfg = for_decoding(params, cfg)
    _, advance = (_cached if cached else _recompute)(cfg, loop.window_keep)
    keys_R = jax.vmap(jax.random.fold_in, (None, 0))(key, samples_R)
    state = _forget_old_tokens(state, _history(cfg, loop))
    R, C, i0 = state.buf_RxL.shape[0], loop.chunk, state.i

    def step(carry, advance=advance):
        s, new_RxC, logprobs_RxC = carry
        t, column = s.prompt_len + s.i, s.prompt_len + s.i - s.base
        token_R = _sample_rows(s.logits_RxV, keys_R, s.i, loop)
        logprob_R = jnp.take_along_axis(jax.nn.log_softmax(s.logits_RxV), token_R[:, None], axis=-1)[:, 0]
        buf_RxL = jax.lax.dynamic_update_slice_in_dim(s.buf_RxL, token_R[:, None], column, axis=1)
        new_RxC = jax.lax.dynamic_update_slice_in_dim(new_RxC, token_R[:, None], s.i - i0, axis=1)
        logprobs_RxC = jax.lax.dynamic_update_slice_in_dim(logprobs_RxC, logprob_R[:, None], s.i - i0, axis=1)
        lengths_R = _note_stops(buf_RxL, column, s.i, s.prompt_len - s.base, s.lengths_R, loop.stops)
        if emit is not None:
            io_callback(emit, None, s.i, token_R, s.lengths_R <= s.i, rows_R, ordered=True)
        logits_RxV, ctx = advance(params, buf_RxL, t, s.base, token_R, s.ctx)
        s = s._replace(buf_RxL=buf_RxL, i=s.i + 1, logits_RxV=logits_RxV.astype(jnp.float32), ctx=ctx,
                       lengths_R=lengths_R)
        return s, new_RxC, logprobs_RxC

    def running(carry):
        s = carry[0]
        return ((s.i - i0 < C) & (s.i < max_new) & jnp.any(s.lengths_R > s.i)
                & ~_nonfinite_logits(s))

    def window(carry):
        """Cached steps while the cache has room, then (still running) one step that refills it."""
        append, refill = advance
        has_room = lambda carry: running(carry) & (carry[0].ctx["pos"] < cfg.block_size)  # noqa: E731
        carry = jax.lax.while_loop(has_room, functools.partial(step, advance=append), carry)
        return jax.lax.cond(running(carry), functools.partial(step, advance=refill), lambda c: c, carry)

    carry = (state, jnp.zeros((R, C), jnp.int32), jnp.zeros((R, C), jnp.float32))
    state, new_RxC, logprobs_RxC = jax.lax.while_loop(running, window if cached else step, carry)
    return state, new_RxC, logprobs_RxC, _nonfinite_logits(state)


def _forget_old_tokens(state: _State, history: int) -> _State:
    """Shift the buffer left so that it starts ``history`` tokens before the next token's column."""
    base = jnp.maximum(state.prompt_len + state.i - history, 0)
    buf_RxL = jnp.roll(state.buf_RxL, state.base - base, axis=1)
    return state._replace(buf_RxL=buf_RxL, base=base)


def _nonfinite_logits(state: _State) -> jax.Array:
    """Whether a running row's next-token logits hold NaN or infinity."""
    running_R = state.lengths_R > state.i
    return jnp.any(running_R & ~jnp.all(jnp.isfinite(state.logits_RxV), axis=-1))


def _sample_rows(logits_RxV: jax.Array, keys_R: jax.Array, i: jax.Array, loop: LoopSettings) -> jax.Array:
    """Token [R] of step ``i``: row r draws with its own key folded with the step."""
    def one_row(logits_V, key):
        return sample_logits(logits_V[None], jax.random.fold_in(key, i), loop.temperature, loop.top_k,
                             loop.top_p)[0]

    return jax.vmap(one_row)(logits_RxV, keys_R)


def _note_stops(buf_RxL, column, i, prompt_column, lengths_R, stops):
    """Rows whose generated text now ends with a stop sequence get their length: up to the stop."""
    for stop in stops:
        m = len(stop)
        tail_Rxm = jax.lax.dynamic_slice_in_dim(buf_RxL, jnp.maximum(column + 1 - m, 0), m, axis=1)
        hit_R = jnp.all(tail_Rxm == jnp.asarray(stop, jnp.int32), axis=1) & (column + 1 - m >= prompt_column)
        lengths_R = jnp.where(hit_R & (lengths_R > i), i + 1 - m, lengths_R)
    return lengths_R


# --- memory -----------------------------------------------------------------------------------------


def _state_bytes_per_row(cfg: Config, loop: LoopSettings) -> int:
    """Device bytes one row of the loop holds at once, estimated from shapes (an upper guess)."""
    W, D, V = cfg.block_size, cfg.n_embd, cfg.vocab_size
    layers = cfg.n_layer if cfg.model == "gpt" else 0
    cache = 2 * layers * W * D * jnp.dtype(compute_dtype(cfg)).itemsize
    # A prefill of W tokens: its logits, activations (qkv, MLP, residual) and attention scores.
    prefill = 4 * W * (V + 9 * D) + 4 * cfg.n_head * W * W
    # The cache may be copied once by a step; the buffer once by the shift between chunks.
    return 2 * cache + prefill + 2 * 4 * _buffer_len(cfg, loop) + OUTPUT_BYTES_PER_TOKEN * loop.chunk + 16 * V


def memory_needed(cfg: Config, settings: Settings, num_prompts: int = 1, rows_at_once: int | None = None,
                  host_bytes_per_token: int = OUTPUT_BYTES_PER_TOKEN) -> tuple[int, int]:
    """(host bytes of the output, device bytes of the loop state) of a request, from shapes alone.

    The output is counted in full (``max_new_tokens`` for every row) at ``host_bytes_per_token``;
    ``rows_at_once`` (default: every row) is how many rows run in one batch.
    """
    rows = num_prompts * settings.num_samples
    output = rows * settings.max_new_tokens * host_bytes_per_token
    return output, (rows_at_once or rows) * _state_bytes_per_row(cfg, settings.loop)


def check_fits(cfg: Config, settings: Settings, num_prompts: int = 1, rows_at_once: int | None = None,
               host_bytes_per_token: int = OUTPUT_BYTES_PER_TOKEN) -> None:
    """Raise GenerationTooLargeError, one line, when ``memory_needed`` exceeds the free memory.

    Free memory is ``sharding.available_memory``: the device's when it reports one, the host's (which a
    CPU device shares with the output) otherwise.
    """
    output, state = memory_needed(cfg, settings, num_prompts, rows_at_once, host_bytes_per_token)
    device = jax.devices()[0]
    free = sharding.available_memory(device)
    n = settings.num_samples
    request = (f"{settings.max_new_tokens:,} new tokens for "
               + (f"{num_prompts:,} prompts x " if num_prompts > 1 else "") + f"{n:,} sample{'s' * (n > 1)}")
    if device.platform == "cpu":
        if output + state > free:
            raise GenerationTooLargeError(
                f"{request} need about {_size(output + state)} of memory ({_size(output)} for the output, "
                f"{_size(state)} for the loop) but {_size(free)} is free; lower max_new_tokens or "
                "num_samples")
        return
    if state > free:
        raise GenerationTooLargeError(
            f"{request} need about {_size(state)} of {device.platform} memory for the loop (the KV cache "
            f"and logits of every sample at once) but {_size(free)} is free; lower num_samples")
    host_free = _host_free_memory()
    if host_free is not None and output > host_free:
        raise GenerationTooLargeError(
            f"{request} need about {_size(output)} of host memory for the output but {_size(host_free)} "
            "is free; lower max_new_tokens or num_samples")


def _host_free_memory() -> int | None:
    try:
        return sharding.available_memory(jax.devices("cpu")[0])
    except RuntimeError:  # the CPU backend is switched off (JAX_PLATFORMS)
        return None


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


# --- prompts ----------------------------------------------------------------------------------------


def _split_prompts(prompt_tokens: Any) -> list[np.ndarray]:
    """One prompt [P], a batch [B, P] or a list of prompts of any lengths -> a list of 1-D arrays."""
    if isinstance(prompt_tokens, str) or (isinstance(prompt_tokens, (list, tuple))
                                          and any(isinstance(p, str) for p in prompt_tokens)):
        raise ConfigError("prompts are token ids, not text: encode them first, e.g. tok.encode('ROMEO:')")
    if isinstance(prompt_tokens, (list, tuple)) and prompt_tokens and all(
            np.ndim(p) == 1 for p in prompt_tokens):
        return [np.asarray(p) for p in prompt_tokens]
    try:
        array = np.asarray(prompt_tokens)
    except ValueError:  # nested lists of mixed depths
        array = None
    if array is None or array.ndim not in (1, 2) or array.dtype == object:
        raise ConfigError("prompt_tokens must be one prompt [P], a batch of prompts [B, P] or a list of "
                          "prompts, each a sequence of token ids"
                          + ("" if array is None else f"; got an array of {array.ndim} dimensions"))
    return [array] if array.ndim == 1 else list(array)


def _check_prompt(prompt: np.ndarray, cfg: Config, name: str) -> np.ndarray:
    """``prompt`` as int32 [P], 1 <= P <= block_size: its last block_size tokens."""
    if prompt.size == 0:
        raise ConfigError(f"{name} is empty; give at least one token (tok.encode of some text; on the "
                          "command line --start=TEXT)")
    return check_ids(prompt, cfg.vocab_size, name)[-cfg.block_size:]


def _groups_by_length(prompts: list[np.ndarray]) -> list[list[int]]:
    """Indices of the prompts, grouped by length, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for b, prompt in enumerate(prompts):
        groups.setdefault(prompt.size, []).append(b)
    return list(groups.values())


# --- the generator ----------------------------------------------------------------------------------


class Generator:
    """Generation with fixed settings for one model: compiles once, then serves any prompt.

    ``compile(params, num_prompts)`` compiles ahead of time (so a caller can time compile and generation
    apart). A compiled loop runs a fixed number of rows at once, the samples of the largest group of
    prompts of one length: later calls whose largest group has ``num_prompts`` prompts (one, by default)
    never recompile, whatever the prompts' lengths. Generators of the same model and sampling settings
    share their compiled loops, whatever their ``max_new_tokens`` (unless they stream).
    """

    def __init__(self, cfg: Config, settings: Settings, cached: bool = True,
                 on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None):
        if settings.stream != (on_token is not None):
            raise ConfigError("streaming needs an on_token callback, and on_token needs stream=True")
        self.cfg, self.settings, self.cached = cfg, settings, cached
        self._emit = None if on_token is None else _Emitter(on_token)
        self._compiled = _shared_loops(cfg, settings.loop, cached) if on_token is None else {}

    def prompts(self, prompt_tokens: Any) -> list[np.ndarray]:
        """Each prompt of ``prompt_tokens`` ([P], [B, P] or a list) as int32 [P], 1 <= P <= block_size:
        its last block_size tokens. Raises ConfigError for an empty prompt, ids out of range, or
        another shape."""
        prompts = _split_prompts(prompt_tokens)
        if len(prompts) == 1:
            return [_check_prompt(prompts[0], self.cfg, "the prompt")]
        return [_check_prompt(p, self.cfg, f"prompt {b} (of {len(prompts)})") for b, p in enumerate(prompts)]

    def crop(self, prompt_tokens: Any) -> np.ndarray:
        """One prompt ([P] token ids) as int32 [P], 1 <= P <= block_size: its last block_size tokens."""
        prompts = self.prompts(prompt_tokens)
        if len(prompts) != 1:
            raise ConfigError(f"expected one prompt, got {len(prompts)}")
        return prompts[0]

    def compile(self, params, num_prompts: int = 1, key: jax.Array | None = None) -> None:
        """Compile (once) for ``num_prompts`` prompts of one length; ``key`` only gives the key type."""
        check_fits(self.cfg, self.settings, num_prompts)
        self._loop(params, num_prompts * self.settings.num_samples,
                   jax.random.PRNGKey(0) if key is None else key)

    def __call__(self, params, prompt_tokens: Any, key: jax.Array) -> Generation:
        """``num_samples`` continuations of every prompt, prompt-major. Raises ConfigError for bad
        prompts, GenerationTooLargeError before allocating a request that cannot fit, and
        NonFiniteModelError when the model's logits are NaN or infinite."""
        prompts = self.prompts(prompt_tokens)
        groups = _groups_by_length(prompts)
        n, total = self.settings.num_samples, len(prompts) * self.settings.num_samples
        rows = n * max(len(g) for g in groups)
        check_fits(self.cfg, self.settings, len(prompts), rows_at_once=rows)
        loop = self._loop(params, rows, key)
        if self._emit is not None:
            self._emit.rows = total
        out = Generation([np.empty(0, np.int32)] * total, [np.empty(0, np.float32)] * total, 0)
        for group in groups:
            inputs = _group_inputs([prompts[b] for b in group], group, n, rows, self.settings.max_new_tokens,
                                   _buffer_len(self.cfg, self.settings.loop))
            out = self._run(loop, params, inputs, key, out)
        return out

    def _loop(self, params, rows: int, key: jax.Array) -> tuple[Callable, Callable]:
        """The compiled (start, chunk) for ``rows`` rows, these params' shapes and this key type."""
        leaves, tree = jax.tree_util.tree_flatten(params)
        signature = (rows, tree, tuple((np.shape(x), str(x.dtype)) for x in leaves), key.shape,
                     str(key.dtype))
        if signature not in self._compiled:
            self._compiled[signature] = self._lower(params, rows, key)
        return self._compiled[signature]

    def _lower(self, params, rows: int, key: jax.Array) -> tuple[Callable, Callable]:
        static = dict(cfg=self.cfg, loop=self.settings.loop, cached=self.cached)
        int_R, int_ = jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
        buf_RxL = jax.ShapeDtypeStruct((rows, _buffer_len(self.cfg, self.settings.loop)), jnp.int32)
        start = _start.lower(params, buf_RxL, int_, int_R, **static)
        state = jax.eval_shape(functools.partial(_start, **static), params, buf_RxL, int_, int_R)
        key = jax.ShapeDtypeStruct(key.shape, key.dtype)
        chunk = _chunk.lower(params, state, key, int_R, int_R, int_, emit=self._emit, **static)
        return start.compile(), chunk.compile()

    def _run(self, loop, params, inputs: tuple, key: jax.Array, out: Generation) -> Generation:
        """Generate one group's rows, chunk by chunk, into their places in ``out``."""
        start, chunk = loop
        buf_RxL, prompt_len, lengths_R, samples_R, rows_R = inputs
        N = self.settings.max_new_tokens
        real = np.flatnonzero(rows_R >= 0)
        tokens, logprobs = np.empty((real.size, N), np.int32), np.empty((real.size, N), np.float32)
        state, i = start(params, buf_RxL, prompt_len, lengths_R), 0
        while True:
            state, new_RxC, logprobs_RxC, nonfinite = chunk(params, state, key, samples_R, rows_R,
                                                            np.int32(N))
            i0, (i, lengths_R, nonfinite, new_RxC, logprobs_RxC) = i, jax.device_get(
                (state.i, state.lengths_R, nonfinite, new_RxC, logprobs_RxC))
            if nonfinite:
                raise NonFiniteModelError(
                    f"the model's logits are NaN or infinite (new token {i + 1}): its parameters hold NaN "
                    "or infinite values, or overflow; the checkpoint may be damaged or its training "
                    "diverged: load an earlier checkpoint step or train again")
            tokens[:, i0:i], logprobs[:, i0:i] = new_RxC[real, :i - i0], logprobs_RxC[real, :i - i0]
            if i >= N or not np.any(lengths_R > i):
                break
        for k, r in enumerate(real):
            out.tokens[rows_R[r]] = tokens[k, :lengths_R[r]]
            out.logprobs[rows_R[r]] = logprobs[k, :lengths_R[r]]
        return out._replace(steps=max(out.steps, int(i)))


def _group_inputs(prompts: list[np.ndarray], ids: list[int], n: int, rows: int, max_new: int, L: int
                  ) -> tuple[np.ndarray, ...]:
    """A group's rows: (buf [R, L], prompt length, lengths [R], sample index [R], output row [R]).

    Prompt ``ids[k]`` fills rows k*n..k*n+n-1; the rest are padding, a copy of the first prompt that
    starts stopped (length 0) and has no output row (-1).
    """
    buf_RxL = np.zeros((rows, L), np.int32)
    buf_RxL[:, :prompts[0].size] = prompts[0]
    for k, prompt in enumerate(prompts):
        buf_RxL[k * n:(k + 1) * n, :prompt.size] = prompt
    real = len(prompts) * n
    lengths_R = np.where(np.arange(rows) < real, max_new, 0).astype(np.int32)
    samples_R = (np.arange(rows) % n).astype(np.int32)
    rows_R = np.full(rows, -1, np.int32)
    rows_R[:real] = np.repeat(np.asarray(ids, np.int32) * n, n) + samples_R[:real]
    return buf_RxL, np.int32(prompts[0].size), lengths_R, samples_R, rows_R


class _Emitter:
    """Hashable wrapper of a user callback (a static argument of the compiled loop).

    It reports every output row: those of the running group with their new token, the others done.
    """

    def __init__(self, fn: Callable):
        self.fn, self.rows = fn, 0

    def __call__(self, i, tokens_R, done_R, rows_R):
        real = np.asarray(rows_R) >= 0
        tokens_B, done_B = np.zeros(self.rows, np.int32), np.ones(self.rows, bool)
        tokens_B[rows_R[real]], done_B[rows_R[real]] = np.asarray(tokens_R)[real], np.asarray(done_R)[real]
        self.fn(int(i), tokens_B, done_B)


@functools.lru_cache(maxsize=16)
def _shared_loops(cfg: Config, loop: LoopSettings, cached: bool) -> dict:
    """The compiled loops of one model config and loop settings, shared by every Generator."""
    return {}


def generate(params, cfg: Config, prompt_tokens, key: jax.Array, max_new_tokens: int = 500,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_samples: int = 1, stops: Sequence[Sequence[int]] = (), window_keep: int | None = None,
             on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> Generation:
    """``num_samples`` continuations of each prompt, with a KV cache, in compiled chunks of steps.

    ``prompt_tokens``: one prompt ([P] token ids), a batch of equal lengths ([B, P]) or a list of
    prompts of any lengths. Returns a Generation with B * num_samples rows, prompt-major: per row the
    new tokens (cut before any of ``stops``, token sequences) and their log-probabilities under the
    model. ``on_token(step, tokens_B, done_B)`` is called as each token is produced (streaming), with
    every row of the output; rows not produced by that step are marked done. ``window_keep``: see the
    module docstring. Raises ConfigError (bad settings or prompts), GenerationTooLargeError (a request
    that cannot fit in memory, refused up front), NonFiniteModelError (NaN or infinite logits).
    """
    settings = make_settings(cfg, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, stops=stops,
                             window_keep=window_keep, stream=on_token is not None)
    return Generator(cfg, settings, cached=True, on_token=on_token)(params, prompt_tokens, key)


def generate_reference(params, cfg: Config, prompt_tokens, key: jax.Array, max_new_tokens: int = 500,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       num_samples: int = 1, stops: Sequence[Sequence[int]] = (),
                       window_keep: int | None = None) -> Generation:
    """``generate`` without a cache: the model runs over the whole context at every step."""
    settings = make_settings(cfg, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, stops=stops,
                             window_keep=window_keep)
    return Generator(cfg, settings, cached=False)(params, prompt_tokens, key)
