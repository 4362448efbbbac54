"""The README's notebook example runs as written."""

import dataclasses
import json
import re

from conftest import ROOT, TINY
from gpt_jax.training import train


def notebook_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Notebook API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2:6] == ["```bash", "pip install -e . && python train.py",
                          "pip install -e '.[test]' && python -m pytest", "```"]


def test_notebook_example_runs(tiny_cfg, tmp_path, monkeypatch, capsys):
    train(dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "out-shakespeare-char-cpu")))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(notebook_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("ROMEO:")
    assert "'train':" in printed[-1] and "'val':" in printed[-1]


def test_colab_notebook_trains_and_samples(shakespeare_file, data_dir, tmp_path, monkeypatch, capsys):
    """The Colab notebook's cells, in order, with the shell lines (clone, install) left out and a tiny
    model in ``overrides``: trains, samples, and never imports TensorFlow."""
    notebook = json.loads((ROOT / "notebooks" / "colab_tpu.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert any("pip install" in c for c in cells) and any('"shakespeare_char"' in c for c in cells)
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for cell in cells:
        code = "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("!", "%")))
        exec(compile(code, "colab_tpu.ipynb", "exec"), namespace)
        if "overrides" in namespace and "cfg" not in namespace:
            namespace["OUT"] = str(tmp_path / namespace["OUT"])
            namespace["overrides"].update(TINY, source_file=str(shakespeare_file), data_dir=str(data_dir))
    printed = capsys.readouterr().out
    assert f"step {TINY['max_iters']}, best val loss" in printed
    assert "\nROMEO:" in printed and len(printed.split("\nROMEO:", 1)[1]) > 500
