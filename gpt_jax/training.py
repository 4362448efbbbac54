"""The jitted train and eval steps, evaluation, and the training loop.

The loop is a thin driver: ``train_step`` is one compiled function with the state donated, batches
come from ``TokenData.get_batch(split, step, seed)`` and the dropout key is ``fold_in(seed, step)``, so
the whole run is a function of (config, data, step) and resuming from a checkpoint gives the same
numbers. The train state, optimizer and schedule are in ``gpt_jax.state``.

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
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm  # plain text bars: tqdm.auto wants ipywidgets in a notebook

from gpt_jax import hf, sharding
from gpt_jax.checkpoint import Checkpointer, checkpoint_dir, complete_steps, make_metadata, resume_changes
from gpt_jax.config import Config, is_pretrained, validate
from gpt_jax.data import TokenData, load_data
from gpt_jax.errors import CheckpointError, ConfigError, NoCheckpointError, NonFiniteLossError
from gpt_jax.model import loss_fn
from gpt_jax.runlock import RunLock, prepare_out_dir
from gpt_jax.state import (
    TrainState,
    abstract_state,
    init_state,
    lr_schedule,
    make_optimizer,
    state_from_params,
    state_shardings,
)
from gpt_jax.xla_options import compiler_options


def dropout_key(cfg: Config, step: jax.Array) -> jax.Array:
    """The dropout key of ``step``. XLA's own generator ("rbg") rather than threefry: the same bits
    for the same key on the same backend, and a shorter compile of every dropout model on CPU."""
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


def evaluate(params: Any, cfg: Config, data: TokenData, batches: dict | None = None,
             mesh: Mesh | None = None) -> dict[str, float]:
    """Mean loss in nats over ``eval_iters`` batches of each split (the course's ``estimate_loss``):
    {"train": float, "val": float}.

    ``batches`` ({split: (xs, ys)} from ``_eval_batches``) saves rebuilding them at every call; ``mesh``
    is the training mesh, when params are laid out on it.
    """
    eval_step = make_eval_step(cfg, mesh)
    batches = batches or _eval_batches(data, cfg)
    return {split: float(eval_step(params, *xy)) for split, xy in batches.items()}


def _eval_batches(data: TokenData, cfg: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (xs, ys)}, the fixed evaluation batches [eval_iters, B, T] of both splits."""
    return {split: data.eval_batches(split, cfg.seed, cfg.batch_size, cfg.block_size, cfg.eval_iters)
            for split in ("train", "val")}


def bytes_per_token(tokenizer: Any, targets: np.ndarray) -> float:
    """The mean UTF-8 bytes of the text that ``targets`` (token ids, any shape) stand for.

    With it a loss in nats per token becomes bits per byte, loss / (ln 2 * bytes_per_token), a figure
    that compares runs with different tokenizers (nanoGPT's char and GPT-2 runs, say).
    """
    return float(tokenizer.token_bytes()[np.asarray(targets)].mean()) if np.size(targets) else 0.0


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    config: Config
    tokenizer: Any
    history: list[dict[str, Any]]  # the records of metrics.jsonl, resumed ones included
    best_val_loss: float
    stopped: str | None = None  # "SIGTERM" or "interrupt" when a signal ended the run early
    checkpoint_step: int | None = None  # the newest checkpoint in out_dir at the end, if any


def setup_data(cfg: Config, data: TokenData | None = None) -> tuple[Config, TokenData]:
    """Load the data (unless given) and complete ``cfg`` with its vocabulary size: (config, data).

    Raises ConfigError for a ``vocab_size`` that contradicts the tokenizer, DataError for a corpus too
    short for ``block_size``.
    """
    data = data if data is not None else load_data(cfg)
    vocab = data.tokenizer.vocab_size
    if cfg.vocab_size not in (0, vocab) and data.tokenizer.kind != "bpe":  # bpe: the size it trained for
        raise ConfigError(f"vocab_size {cfg.vocab_size} differs from the tokenizer's {vocab}; "
                          "leave vocab_size at 0")
    cfg = validate(dataclasses.replace(cfg, vocab_size=vocab))
    data.check_block_size(cfg.block_size)
    return cfg, data


def check_memory(cfg: Config, mesh: Mesh) -> None:
    """Refuse a model whose parameters, gradients and AdamW state alone exceed a device's free memory.

    A lower bound (activations come on top), computed from shapes without allocating anything, so an
    impossible model fails at once with a ConfigError instead of stalling in the allocator.
    """
    abstract = abstract_state(cfg)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    need = (nbytes(abstract) + nbytes(abstract.params)) / (mesh.size if cfg.fsdp else 1)
    device = mesh.devices.flat[0]
    free = sharding.available_memory(device)
    if need > free:
        n = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
        raise ConfigError(
            f"the model has {n:,} parameters and needs at least {need / 2**30:,.1f} GiB per device for them, "
            f"their gradients and the AdamW state, but {device.platform} device {device.id} has "
            f"{free / 2**30:,.1f} GiB free; lower n_embd or n_layer"
            + ("" if cfg.fsdp or mesh.size == 1 else ", or shard the state with --fsdp=True"))


def train(cfg: Config, data: TokenData | None = None, log: Callable[[str], None] | None = None,
          mesh: Mesh | None = None, exit_on_second_interrupt: bool = False) -> TrainResult:
    """Train ``cfg`` from scratch, or continue ``out_dir``'s newest checkpoint (``init_from="resume"``,
    or ``"auto"``: resume if there is one), or fine-tune pretrained weights (``init_from="gpt2"``, another
    GPT-2 name or a model folder: ``hf.pretrained_config`` takes the architecture from them; a run whose
    ``out_dir`` already holds checkpoints continues them, so the same command resumes it); returns the
    final state.

    ``mesh``: the devices to train on (default: all of them, over all processes). With several
    processes every one calls ``train``; only process 0 logs and writes metrics.

    Everything is checked (config, data, memory, ``out_dir``) before ``out_dir`` is locked or written.
    SIGTERM or Ctrl-C during training stops after the current step with a checkpoint of that step
    (``TrainResult.stopped``); a second Ctrl-C raises KeyboardInterrupt, or ends the process if
    ``exit_on_second_interrupt`` (the command line, where signals before the first step also end it
    at once, whatever it is doing).
    """
    with _default_signals(exit_on_second_interrupt):
        sharding.initialize_distributed(cfg.distributed)
        mesh = mesh or sharding.make_mesh()
        sharding.check_batch(cfg, mesh)
        cfg = hf.pretrained_config(_pretrained_origin(cfg))
        cfg, data = _setup_everywhere(cfg, data)
        if is_pretrained(cfg.init_from):
            hf.check_data_tokenizer(cfg, data.tokenizer)
        check_memory(cfg, mesh)
        primary = sharding.is_primary()
        log = (log or (lambda msg: tqdm.write(msg))) if primary else (lambda msg: None)
        if cfg.init_from == "resume" and not complete_steps(checkpoint_dir(cfg.out_dir)):
            raise _nothing_to_resume(cfg.out_dir)
        out_dir = prepare_out_dir(cfg.out_dir)
    with contextlib.ExitStack() as stack:
        if primary:
            stack.enter_context(RunLock(out_dir))
        ckpt = stack.enter_context(Checkpointer(out_dir, cfg.keep_checkpoints))
        with _default_signals(exit_on_second_interrupt):
            state, best_val, resumed = _initial_state(cfg, ckpt, data, log, mesh)
        history = _Metrics(out_dir / "metrics.jsonl", int(state.step), resumed, write=primary)
        if int(state.step) >= cfg.max_iters:
            log(f"step {int(state.step)} already reached max_iters={cfg.max_iters}: nothing to train; pass a "
                "larger --max_iters to continue")
        stop = stack.enter_context(StopSignals(hard_exit=exit_on_second_interrupt))
        loop = _Loop(cfg, data, ckpt, history, best_val, log, mesh, stop)
        state = loop.run(state)
        ckpt.wait()
        steps = ckpt.steps()
    return TrainResult(state, cfg, data.tokenizer, history.records, loop.best_val, stop.reason,
                       steps[-1] if steps else None)


@contextlib.contextmanager
def _default_signals(active: bool) -> Iterator[None]:
    """On a command line, SIGTERM and Ctrl-C end the process at once while nothing worth saving exists
    yet: the kernel's default action works even while the process waits inside a compiler or an
    allocator, where a Python handler would never run."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


def _setup_everywhere(cfg: Config, data: TokenData | None) -> tuple[Config, TokenData]:
    """``setup_data`` on every process; process 0 first, so a shared data_dir is written once."""
    if jax.process_count() == 1 or data is not None:
        return setup_data(cfg, data)
    from jax.experimental import multihost_utils

    if sharding.is_primary():
        result = setup_data(cfg)
        multihost_utils.sync_global_devices("gpt_jax: data ready")
        return result
    multihost_utils.sync_global_devices("gpt_jax: data ready")
    return setup_data(cfg)


def _initial_state(cfg: Config, ckpt: Checkpointer, data: TokenData, log, mesh: Mesh
                   ) -> tuple[TrainState, float, bool]:
    """(state, best validation loss so far, resumed?) as ``init_from`` asks."""
    if cfg.init_from == "scratch":
        if ckpt.steps():
            raise CheckpointError(
                f"{ckpt.directory.parent} already holds checkpoints (steps {ckpt.steps()}); continue them "
                "with --init_from=resume (or auto), or choose another --out_dir")
        return init_state(cfg, mesh), math.inf, False
    if is_pretrained(cfg.init_from) and not ckpt.steps():
        log(f"starting from the weights of {cfg.init_from}")
        return state_from_params(cfg, hf.pretrained_params(cfg), mesh), math.inf, False
    changes: list[str] = []

    def target_for(meta: dict[str, Any]) -> TrainState:
        changes[:] = resume_changes(meta, cfg, data.tokenizer)
        return abstract_state(cfg, mesh)

    try:
        step, state, meta = ckpt.restore(target_for)
    except NoCheckpointError:
        if cfg.init_from == "resume":
            raise _nothing_to_resume(ckpt.directory.parent) from None
        log(f"no checkpoint in {ckpt.directory.parent}: starting from scratch")
        return init_state(cfg, mesh), math.inf, False
    if changes:
        log(f"resuming with changed settings: {'; '.join(changes)}")
    log(f"resuming from step {step} in {ckpt.directory}")
    return state, meta["metrics"].get("best_val_loss", math.inf), True


def _pretrained_origin(cfg: Config) -> Config:
    """``cfg`` resuming (``resume`` or ``auto``) a run that started from pretrained weights continues it
    from them: its init_from becomes theirs, so the model and tokenizer are the weights' again."""
    if cfg.init_from not in ("resume", "auto") or not complete_steps(checkpoint_dir(cfg.out_dir)):
        return cfg
    with Checkpointer(cfg.out_dir, read_only=True) as ckpt:
        meta = ckpt.newest_metadata()
    saved = (meta or {}).get("config", {}).get("init_from")
    started_from_weights = isinstance(saved, str) and is_pretrained(saved)
    return dataclasses.replace(cfg, init_from=saved) if started_from_weights else cfg


def _nothing_to_resume(out_dir: str | Path) -> NoCheckpointError:
    return NoCheckpointError(f"--init_from=resume, but {out_dir} holds no checkpoint; train first, or pass "
                             "--init_from=auto to start fresh when there is none")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``path``, or an out_dir holding one), in order.

    Each record is one JSON object: log lines hold ``step``, ``batch_loss``, ``lr``,
    ``tokens_per_sec``, ``elapsed_s``; evaluation lines add ``train_loss`` and ``val_loss`` (nats) and
    ``val_bpb`` (the validation loss in bits per UTF-8 byte, comparable across tokenizers).
    Damaged lines (a crash while writing) are dropped with one warning. Raises CheckpointError when the
    file cannot be read or no line of it is a JSON object.
    """
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    records, damaged = _parse_metrics(path)
    if damaged and not records:
        raise CheckpointError(f"{path} is not a metrics file (no line of it is a JSON object); give an "
                              "out_dir or the metrics.jsonl a training wrote")
    _warn_damaged(path, damaged, stacklevel=3)
    return records


def _parse_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the JSON-object lines of ``path``, the numbers of the lines that are not)."""
    try:
        lines = path.read_bytes().decode("utf-8", "replace").removeprefix("\ufeff").split("\n")
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); check the path (an out_dir or its "
                              "metrics.jsonl) and that it is readable") from None
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        line = line.strip().strip("\0")
        if not line:
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except ValueError:
            damaged.append(number)
    return records, damaged


