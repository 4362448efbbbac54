"""The models, in Flax Linen: the course's Bigram and a GPT. The only file that imports Flax.

Outside this file a model is a params pytree and the pure functions ``init_params``, ``logits_fn``,
``loss_fn`` and ``weight_decay_mask``. Attention itself (kernels, kernel choice, the KV-cache step) is
plain functions in ``attention.py``. Shapes are named in variables: B batch, T time, D n_embd,
H heads, K head size, V vocabulary, F the MLP width (4D), N = B * T.

The residual stream is kept flat, [N, D]: XLA's CPU backend turns the weight gradients of a 3-D
activation (a contraction over both B and T) into slow transposing copies, which a flat stream avoids
(benchmarks/cpu_profile.py shows where a step's time goes); on accelerators it changes nothing.

How the model is computed is configurable without changing what it computes: the compute ``dtype``
(parameters stay float32; layer norm statistics, softmax and the loss are float32), the ``attention``
kernel, ``remat`` and ``scan_layers`` (the blocks' parameters stacked on a leading layer axis under
``params["h"]["block"]``; ``stack_layers``/``unstack_layers`` convert between the two layouts).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# compute_dtype is also imported from here (gpt_jax.model.compute_dtype) by other modules.
from gpt_jax.attention import cached_attention, causal_attention, compute_dtype, empty_layer_cache
from gpt_jax.config import Config
from gpt_jax.errors import ConfigError

_INIT_STD = 0.02


def _normal(std: float = _INIT_STD):
    return nn.initializers.normal(stddev=std)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...]) -> jax.Array:
    """A parameter of ``module`` drawn from N(0, 0.02), stored in float32, used in the compute dtype."""
    return module.param(name, _normal(), shape).astype(compute_dtype(module.config))


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
        logits_BxTxV = _embed(_weight(self, "table", (V, V)), tokens_BxT)
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {**cache, "pos": cache["pos"] + tokens_BxT.shape[1]}


def _dense(cfg: Config, features: int, name: str, std: float = _INIT_STD) -> nn.Dense:
    """A linear layer: float32 parameters, computed in the compute dtype."""
    return nn.Dense(features, use_bias=cfg.bias, kernel_init=_normal(std), dtype=compute_dtype(cfg),
                    param_dtype=jnp.float32, name=name)


def _residual_proj(cfg: Config, features: int, name: str) -> nn.Dense:
    """A projection into the residual stream, init std scaled by 1/sqrt(2 n_layer) (GPT-2)."""
    return _dense(cfg, features, name, std=_INIT_STD / math.sqrt(2 * cfg.n_layer))


def _layer_norm(cfg: Config, name: str) -> nn.LayerNorm:
    # Statistics are computed in float32 whatever the compute dtype (Flax's default).
    return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=compute_dtype(cfg), name=name)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection.

    Without a layer cache the T tokens attend among themselves (``attention.causal_attention``, which
    picks the kernel). With one ({"k", "v"}: [B, H, W, K]) they are new tokens at positions
    ``pos .. pos + T - 1`` and attend to everything cached before them as well
    (``attention.cached_attention``); the updated layer cache is returned next to the output.
    """

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, T: int, *, deterministic: bool, layer_cache: dict | None = None,
                 pos: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        N, D = x_NxD.shape
        qkv_Nx3D = _dense(cfg, 3 * D, "c_attn")(x_NxD)
        qkv_BxTx3HxK = qkv_Nx3D.reshape(N // T, T, 3 * cfg.n_head, cfg.head_dim)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_BxTx3HxK, 3, axis=2)
        if layer_cache is None:
            training = not deterministic and cfg.dropout > 0
            attn_dropout = nn.Dropout(cfg.dropout, deterministic=False) if training else None
            y_BxTxHxK = causal_attention(cfg, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, attn_dropout,
                                         observe=self._observer())
        else:
            y_BxTxHxK, layer_cache = cached_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, layer_cache, pos)
        y_NxD = _residual_proj(cfg, D, "c_proj")(y_BxTxHxK.reshape(N, D))
        return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic), layer_cache


    def _observer(self):
        """Records the attention weights in the "intermediates" collection when the caller asks for it
        (``apply(..., mutable=["intermediates"])``, as ``analysis.attention_weights`` does)."""
        if not self.is_mutable_collection("intermediates"):
            return None
        return lambda probs_BxHxTxT: self.sow("intermediates", "attention_weights", probs_BxHxTxT)


class MLP(nn.Module):
    """Linear to 4D, GELU (tanh approximation, as GPT-2), linear back to D; dropout."""

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        D = x_NxD.shape[-1]
        h_NxF = _dense(cfg, 4 * D, "c_fc")(x_NxD)
        h_NxF = nn.gelu(h_NxF, approximate=True)
        y_NxD = _residual_proj(cfg, D, "c_proj")(h_NxF)
        return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic)


