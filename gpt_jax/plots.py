"""Pictures for notebooks and reports: loss curves, attention heatmaps, positional-encoding tables.

Needs matplotlib (the ``notebooks`` extra: ``pip install -e '.[notebooks]'``). Every function draws on
``ax`` (a new figure when it is None) and returns the Axes, so figures can be combined.

Command line: ``python -m gpt_jax.plots OUT_DIR [OUT_DIR ...] --out=loss.png`` draws the loss curves of
runs on one chart into an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt_jax.errors import ConfigError, MissingDependencyError
from gpt_jax.training import read_metrics

Run = str | Path | Sequence[dict[str, Any]]


def _records(run: Run) -> list[dict[str, Any]]:
    if isinstance(run, str | Path):
        return read_metrics(run)
    if isinstance(run, dict) or not all(isinstance(r, dict) for r in run):
        raise ConfigError("a run is an out_dir, a metrics.jsonl path or a list of records (dicts, as "
                          f"TrainResult.history), got {type(run).__name__}")
    return list(run)


def _label(run: Run, i: int) -> str:
    if isinstance(run, str | Path):
        path = Path(run).resolve()
        return path.parent.name if path.name == "metrics.jsonl" else path.name
    return f"run {i + 1}"


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or a numpy/JAX scalar; None for anything else (bool included)."""
    if isinstance(value, bool | str | bytes) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """{"batch_loss" | "train_loss" | "val_loss": [(step, loss), ...]} of the records that have them."""
    curves = {}
    for key in ("batch_loss", "train_loss", "val_loss"):
        points = [(_number(r.get("step")), _number(r.get(key))) for r in records]
        points = [p for p in points if None not in p]
        if points:
            curves[key] = points
    return curves


def pyplot():
    """matplotlib.pyplot; raises MissingDependencyError, naming the extra, when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("plots need matplotlib, which is not installed: pip install "
                                     "'gpt_jax[notebooks]' (or pip install matplotlib)") from None
    return plt


def _axes(ax):
    return pyplot().subplots()[1] if ax is None else ax


def loss_curves(*runs: Run, labels: Sequence[str] | None = None, ax=None):
    """Loss (nats) against step for one or several runs, on one chart; returns the Axes.

    Each run is an out_dir, a ``metrics.jsonl`` path, or its records (``TrainResult.history``,
    ``read_metrics``). Drawn per run, in one colour: the validation loss (solid) and training loss
    (dashed) of each evaluation, and each logged batch's loss (faint). Raises ConfigError without runs,
    with a labels list of another length, or for a run without any loss recorded.
    """
    if not runs:
        raise ConfigError("loss_curves needs at least one run: an out_dir, a metrics.jsonl or records")
    labels = [labels] if isinstance(labels, str) else labels
    if labels is not None and len(labels) != len(runs):
        raise ConfigError(f"got {len(labels)} labels for {len(runs)} runs")
    labels = labels or [_label(run, i) for i, run in enumerate(runs)]
    curves = [_curves(_records(run)) for run in runs]  # every run is read before anything is drawn
    for label, run_curves in zip(labels, curves, strict=True):
        if not run_curves:
            raise ConfigError(f"{label} has no finite loss recorded (no log or evaluation line with one)")
    ax = _axes(ax)
    styles = {"batch_loss": dict(alpha=0.3, linewidth=0.8), "train_loss": dict(linestyle="--", marker="."),
              "val_loss": dict(marker=".")}
    for i, (label, run_curves) in enumerate(zip(labels, curves, strict=True)):
        for key, points in run_curves.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, color=f"C{i % 10}", label=f"{label}: {key.replace('_', ' ')}",
                    **styles[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def attention_heatmap(weights_TxT: Any, labels: Sequence[str] | None = None, ax=None,
                      title: str | None = None):
    """One head's attention weights as an image: row i is what token i attends to; returns the Axes.

    ``weights_TxT``: a [T, T] array, e.g. ``attention_weights(params, cfg, tokens)[layer, 0, head]``.
    ``labels``: the T tokens as text (shown on both axes; newlines and spaces made visible). Raises
    ConfigError for another shape or a labels list of another length.
    """
    weights_TxT = np.asarray(weights_TxT, dtype=np.float32)
    if weights_TxT.ndim != 2 or weights_TxT.shape[0] != weights_TxT.shape[1]:
        raise ConfigError(f"attention_heatmap takes a square [T, T] array, got shape {weights_TxT.shape}")
    if labels is not None and len(labels) != weights_TxT.shape[0]:
        raise ConfigError(f"got {len(labels)} labels for {weights_TxT.shape[0]} tokens")
    ax = _axes(ax)
    image = ax.imshow(weights_TxT, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if labels is not None:
        shown = [{"\n": "\\n", " ": "␣", "\t": "\\t"}.get(t, t) for t in labels]
        ticks = np.arange(len(shown))
        ax.set_xticks(ticks, shown, fontsize="small")
        ax.set_yticks(ticks, shown, fontsize="small")
    ax.set_xlabel("attends to (key)")
    ax.set_ylabel("token (query)")
    if title:
        ax.set_title(title)
    return ax


def positional_table(table_TxD: Any, ax=None, title: str | None = None):
    """A positional-encoding table [T, D] as an image (positions down, features across); returns the Axes.

    E.g. ``gpt_jax.model.sinusoidal_positions(jnp.arange(T), D)`` or a learned ``params["wpe"]``.
    Raises ConfigError for another shape.
    """
    table_TxD = np.asarray(table_TxD, dtype=np.float32)
    if table_TxD.ndim != 2 or table_TxD.size == 0:
        raise ConfigError(f"positional_table takes a non-empty [T, D] array, got shape {table_TxD.shape}")
    ax = _axes(ax)
    limit = float(np.abs(table_TxD).max()) or 1.0
    image = ax.imshow(table_TxD, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.figure.colorbar(image, ax=ax)
    ax.set_xlabel("feature (dimension of the embedding)")
    ax.set_ylabel("position")
    if title:
        ax.set_title(title)
    return ax


def main(argv: list[str]) -> int:
    from gpt_jax.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m gpt_jax.plots",
                            description="Draw the loss curves of runs, on one chart, into an image.")
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR",
                        help="a run's out_dir (or its metrics.jsonl); several are drawn on one chart")
    parser.add_argument("--out", default="loss.png",
                        help="the image to write: .png, .svg or .pdf (default: loss.png here)")
    parser.add_argument("--labels", default=None, help="comma-separated names of the runs")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    plt = pyplot()
    plt.switch_backend("Agg")  # a file, never a window
    fig, ax = plt.subplots(figsize=(8, 5))
    loss_curves(*args.out_dirs, labels=labels, ax=ax)
    out = Path(args.out)
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--out={args.out} needs an image extension: .png, .svg or .pdf (or one of "
                          f"{', '.join(sorted(formats))})")
    try:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot write {out} ({e}); choose another --out (.png, .svg or .pdf)") from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from gpt_jax.cli import run

    run(main, "python -m gpt_jax.plots")
