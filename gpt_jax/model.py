"""The models, in Flax Linen: the course's Bigram and a GPT. The only file that imports Flax.

Outside this file a model is a params pytree and the pure functions ``init_params``, ``logits_fn`` and
``loss_fn``. Shapes are named in variables: B batch, T time, D n_embd, H heads, K head size,
V vocabulary, F the MLP width (4D), N = B * T.

The residual stream is kept flat, [N, D]: XLA's CPU backend turns the weight gradients of a 3-D
activation (a contraction over both B and T) into slow transposing copies, and a flat stream halves
the time of a train step there while changing nothing on accelerators.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError

_INIT_STD = 0.02


def _normal(std: float = _INIT_STD):
    return nn.initializers.normal(stddev=std)


def _embed(table_VxD: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """Rows of ``table`` for ``tokens``: [B, T, D].

    On CPU a one-hot matmul: XLA's CPU scatter-add (the gather's gradient) is a slow serial loop,
    while the matmul and its transpose are fast. Both give the same numbers, since each output is
    one product with 1.0. Elsewhere a gather, which is cheaper for large vocabularies.
    """
    if jax.default_backend() == "cpu":
        (B, T), (V, D) = tokens_BxT.shape, table_VxD.shape
        one_hot_NxV = jax.nn.one_hot(tokens_BxT.reshape(B * T), V, dtype=table_VxD.dtype)
        return (one_hot_NxV @ table_VxD).reshape(B, T, D)
    return jnp.take(table_VxD, tokens_BxT, axis=0)


class Bigram(nn.Module):
    """The course's first model: the next token's logits are a row of a V x V table."""

    config: Config

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool = True, cache: dict | None = None):
        V = self.config.vocab_size
        table_VxV = self.param("table", _normal(), (V, V))
        logits_BxTxV = _embed(table_VxV, tokens_BxT)
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {**cache, "pos": cache["pos"] + tokens_BxT.shape[1]}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection.

    With a layer cache ({"k", "v"}: [B, H, W, K], W = block_size) the T new tokens sit at positions
    ``pos .. pos + T - 1``: their keys and values are written into the cache and the queries attend
    to every cached position up to their own. Without one, the T tokens attend among themselves.
    """

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, T: int, *, deterministic: bool, layer_cache: dict | None = None,
                 pos: jax.Array | None = None):
        cfg = self.config
        N, D = x_NxD.shape
        B, H, K = N // T, cfg.n_head, cfg.head_dim
        qkv_Nx3D = nn.Dense(3 * D, use_bias=cfg.bias, kernel_init=_normal(), name="c_attn")(x_NxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_Nx3D.reshape(B, T, 3 * H, K), 3, axis=2)
        if layer_cache is None:
            scores_BxHxTxS = jnp.einsum("bqhk,bthk->bhqt", q_BxTxHxK, k_BxTxHxK)
            values, values_spec = v_BxTxHxK, "bhqt,bthk->bqhk"
            visible_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
        else:
            # The cache is kept as [B, H, W, K], the layout of the attention products: a step then
            # transposes only its own T new rows, never the whole cache.
            def write(entries_BxHxWxK, new_BxTxHxK):
                return jax.lax.dynamic_update_slice_in_dim(
                    entries_BxHxWxK, new_BxTxHxK.transpose(0, 2, 1, 3), pos, axis=2)

            layer_cache = {"k": write(layer_cache["k"], k_BxTxHxK), "v": write(layer_cache["v"], v_BxTxHxK)}
            scores_BxHxTxS = jnp.einsum("bqhk,bhtk->bhqt", q_BxTxHxK, layer_cache["k"])
            values, values_spec = layer_cache["v"], "bhqt,bhtk->bqhk"
            S = layer_cache["k"].shape[2]
            visible_TxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
        scores_BxHxTxS = scores_BxHxTxS / math.sqrt(K)
        scores_BxHxTxS = jnp.where(visible_TxS, scores_BxHxTxS.astype(jnp.float32), -jnp.inf)
        probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(x_NxD.dtype)
        probs_BxHxTxS = nn.Dropout(cfg.dropout)(probs_BxHxTxS, deterministic=deterministic)
        y_BxTxHxK = jnp.einsum(values_spec, probs_BxHxTxS, values)
        y_NxD = _residual_proj(cfg, D, "c_proj")(y_BxTxHxK.reshape(N, D))
        return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic), layer_cache


