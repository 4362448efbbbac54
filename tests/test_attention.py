import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import attention, model
from gpt_jax.config import make_config
from gpt_jax.errors import ConfigError

BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)


def qkv(B, T, H, K, seed=0):
    return tuple(jax.random.normal(jax.random.PRNGKey(seed + i), (B, T, H, K)) for i in range(3))


def _reference_attention(q, k, v):
    T = q.shape[1]
    return attention.attention_xla(q, k, v, jnp.tril(jnp.ones((T, T), dtype=bool)))


def test_xla_attention_is_the_softmax_of_scaled_dot_products():
    q, k, v = qkv(2, 5, 3, 8)
    visible = jnp.tril(jnp.ones((5, 5), dtype=bool))
    out = attention.attention_xla(q, k, v, visible)
    for b, t, h in [(0, 0, 0), (1, 3, 2), (0, 4, 1)]:
        scores = k[b, : t + 1, h] @ q[b, t, h] / np.sqrt(8)
        weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(out[b, t, h], weights @ v[b, : t + 1, h], rtol=1e-5, atol=1e-6)


def test_pallas_flash_attention_matches_xla():
    """The TPU kernel, run by Pallas's interpreter on CPU: forward and gradients within 1e-5."""
    from jax.experimental.pallas import tpu as pltpu

    B, T, H, K = 1, 128, 2, 32
    q, k, v = qkv(B, T, H, K)
    tol = attention.ATTENTION_TOLERANCE["float32"]
    with pltpu.force_tpu_interpret_mode():
        out = attention.attention_pallas(q, k, v)
        grads = jax.grad(lambda *a: attention.attention_pallas(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, _reference_attention(q, k, v), atol=tol)
    ref_grads = jax.grad(lambda *a: _reference_attention(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=tol)


def test_cached_attention_in_pieces_equals_attention_over_the_whole_sequence():
    """A prompt of 5, then 1, then 3 tokens through the cache: the outputs of attending over all 9."""
    cfg = make_config(**BASE)
    B, T, H, K = 2, 9, cfg.n_head, cfg.head_dim
    q, k, v = qkv(B, T, H, K)
    layer_cache, pieces, pos = attention.empty_layer_cache(cfg, B, jnp.float32), [], 0
    for n in (5, 1, 3):
        y, layer_cache = attention.cached_attention(q[:, pos:pos + n], k[:, pos:pos + n], v[:, pos:pos + n],
                                                    layer_cache, jnp.asarray(pos))
        pieces.append(y)
        pos += n
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), _reference_attention(q, k, v), atol=1e-5)
    assert layer_cache["k"].shape == (B, H, cfg.block_size, K)
    np.testing.assert_array_equal(layer_cache["k"][:, :, :T], k.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(layer_cache["v"][:, :, T:], 0.0)  # nothing written past the tokens


def test_causal_attention_applies_dropout_to_the_weights_only_when_given():
    cfg = make_config(**{**BASE, "dropout": 0.5})
    q, k, v = qkv(1, 6, 2, 16)
    plain = attention.causal_attention(cfg, q, k, v)
    np.testing.assert_array_equal(plain, _reference_attention(q, k, v))
    dropped = attention.causal_attention(cfg, q, k, v, lambda probs: jnp.zeros_like(probs))
    np.testing.assert_array_equal(dropped, 0.0)


def test_attention_choice():
    cfg = make_config(**BASE)
    assert attention.attention_impl(cfg, 16, with_dropout=False) == "xla"  # auto on CPU
    for choice, needs in (("cudnn", "NVIDIA GPU"), ("pallas", "TPUs only")):
        message = f"attention={choice} cannot run: .*{needs}.*use attention=auto"
        with pytest.raises(ConfigError, match=message):
            attention.attention_impl(dataclasses.replace(cfg, attention=choice), 128, with_dropout=False)
    logits_fn = jax.jit(model.logits_fn, static_argnums=1)
    with pytest.raises(ConfigError, match="attention=cudnn cannot run"):  # refused at trace time too
        logits_fn(model.init_params(cfg, jax.random.PRNGKey(0)), dataclasses.replace(cfg, attention="cudnn"),
                  jnp.zeros((1, 16), jnp.int32))


def test_auto_attention_keeps_attention_dropout_on_xla(monkeypatch):
    """On a GPU that runs cuDNN, auto takes it for deterministic calls and XLA while attention
    dropout is active; an explicit fused choice with dropout is refused, not silently changed."""
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_cudnn_unsupported", lambda cfg: None)
    cfg = make_config(**{**BASE, "dropout": 0.1})
    assert attention.attention_impl(cfg, 16, with_dropout=False) == "cudnn"
    assert attention.attention_impl(cfg, 16, with_dropout=True) == "xla"
    with pytest.raises(ConfigError, match="no attention-weight dropout"):
        attention.attention_impl(dataclasses.replace(cfg, attention="cudnn"), 16, with_dropout=True)


@pytest.mark.parametrize("kernel", ["cudnn", "pallas"])
def test_a_kernel_of_another_platform_becomes_auto_with_a_warning(kernel):
    """A model trained with a fused kernel elsewhere samples on this CPU: the kernel is re-chosen."""
    cfg = make_config(**{**BASE, "attention": kernel})
    with pytest.warns(UserWarning, match=f"attention={kernel} cannot run: .*using attention=auto here"):
        assert attention.portable(cfg) == dataclasses.replace(cfg, attention="auto")


@pytest.mark.parametrize("kernel", ["xla", "auto"])
def test_a_kernel_that_runs_here_is_kept(kernel, recwarn):
    cfg = make_config(**{**BASE, "attention": kernel})
    assert attention.portable(cfg) is cfg
    assert not [w for w in recwarn if "attention" in str(w.message)]
