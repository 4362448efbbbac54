"""Self-describing orbax checkpoints: the train state plus JSON metadata, one directory per step.

Layout: ``<out_dir>/checkpoints/<step>/{state,meta}``. ``meta`` holds the config, the tokenizer's
vocabulary, the metrics at that step and library versions, so a checkpoint directory is all that
``sample.py`` or a notebook needs.

Writers and readers. orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when
complete; pruned steps are first renamed into ``pruned/`` and only then deleted, so a reader sees every
step either whole or not at all. ``Checkpointer.restore`` is the one restore path (resume, notebooks,
``sample.py``): it takes the newest step that restores, lists the steps afresh when one disappears under
it (pruned by a running training), and calls a step damaged only when its directory is still there
and cannot be read, with one warning line, before falling back to the next older step.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

from gpt_jax.config import FIELDS, Config, coerce, expand, validate
from gpt_jax.errors import (
    CheckpointError,
    GptJaxError,
    IncompatibleCheckpointError,
    NoCheckpointError,
    TokenizerError,
)
from gpt_jax.runlock import active_holder
from gpt_jax.tokenizer import Tokenizer, tokenizer_from_json

CHECKPOINT_SUBDIR = "checkpoints"
PRUNED_SUBDIR = "pruned"  # pruned steps are renamed here (atomic for readers), then deleted
_TMP_MARK = ".orbax-checkpoint-tmp"
_VERSIONED = ("jax", "flax", "optax", "orbax-checkpoint")
_LISTING_ATTEMPTS = 5  # fresh listings a reader tries while a running training prunes under it

# Fields that fix the parameters' shapes or layout: a checkpoint resumes only with the same values.
MODEL_FIELDS = ("model", "n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "pos_encoding",
                "norm_position", "tie_embeddings", "scan_layers", "tokenizer")
# Fields that never matter to a resume (how it was started, where it was written).
_RUN_FIELDS = ("init_from", "out_dir", "progress")

# orbax logs routine events (every save, read-only opens) through absl; keep the console for training.
logging.getLogger("absl").setLevel(logging.ERROR)


class Restored(NamedTuple):
    step: int
    state: Any  # the train state, laid out as the restore target asked
    meta: dict[str, Any]  # the JSON metadata saved with it (make_metadata)


def checkpoint_dir(out_dir: str | Path) -> Path:
    return expand(str(out_dir)).resolve() / CHECKPOINT_SUBDIR


def make_metadata(cfg: Config, tokenizer: Tokenizer, metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON saved beside each state: config, tokenizer, metrics at that step, library versions."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"config": cfg.to_dict(), "tokenizer": tokenizer.to_json(), "metrics": metrics,
            "versions": versions}


def config_from_metadata(meta: dict[str, Any]) -> Config:
    """The Config stored in a checkpoint's metadata; CheckpointError if it is missing or unusable."""
    try:
        return validate(Config(**{k: coerce(k, v) for k, v in meta["config"].items()}))
    except (KeyError, TypeError, AttributeError, GptJaxError) as e:
        raise CheckpointError(f"its metadata has no usable config ({' '.join(str(e).split())})") from None


def tokenizer_from_metadata(meta: dict[str, Any], cfg: Config) -> Tokenizer:
    """The tokenizer stored in a checkpoint (any kind), checked against the model it was saved with.

    Raises CheckpointError saying what is inconsistent: a description that is no tokenizer (for char, a
    vocabulary that is not a list of distinct characters), or a vocabulary whose size is not the
    model's ``vocab_size`` (a character dropped or added).
    """
    try:
        tokenizer = tokenizer_from_json(meta["tokenizer"])
    except (KeyError, TypeError, AttributeError, TokenizerError) as e:
        raise CheckpointError(f"its vocabulary is unusable ({' '.join(str(e).split())})") from None
    if tokenizer.vocab_size != cfg.vocab_size:
        what = "characters" if tokenizer.kind == "char" else "ids"
        raise CheckpointError(f"its vocabulary has {tokenizer.vocab_size} {what} but the model has "
                              f"vocab_size {cfg.vocab_size}: the vocabulary was edited")
    return tokenizer


