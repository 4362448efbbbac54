import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model
from gpt_jax.config import make_config
from gpt_jax.model import count_params, cross_entropy, init_params

# Compiled, as every caller in the library uses them; op-by-op Flax is slow.
logits_fn = jax.jit(model.logits_fn, static_argnums=1)
loss_fn = jax.jit(model.loss_fn, static_argnums=1)

BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)


def tokens(B, T, seed=0, V=65):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, V, dtype=jnp.int32)


def test_logits_shape_and_param_count():
    cfg = make_config(**BASE)
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert logits_fn(params, cfg, tokens(3, 16)).shape == (3, 16, 65)
    assert logits_fn(params, cfg, tokens(3, 5)).shape == (3, 5, 65)
    # wte 65x32 + wpe 16x32 + per layer (qkv 32x96 + proj 32x32 + fc 32x128 + proj 128x32 + 2 ln) + ln_f
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + 2 * 32
    assert count_params(params) == 65 * 32 + 16 * 32 + 2 * per_layer + 32


def test_initial_loss_is_about_ln_vocab():
    for kind in ("gpt", "bigram"):
        cfg = make_config(model=kind, **BASE)
        params = init_params(cfg, jax.random.PRNGKey(1))
        x = tokens(8, 16)
        loss = float(loss_fn(params, cfg, x, tokens(8, 16, seed=2)))
        assert abs(loss - math.log(65)) < 0.1, (kind, loss)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_causality(pos_encoding, norm_position):
    """Changing tokens after position t leaves the logits up to t unchanged."""
    cfg = make_config(pos_encoding=pos_encoding, norm_position=norm_position, **BASE)
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = tokens(2, 16)
    t = 9
    changed = x.at[:, t + 1:].set((x[:, t + 1:] + 7) % 65)
    a, b = logits_fn(params, cfg, x), logits_fn(params, cfg, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


OPTIONS = list(itertools.product(["learned", "sinusoidal"], ["pre", "post"], [False, True],
                                 [False, True], [0.0, 0.2]))


@pytest.mark.parametrize("pos_encoding, norm_position, bias, tie, dropout", OPTIONS)
def test_every_option_combination_trains(pos_encoding, norm_position, bias, tie, dropout):
    cfg = make_config(**{**BASE, "dropout": dropout, "n_layer": 1}, pos_encoding=pos_encoding,
                      norm_position=norm_position, bias=bias, tie_embeddings=tie)
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert ("lm_head" in params) == (not tie)
    assert ("wpe" in params) == (pos_encoding == "learned")
    assert ("bias" in params["h_0"]["attn"]["c_attn"]) == bias
    x, y = tokens(2, 16), tokens(2, 16, seed=1)
    loss, grads = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=1)(
        params, cfg, x, y, jax.random.key(3, impl="rbg"))
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_dropout_acts_only_with_a_key():
    cfg = make_config(**{**BASE, "dropout": 0.5})
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = tokens(2, 16)
    np.testing.assert_array_equal(logits_fn(params, cfg, x), logits_fn(params, cfg, x))
    a = logits_fn(params, cfg, x, jax.random.PRNGKey(1))
    b = logits_fn(params, cfg, x, jax.random.PRNGKey(2))
    assert not np.allclose(a, b)


def test_residual_projections_are_scaled_at_init():
    cfg = make_config(**{**BASE, "n_layer": 8, "n_embd": 128, "n_head": 4})
    params = init_params(cfg, jax.random.PRNGKey(0))
    std_fc = float(jnp.std(params["h_0"]["mlp"]["c_fc"]["kernel"]))
    std_proj = float(jnp.std(params["h_0"]["mlp"]["c_proj"]["kernel"]))
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.0005


def test_cross_entropy_matches_its_definition():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5)).astype(jnp.bfloat16)
    targets = jnp.array([[0, 4, 2], [1, 1, 3]])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    expected = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    assert cross_entropy(logits, targets).dtype == jnp.float32
    np.testing.assert_allclose(cross_entropy(logits, targets), expected, rtol=1e-6)


def test_one_hot_embedding_equals_a_gather():
    _embed = model._embed
    table = jax.random.normal(jax.random.PRNGKey(0), (65, 32))
    idx = tokens(3, 7)
    np.testing.assert_array_equal(_embed(table, idx), jnp.take(table, idx, axis=0))


def test_longer_than_block_size_is_refused():
    cfg = make_config(**BASE)
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(Exception, match="exceeds block_size"):
        model.logits_fn(params, cfg, tokens(1, 17))


def test_config_change_changes_the_model():
    cfg = make_config(**BASE)
    other = dataclasses.replace(cfg, n_layer=3)
    assert count_params(init_params(other, jax.random.PRNGKey(0))) > count_params(
        init_params(cfg, jax.random.PRNGKey(0)))


# --- how the model is computed: layouts, precision, attention kernels ------------------------------

def _loss_and_grads(cfg, params, x, y, key=None):
    loss, grads = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=1)(params, cfg, x, y, key)
    return float(loss), model.unstack_layers(grads, cfg)


