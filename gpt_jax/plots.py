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
    return list(run)


def _label(run: Run, i: int) -> str:
    if isinstance(run, str | Path):
        path = Path(run)
        return path.parent.name if path.name == "metrics.jsonl" else path.name
    return f"run {i + 1}"


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
    if labels is not None and len(labels) != len(runs):
        raise ConfigError(f"got {len(labels)} labels for {len(runs)} runs")
    ax = _axes(ax)
    for i, run in enumerate(runs):
        records, label = _records(run), labels[i] if labels is not None else _label(run, i)
        color = f"C{i % 10}"
        drawn = False
        for key, style in (("batch_loss", dict(alpha=0.3, linewidth=0.8)),
                           ("train_loss", dict(linestyle="--", marker=".")),
                           ("val_loss", dict(marker="."))):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)
                      and isinstance(r.get("step"), int) and math.isfinite(r[key])]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, color=color, label=f"{label}: {key.replace('_', ' ')}", **style)
                drawn = True
        if not drawn:
            raise ConfigError(f"{label} has no loss recorded yet (no log or evaluation line)")
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
    ax = _axes(ax)
    image = ax.imshow(weights_TxT, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if labels is not None:
        if len(labels) != weights_TxT.shape[0]:
            raise ConfigError(f"got {len(labels)} labels for {weights_TxT.shape[0]} tokens")
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
    if table_TxD.ndim != 2:
        raise ConfigError(f"positional_table takes a [T, D] array, got shape {table_TxD.shape}")
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
    try:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot write {out} ({e}); choose another --out (.png, .svg or .pdf)") from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from gpt_jax.cli import run

    run(main, "python -m gpt_jax.plots")