def resume_changes(meta: dict[str, Any], cfg: Config, tokenizer: Tokenizer) -> list[str]:
    """What resuming the checkpoint ``meta`` with ``cfg`` and ``tokenizer`` changes, as "name old -> new".

    Raises CheckpointError if the model would change (a field of MODEL_FIELDS, or the vocabulary: another
    dataset); every other change (``max_iters``, ``learning_rate``, ...) is returned, to be reported.
    """
    saved = config_from_metadata(meta)
    saved_vocabulary = tokenizer_from_metadata(meta, saved).to_json()
    model, other = [], []
    for name in FIELDS:
        old, new = getattr(saved, name), getattr(cfg, name)
        if old != new and name not in _RUN_FIELDS:
            (model if name in MODEL_FIELDS else other).append(f"{name} {old!r} -> {new!r}")
    other_vocabulary = saved_vocabulary != tokenizer.to_json()
    if other_vocabulary and not any(c.startswith(("vocab_size", "tokenizer")) for c in model):
        model.append("the vocabulary (same size, other tokens)")
    if model:
        other_data = saved.vocab_size != cfg.vocab_size or other_vocabulary
        raise IncompatibleCheckpointError(
            f"the model differs{' (another dataset?)' if other_data else ''} ({'; '.join(model)}); keep the "
            "saved values, resume with the same dataset, or start a new --out_dir")
    return other


class Checkpointer:
    """Saves and restores (state, metadata) pairs under ``<out_dir>/checkpoints``.

    A writer (``read_only=False``) must hold the run lock (``runlock.RunLock``); it removes what
    interrupted saves left behind. Readers may run while a training writes.
    """

    def __init__(self, out_dir: str | Path, keep: int = 2, *, read_only: bool = False):
        self.directory = checkpoint_dir(out_dir)
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise NoCheckpointError(
                f"no checkpoints in {self.directory.parent}; train first or check --out_dir"
            )
        self._report_partial_saves()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only, todelete_subdir=None if read_only else PRUNED_SUBDIR)
        self._manager = _retry_listing(lambda: ocp.CheckpointManager(self.directory, options=options))
        self._saving: int | None = None
        self._failed = False

    def _report_partial_saves(self) -> None:
        """Warn about each unfinished save that nobody is writing any more: a writer removes it, a
        reader ignores it. A save in progress (the run lock's holder is alive) is not reported."""
        if not self.directory.is_dir() or (self.read_only and active_holder(self.directory.parent)):
            return
        for path in sorted(self.directory.glob(f"*{_TMP_MARK}*")):
            step = path.name.split(".", 1)[0]
            warnings.warn(f"checkpoint step {step} in {self.directory} was never completed (an interrupted "
                          f"save left {path.name}); {'ignoring it' if self.read_only else 'removing it'}",
                          stacklevel=3)

    def steps(self) -> list[int]:
        """The complete steps, oldest first, listed afresh."""
        return sorted(_retry_listing(lambda: (self._manager.reload(), self._manager.all_steps())[1]))

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Start saving ``state`` at ``step``; returns once the arrays are copied off the device.

        The write finishes in the background; a failure (a full disk, say) is raised as a
        CheckpointError by the next ``save`` or ``wait``. Older steps are pruned only after a new one
        is complete, so a failed save leaves them as they were.
        """
        self.wait()
        self._saving = step
        self._check(lambda: self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata))))

    def wait(self) -> None:
        """Block until the save in flight is complete; raise CheckpointError if it failed."""
        self._check(self._manager.wait_until_finished)
        self._saving = None
        shutil.rmtree(self.directory / PRUNED_SUBDIR, ignore_errors=True)

    def _check(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as e:  # orbax and tensorstore raise many types for failed writes
            step, self._saving = self._saving, None
            if step is None:
                raise
            self._failed = True
            good = [s for s in complete_steps(self.directory) if s != step]
            kept = f"the newest complete checkpoint is step {good[-1]}" if good else "no complete checkpoint"
            raise CheckpointError(f"cannot write checkpoint step {step} in {self.directory} "
                                  f"({_short_reason(e)}); {kept}; {_advice(e)}, then resume") from e

    def restore(self, target_for: Callable[[dict[str, Any]], Any], step: int | None = None) -> Restored:
        """The newest step (or ``step``) that restores: (step, state, metadata).

        ``target_for(meta)`` gives the restore target for a step's metadata (``state.abstract_state``
        of its config: tree structure, shapes, dtypes, shardings); an IncompatibleCheckpointError it
        raises (a resume that would change the model) ends the search, any other error marks the step
        damaged. Steps that disappear
        while being read (pruned) are skipped silently; a damaged step is named in one warning and the
        next older one is tried.

        Raises NoCheckpointError when there is no step, CheckpointError when none restores.
        """
        damaged: dict[int, str] = {}
        for _ in range(_LISTING_ATTEMPTS):
            listed = self.steps()
            if step is not None and step not in listed:
                raise NoCheckpointError(f"no checkpoint step {step} in {self.directory}; its steps are "
                                        f"{', '.join(map(str, listed)) or 'none'}")
            candidates = [step] if step is not None else [s for s in listed[::-1] if s not in damaged]
            for s in candidates:
                try:
                    return self._restore_step(s, target_for)
                except _Vanished:
                    break  # pruned under us: list again
                except _Damaged as e:
                    damaged[s] = e.reason
                    warnings.warn(f"checkpoint step {s} in {self.directory} cannot be restored ({e.reason}); "
                                  + ("trying an older step" if s != candidates[-1] else "no older step"),
                                  stacklevel=2)
            else:
                break
        if not damaged:
            raise NoCheckpointError(f"no checkpoint steps in {self.directory}; train first")
        steps = "; ".join(f"step {s}: {r}" for s, r in damaged.items())
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({steps}); restore the directory "
                              "from a backup or train again")

    def newest_metadata(self) -> dict[str, Any] | None:
        """The JSON metadata of the newest step (None when there is no step or it cannot be read)."""
        steps = self.steps()
        if not steps:
            return None
        try:
            with _quiet_storage_logs():
                args = ocp.args.Composite(meta=ocp.args.JsonRestore())
                return self._manager.restore(steps[-1], args=args)["meta"]
        except Exception:  # damaged or pruned meanwhile: the restore that follows reports it
            return None

    def _restore_step(self, step: int, target_for: Callable[[dict[str, Any]], Any]) -> Restored:
        path = self.directory / str(step)
        _silence_abandoned_reads()
        try:
            with _quiet_storage_logs():
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                target = target_for(meta)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            return Restored(step, restored["state"], restored["meta"])
        except IncompatibleCheckpointError as e:
            raise IncompatibleCheckpointError(f"cannot resume step {step} of {self.directory.parent}: {e}"
                                              ) from None
        except Exception as e:  # orbax raises many types for unreadable or vanished data
            if _vanished(path, self.directory.parent):
                raise _Vanished from None
            reason = _one_line(e) if isinstance(e, GptJaxError) else f"{type(e).__name__}: {_one_line(e)}"
            raise _Damaged(reason[:400]) from None

    def close(self) -> None:
        """Finish background work. A save that failed was reported by ``wait``/``save``; its leftovers
        are not reported again here."""
        try:
            self._manager.close()
        except Exception as e:
            if not self._failed:
                raise CheckpointError(f"cannot finish writing checkpoints in {self.directory} "
                                      f"({_short_reason(e)}); {_advice(e)}") from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Vanished(Exception):
    """The step's directory disappeared while it was read."""