def _max_diff(a, b) -> float:
    return max(float(jnp.abs(x - y).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.parametrize("change", [dict(scan_layers=True), dict(scan_layers=True, remat=True)])
def test_scan_and_remat_compute_the_same_loss_and_gradients(change):
    cfg = make_config(**{**BASE, "n_layer": 3})
    other = dataclasses.replace(cfg, **change)
    params = init_params(cfg, jax.random.PRNGKey(0))
    other_params = init_params(other, jax.random.PRNGKey(0))  # same seed, same model, other layout
    assert _max_diff(model.unstack_layers(other_params, other), params) == 0.0
    if other.scan_layers:
        assert other_params["h"]["block"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 96)
        assert model.stack_layers(params, other).keys() == other_params.keys()
    x, y = tokens(4, 16), tokens(4, 16, seed=1)
    loss, grads = _loss_and_grads(cfg, params, x, y)
    other_loss, other_grads = _loss_and_grads(other, other_params, x, y)
    assert abs(loss - other_loss) < 1e-6 and _max_diff(grads, other_grads) < 1e-6


def test_remat_gives_the_same_loss_gradients_and_dropout_masks():
    cfg = make_config(**{**BASE, "dropout": 0.2})
    params = init_params(cfg, jax.random.PRNGKey(0))
    x, y, key = tokens(4, 16), tokens(4, 16, seed=1), jax.random.key(5)
    loss, grads = _loss_and_grads(cfg, params, x, y, key)
    remat_loss, remat_grads = _loss_and_grads(dataclasses.replace(cfg, remat=True), params, x, y, key)
    assert loss == remat_loss and _max_diff(grads, remat_grads) < 1e-6


def test_scanned_layers_decode_with_the_kv_cache():
    cfg = make_config(**BASE)
    scanned = dataclasses.replace(cfg, scan_layers=True)
    params = init_params(scanned, jax.random.PRNGKey(0))
    x = tokens(2, 16)
    logits, _ = model.cached_logits_fn(params, scanned, x, model.init_cache(scanned, 2))
    np.testing.assert_allclose(logits, logits_fn(params, scanned, x), atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_loss():
    cfg = make_config(**BASE)
    half = dataclasses.replace(cfg, dtype="bfloat16")
    params = init_params(half, jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    assert logits_fn(params, half, tokens(2, 16)).dtype == jnp.bfloat16
    x, y = tokens(4, 16), tokens(4, 16, seed=1)
    loss, grads = _loss_and_grads(cfg, params, x, y)
    half_loss, half_grads = _loss_and_grads(half, params, x, y)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half_grads)} == {jnp.dtype(jnp.float32)}
    assert abs(loss - half_loss) < 1e-2  # bfloat16 keeps 8 bits of mantissa
    assert model.compute_dtype(make_config(**BASE)) == jnp.float32  # auto on CPU
    cache = model.init_cache(half, 1)
    assert cache["layers"][0]["k"].dtype == jnp.bfloat16


def _decay_by_role(mask) -> dict[str, bool]:
    """{parameter path with the layer index dropped: decayed?}, the same for either layout."""
    by_role: dict[str, set[bool]] = {}
    for path, decays in jax.tree_util.tree_leaves_with_path(mask):
        role = re.sub(r"\['h_\d+'\]|\['h'\]\['block'\]", "[layer]", jax.tree_util.keystr(path))
        by_role.setdefault(role, set()).add(bool(decays))
    assert all(len(v) == 1 for v in by_role.values()), by_role  # every layer alike
    return {role: v.pop() for role, v in by_role.items()}


def test_weight_decay_mask_decays_matrices_not_biases_or_norms_in_either_layout():
    cfg = make_config(**{**BASE, "bias": True, "tie_embeddings": False})
    params = init_params(cfg, jax.random.PRNGKey(0))
    decay = _decay_by_role(model.weight_decay_mask(params, cfg))
    matrices = {"['wte']", "['wpe']", "['lm_head']['kernel']", "[layer]['attn']['c_attn']['kernel']",
                "[layer]['attn']['c_proj']['kernel']", "[layer]['mlp']['c_fc']['kernel']",
                "[layer]['mlp']['c_proj']['kernel']"}
    assert {role for role, d in decay.items() if d} == matrices
    assert "[layer]['ln_1']['scale']" in decay and "[layer]['mlp']['c_fc']['bias']" in decay
    scanned = dataclasses.replace(cfg, scan_layers=True)
    stacked = model.stack_layers(params, scanned)
    assert stacked["h"]["block"]["ln_1"]["scale"].ndim == 2  # [L, D]: a matrix only by its layer axis
    assert _decay_by_role(model.weight_decay_mask(stacked, scanned)) == decay
    bigram = make_config(**{**BASE, "model": "bigram"})
    assert model.weight_decay_mask(init_params(bigram, jax.random.PRNGKey(0)), bigram) == {"table": True}