def _warn_damaged(path: Path, damaged: list[int], stacklevel: int) -> None:
    if len(damaged) == 1:
        warnings.warn(f"{path} line {damaged[0]} is damaged (a crash while writing it?); dropping it",
                      stacklevel=stacklevel)
    elif damaged:
        warnings.warn(f"{path} lines {damaged[0]}, ... ({len(damaged)} lines) are damaged; dropping them",
                      stacklevel=stacklevel)


class _Metrics:
    """metrics.jsonl, one JSON object per line; on resume, lines past the restored step are dropped.

    Log lines hold ``batch_loss`` (the loss of that step's batch); evaluation lines ``train_loss`` and
    ``val_loss`` (estimates over ``eval_iters`` batches). ``elapsed_s`` counts training time across
    resumes. A torn last line (a crash mid-write) is dropped with a warning.
    """

    def __init__(self, path: Path, step: int, resume: bool, write: bool = True):
        self.path, self.records, self.write = path, [], write
        if resume and path.exists():
            self.records = [r for r in self._read() if r.get("step", math.inf) <= step]
        self.elapsed_before = max((r.get("elapsed_s", 0.0) for r in self.records), default=0.0)
        if write:
            self._write_all()

    def _read(self) -> list[dict[str, Any]]:
        records, damaged = _parse_metrics(self.path)
        _warn_damaged(self.path, damaged, stacklevel=4)
        return records

    def _write_all(self) -> None:
        try:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        except OSError as e:
            raise self._unwritable(e) from None

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise self._unwritable(e) from None

    def _unwritable(self, error: OSError) -> CheckpointError:
        return CheckpointError(f"cannot write {self.path} ({error.strerror}); make it writable or choose "
                               "another --out_dir, then resume")


