"""plots.py: loss curves, attention heatmaps and positional tables, and the plotting command."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.errors import ConfigError, MissingDependencyError
from gpt_jax.model import sinusoidal_positions

plots = pytest.importorskip("gpt_jax.plots")
plt = plots.pyplot()
plt.switch_backend("Agg")


def write_run(out_dir, losses):
    out_dir.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses):
        record = {"step": step * 10, "batch_loss": loss, "lr": 1e-3}
        if step % 2 == 0:
            record.update(train_loss=loss, val_loss=loss + 0.1)
        lines.append(json.dumps(record))
    (out_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir


def test_loss_curves_draw_each_run_from_its_out_dir_file_or_records(tmp_path):
    a = write_run(tmp_path / "run-a", [4.0, 3.0, 2.5, 2.2])
    b = write_run(tmp_path / "run-b", [4.1, 3.5])
    records = [{"step": 0, "batch_loss": 4.2}, {"step": 5, "batch_loss": 3.9}]
    ax = plots.loss_curves(a, b / "metrics.jsonl", records)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["run 3: batch loss", "run-a: batch loss", "run-a: train loss", "run-a: val loss",
                             "run-b: batch loss", "run-b: train loss", "run-b: val loss"]
    np.testing.assert_allclose(lines["run-a: val loss"].get_xydata(), [[0, 4.1], [20, 2.6]])
    np.testing.assert_allclose(lines["run 3: batch loss"].get_xydata(), [[0, 4.2], [5, 3.9]])
    assert lines["run-a: val loss"].get_color() == lines["run-a: batch loss"].get_color()
    assert lines["run-a: val loss"].get_color() != lines["run-b: val loss"].get_color()
    plt.close("all")


def test_loss_curves_refuse_what_they_cannot_draw(tmp_path):
    with pytest.raises(ConfigError, match="at least one run"):
        plots.loss_curves()
    with pytest.raises(ConfigError, match="2 labels for 1 runs"):
        plots.loss_curves([{"step": 0, "batch_loss": 1.0}], labels=["a", "b"])
    with pytest.raises(ConfigError, match="no finite loss recorded"):
        plots.loss_curves([{"step": 0, "lr": 1.0}, {"step": 1, "val_loss": float("nan")}])
    with pytest.raises(ConfigError, match="a list of records"):
        plots.loss_curves({"step": 0, "batch_loss": 1.0})
    with pytest.raises(Exception, match="cannot read .*metrics.jsonl"):
        plots.loss_curves(tmp_path / "missing")
    plt.close("all")


def test_loss_curves_take_numpy_and_jax_numbers_and_one_label_as_a_string():
    records = [{"step": np.int64(0), "batch_loss": np.float32(4.0)},
               {"step": 10, "batch_loss": jnp.float32(3.0)}, {"step": 20, "batch_loss": True}]
    ax = plots.loss_curves(records, labels="mine")
    (line,) = ax.get_lines()
    assert line.get_label() == "mine: batch loss"
    np.testing.assert_allclose(line.get_xydata(), [[0, 4.0], [10, 3.0]])  # a bool is not a loss
    plt.close("all")


def test_metrics_files_read_back_with_damage_named_once(tmp_path):
    from gpt_jax import read_metrics
    from gpt_jax.errors import CheckpointError

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"step": 0, "batch_loss": 4.0}\n' + b"garbage\n" * 500 + b'{"step": 5}\n')
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(tmp_path) == [{"step": 0, "batch_loss": 4.0}, {"step": 5}]
    assert len(caught) == 1 and "lines 2, ... (500 lines) are damaged" in str(caught[0].message)
    path.write_text("root:x:0:0:root:/root:/bin/bash\n" * 50)
    with pytest.raises(CheckpointError, match="is not a metrics file"):
        read_metrics(path)


def test_attention_heatmap_shows_the_weights_with_visible_token_labels():
    weights = np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]
    ax = plots.attention_heatmap(weights, labels=["a", " ", "\n"], title="layer 0, head 1")
    np.testing.assert_allclose(ax.get_images()[0].get_array(), weights)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "␣", "\\n"]
    assert ax.get_title() == "layer 0, head 1"
    with pytest.raises(ConfigError, match=r"square \[T, T\]"):
        plots.attention_heatmap(np.ones((2, 3)))
    with pytest.raises(ConfigError, match="2 labels for 3 tokens"):
        plots.attention_heatmap(weights, labels=["a", "b"])
    plt.close("all")


def test_positional_table_draws_the_table_centred_on_zero():
    table = sinusoidal_positions(jnp.arange(16), 8)
    ax = plots.positional_table(table)
    image = ax.get_images()[0]
    np.testing.assert_allclose(image.get_array(), table, atol=1e-6)
    assert image.get_clim() == (-1.0, 1.0)
    with pytest.raises(ConfigError, match=r"\[T, D\]"):
        plots.positional_table(np.ones(3))
    plt.close("all")


def test_missing_matplotlib_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependencyError, match=r"gpt_jax\[notebooks\]"):
        plots.pyplot()


def plot_command(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gpt_jax.plots", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_command_draws_runs_on_one_chart_into_a_png(tmp_path):
    a = write_run(tmp_path / "a", [4.0, 3.0, 2.5])
    b = write_run(tmp_path / "b", [4.0, 3.2])
    out = tmp_path / "loss.png"
    done = plot_command(str(a), str(b), f"--out={out}", "--labels=first,second")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    bad = plot_command(str(tmp_path / "nowhere"), f"--out={out}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "error: cannot read" in bad.stderr and "nowhere" in bad.stderr
    no_extension = plot_command(str(a), f"--out={tmp_path / 'curves'}")
    assert no_extension.returncode == 2 and "needs an image extension" in no_extension.stderr
    assert not list(tmp_path.glob("curves*"))
