"""The train state: nanoGPT's schedule, AdamW's decay mask, fresh and abstract states."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from gpt_jax import model
from gpt_jax.state import abstract_state, init_state, lr_schedule, make_optimizer
from gpt_jax.training import setup_data


def nanogpt_lr(it, cfg):
    """nanoGPT's get_lr, transcribed as the reference."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def test_lr_schedule_is_nanogpts(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, warmup_iters=10, lr_decay_iters=100, learning_rate=1e-3,
                              min_lr=1e-4)
    schedule = lr_schedule(cfg)
    for it in [0, 1, 5, 9, 10, 11, 50, 99, 100, 101, 500]:
        assert float(schedule(it)) == pytest.approx(nanogpt_lr(it, cfg), rel=1e-5), it


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_applies_to_matrices_only(tiny_cfg, scan_layers):
    cfg, _ = setup_data(dataclasses.replace(tiny_cfg, bias=True, learning_rate=0.1, min_lr=0.0,
                                         scan_layers=scan_layers))
    state = init_state(cfg)
    zeros = jax.tree_util.tree_map(np.zeros_like, state.params)
    updates, _ = jax.jit(make_optimizer(cfg).update)(zeros, state.opt_state, state.params)
    # With zero gradients the only update is the decay, -lr * wd * p, on >= 2-D weights alone
    # (counted per layer: the scanned layout's stacking axis does not count).
    flat = jax.tree_util.tree_leaves_with_path(model.unstack_layers(updates, cfg))
    params = dict(jax.tree_util.tree_leaves_with_path(model.unstack_layers(state.params, cfg)))
    assert len(flat) == len(params) > 10
    for path, update in flat:
        if params[path].ndim >= 2:
            assert np.any(update != 0), path
        else:
            assert np.all(update == 0), path


def test_abstract_state_matches_the_real_one_without_computing_it(tiny_cfg):
    cfg, _ = setup_data(tiny_cfg)
    real, abstract = init_state(cfg), abstract_state(cfg)
    assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(abstract)
    for a, b in zip(jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(abstract), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype) and isinstance(b, jax.ShapeDtypeStruct)
