"""The README's notebook example runs as written."""

import dataclasses
import re

from conftest import ROOT
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
