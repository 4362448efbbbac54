"""The course notebooks (notebooks/tr, notebooks/en) and guides (docs/): they run top to bottom in quick
mode, the two languages share their code cells, and every gpt_jax name and file link they mention exists."""

import importlib
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT

COURSE = ["01_jax_basics", "02_bigram", "03_gpt_from_scratch", "04_bigger_data_and_chat"]
LANGUAGES = {"tr": "dakika", "en": "minute"}  # ... and the word each opening uses for how long it takes
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*/*.ipynb"))
GUIDES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def cells(path: Path, kind: str | None = None) -> list[dict]:
    found = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [c for c in found if kind is None or c["cell_type"] == kind]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_every_lesson_exists_in_both_languages():
    for language in LANGUAGES:
        assert sorted(p.stem for p in (ROOT / "notebooks" / language).glob("*.ipynb")) == COURSE
    assert (ROOT / "docs/tr/mimari.md").is_file() and (ROOT / "docs/en/architecture.md").is_file()


@pytest.mark.parametrize("lesson", COURSE)
def test_turkish_and_english_share_their_code_cells(lesson):
    tr, en = (ROOT / "notebooks" / lang / f"{lesson}.ipynb" for lang in ("tr", "en"))
    assert [source(c) for c in cells(tr, "code")] == [source(c) for c in cells(en, "code")]


@pytest.mark.parametrize("path", NOTEBOOKS + [ROOT / "notebooks" / "colab_tpu.ipynb"], ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    for cell in cells(path, "code"):
        assert cell["outputs"] == [] and cell["execution_count"] is None, source(cell)[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_opens_with_what_it_teaches_and_how_long_and_keeps_quick_sizes_in_one_cell(path):
    first = cells(path)[0]
    assert first["cell_type"] == "markdown" and LANGUAGES[path.parent.name] in source(first).lower()
    code = [source(c) for c in cells(path, "code")]
    assert "find_spec(\"gpt_jax\")" in code[0]  # installs the package on Colab when it is missing
    assert [i for i, text in enumerate(code) if "GPT_JAX_QUICK" in text] == [1]
    assert re.search(r"^QUICK = ", code[1], re.M)


def run_notebook(path: Path) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_notebook_runs_top_to_bottom_in_quick_mode(path, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_JAX_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    before = {p for p in (ROOT / "notebooks").rglob("*") if p.is_file()}
    run_notebook(path)
    assert {p for p in (ROOT / "notebooks").rglob("*") if p.is_file()} == before  # leaves nothing behind


NAME = re.compile(r"\bgpt_jax(?:\.[A-Za-z_]\w*)+")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def resolves(dotted: str) -> bool:
    """Whether ``gpt_jax.a.b`` is a module, or an attribute reached from the longest importable one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def texts():
    """(file, text of it) for each guide and each notebook cell."""
    for path in GUIDES:
        yield path, path.read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        for cell in cells(path):
            yield path, source(cell)


def test_every_gpt_jax_name_in_the_guides_and_notebooks_exists():
    names = {(path.relative_to(ROOT).as_posix(), name)
             for path, text in texts() for name in NAME.findall(text)}
    assert len(names) > 40  # the guides do point at the code
    missing = sorted(f"{where}: {name}" for where, name in names if not resolves(name.rstrip(".")))
    assert not missing


def test_every_file_link_in_the_guides_and_notebooks_exists():
    broken, checked = [], 0
    for path, text in texts():
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:|#", target):
                continue
            checked += 1
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert checked > 20 and not broken


def test_quick_switch_is_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "GPT_JAX_QUICK=1" in readme and "docs/tr/mimari.md" in readme
