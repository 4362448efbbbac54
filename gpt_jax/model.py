"""The models, in Flax Linen: the course's Bigram and a GPT. The only file that imports Flax.

Outside this file a model is a params pytree and the pure functions ``init_params``, ``logits_fn`` and
``loss_fn``. Shapes are named in variables: B batch, T time, D n_embd, H heads, K head size,
V vocabulary, F the MLP width (4D), N = B * T.

The residual stream is kept flat, [N, D]: XLA's CPU backend turns the weight gradients of a 3-D
activation (a contraction over both B and T) into slow transposing copies, and a flat stream halves
the time of a train step there while changing nothing on accelerators.

How the model is computed is configurable without changing what it computes: the compute ``dtype``
(parameters stay float32; layer norm statistics, softmax and the loss are float32), the ``attention``
kernel, ``remat`` and ``scan_layers`` (the blocks' parameters stacked on a leading layer axis under
``params["h"]["block"]``; ``stack_layers``/``unstack_layers`` convert between the two layouts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError

_INIT_STD = 0.02
ATTENTION_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # max |fused - xla| on unit-scale outputs


def compute_dtype(cfg: Config) -> jnp.dtype:
    """The dtype activations are computed in: bfloat16 on GPU and TPU, float32 on CPU, unless set."""
    if cfg.dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(cfg.dtype)


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

def attention_xla(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                  visible_TxS: jax.Array, dropout: Callable | None = None) -> jax.Array:
    """Softmax attention written out (the reference): [B, T, H, K]; softmax in float32."""
    scores_BxHxTxS = jnp.einsum("bqhk,bthk->bhqt", q_BxTxHxK, k_BxSxHxK) / math.sqrt(q_BxTxHxK.shape[-1])
    scores_BxHxTxS = jnp.where(visible_TxS, scores_BxHxTxS.astype(jnp.float32), -jnp.inf)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(q_BxTxHxK.dtype)
    if dropout is not None:
        probs_BxHxTxS = dropout(probs_BxHxTxS)
    return jnp.einsum("bhqt,bthk->bqhk", probs_BxHxTxS, v_BxSxHxK)


def attention_cudnn(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
    """Causal flash attention from cuDNN (NVIDIA GPUs; bfloat16 or float16)."""
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True,
                                        implementation="cudnn")


def attention_pallas(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
    """Causal flash attention, the Pallas TPU kernel (T a multiple of its 128-wide tiles)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
    y_BxHxTxK = flash_attention(q, k, v, causal=True, sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return y_BxHxTxK.transpose(0, 2, 1, 3)


_PALLAS_TILE = 128


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


class Bigram(nn.Module):
    """The course's first model: the next token's logits are a row of a V x V table."""

    config: Config

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool = True, cache: dict | None = None):
        V = self.config.vocab_size
        table_VxV = self.param("table", _normal(), (V, V))
        logits_BxTxV = _embed(table_VxV.astype(compute_dtype(self.config)), tokens_BxT)
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {**cache, "pos": cache["pos"] + tokens_BxT.shape[1]}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection.

    With a layer cache ({"k", "v"}: [B, H, W, K], W = block_size) the T new tokens sit at positions
    ``pos .. pos + T - 1``: their keys and values are written into the cache and the queries attend
    to every cached position up to their own (always XLA). Without one, the T tokens attend among
    themselves with the kernel ``attention_impl`` picks.
    """

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, T: int, *, deterministic: bool, layer_cache: dict | None = None,
                 pos: jax.Array | None = None):
        cfg = self.config
        N, D = x_NxD.shape
        B, H, K = N // T, cfg.n_head, cfg.head_dim
        qkv_Nx3D = _dense(cfg, 3 * D, "c_attn")(x_NxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_Nx3D.reshape(B, T, 3 * H, K), 3, axis=2)
        with_dropout = not deterministic and cfg.dropout > 0
        if layer_cache is None:
            impl = attention_impl(cfg, T, with_dropout=with_dropout)
            if impl == "cudnn":
                y_BxTxHxK = attention_cudnn(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
            elif impl == "pallas":
                y_BxTxHxK = attention_pallas(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
            else:
                visible_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
                attn_dropout = functools.partial(nn.Dropout(cfg.dropout), deterministic=deterministic)
                y_BxTxHxK = attention_xla(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, visible_TxT, attn_dropout)
        else:
            # The cache is kept as [B, H, W, K], the layout of the attention products: a step then
            # transposes only its own T new rows, never the whole cache.
            def write(entries_BxHxWxK, new_BxTxHxK):
                return jax.lax.dynamic_update_slice_in_dim(
                    entries_BxHxWxK, new_BxTxHxK.astype(entries_BxHxWxK.dtype).transpose(0, 2, 1, 3),
                    pos, axis=2)

            layer_cache = {"k": write(layer_cache["k"], k_BxTxHxK), "v": write(layer_cache["v"], v_BxTxHxK)}
            keys_BxHxSxK = layer_cache["k"].astype(q_BxTxHxK.dtype)
            scores_BxHxTxS = jnp.einsum("bqhk,bhtk->bhqt", q_BxTxHxK, keys_BxHxSxK) / math.sqrt(K)
            S = keys_BxHxSxK.shape[2]
            visible_TxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
            scores_BxHxTxS = jnp.where(visible_TxS, scores_BxHxTxS.astype(jnp.float32), -jnp.inf)
            probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(q_BxTxHxK.dtype)
            y_BxTxHxK = jnp.einsum("bhqt,bhtk->bqhk", probs_BxHxTxS,
                                   layer_cache["v"].astype(q_BxTxHxK.dtype))
        y_NxD = _residual_proj(cfg, D, "c_proj")(y_BxTxHxK.reshape(N, D))
        return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic), layer_cache


def _dense(cfg: Config, features: int, name: str, std: float = _INIT_STD) -> nn.Dense:
    """A linear layer: float32 parameters, computed in the compute dtype."""
    return nn.Dense(features, use_bias=cfg.bias, kernel_init=_normal(std), dtype=compute_dtype(cfg),
                    param_dtype=jnp.float32, name=name)


def _residual_proj(cfg: Config, features: int, name: str) -> nn.Dense:
    """A projection into the residual stream, init std scaled by 1/sqrt(2 n_layer) (GPT-2)."""
    return _dense(cfg, features, name, std=_INIT_STD / math.sqrt(2 * cfg.n_layer))


class MLP(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        D = x_NxD.shape[-1]
        h_NxF = _dense(cfg, 4 * D, "c_fc")(x_NxD)
        h_NxF = nn.gelu(h_NxF, approximate=True)
        y_NxD = _residual_proj(cfg, D, "c_proj")(h_NxF)
        return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic)


def _layer_norm(cfg: Config, name: str) -> nn.LayerNorm:
    # Statistics are computed in float32 whatever the compute dtype (Flax's default).
    return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=compute_dtype(cfg), name=name)


class Block(nn.Module):
    """Attention then MLP, each with a residual connection; layer norm before (pre) or after (post)."""

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, T: int, deterministic: bool, layer_cache: dict | None = None,
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


class _LayerStep(nn.Module):
    """One Block as the body of ``nn.scan`` over layers: the carry is the residual stream."""

    config: Config
    T: int
    deterministic: bool

    @nn.compact
    def __call__(self, x_NxD: jax.Array, _) -> tuple[jax.Array, None]:
        x_NxD, _ = Block(self.config, name="block")(x_NxD, self.T, self.deterministic)
        return x_NxD, None


def _scanned_layers(cfg: Config, T: int, deterministic: bool) -> nn.Module:
    step = nn.remat(_LayerStep, prevent_cse=False) if cfg.remat else _LayerStep
    scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=cfg.n_layer)
    return scan(cfg, T, deterministic, name="h")


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
        dtype = compute_dtype(cfg)
        wte_VxD = self.param("wte", _normal(), (V, D)).astype(dtype)
        if cfg.pos_encoding == "learned":
            wpe_WxD = self.param("wpe", _normal(), (cfg.block_size, D)).astype(dtype)
            pos_TxD = wpe_WxD[:T] if cache is None else jax.lax.dynamic_slice_in_dim(wpe_WxD, pos, T)
        else:
            pos_TxD = sinusoidal_positions(pos + jnp.arange(T), D).astype(dtype)
        x_BxTxD = _embed(wte_VxD, tokens_BxT) + pos_TxD
        x_NxD = nn.Dropout(cfg.dropout)(x_BxTxD.reshape(B * T, D), deterministic=deterministic)
        layers = []
        if cfg.scan_layers:
            if cache is not None:
                raise ConfigError("the KV cache needs the layers unrolled: call cached_logits_fn, which "
                                  "unstacks them (unstack_layers)")
            x_NxD, _ = _scanned_layers(cfg, T, deterministic)(x_NxD, None)
        else:
            # remat's static arguments count self as 0: T and deterministic are 2 and 3.
            block = nn.remat(Block, static_argnums=(2, 3)) if cfg.remat and cache is None else Block
            for i in range(cfg.n_layer):
                layer_cache = None if cache is None else cache["layers"][i]
                x_NxD, layer_cache = block(cfg, name=f"h_{i}")(x_NxD, T, deterministic, layer_cache, pos)
                layers.append(layer_cache)
        x_NxD = _layer_norm(cfg, "ln_f")(x_NxD)
        if cfg.tie_embeddings:
            logits_NxV = x_NxD @ wte_VxD.T
        else:
            logits_NxV = _dense(dataclasses.replace(cfg, bias=False), V, "lm_head")(x_NxD)
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
    """A fresh params pytree for ``cfg`` (float32).

    The same key gives the same model whatever ``scan_layers``, ``remat``, ``dtype`` or ``attention``:
    parameters are drawn for the unrolled layout and stacked for the scanned one.
    """
    unrolled = dataclasses.replace(cfg, scan_layers=False, remat=False, dtype="float32", attention="xla")
    params = _init_params(build_model(unrolled), key)
    return stack_layers(params, cfg) if cfg.scan_layers and cfg.model == "gpt" else params


def stack_layers(params: dict, cfg: Config) -> dict:
    """Unrolled params (``h_0`` .. ``h_{L-1}``) -> the scanned layout (``h/block``, leading axis L)."""
    if "h" in params:
        return params
    names = [f"h_{i}" for i in range(cfg.n_layer)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
    return {**{k: v for k, v in params.items() if k not in names}, "h": {"block": stacked}}


def unstack_layers(params: dict, cfg: Config) -> dict:
    """The scanned layout -> unrolled params; unrolled params are returned as they are."""
    if "h" not in params:
        return params
    layers = {f"h_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], params["h"]["block"])
              for i in range(cfg.n_layer)}
    return {**{k: v for k, v in params.items() if k != "h"}, **layers}


def for_decoding(params: dict, cfg: Config) -> tuple[dict, Config]:
    """(params, config) for the KV-cached path, which runs the layers unrolled."""
    if not cfg.scan_layers:
        return params, cfg
    return unstack_layers(params, cfg), dataclasses.replace(cfg, scan_layers=False, remat=False)


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


def init_cache(cfg: Config, batch_size: int, dtype: jnp.dtype | None = None) -> dict:
    """An empty KV cache: {"pos": 0, "layers": ({"k", "v"}: [B, H, block_size, K]) * n_layer}.

    Stored in the compute dtype unless ``dtype`` is given.
    """
    dtype = dtype or compute_dtype(cfg)
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(cfg.n_layer if cfg.model == "gpt" else 0))
    return {"pos": jnp.zeros((), jnp.int32), "layers": layers}


def cached_logits_fn(params: dict, cfg: Config, tokens_BxT: jax.Array, cache: dict
                     ) -> tuple[jax.Array, dict]:
    """Logits [B, T, V] of ``tokens`` continuing ``cache``, and the cache with them appended.

    The caller keeps ``cache["pos"] + T <= block_size``; positions past the cache are not checked
    inside a compiled loop. Scanned-layer params are unstacked first (``for_decoding`` does that once,
    outside a loop).
    """
    params, cfg = for_decoding(params, cfg)
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