def _residual_proj(cfg: Config, features: int, name: str) -> nn.Dense:
    """A projection into the residual stream, init std scaled by 1/sqrt(2 n_layer) (GPT-2)."""
    std = _INIT_STD / math.sqrt(2 * cfg.n_layer)
    return nn.Dense(features, use_bias=cfg.bias, kernel_init=_normal(std), name=name)


class MLP(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        D = x_NxD.shape[-1]
        h_NxF = nn.Dense(4 * D, use_bias=cfg.bias, kernel_init=_normal(), name="c_fc")(x_NxD)
        h_NxF = nn.gelu(h_NxF, approximate=True)
        y_NxD = _residual_proj(cfg, D, "c_proj")(h_NxF)
        return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic)


def _layer_norm(cfg: Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, name=name)


class Block(nn.Module):
    """Attention then MLP, each with a residual connection; layer norm before (pre) or after (post)."""

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, T: int, *, deterministic: bool, layer_cache: dict | None = None,
                 pos: jax.Array | None = None):
        cfg = self.config
        attn, mlp = CausalSelfAttention(cfg, name="attn"), MLP(cfg, name="mlp")
        ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
        if cfg.norm_position == "pre":
            a_NxD, layer_cache = attn(ln_1(x_NxD), T, deterministic=deterministic,
                                      layer_cache=layer_cache, pos=pos)
            x_NxD = x_NxD + a_NxD
            return x_NxD + mlp(ln_2(x_NxD), deterministic=deterministic), layer_cache
        a_NxD, layer_cache = attn(x_NxD, T, deterministic=deterministic, layer_cache=layer_cache, pos=pos)
        x_NxD = ln_1(x_NxD + a_NxD)
        return ln_2(x_NxD + mlp(x_NxD, deterministic=deterministic)), layer_cache


def sinusoidal_positions(positions_T: jax.Array, D: int) -> jax.Array:
    """The fixed encoding of "Attention Is All You Need": [T, D], sin on even, cos on odd features."""
    freq_half = jnp.exp(-math.log(10000.0) * jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angles_TxHalf = positions_T.astype(jnp.float32)[:, None] * freq_half
    T = positions_T.shape[0]
    return jnp.stack([jnp.sin(angles_TxHalf), jnp.cos(angles_TxHalf)], axis=-1).reshape(T, D)


class GPT(nn.Module):
    """Token embedding + positions, ``n_layer`` blocks, final layer norm, output layer.

    ``cache=None``: logits [B, T, V] for tokens at positions 0..T-1. With a cache (``init_cache``),
    the tokens continue it at positions ``cache["pos"]..`` and (logits, new cache) is returned.
    """

    config: Config

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool = True, cache: dict | None = None):
        cfg = self.config
        (B, T), D, V = tokens_BxT.shape, cfg.n_embd, cfg.vocab_size
        pos = 0 if cache is None else cache["pos"]
        wte_VxD = self.param("wte", _normal(), (V, D))
        if cfg.pos_encoding == "learned":
            wpe_WxD = self.param("wpe", _normal(), (cfg.block_size, D))
            pos_TxD = wpe_WxD[:T] if cache is None else jax.lax.dynamic_slice_in_dim(wpe_WxD, pos, T)
        else:
            pos_TxD = sinusoidal_positions(pos + jnp.arange(T), D)
        x_BxTxD = _embed(wte_VxD, tokens_BxT) + pos_TxD
        x_NxD = nn.Dropout(cfg.dropout)(x_BxTxD.reshape(B * T, D), deterministic=deterministic)
        layers = []
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else cache["layers"][i]
            x_NxD, layer_cache = Block(cfg, name=f"h_{i}")(x_NxD, T, deterministic=deterministic,
                                                           layer_cache=layer_cache, pos=pos)
            layers.append(layer_cache)
        x_NxD = _layer_norm(cfg, "ln_f")(x_NxD)
        if cfg.tie_embeddings:
            logits_NxV = x_NxD @ wte_VxD.T
        else:
            logits_NxV = nn.Dense(V, use_bias=False, kernel_init=_normal(), name="lm_head")(x_NxD)
        logits_BxTxV = logits_NxV.reshape(B, T, V)
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {"pos": pos + T, "layers": tuple(layers)}