class _Damaged(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _vanished(path: Path, out_dir: Path) -> bool:
    """Whether ``path`` is gone, or goes within a moment while a training writes ``out_dir`` (a prune
    renames the step away; a read can fail just before)."""
    if not path.exists():
        return True
    if active_holder(out_dir) is None:
        return False
    time.sleep(0.2)
    return not path.exists()


def _retry_listing(list_steps: Callable[[], Any]) -> Any:
    """``list_steps()``, again when a step disappears between orbax's listing and its reading of it
    (orbax then raises FileNotFoundError, or NotADirectoryError when the step goes between its
    ``exists()`` and ``is_dir()``)."""
    for attempt in range(_LISTING_ATTEMPTS):
        try:
            return list_steps()
        except (FileNotFoundError, NotADirectoryError):
            if attempt == _LISTING_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def complete_steps(directory: Path) -> list[int]:
    """The step directories under ``directory`` (a checkpoint_dir), read from the file system alone."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _silence_abandoned_reads() -> None:
    """After a failed read, orbax's other reads of that step fail too, in tasks, coroutines, threads
    and storage callbacks nobody waits for any more; Python and asyncio would print each of their
    tracebacks (hundreds of lines) as they are collected or reach a closed event loop. Those are
    dropped; every other report is untouched. Installed once per process, before the first restore
    (the reports can come before the failed read itself is raised)."""
    global _SILENCED
    if _SILENCED:
        return
    _SILENCED = True
    unraisable, thread_hook, main_hook = sys.unraisablehook, threading.excepthook, sys.excepthook

    def drop_unraisable(report: Any) -> None:
        if not _abandoned_read(report.exc_value, report.exc_traceback):
            unraisable(report)

    def drop_thread_error(report: Any) -> None:
        if not _abandoned_read(report.exc_value, report.exc_traceback):
            thread_hook(report)

    def drop_callback_error(kind: type, value: BaseException, tb: Any) -> None:
        if not _abandoned_read(value, tb):
            main_hook(kind, value, tb)

    sys.unraisablehook, threading.excepthook, sys.excepthook = (drop_unraisable, drop_thread_error,
                                                                drop_callback_error)
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _abandoned_read(record.exc_info[1], record.exc_info[2])))


_SILENCED = False


# tensorstore reports failed reads as ValueErrors that start with a status code, and orbax leaves the
# futures holding them unawaited when one read of a step fails.
_STORAGE_STATUS = re.compile(r"^(FAILED_PRECONDITION|NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|INVALID_ARGUMENT|"
                             r"UNKNOWN|INTERNAL|UNAVAILABLE|PERMISSION_DENIED|RESOURCE_EXHAUSTED): ")


def _abandoned_read(error: BaseException | None, tb: Any) -> bool:
    """Whether an error comes from orbax's code, is a storage status error, or is a storage callback
    that found its event loop already closed."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    if isinstance(error, ValueError) and _STORAGE_STATUS.match(str(error)):
        return True
    marker = f"{os.sep}orbax{os.sep}"
    while tb is not None:
        if marker in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def _quiet_storage_logs() -> Iterator[None]:
    """orbax and its event loop log every failed read with long tracebacks; the caller reports it once."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _one_line(error: BaseException) -> str:
    """The first line of ``error``, without tensorstore's long specs; when it only points further
    down ("See full TensorStore details"), the first line of its cause instead."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    cause = error.__cause__ or error.__context__
    if "See full TensorStore details" in text and cause is not None:
        return _one_line(cause)
    return text.split(" [tensorstore_spec=", 1)[0]


def _short_reason(error: Exception) -> str:
    """The telling part of a storage error: tensorstore's messages end with the OS error, followed by
    a long spec that says nothing to a person."""
    text = _one_line(error)
    return text if len(text) <= 240 else "..." + text[-240:]


def _advice(error: BaseException) -> str:
    """What to do about a failed write, from the OS error anywhere in its chain or text."""
    text, cause = str(error), error
    while cause is not None:
        if isinstance(cause, PermissionError) or "Permission denied" in str(cause):
            return "permission denied: make the directory writable or choose another --out_dir"
        text += str(cause)
        cause = cause.__cause__ or cause.__context__
    if any(sign in text for sign in ("No space left", "ENOSPC", "File too large", "Disk quota")):
        return "free disk space (the disk is full) or choose another --out_dir"
    return "check that the disk has room and the directory is writable, or choose another --out_dir"


def load_checkpoint(out_dir: str | Path, step: int | None = None
                    ) -> tuple[Any, Config, Tokenizer, dict[str, Any]]:
    """(params, config, tokenizer, metadata) from a training ``out_dir`` — the notebook entry point.

    Restores the newest good step (or ``step``), also while a training writes into ``out_dir``;
    parameters come back as float32 arrays on one local device, whatever the device count or platform
    that wrote them. Raises NoCheckpointError / CheckpointError (one line) when nothing restores.
    """
    import jax

    from gpt_jax.attention import portable
    from gpt_jax.sharding import make_mesh
    from gpt_jax.state import abstract_state

    mesh = make_mesh(jax.local_devices()[:1])  # whatever devices wrote it, restore onto one

    def target_for(meta: dict[str, Any]) -> Any:
        cfg = config_from_metadata(meta)
        tokenizer_from_metadata(meta, cfg)
        return abstract_state(cfg, mesh)

    with Checkpointer(out_dir, read_only=True) as ckpt:
        _, state, meta = ckpt.restore(target_for, step)
    cfg = config_from_metadata(meta)
    return state.params, portable(cfg), tokenizer_from_metadata(meta, cfg), meta
