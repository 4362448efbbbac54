"""Optimizer, train state, the jitted train and eval steps, and the training loop.

The loop is a thin driver: ``train_step`` is one compiled function with the state donated, batches
come from ``get_batch(split, step, seed)`` and the dropout key is ``fold_in(seed, step)``, so the whole
run is a function of (config, data, step) and resuming from a checkpoint gives the same numbers.

Devices: the steps are compiled for a mesh (``gpt_jax.sharding``) with the batch split over its
``data`` axis and the state replicated or FSDP-sharded; one device is the same code with a mesh of one.
With ``gradient_accumulation_steps`` = A the step takes [A, B, T] and sums the gradients of its A
micro-batches in a ``lax.scan`` before one update: the same update as one batch of A * B rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gpt_jax import sharding
from gpt_jax.checkpoint import Checkpointer, config_from_metadata, make_metadata
from gpt_jax.config import Config, expand, resume_differences, validate
from gpt_jax.data import TokenData, get_batch, load_data
from gpt_jax.errors import CheckpointError, ConfigError, NonFiniteLossError
from gpt_jax.model import init_params, loss_fn
from gpt_jax.runlock import RunLock
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
    """AdamW with weight decay on weights of two or more dimensions only; global-norm clipping.

    Dimensions are counted per layer: in the scanned layout (``params["h"]``) the leading layer axis
    does not make a layer-norm scale a matrix.
    """
    def decay_mask(params):
        def per_layer_ndim(path, p):
            stacked = cfg.scan_layers and getattr(path[0], "key", None) == "h"
            return p.ndim - stacked >= 2

        return jax.tree_util.tree_map_with_path(per_layer_ndim, params)

    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    # Always a chain, so the optimizer state has one structure whether or not grad_clip is set and a
    # resume may change it; an infinite bound clips nothing.
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip if cfg.grad_clip > 0 else math.inf), adamw)


def init_state(cfg: Config, mesh: Mesh | None = None) -> TrainState:
    """A fresh train state; with a mesh, created directly in its shardings (same values)."""
    def fresh() -> TrainState:
        params = init_params(cfg, jax.random.PRNGKey(cfg.seed))
        return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params))

    if mesh is None:
        return fresh()
    return jax.jit(fresh, out_shardings=state_shardings(cfg, mesh))()


def abstract_state(cfg: Config, mesh: Mesh | None = None) -> TrainState:
    """Shapes and dtypes of the train state, without computing it: a restore target. With a mesh
    the leaves carry their shardings there, so a checkpoint restores onto any device count."""
    abstract = jax.eval_shape(lambda: init_state(cfg))
    if mesh is None:
        return abstract
    return sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh, cfg.fsdp))


def state_shardings(cfg: Config, mesh: Mesh) -> TrainState:
    return sharding.state_shardings(jax.eval_shape(lambda: init_state(cfg)), mesh, cfg.fsdp)


def dropout_key(cfg: Config, step: jax.Array) -> jax.Array:
    """The dropout key of ``step``. XLA's own generator ("rbg") rather than threefry: the same bits
    for the same key on the same backend, and several seconds less compile time per dropout model
    on CPU."""
    return jax.random.fold_in(jax.random.key(cfg.seed, impl="rbg"), step)


@functools.lru_cache(maxsize=8)
def make_train_step(cfg: Config, mesh: Mesh | None = None) -> Callable:
    """``train_step(state, x, y) -> (state, metrics)``, compiled once, state donated.

    x and y are [B, T], or [A, B, T] with ``gradient_accumulation_steps`` = A > 1. The default mesh is
    every device.
    """
    mesh = mesh or sharding.make_mesh()
    optimizer = make_optimizer(cfg)
    schedule = lr_schedule(cfg)
    accum = cfg.gradient_accumulation_steps
    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, x: jax.Array, y: jax.Array):
        key = dropout_key(cfg, state.step)
        if accum == 1:
            loss, grads = grad_fn(state.params, cfg, x, y, key)
        else:
            def micro(carry, xs):
                i, x_BxT, y_BxT = xs
                loss, grads = grad_fn(state.params, cfg, x_BxT, y_BxT, jax.random.fold_in(key, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), x, y))
            loss, grads = jax.tree_util.tree_map(lambda g: g / accum, (loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    state_sh = state_shardings(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh, leading=int(accum > 1))
    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options(),
                   in_shardings=(state_sh, batch_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)))


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: Config, mesh: Mesh | None = None) -> Callable:
    """``eval_step(params, xs_NxBxT, ys_NxBxT) -> mean loss`` over N batches, in one compiled call.

    Without a mesh the arrays stay where they are; with one, params and batches are laid out as in
    training.
    """

    def eval_step(params, xs_NxBxT: jax.Array, ys_NxBxT: jax.Array) -> jax.Array:
        losses_N = jax.lax.map(lambda xy: loss_fn(params, cfg, *xy), (xs_NxBxT, ys_NxBxT))
        return jnp.mean(losses_N)

    if mesh is None:
        return jax.jit(eval_step, compiler_options=compiler_options())
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    return jax.jit(eval_step, compiler_options=compiler_options(),
                   in_shardings=(state_shardings(cfg, mesh).params, batch_sh, batch_sh),
                   out_shardings=sharding.replicated(mesh))


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


def evaluate(params: Any, cfg: Config, data: TokenData, batches: dict | None = None,
             mesh: Mesh | None = None) -> dict[str, float]:
    """Mean loss over ``eval_iters`` batches of each split (the course's ``estimate_loss``).

    ``batches`` ({split: (xs, ys)} from ``eval_batches``) saves rebuilding them at every call; ``mesh``
    is the training mesh, when params are laid out on it.
    """
    eval_step = make_eval_step(cfg, mesh)
    batches = batches or {split: eval_batches(data, split, cfg) for split in ("train", "val")}
    return {split: float(eval_step(params, *xy)) for split, xy in batches.items()}


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    config: Config
    tokenizer: Any
    history: list[dict[str, Any]]
    best_val_loss: float
    stopped: str | None = None  # "SIGTERM" or "interrupt" when a signal ended the run early


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


def train(cfg: Config, data: TokenData | None = None, log: Callable[[str], None] | None = None,
          mesh: Mesh | None = None, exit_on_second_interrupt: bool = False) -> TrainResult:
    """Train ``cfg`` from scratch or resume it (``init_from="resume"``); returns the final state.

    ``mesh``: the devices to train on (default: all of them, over all processes). With several
    processes every one calls ``train``; only process 0 logs and writes metrics.

    SIGTERM or Ctrl-C stops after the current step with a checkpoint (``TrainResult.stopped``); a
    second Ctrl-C raises KeyboardInterrupt, or ends the process if ``exit_on_second_interrupt``.
    """
    sharding.initialize_distributed(cfg.distributed)
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch(cfg, mesh)
    cfg, data = _prepare_everywhere(cfg, data)
    primary = sharding.is_primary()
    log = (log or (lambda msg: tqdm.write(msg))) if primary else (lambda msg: None)
    out_dir = expand(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if primary:
            stack.enter_context(RunLock(out_dir))
        ckpt = stack.enter_context(Checkpointer(out_dir, cfg.keep_checkpoints))
        stop = stack.enter_context(StopSignals(hard_exit=exit_on_second_interrupt))
        state, best_val = _initial_state(cfg, ckpt, data, log, mesh)
        history = _Metrics(out_dir / "metrics.jsonl", int(state.step), cfg.init_from == "resume",
                           write=primary)
        loop = _Loop(cfg, data, ckpt, history, best_val, log, mesh, stop)
        state = loop.run(state)
        ckpt.wait()
    return TrainResult(state, cfg, data.tokenizer, history.records, loop.best_val, stop.reason)


class StopSignals:
    """SIGTERM or a first Ctrl-C asks the loop to stop after the current step (it then saves a
    checkpoint); a second Ctrl-C interrupts at once: KeyboardInterrupt, or with ``hard_exit`` the
    process ends with status 130 (the kernel releases the run lock; a half-written save is ignored and
    cleaned up by the next run). Handlers are installed only in the main thread and restored on exit."""

    def __init__(self, hard_exit: bool = False):
        self.reason: str | None = None
        self.hard_exit = hard_exit
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.reason == "interrupt":
                if self.hard_exit:  # a command line: leave now, whatever is running (a save, say)
                    print("interrupted", file=sys.stderr, flush=True)
                    os._exit(130)
                raise KeyboardInterrupt  # a notebook: interrupt the cell, keep the kernel
            self.reason = "interrupt"
        elif self.reason is None:
            self.reason = "SIGTERM"

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _prepare_everywhere(cfg: Config, data: TokenData | None) -> tuple[Config, TokenData]:
    """``prepare`` on every process; process 0 first, so a shared data_dir is written once."""
    if jax.process_count() == 1 or data is not None:
        return prepare(cfg, data)
    from jax.experimental import multihost_utils

    if sharding.is_primary():
        result = prepare(cfg)
        multihost_utils.sync_global_devices("gpt_jax: data prepared")
        return result
    multihost_utils.sync_global_devices("gpt_jax: data prepared")
    return prepare(cfg)


def _initial_state(cfg: Config, ckpt: Checkpointer, data: TokenData, log, mesh: Mesh
                   ) -> tuple[TrainState, float]:
    if cfg.init_from == "resume":
        _check_resume_config(cfg, ckpt, log)
        step, state, meta = ckpt.restore(abstract_state(cfg, mesh))
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
    return init_state(cfg, mesh), math.inf


def _check_resume_config(cfg: Config, ckpt: Checkpointer, log) -> None:
    """Refuse a resume that changes the model; say which other settings changed."""
    for step in ckpt.steps()[::-1]:
        try:
            saved = config_from_metadata(ckpt.restore_metadata(step))
        except Exception:  # unreadable metadata: restore() warns about this step and skips it
            continue
        model, other = resume_differences(dataclasses.replace(saved, vocab_size=cfg.vocab_size), cfg)
        if saved.vocab_size != cfg.vocab_size:
            model.insert(0, f"vocab_size {saved.vocab_size} -> {cfg.vocab_size} (another dataset?)")
        if model:
            raise CheckpointError(f"cannot resume step {step} of {ckpt.directory.parent}: the model "
                                  f"differs ({'; '.join(model)}); keep the saved values or start a "
                                  "new --out_dir")
        if other:
            log(f"resuming with changed settings: {'; '.join(other)}")
        return


class _Metrics:
    """metrics.jsonl, one JSON object per line; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, step: int, resume: bool, write: bool = True):
        self.path, self.records, self.write = path, [], write
        if resume and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= step]
        if write:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class _Loop:
    """Drives the compiled steps; syncs with the device only at log and eval steps."""

    def __init__(self, cfg: Config, data: TokenData, ckpt: Checkpointer, metrics: _Metrics,
                 best_val: float, log: Callable[[str], None], mesh: Mesh, stop: StopSignals | None = None):
        self.cfg, self.data, self.ckpt, self.metrics, self.log = cfg, data, ckpt, metrics, log
        self.best_val, self.mesh, self.stop = best_val, mesh, stop or StopSignals()
        self.unchecked: list[tuple[int, jax.Array]] = []  # (step, loss) not yet checked for NaN
        self.train_step = make_train_step(cfg, mesh)
        self.accum = cfg.gradient_accumulation_steps
        self.batch_sh = sharding.batch_sharding(mesh, leading=int(self.accum > 1))
        eval_sh = sharding.batch_sharding(mesh, leading=1)
        self.eval_data = {
            split: tuple(sharding.put_global(a, eval_sh) for a in eval_batches(data, split, cfg))
            for split in ("train", "val")}
        self.tokens_per_step = self.accum * cfg.batch_size * cfg.block_size
        self.start = time.perf_counter()

    def run(self, state: TrainState) -> TrainState:
        cfg = self.cfg
        step = int(state.step)
        if step == 0:
            self._eval(state, step, {}, save=False)
        bar = tqdm(total=cfg.max_iters, initial=step, disable=not (cfg.progress and self.metrics.write),
                   unit="step", dynamic_ncols=True, leave=False)
        timer_step, timer = step, None  # the first interval starts after the first (compiling) step
        while step < cfg.max_iters:
            state, metrics = self.train_step(state, *self._batch(step))
            step += 1
            self.unchecked.append((step, metrics["loss"]))
            bar.update(1)
            if timer is None:
                jax.block_until_ready(metrics)
                timer_step, timer = step, time.perf_counter()
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            stopping = self.stop.reason is not None
            if step % cfg.log_interval == 0 or is_eval or stopping:
                self._check_finite()  # the host syncs here anyway
            if step % cfg.log_interval == 0 or is_eval:
                record = self._log_record(step, metrics, timer_step, timer)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                tok_s=f"{record['tokens_per_sec']:.0f}")
                if is_eval:
                    self._eval(state, step, record, save=True)
                else:
                    self.metrics.append(record)
                timer_step, timer = step, time.perf_counter()
            if stopping:
                self._save_on_stop(state, step)
                break
        bar.close()
        return state

    def _check_finite(self) -> None:
        """Raise NonFiniteLossError naming the first step, since the last check, whose loss is NaN or
        infinite. Nothing from that step on is saved; earlier checkpoints are left as they are."""
        steps = [s for s, _ in self.unchecked]
        losses = jax.device_get([loss for _, loss in self.unchecked])
        self.unchecked = []
        for step, loss in zip(steps, losses, strict=True):
            if not math.isfinite(float(loss)):
                self._fail_non_finite(f"the training loss is {float(loss)} at step {step}")

    def _fail_non_finite(self, what: str) -> None:
        self.ckpt.wait()  # saves already started hold good states: let them complete
        good = self.ckpt.steps()
        kept = (f"the last good checkpoint, step {good[-1]} in {self.ckpt.directory}, is untouched"
                if good else "no checkpoint had been saved")
        raise NonFiniteLossError(f"{what}; training stopped and {kept}. Lower --learning_rate (or raise "
                                 "--warmup_iters or --grad_clip) and resume with --init_from=resume")

    def _save_on_stop(self, state: TrainState, step: int) -> None:
        """A stop signal: make sure a checkpoint of ``step`` exists, then end the run."""
        self.ckpt.wait()
        if step not in self.ckpt.steps():
            meta = {"step": step, "best_val_loss": self.best_val, "stopped": self.stop.reason}
            self.ckpt.save(step, state, make_metadata(self.cfg, self.data.tokenizer, meta))
            self.ckpt.wait()
        self.log(f"stopped by {self.stop.reason} at step {step}; checkpoint saved in {self.ckpt.directory}; "
                 "continue with --init_from=resume")

    def _batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        """The training batch of ``step``: [B, T], or A micro-batches [A, B, T] drawn as one A * B batch
        (so accumulation sees the same rows as the full batch would)."""
        cfg, A = self.cfg, self.accum
        x, y = self.data.get_batch("train", step, cfg.seed, A * cfg.batch_size, cfg.block_size)
        if A > 1:
            x, y = (a.reshape(A, cfg.batch_size, cfg.block_size) for a in (x, y))
        return sharding.put_global(x, self.batch_sh), sharding.put_global(y, self.batch_sh)

    def _log_record(self, step: int, metrics: dict, timer_step: int, timer: float) -> dict:
        loss, lr = float(metrics["loss"]), float(metrics["lr"])  # the host sync of this interval
        steps = step - timer_step
        rate = self.tokens_per_step * steps / (time.perf_counter() - timer) if steps else 0.0
        return {"step": step, "train_loss": loss, "lr": lr, "tokens_per_sec": rate,
                "elapsed_s": time.perf_counter() - self.start}

    def _eval(self, state: TrainState, step: int, record: dict, save: bool) -> None:
        losses = evaluate(state.params, self.cfg, self.data, self.eval_data, self.mesh)
        if not all(math.isfinite(v) for v in losses.values()):
            self._fail_non_finite(f"the evaluation loss is {losses} at step {step}")
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