class _Loop:
    """Drives the compiled steps; syncs with the device only at log and eval steps.

    ``run`` is the one place that shows the order of things: batch, step, NaN check, log, evaluate and
    save, stop.
    """

    def __init__(self, cfg: Config, data: TokenData, ckpt: Checkpointer, metrics: _Metrics,
                 best_val: float, log: Callable[[str], None], mesh: Mesh, stop: StopSignals):
        self.cfg, self.data, self.ckpt, self.metrics, self.log = cfg, data, ckpt, metrics, log
        self.best_val, self.mesh, self.stop = best_val, mesh, stop
        self.unchecked: list[tuple[int, jax.Array]] = []  # (step, loss) not yet checked for NaN
        self.train_step = make_train_step(cfg, mesh)
        self.accum = cfg.gradient_accumulation_steps
        self.batch_sh = sharding.batch_sharding(mesh, leading=int(self.accum > 1))
        eval_sh = sharding.batch_sharding(mesh, leading=1)
        eval_batches = _eval_batches(data, cfg)
        self.val_bytes_per_token = bytes_per_token(data.tokenizer, eval_batches["val"][1])
        self.eval_data = {split: tuple(sharding.put_global(a, eval_sh) for a in xy)
                          for split, xy in eval_batches.items()}
        self.tokens_per_step = self.accum * cfg.batch_size * cfg.block_size
        self.start = time.perf_counter() - metrics.elapsed_before

    def run(self, state: TrainState) -> TrainState:
        cfg = self.cfg
        step = int(state.step)
        if step == 0:
            self._eval(state, step, {}, save=False)
        bar = tqdm(total=cfg.max_iters, initial=min(step, cfg.max_iters),
                   disable=not (cfg.progress and self.metrics.write), unit="step", dynamic_ncols=True,
                   leave=False)
        timer_step, timer = step, None  # the first interval starts after the first (compiling) step
        while step < cfg.max_iters and self.stop.reason is None:
            state, metrics = self.train_step(state, *self._batch(step))
            step += 1
            self.unchecked.append((step, metrics["loss"]))
            bar.update(1)
            if timer is None:
                jax.block_until_ready(metrics)
                timer_step, timer = step, time.perf_counter()
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            if step % cfg.log_interval == 0 or is_eval or self.stop.reason is not None:
                self._check_finite()  # the host syncs here anyway
            if step % cfg.log_interval == 0 or is_eval:
                record = self._log_record(step, metrics, timer_step, timer)
                bar.set_postfix(loss=f"{record['batch_loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                if is_eval:
                    self._eval(state, step, record, save=True)
                else:
                    self.metrics.append(record)
                timer_step, timer = step, time.perf_counter()
        bar.close()
        if self.stop.reason is not None:  # also when the signal came during the last evaluation
            self._save_on_stop(state, step)
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
        advice = "Lower --learning_rate (or raise --warmup_iters or --grad_clip)"
        if good:
            raise NonFiniteLossError(
                f"{what}; training stopped, and the last good checkpoint, step {good[-1]} in "
                f"{self.ckpt.directory}, is untouched. {advice} and continue it with --init_from=resume")
        raise NonFiniteLossError(f"{what}; training stopped before any checkpoint was saved, so there is "
                                 f"nothing to resume. {advice} and train again")

    def _save_on_stop(self, state: TrainState, step: int) -> None:
        """A stop signal: make sure a checkpoint of ``step`` exists, then end the run."""
        self._check_finite()
        self.ckpt.wait()
        if step not in self.ckpt.steps():
            meta = {"step": step, "best_val_loss": self.best_val, "stopped": self.stop.reason}
            self.ckpt.save(step, state, make_metadata(self.cfg, self.data.tokenizer, meta))
            self.ckpt.wait()
        self.log(f"stopped by {self.stop.reason} at step {step}; checkpoint saved in {self.ckpt.directory}; "
                 "continue with --init_from=resume (or auto)")

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
        return {"step": step, "batch_loss": loss, "lr": lr, "tokens_per_sec": rate,
                "elapsed_s": time.perf_counter() - self.start}

    def _eval(self, state: TrainState, step: int, record: dict, save: bool) -> None:
        losses = evaluate(state.params, self.cfg, self.data, self.eval_data, self.mesh)
        if not all(math.isfinite(v) for v in losses.values()):
            self._fail_non_finite(f"the evaluation loss is {losses} at step {step}")
        record = record or {"step": step, "lr": float(lr_schedule(self.cfg)(step))}  # before any update
        record = {**record, "train_loss": losses["train"], "val_loss": losses["val"],
                  "elapsed_s": time.perf_counter() - self.start}
        if self.val_bytes_per_token > 0:  # comparable across tokenizers
            record["val_bpb"] = losses["val"] / (math.log(2) * self.val_bytes_per_token)
        improved = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        self.log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if save and (improved or self.cfg.always_save_checkpoint):
            meta_metrics = {**record, "best_val_loss": self.best_val}
            self.ckpt.save(step, state, make_metadata(self.cfg, self.data.tokenizer, meta_metrics))
            record["checkpoint"] = True
        self.metrics.append(record)
