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
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Start saving ``state`` at ``step``; returns once the arrays are copied off the device."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)))

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        steps = [step] if step is not None else ckpt.steps()[::-1]
        if not steps:
            raise CheckpointError(f"no checkpoint steps in {ckpt.directory}; train first")
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
