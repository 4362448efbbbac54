"""Self-describing orbax checkpoints: the train state plus JSON metadata, one directory per step.

Layout: ``<out_dir>/checkpoints/<step>/{state,meta}``. ``meta`` holds the config, the tokenizer's
vocabulary, the metrics at that step and library versions, so a checkpoint directory is all that
``sample.py`` or a notebook needs. orbax writes each step into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous steps as they were; a step that fails to
restore is skipped with a warning in favour of the next older one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import warnings
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from gpt_jax.config import Config, coerce, expand, validate
from gpt_jax.errors import CheckpointError, ConfigError
from gpt_jax.tokenizer import CharTokenizer

CHECKPOINT_SUBDIR = "checkpoints"
_TMP_MARK = ".orbax-checkpoint-tmp"
_VERSIONED = ("jax", "flax", "optax", "orbax-checkpoint")

# orbax logs routine events (every save, read-only opens) through absl; keep the console for training.
logging.getLogger("absl").setLevel(logging.ERROR)


def checkpoint_dir(out_dir: str | Path) -> Path:
    return expand(str(out_dir)).resolve() / CHECKPOINT_SUBDIR


def make_metadata(cfg: Config, tokenizer: CharTokenizer, metrics: dict[str, Any]) -> dict[str, Any]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"config": cfg.to_dict(), "tokenizer": tokenizer.to_json(), "metrics": metrics,
            "versions": versions}


class Checkpointer:
    """Saves and restores (state, metadata) pairs under ``<out_dir>/checkpoints``."""

    def __init__(self, out_dir: str | Path, keep: int = 2, *, read_only: bool = False):
        self.directory = checkpoint_dir(out_dir)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(
                f"no checkpoints in {self.directory.parent}; train first or check --out_dir"
            )
        self._warn_about_partial_saves(removing=not read_only)
        # A run that writes holds the directory's lock (runlock.py), so leftovers of an interrupted
        # save belong to nobody and are removed.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               read_only=read_only, cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None

    def _warn_about_partial_saves(self, removing: bool) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"*{_TMP_MARK}*")):
            step = path.name.split(".", 1)[0]
            warnings.warn(f"checkpoint step {step} in {self.directory} was never completed (an interrupted "
                          f"save left {path.name}); {'removing it' if removing else 'ignoring it'}",
                          stacklevel=3)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Start saving ``state`` at ``step``; returns once the arrays are copied off the device.

        The write finishes in the background; a failure (a full disk, say) is raised as a
        CheckpointError by the next ``save`` or ``wait``. Older steps are pruned only after a new one
        is complete, so a failed save leaves them as they were.
        """
        self._check(lambda: self._manager.wait_until_finished())
        self._saving = step
        self._check(lambda: self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata))))

    def _check(self, action) -> None:
        try:
            action()
        except Exception as e:  # orbax and tensorstore raise many types for failed writes
            step, self._saving = self._saving, None
            if step is None:
                raise
            good = [s for s in self._completed_steps() if s != step]
            kept = f"the newest complete checkpoint is step {good[-1]}" if good else "no complete checkpoint"
            reason = _short_reason(e)
            raise CheckpointError(f"cannot write checkpoint step {step} in {self.directory} ({reason}); "
                                  f"{kept}; free disk space or choose another --out_dir, then resume") from e

    def _completed_steps(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def restore_metadata(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"]

    def restore(self, target: Any | None, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
        """(step, state, metadata) of ``step``, or of the newest step that restores.

        ``target`` gives the tree structure, shapes and dtypes (``jax.eval_shape`` of the state);
        ``None`` restores whatever was saved, as nested dicts of arrays.
        """
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            raise CheckpointError(f"no checkpoint steps in {self.directory}; train first")
        failures = []
        for s in steps:
            try:
                restored = self._manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                return s, restored["state"], restored["meta"]
            except Exception as e:  # orbax raises many types for unreadable data
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                failures.append(f"step {s} ({reason})")
                warnings.warn(f"checkpoint step {s} in {self.directory} cannot be restored "
                              f"({reason}); trying an older step", stacklevel=2)
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored: "
                              + "; ".join(failures))

    def wait(self) -> None:
        self._check(self._manager.wait_until_finished)
        self._saving = None

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _short_reason(error: Exception) -> str:
    """The telling part of a storage error: tensorstore's messages end with the OS error, followed by
    a long spec that says nothing to a person."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.split(" [tensorstore_spec=", 1)[0]
    return text if len(text) <= 240 else "..." + text[-240:]


def config_from_metadata(meta: dict[str, Any]) -> Config:
    """The Config stored in a checkpoint (unknown keys from other versions are an error)."""
    try:
        return validate(Config(**{k: coerce(k, v) for k, v in meta["config"].items()}))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata has no usable config ({e})") from None


def portable(cfg: Config) -> Config:
    """``cfg`` for this machine: an attention kernel chosen for another platform becomes "auto".

    The kernel changes how attention is computed, not its result, so a model trained with
    ``attention=cudnn`` on a GPU can be sampled on a CPU.
    """
    from gpt_jax.model import attention_impl

    try:
        attention_impl(cfg, cfg.block_size, with_dropout=False)
    except ConfigError as e:
        warnings.warn(f"{e}: using attention=auto here", stacklevel=3)
        return dataclasses.replace(cfg, attention="auto")
    return cfg


def load_checkpoint(out_dir: str | Path, step: int | None = None
                    ) -> tuple[Any, Config, CharTokenizer, dict[str, Any]]:
    """(params, config, tokenizer, metadata) from a training ``out_dir`` — the notebook entry point.

    Restores the newest good step (or ``step``); parameters come back as float32 arrays on one local
    device, whatever the device count or platform that wrote them.
    """
    import jax

    from gpt_jax.sharding import make_mesh
    from gpt_jax.training import abstract_state

    mesh = make_mesh(jax.local_devices()[:1])  # whatever devices wrote it, restore onto one
    with Checkpointer(out_dir, read_only=True) as ckpt:
        available = ckpt.steps()
        if not available:
            raise CheckpointError(f"no checkpoint steps in {ckpt.directory}; train first")
        if step is not None and step not in available:
            raise CheckpointError(f"no checkpoint step {step} in {ckpt.directory}; its steps are "
                                  f"{', '.join(map(str, available))}")
        steps = [step] if step is not None else available[::-1]
        for s in steps:
            try:
                cfg = config_from_metadata(ckpt.restore_metadata(s))
            except Exception as e:  # unreadable or foreign metadata
                warnings.warn(f"checkpoint step {s} in {ckpt.directory} has unusable metadata "
                              f"({type(e).__name__}: {e}); trying an older step", stacklevel=2)
                continue
            try:
                _, state, meta = ckpt.restore(abstract_state(cfg, mesh), step=s)  # warns if it fails
            except CheckpointError:
                continue
            return state.params, portable(cfg), CharTokenizer.from_json(meta["tokenizer"]), meta
    raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(out_dir)} (steps {steps}); "
                          "train again or restore the directory from a backup")
