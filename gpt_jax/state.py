"""The train state and how it changes: TrainState, the optimizer, the learning-rate schedule, and fresh
or abstract (shape-only) states laid out on a mesh.

Checkpoints restore into ``abstract_state`` and training starts from ``init_state``; both live here so
that neither ``checkpoint.py`` nor ``training.py`` needs the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gpt_jax import sharding
from gpt_jax.config import Config
from gpt_jax.model import init_params, weight_decay_mask


class TrainState(NamedTuple):
    """Everything a training step reads and writes; a checkpoint saves exactly this."""

    step: jax.Array  # int32 scalar: the number of updates applied
    params: Any  # the model's params pytree (float32)
    opt_state: Any  # optax state of ``make_optimizer(cfg)``


def lr_schedule(cfg: Config) -> Callable[[jax.Array], jax.Array]:
    """nanoGPT's schedule: ``step -> learning rate`` (float32 scalar).

    Linear warmup from ``learning_rate / (warmup_iters + 1)`` to ``learning_rate`` over
    ``warmup_iters`` steps, cosine decay to ``min_lr`` at ``lr_decay_iters`` (default ``max_iters``),
    then ``min_lr``; a constant ``learning_rate`` when ``decay_lr`` is off. Source: nanoGPT ``train.py``
    ``get_lr`` (SGDR cosine: Loshchilov & Hutter, 2017).
    """
    lr, min_lr, warmup, decay = cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters

    def schedule(step: jax.Array) -> jax.Array:
        if not cfg.decay_lr:
            return jnp.asarray(lr, jnp.float32)
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1) / (warmup + 1)
        ratio = jnp.clip((step - warmup) / max(decay - warmup, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (lr - min_lr)
        return jnp.where(step < warmup, warm, jnp.where(step > decay, min_lr, cosine))

    return schedule


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (Loshchilov & Hutter, 2019) with the schedule above.

    Weight decay applies where the model says (``model.weight_decay_mask``: matrices, not biases or
    norms). Always a chain, so the optimizer state has one structure whether or not ``grad_clip`` is
    set and a resume may change it; an infinite bound clips nothing.
    """
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=lambda params: weight_decay_mask(params, cfg))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip if cfg.grad_clip > 0 else math.inf), adamw)


def _fresh_state(cfg: Config) -> TrainState:
    params = init_params(cfg, jax.random.PRNGKey(cfg.seed))
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params))


def state_shardings(cfg: Config, mesh: Mesh) -> TrainState:
    """A ``NamedSharding`` per leaf of the train state on ``mesh``: replicated, or FSDP (``cfg.fsdp``)."""
    return sharding.tree_shardings(jax.eval_shape(lambda: _fresh_state(cfg)), mesh, cfg.fsdp)


def init_state(cfg: Config, mesh: Mesh | None = None) -> TrainState:
    """A fresh train state (params from ``PRNGKey(cfg.seed)``, step 0); with a mesh, created directly in
    its shardings (the same values)."""
    if mesh is None:
        return _fresh_state(cfg)
    return jax.jit(lambda: _fresh_state(cfg), out_shardings=state_shardings(cfg, mesh))()


def state_from_params(cfg: Config, params: Any, mesh: Mesh | None = None) -> TrainState:
    """A train state at step 0 that starts from ``params`` (pretrained weights, host arrays shaped as
    ``init_params`` makes them) with a fresh optimizer state; with a mesh, laid out in its shardings
    (each process gives the same full arrays and keeps its own shards)."""
    def build(params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params))

    if mesh is None:
        return build(jax.tree_util.tree_map(jnp.asarray, params))
    shardings = state_shardings(cfg, mesh)
    params = jax.tree_util.tree_map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                                    params, shardings.params)
    return jax.jit(build, out_shardings=shardings)(params)


def abstract_state(cfg: Config, mesh: Mesh | None = None) -> TrainState:
    """Shapes and dtypes of the train state (``jax.ShapeDtypeStruct`` leaves), without computing it: a
    restore target. With a mesh the leaves carry their shardings there, so a checkpoint restores onto
    any device count."""
    abstract = jax.eval_shape(lambda: _fresh_state(cfg))
    if mesh is None:
        return abstract
    return sharding.with_shardings(abstract, sharding.tree_shardings(abstract, mesh, cfg.fsdp))