@functools.lru_cache(maxsize=32)
def build_model(cfg: Config) -> nn.Module:
    if cfg.vocab_size <= 0:
        raise ConfigError("vocab_size is not set; take it from the tokenizer (tokenizer.vocab_size)")
    return GPT(cfg) if cfg.model == "gpt" else Bigram(cfg)


def init_params(cfg: Config, key: jax.Array) -> dict:
    """A fresh params pytree for ``cfg`` (float32)."""
    return _init_params(build_model(cfg), key)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: nn.Module, key: jax.Array) -> dict:
    tokens_1xT = jnp.zeros((1, model.config.block_size), dtype=jnp.int32)
    return model.init({"params": key}, tokens_1xT)["params"]


def logits_fn(params: dict, cfg: Config, tokens_BxT: jax.Array,
              dropout_key: jax.Array | None = None) -> jax.Array:
    """Next-token logits [B, T, V] for tokens [B, T] (T <= block_size). Dropout only with a key."""
    if tokens_BxT.shape[-1] > cfg.block_size:
        raise ConfigError(f"sequence length {tokens_BxT.shape[-1]} exceeds block_size {cfg.block_size}")
    train = dropout_key is not None and cfg.dropout > 0
    rngs = {"dropout": dropout_key} if train else {}
    return build_model(cfg).apply({"params": params}, tokens_BxT, deterministic=not train, rngs=rngs)


def init_cache(cfg: Config, batch_size: int, dtype: jnp.dtype = jnp.float32) -> dict:
    """An empty KV cache: {"pos": 0, "layers": ({"k", "v"}: [B, H, block_size, K]) * n_layer}."""
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(cfg.n_layer if cfg.model == "gpt" else 0))
    return {"pos": jnp.zeros((), jnp.int32), "layers": layers}


def cached_logits_fn(params: dict, cfg: Config, tokens_BxT: jax.Array, cache: dict
                     ) -> tuple[jax.Array, dict]:
    """Logits [B, T, V] of ``tokens`` continuing ``cache``, and the cache with them appended.

    The caller keeps ``cache["pos"] + T <= block_size``; positions past the cache are not checked
    inside a compiled loop.
    """
    return build_model(cfg).apply({"params": params}, tokens_BxT, deterministic=True, cache=cache)


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    # A one-hot product rather than a gather: its gradient is elementwise, not a scatter.
    one_hot_BxTxV = jax.nn.one_hot(targets_BxT, logits_BxTxV.shape[-1], dtype=jnp.float32)
    target_BxT = jnp.sum(logits_BxTxV * one_hot_BxTxV, axis=-1)
    return jnp.mean(logz_BxT - target_BxT)


def loss_fn(params: dict, cfg: Config, tokens_BxT: jax.Array, targets_BxT: jax.Array,
            dropout_key: jax.Array | None = None) -> jax.Array:
    return cross_entropy(logits_fn(params, cfg, tokens_BxT, dropout_key), targets_BxT)


def count_params(params: dict) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
