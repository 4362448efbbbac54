"""Causal self-attention as plain functions of q, k and v: the kernels, which kernel runs where, and the
step of cached attention used by generation. No Flax here: ``model.py`` holds the layers' parameters
and calls these.

Shapes: B batch, T queries (new tokens), S keys, H heads, K head size, W = block_size (cache length).
Every kernel takes q, k, v as [B, T, H, K] and returns [B, T, H, K]; the softmax is computed in float32.

Kernels (``Config.attention``): "xla" is the attention written out, the reference; "cudnn" is cuDNN's
flash attention (NVIDIA GPUs), "pallas" the Pallas flash-attention kernel (TPUs); "auto" picks the
fused kernel of the platform when it can run, else XLA. A kernel changes how attention is computed,
not its result (within ``ATTENTION_TOLERANCE``): a checkpoint trained with one samples with another
(``portable``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError

ATTENTION_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # max |fused - xla| on unit-scale outputs
_PALLAS_TILE = 128


def compute_dtype(cfg: Config) -> jnp.dtype:
    """The dtype activations are computed in: bfloat16 on GPU and TPU, float32 on CPU, unless set."""
    if cfg.dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(cfg.dtype)


# --- kernels ------------------------------------------------------------------------------------------

def attention_xla(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                  visible_TxS: jax.Array, dropout: Callable | None = None,
                  observe: Callable[[jax.Array], None] | None = None) -> jax.Array:
    """Softmax attention written out (the reference): [B, T, H, K] in q's dtype; softmax in float32.

    ``visible_TxS`` (bool) says which keys each query sees; ``dropout``, if given, is applied to the
    attention weights (probabilities [B, H, T, S]); ``observe``, if given, is called with those
    weights in float32 before dropout (how ``analysis.attention_weights`` sees them). Source: Vaswani
    et al. 2017, eq. 1.
    """
    scores_BxHxTxS = jnp.einsum("bqhk,bthk->bhqt", q_BxTxHxK, k_BxSxHxK) / math.sqrt(q_BxTxHxK.shape[-1])
    scores_BxHxTxS = jnp.where(visible_TxS, scores_BxHxTxS.astype(jnp.float32), -jnp.inf)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    if observe is not None:
        observe(probs_BxHxTxS)
    probs_BxHxTxS = probs_BxHxTxS.astype(q_BxTxHxK.dtype)
    if dropout is not None:
        probs_BxHxTxS = dropout(probs_BxHxTxS)
    return jnp.einsum("bhqt,bthk->bqhk", probs_BxHxTxS, v_BxSxHxK)


def attention_cudnn(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
    """Causal flash attention from cuDNN: [B, T, H, K] (NVIDIA GPUs; bfloat16 or float16 inputs).

    Raises whatever ``jax.nn.dot_product_attention`` raises where cuDNN cannot run; ``attention_impl``
    says so beforehand.
    """
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True,
                                        implementation="cudnn")


def attention_pallas(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
    """Causal flash attention, the Pallas TPU kernel: [B, T, H, K] (T a multiple of its 128-wide tiles).

    Off a TPU it runs only inside ``pltpu.force_tpu_interpret_mode()`` (the tests' interpreter).
    """
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
    y_BxHxTxK = flash_attention(q, k, v, causal=True, sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return y_BxHxTxK.transpose(0, 2, 1, 3)


# --- which kernel runs ------------------------------------------------------------------------------

def _cudnn_unsupported(cfg: Config) -> str | None:
    """Why cuDNN flash attention cannot run this model here, or None if it can."""
    device = jax.devices()[0]
    if jax.default_backend() != "gpu" or not hasattr(device, "compute_capability"):
        return f"it needs an NVIDIA GPU (this backend is {jax.default_backend()})"
    capability = float(device.compute_capability)
    if capability < 8.0:
        return f"it needs an Ampere or newer GPU (compute capability {capability} < 8.0)"
    if compute_dtype(cfg) not in (jnp.bfloat16, jnp.float16):
        return "it needs bfloat16 compute (set dtype=bfloat16 or auto)"
    limit = 256 if capability >= 9.0 else 128
    if cfg.head_dim % 8 or cfg.head_dim > limit:
        return (f"it needs a head size (n_embd / n_head = {cfg.head_dim}) that is a multiple of 8 "
                f"and <= {limit}")
    return None


def _pallas_unsupported(cfg: Config, T: int) -> str | None:
    """Why the Pallas kernel cannot run attention over ``T`` tokens here, or None if it can."""
    if jax.default_backend() != "tpu":
        return f"it runs on TPUs only (this backend is {jax.default_backend()})"
    if T % _PALLAS_TILE:
        return f"it needs a sequence length that is a multiple of {_PALLAS_TILE}, got {T}"
    return None


def attention_impl(cfg: Config, T: int, *, with_dropout: bool) -> str:
    """The kernel the uncached attention of ``T`` tokens uses: "xla", "cudnn" or "pallas".

    Fused kernels have no dropout on the attention weights, so while that dropout is active (training
    with ``dropout > 0``) "auto" uses XLA, and an explicit fused choice is an error rather than a
    silently different model. Evaluation and generation are deterministic and use the fused kernel.

    Raises ConfigError if ``cfg.attention`` names a fused kernel that cannot run here.
    """
    choice = cfg.attention
    if choice == "xla":
        return choice
    if choice == "auto":
        if with_dropout:
            return "xla"
        if jax.default_backend() == "gpu" and _cudnn_unsupported(cfg) is None:
            return "cudnn"
        if jax.default_backend() == "tpu" and _pallas_unsupported(cfg, T) is None:
            return "pallas"
        return "xla"
    reason = _cudnn_unsupported(cfg) if choice == "cudnn" else _pallas_unsupported(cfg, T)
    if reason is None and with_dropout:
        reason = (f"fused kernels have no attention-weight dropout (dropout={cfg.dropout}); set "
                  "dropout=0 or attention=auto, which uses XLA while dropout is active")
    if reason is not None:
        raise ConfigError(f"attention={choice} cannot run: {reason}; use attention=auto or xla")
    return choice


def portable(cfg: Config) -> Config:
    """``cfg`` for this machine: an attention kernel chosen for another platform becomes "auto".

    The kernel changes how attention is computed, not its result, so a model trained with
    ``attention=cudnn`` on a GPU can be sampled on a CPU. Warns (UserWarning) when it changes the
    kernel; returns ``cfg`` itself when the kernel can run here.
    """
    try:
        attention_impl(cfg, cfg.block_size, with_dropout=False)
    except ConfigError as e:
        warnings.warn(f"{e}: using attention=auto here", stacklevel=3)
        return dataclasses.replace(cfg, attention="auto")
    return cfg


# --- attention of a layer, uncached and cached ------------------------------------------------------

def causal_attention(cfg: Config, q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                     dropout: Callable | None = None,
                     observe: Callable[[jax.Array], None] | None = None) -> jax.Array:
    """Each of T tokens attends to itself and the tokens before it: [B, T, H, K].

    ``dropout`` (on the attention weights) is given only while it is active (training with
    ``cfg.dropout > 0``); the kernel is ``attention_impl``'s choice, which is XLA while it is.
    ``observe`` receives the attention weights [B, H, T, T] (float32); fused kernels never form them,
    so with it XLA runs. Raises ConfigError as ``attention_impl`` does.
    """
    T = q_BxTxHxK.shape[1]
    impl = "xla" if observe is not None else attention_impl(cfg, T, with_dropout=dropout is not None)
    if impl == "cudnn":
        return attention_cudnn(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
    if impl == "pallas":
        return attention_pallas(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
    visible_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
    return attention_xla(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, visible_TxT, dropout, observe)


def empty_layer_cache(cfg: Config, batch_size: int, dtype: jnp.dtype) -> dict:
    """One layer's empty KV cache: {"k", "v"}: zeros [B, H, W, K] of ``dtype``.

    Kept as [B, H, W, K], the layout of the attention products: a step then transposes only its own T
    new rows, never the whole cache.
    """
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array, layer_cache: dict,
                     pos: jax.Array) -> tuple[jax.Array, dict]:
    """Attention of T new tokens at positions ``pos .. pos + T - 1`` over a layer's KV cache.

    Their keys and values are written into ``layer_cache`` ({"k", "v"}: [B, H, W, K], any dtype) at
    ``pos``; each query attends to every cached position up to its own (always XLA: the queries are
    few). Returns (y [B, T, H, K] in q's dtype, the updated layer cache). ``pos + T <= W`` is the
    caller's to keep: inside a compiled loop it is not checked.
    """
    T, K = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]

    def write(entries_BxHxWxK, new_BxTxHxK):
        return jax.lax.dynamic_update_slice_in_dim(
            entries_BxHxWxK, new_BxTxHxK.astype(entries_BxHxWxK.dtype).transpose(0, 2, 1, 3), pos, axis=2)

    layer_cache = {"k": write(layer_cache["k"], k_BxTxHxK), "v": write(layer_cache["v"], v_BxTxHxK)}
    keys_BxHxSxK = layer_cache["k"].astype(q_BxTxHxK.dtype)
    scores_BxHxTxS = jnp.einsum("bqhk,bhtk->bhqt", q_BxTxHxK, keys_BxHxSxK) / math.sqrt(K)
    S = keys_BxHxSxK.shape[2]
    visible_TxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
    scores_BxHxTxS = jnp.where(visible_TxS, scores_BxHxTxS.astype(jnp.float32), -jnp.inf)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(q_BxTxHxK.dtype)
    y_BxTxHxK = jnp.einsum("bhqt,bhtk->bqhk", probs_BxHxTxS, layer_cache["v"].astype(q_BxTxHxK.dtype))
    return y_BxTxHxK, layer_cache
