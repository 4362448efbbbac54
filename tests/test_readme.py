"""The README's notebook example runs as written."""

import dataclasses
import json
import re

import pytest

from conftest import ROOT, TINY
from gpt_jax.training import train


def notebook_example() -> str:
    """The Python blocks of the README's notebook section, one after the other."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Notebook API", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def test_readme_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2:6] == ["```bash", "pip install -e . && python train.py",
                          "pip install -e '.[test]' && python -m pytest", "```"]


def test_notebook_example_runs(tiny_cfg, tmp_path, monkeypatch, capsys):
    train(dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "out-shakespeare-char-cpu")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    capsys.readouterr()
    exec(compile(notebook_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("ROMEO:")
    assert "'train':" in printed[-2] and "'val':" in printed[-2]
    assert re.fullmatch(r"\d\.\d{3} bits per character, perplexity \d+\.\d\d", printed[-1])


def colab_cells(**settings) -> list[str]:
    """The Colab notebook's code cells with the shell lines (clone, install) left out and the settings
    of its first cell replaced by ``settings`` (name -> Python source)."""
    notebook = json.loads((ROOT / "notebooks" / "colab_tpu.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert any("pip install" in c for c in cells) and any("init_from=\"auto\"" in c for c in cells)
    assert not any("/dev/null" in c or "assert " in c for c in cells)  # errors show; no developer checks
    code = []
    for cell in cells:
        lines = [line for line in cell.splitlines() if not line.lstrip().startswith(("!", "%"))]
        for name, value in settings.items():
            lines = [f"{name} = {value}" if line.startswith(f"{name} = ") else line for line in lines]
        code.append("\n".join(lines))
    return code


def run_cells(cells: list[str], stop_after: int | None = None) -> dict:
    namespace: dict = {}
    for cell in cells[:stop_after]:
        exec(compile(cell, "colab_tpu.ipynb", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_colab_notebook_trains_chats_and_learns_your_text(tmp_path, monkeypatch, capsys):
    """Run all, on this CPU with RUN_WITHOUT_TPU and a tiny model: trains (from the packaged corpus,
    init_from=auto), samples, chats, trains on an uploaded text, and never imports TensorFlow."""
    import builtins
    import sys

    mine = tmp_path / "mine.txt"
    mine.write_text("Öğretmen derse girdi. Çocuklar ayağa kalktı.\n" * 60, encoding="utf-8")
    data_dir = tmp_path / "data"
    overrides = {**TINY, "data_dir": str(data_dir)}
    cells = colab_cells(REPO='"a copy"', USE_DRIVE="True", RUN_WITHOUT_TPU="True", MY_TEXT=repr(str(mine)),
                        overrides=repr(overrides))
    answers = iter(["ROMEO:", "€", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    monkeypatch.chdir(tmp_path)
    run_cells(cells)
    printed = capsys.readouterr().out
    assert f"step {TINY['max_iters']}, best val loss" in printed
    assert "\nROMEO:" in printed and len(printed.split("\nROMEO:", 1)[1]) > 500
    assert "outside the vocabulary: '€' (U+20AC EURO SIGN)" in printed  # the chat loop goes on
    assert (tmp_path / "out-shakespeare-char-my-text" / "checkpoints").is_dir()
    assert "tensorflow" not in sys.modules
    # Running all cells again (a reconnected runtime) continues the run instead of failing.
    answers = iter(["/quit"])
    run_cells(cells)
    assert "resuming from step" in capsys.readouterr().out


def test_colab_notebook_stops_with_instructions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Set REPO in this cell"):
        run_cells(colab_cells(), stop_after=1)
    with pytest.raises(RuntimeError, match="This runtime has no TPU .*Change runtime type → TPU"):
        run_cells(colab_cells(REPO='"a copy"'), stop_after=3)
