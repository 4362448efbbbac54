"""Optimizer, train state, the jitted train and eval steps, and the training loop.

The loop is a thin driver: ``train_step`` is one compiled function with the state donated, batches
come from ``get_batch(split, step, seed)`` and the dropout key is ``fold_in(seed, step)``, so the whole
run is a function of (config, data, step) and resuming from a checkpoint gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gpt_jax.checkpoint import Checkpointer, make_metadata
from gpt_jax.config import Config, expand, validate
from gpt_jax.data import TokenData, get_batch, load_data
from gpt_jax.errors import CheckpointError, ConfigError
from gpt_jax.model import init_params, loss_fn
from gpt_jax.xla_options import compiler_options


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: the number of updates applied
    params: Any
    opt_state: Any


def lr_schedule(cfg: Config) -> Callable[[jax.Array], jax.Array]:
    """nanoGPT's schedule: linear warmup to learning_rate, cosine decay to min_lr, then min_lr."""
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
    """AdamW with weight decay on weights of two or more dimensions only; global-norm clipping."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def init_state(cfg: Config) -> TrainState:
    params = init_params(cfg, jax.random.PRNGKey(cfg.seed))
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params))


def abstract_state(cfg: Config) -> TrainState:
    """Shapes and dtypes of the train state, without computing it (a restore target)."""
    return jax.eval_shape(lambda: init_state(cfg))


def dropout_key(cfg: Config, step: jax.Array) -> jax.Array:
    """The dropout key of ``step``. XLA's own generator ("rbg") rather than threefry: the same bits
    for the same key on the same backend, and several seconds less compile time per dropout model
    on CPU."""
    return jax.random.fold_in(jax.random.key(cfg.seed, impl="rbg"), step)


@functools.lru_cache(maxsize=8)
def make_train_step(cfg: Config) -> Callable:
    """``train_step(state, x_BxT, y_BxT) -> (state, metrics)``, compiled once, state donated."""
    optimizer = make_optimizer(cfg)
    schedule = lr_schedule(cfg)

    def train_step(state: TrainState, x_BxT: jax.Array, y_BxT: jax.Array):
        key = dropout_key(cfg, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, cfg, x_BxT, y_BxT, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options())


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: Config) -> Callable:
    """``eval_step(params, xs_NxBxT, ys_NxBxT) -> mean loss`` over N batches, in one compiled call."""

    def eval_step(params, xs_NxBxT: jax.Array, ys_NxBxT: jax.Array) -> jax.Array:
        losses_N = jax.lax.map(lambda xy: loss_fn(params, cfg, *xy), (xs_NxBxT, ys_NxBxT))
        return jnp.mean(losses_N)

    return jax.jit(eval_step, compiler_options=compiler_options())


def eval_batches(data: TokenData, split: str, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The fixed evaluation batches of a split: [eval_iters, B, T] each for x and y.

    The same every evaluation (so successive estimates compare like with like) and drawn from their
    own random stream, apart from the training batches.
    """
    tokens = data.split(split)
    stream = 2 + ("train", "val").index(split)
    pairs = [get_batch(tokens, i, cfg.seed, cfg.batch_size, cfg.block_size, stream)
             for i in range(cfg.eval_iters)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def evaluate(params: Any, cfg: Config, data: TokenData, batches: dict | None = None) -> dict[str, float]:
    """Mean loss over ``eval_iters`` batches of each split (the course's ``estimate_loss``).

    ``batches`` ({split: (xs, ys)} from ``eval_batches``) saves rebuilding them at every call.
    """
    eval_step = make_eval_step(cfg)
    batches = batches or {split: eval_batches(data, split, cfg) for split in ("train", "val")}
    return {split: float(eval_step(params, *xy)) for split, xy in batches.items()}


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    config: Config
    tokenizer: Any
    history: list[dict[str, Any]]
    best_val_loss: float


def prepare(cfg: Config, data: TokenData | None = None) -> tuple[Config, TokenData]:
    """Load the data and complete the config with its vocabulary size."""
    data = data if data is not None else load_data(cfg)
    vocab = data.tokenizer.vocab_size
    if cfg.vocab_size not in (0, vocab):
        raise ConfigError(f"vocab_size {cfg.vocab_size} differs from the tokenizer's {vocab}; "
                          "leave vocab_size at 0")
    cfg = validate(dataclasses.replace(cfg, vocab_size=vocab))
    data.check_block_size(cfg.block_size)
    return cfg, data


def train(cfg: Config, data: TokenData | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``cfg`` from scratch or resume it (``init_from="resume"``); returns the final state."""
    cfg, data = prepare(cfg, data)
    log = log or (lambda msg: tqdm.write(msg))
    out_dir = expand(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Checkpointer(out_dir, cfg.keep_checkpoints) as ckpt:
        state, best_val = _initial_state(cfg, ckpt, data, log)
        history = _Metrics(out_dir / "metrics.jsonl", int(state.step), cfg.init_from == "resume")
        loop = _Loop(cfg, data, ckpt, history, best_val, log)
        state = loop.run(state)
        ckpt.wait()
    return TrainResult(state, cfg, data.tokenizer, history.records, loop.best_val)


def _initial_state(cfg: Config, ckpt: Checkpointer, data: TokenData, log) -> tuple[TrainState, float]:
    if cfg.init_from == "resume":
        step, state, meta = ckpt.restore(abstract_state(cfg))
        saved_vocab = meta.get("tokenizer", {}).get("chars")
        if saved_vocab != data.tokenizer.chars:
            raise CheckpointError(f"the checkpoint at step {step} was trained on another vocabulary "
                                  f"than {data.source}; resume with the same dataset")
        log(f"resuming from step {step} in {ckpt.directory}")
        return state, meta["metrics"].get("best_val_loss", math.inf)
    if ckpt.steps():
        raise CheckpointError(
            f"{cfg.out_dir} already holds checkpoints (steps {ckpt.steps()}); continue them with "
            "--init_from=resume or choose another --out_dir"
        )
    return init_state(cfg), math.inf


class _Metrics:
    """metrics.jsonl, one JSON object per line; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, step: int, resume: bool):
        self.path, self.records = path, []
        if resume and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class _Loop:
    """Drives the compiled steps; syncs with the device only at log and eval steps."""

    def __init__(self, cfg: Config, data: TokenData, ckpt: Checkpointer, metrics: _Metrics,
                 best_val: float, log: Callable[[str], None]):
        self.cfg, self.data, self.ckpt, self.metrics, self.log = cfg, data, ckpt, metrics, log
        self.best_val = best_val
        self.train_step = make_train_step(cfg)
        self.eval_data = {split: eval_batches(data, split, cfg) for split in ("train", "val")}
        self.tokens_per_step = cfg.batch_size * cfg.block_size
        self.start = time.perf_counter()

    def run(self, state: TrainState) -> TrainState:
        cfg = self.cfg
        step = int(state.step)
        if step == 0:
            self._eval(state, step, {}, save=False)
        bar = tqdm(total=cfg.max_iters, initial=step, disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, leave=False)
        timer_step, timer = step, None  # the first interval starts after the first (compiling) step
        while step < cfg.max_iters:
            x_BxT, y_BxT = self.data.get_batch("train", step, cfg.seed, cfg.batch_size, cfg.block_size)
            state, metrics = self.train_step(state, x_BxT, y_BxT)
            step += 1
            bar.update(1)
            if timer is None:
                jax.block_until_ready(metrics)
                timer_step, timer = step, time.perf_counter()
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            if step % cfg.log_interval == 0 or is_eval:
                record = self._log_record(step, metrics, timer_step, timer)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                tok_s=f"{record['tokens_per_sec']:.0f}")
                if is_eval:
                    self._eval(state, step, record, save=True)
                else:
                    self.metrics.append(record)
                timer_step, timer = step, time.perf_counter()
        bar.close()
        return state

    def _log_record(self, step: int, metrics: dict, timer_step: int, timer: float) -> dict:
        loss, lr = float(metrics["loss"]), float(metrics["lr"])  # the host sync of this interval
        steps = step - timer_step
        rate = self.tokens_per_step * steps / (time.perf_counter() - timer) if steps else 0.0
        return {"step": step, "train_loss": loss, "lr": lr, "tokens_per_sec": rate,
                "elapsed_s": time.perf_counter() - self.start}

    def _eval(self, state: TrainState, step: int, record: dict, save: bool) -> None:
        losses = evaluate(state.params, self.cfg, self.data, self.eval_data)
        if record:  # the log record of this step: its batch loss moves aside for the estimates
            record = {**record, "batch_loss": record["train_loss"]}
        else:  # before the first update
            record = {"step": step, "lr": float(lr_schedule(self.cfg)(step)), "tokens_per_sec": 0.0}
        record.update(train_loss=losses["train"], val_loss=losses["val"],
                      elapsed_s=time.perf_counter() - self.start)
        improved = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        self.log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if save and (improved or self.cfg.always_save_checkpoint):
            meta_metrics = {**record, "best_val_loss": self.best_val}
            self.ckpt.save(step, state, make_metadata(self.cfg, self.data.tokenizer, meta_metrics))
            record["checkpoint"] = True
        self.metrics.append(record)