class Block(nn.Module):
    """Attention then MLP, each with a residual connection; layer norm before (pre) or after (post).

    Returns the residual stream [N, D] and the layer's cache (None without one).
    """

    config: Config

    @nn.compact
    def __call__(self, x_NxD: jax.Array, T: int, deterministic: bool, layer_cache: dict | None = None,
                 pos: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        attn = functools.partial(CausalSelfAttention(cfg, name="attn"), T=T, deterministic=deterministic,
                                 layer_cache=layer_cache, pos=pos)
        mlp = functools.partial(MLP(cfg, name="mlp"), deterministic=deterministic)
        ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
        if cfg.norm_position == "pre":  # GPT-2
            a_NxD, layer_cache = attn(ln_1(x_NxD))
            x_NxD = x_NxD + a_NxD
            x_NxD = x_NxD + mlp(ln_2(x_NxD))
        else:  # the original Transformer
            a_NxD, layer_cache = attn(x_NxD)
            x_NxD = ln_1(x_NxD + a_NxD)
            x_NxD = ln_2(x_NxD + mlp(x_NxD))
        return x_NxD, layer_cache


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


def _unrolled_layers(cfg: Config, x_NxD: jax.Array, T: int, deterministic: bool, cache: dict | None
                     ) -> tuple[jax.Array, tuple[dict, ...]]:
    """The blocks ``h_0 .. h_{L-1}`` one after the other: the residual stream and the layer caches."""
    # remat's static arguments count self as 0: T and deterministic are 2 and 3.
    block = nn.remat(Block, static_argnums=(2, 3)) if cfg.remat and cache is None else Block
    pos = None if cache is None else cache["pos"]
    layer_caches = []
    for i in range(cfg.n_layer):
        layer_cache = None if cache is None else cache["layers"][i]
        x_NxD, layer_cache = block(cfg, name=f"h_{i}")(x_NxD, T, deterministic, layer_cache, pos)
        layer_caches.append(layer_cache)
    return x_NxD, tuple(layer_caches)


def _layers(cfg: Config, x_NxD: jax.Array, T: int, deterministic: bool, cache: dict | None
            ) -> tuple[jax.Array, tuple[dict, ...]]:
    """The ``n_layer`` blocks, scanned or unrolled: the residual stream [N, D] and the layer caches."""
    if not cfg.scan_layers:
        return _unrolled_layers(cfg, x_NxD, T, deterministic, cache)
    if cache is not None:
        raise ConfigError("the KV cache needs the layers unrolled: call cached_logits_fn, which "
                          "unstacks them (unstack_layers)")
    x_NxD, _ = _scanned_layers(cfg, T, deterministic)(x_NxD, None)
    return x_NxD, ()


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
        wte_VxD = _weight(self, "wte", (padded_vocab_size(cfg), D))
        x_BxTxD = _embed(wte_VxD, tokens_BxT) + self._positions(pos, T)
        x_NxD = nn.Dropout(cfg.dropout)(x_BxTxD.reshape(B * T, D), deterministic=deterministic)
        x_NxD, layer_caches = _layers(cfg, x_NxD, T, deterministic, cache)
        x_NxD = _layer_norm(cfg, "ln_f")(x_NxD)
        logits_BxTxV = self._lm_head(wte_VxD, x_NxD)[:, :V].reshape(B, T, V)
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {"pos": pos + T, "layers": layer_caches}

    def _positions(self, pos: int | jax.Array, T: int) -> jax.Array:
        """The position encodings of positions ``pos .. pos + T - 1``: [T, D]."""
        cfg = self.config
        if cfg.pos_encoding == "learned":
            wpe_WxD = _weight(self, "wpe", (cfg.block_size, cfg.n_embd))
            return jax.lax.dynamic_slice_in_dim(wpe_WxD, pos, T)
        return sinusoidal_positions(pos + jnp.arange(T), cfg.n_embd).astype(compute_dtype(cfg))

    def _lm_head(self, wte_VxD: jax.Array, x_NxD: jax.Array) -> jax.Array:
        """Logits [N, V]: the token embedding transposed (tied), or a layer of its own without bias."""
        cfg = self.config
        if cfg.tie_embeddings:
            return x_NxD @ wte_VxD.T
        return _dense(dataclasses.replace(cfg, bias=False), padded_vocab_size(cfg), "lm_head")(x_NxD)


def padded_vocab_size(cfg: Config) -> int:
    """Rows of the token embedding (and output layer): ``vocab_size``, rounded up to a multiple of 64
    for the gpt2 tokenizer (50,257 -> 50,304, as nanoGPT pads it, for faster matrix multiplies on
    accelerators). The padded rows are never an input, and their logits are cut off: the model's
    output always has ``vocab_size`` columns."""
    return -(-cfg.vocab_size // 64) * 64 if cfg.tokenizer == "gpt2" else cfg.vocab_size


@functools.lru_cache(maxsize=32)
def build_model(cfg: Config) -> nn.Module:
    """The Flax module of ``cfg`` (GPT or Bigram), one per config. Raises ConfigError without a vocab_size."""
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
    layers = tuple(empty_layer_cache(cfg, batch_size, dtype)
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
    """Mean next-token cross-entropy (nats, float32 scalar) of ``targets`` [B, T]; dropout only with a key."""
    return cross_entropy(logits_fn(params, cfg, tokens_BxT, dropout_key), targets_BxT)


def count_params(params: dict) -> int:
    """The number of parameters (scalars) in ``params``."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def weight_decay_mask(params: dict, cfg: Config) -> dict:
    """Which parameters weight decay applies to: a pytree of bool shaped like ``params``.

    True for weights that are matrices per layer (two or more dimensions: the embeddings, linear
    kernels, the bigram table), False for biases and layer-norm scales (nanoGPT's
    ``configure_optimizers`` splits the same way). Dimensions are counted per layer: in the scanned
    layout (``cfg.scan_layers``, ``params["h"]``) the leading layer axis does not make a layer-norm
    scale a matrix. ``params`` may be arrays or shapes (``jax.ShapeDtypeStruct``).
    """
    def decays(path: tuple, p: jax.Array) -> bool:
        stacked = cfg.scan_layers and getattr(path[0], "key", None) == "h"
        return p.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(decays, params)

