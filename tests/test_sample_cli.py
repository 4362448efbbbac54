"""sample.py as a person runs it, on a model trained on a corpus without line breaks: prompts and their
text hygiene, what is counted, what is refused, the interactive loop."""

import os
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT, TINY, load_script, run_script
from gpt_jax import sampling

SEPARATOR = "---------------\n"


SAMPLE = load_script("sample.py")


@pytest.fixture(scope="module")
def one_line_run(shakespeare_file, tmp_path_factory):
    """A tiny model trained on Tiny Shakespeare with its line breaks made spaces, and a few Turkish words
    (composed characters)."""
    tmp = tmp_path_factory.mktemp("one_line")
    corpus = tmp / "one_line.txt"
    text = shakespeare_file.read_text(encoding="utf-8")[:200_000].replace("\n", " ")
    corpus.write_text(text + " Öğretmen Ayşe Ömer", encoding="utf-8")
    out = tmp / "run"
    options = {**TINY, "dataset": corpus, "data_dir": tmp / "data", "out_dir": out}
    result = run_script("train.py", *(f"--{k}={v}" for k, v in options.items()))
    assert result.returncode == 0, result.stderr
    return out


def _one_error_line(result) -> str:
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: "), \
        result.stderr[-2000:]
    return lines[0]


def test_the_default_prompt_outside_the_vocabulary_says_to_pass_start(one_line_run):
    line = _one_error_line(run_script("sample.py", f"--out_dir={one_line_run}"))
    assert "the default prompt, a newline, is not in this model's vocabulary" in line
    assert "--start=TEXT" in line


def test_a_prompt_file_is_normalised_like_the_training_text(one_line_run, tmp_path):
    """A byte-order mark and decomposed characters (as macOS keyboards type them): the model gets, and
    the output shows, the composed text."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("\ufeffO\u0308mer".encode())
    result = run_script("sample.py", f"--out_dir={one_line_run}", f"--start=FILE:{prompt}",
                        "--max_new_tokens=5", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Ömer") and len(result.stdout.split(SEPARATOR)[0]) == len("Ömer") + 5 + 1


def test_a_prompt_file_is_read_as_it_is(tmp_path):
    """Line endings reach the tokenizer untranslated: it normalises them as it did the training text."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"a\r\nb\rc\n")
    assert SAMPLE.read_prompt(f"FILE:{prompt}") == "a\r\nb\rc\n"


def test_the_token_count_counts_kept_tokens(one_line_run):
    """Samples cut by a stop count the tokens they keep, not the loop's steps."""
    result = run_script("sample.py", f"--out_dir={one_line_run}", "--start=ROMEO:", "--num_samples=3",
                        "--max_new_tokens=40", "--stop= ", "--seed=1")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split(SEPARATOR)[:-1]
    kept = sum(len(s) - len("ROMEO:") - 1 for s in samples)
    assert len(samples) == 3 and kept < 3 * 40
    assert f"\n{kept} tokens in " in "\n" + result.stderr


def test_generation_runs_once_after_one_compile(one_line_run, monkeypatch, capsys):
    """No warm-up run: the prompt is prefilled once, after the one compile."""
    compiled, prefills = [], []
    lower = SAMPLE.Generator._lower
    sampling._shared_loops.cache_clear()  # compiles of other tests in this process do not count

    def counting_lower(self, *args):
        start, chunk = lower(self, *args)
        compiled.append(1)
        return lambda *a: prefills.append(1) or start(*a), chunk

    monkeypatch.setattr(SAMPLE.Generator, "_lower", counting_lower)
    assert SAMPLE.main([f"--out_dir={one_line_run}", "--start=ROMEO:", "--max_new_tokens=300",
                        "--num_samples=2", "--seed=5"]) == 0
    assert len(compiled) == 1 and len(prefills) == 1
    assert capsys.readouterr().out.count(SEPARATOR) == 2


@pytest.mark.parametrize("options", [["--max_new_tokens=1000000000", "--num_samples=10000"],
                                     ["--num_samples=100000000"]], ids=["tokens", "samples"])
def test_a_request_too_large_for_memory_fails_fast_in_one_line(one_line_run, options):
    result = run_script("sample.py", f"--out_dir={one_line_run}", "--start=ROMEO:", *options, timeout=120)
    line = _one_error_line(result)
    assert "need about" in line and "is free; lower " in line and "num_samples" in line


def test_interactive_banner_help_and_end_of_input(one_line_run):
    """Piped input: the banner and /help go to stderr, the end of input ends quietly with exit 0, and
    stdout holds the answers alone."""
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={one_line_run}",
                             "--interactive", "--max_new_tokens=8", "--temperature=0"],
                            input="ROMEO\n/help\n/bogus\nAyşe", text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    banner = result.stderr.splitlines()[0]
    assert "/help" in banner and "/quit or Ctrl-D" in banner
    assert "/quit   end the session" in result.stderr
    assert "unknown command /bogus; /help lists the commands" in result.stderr
    answers = result.stdout.split(SEPARATOR)
    assert len(answers) == 3 and answers[2] == ""
    assert answers[0].startswith("ROMEO") and answers[1].startswith("Ayşe")
    assert all(len(a) == len(p) + 8 + 1 for a, p in zip(answers, ["ROMEO", "Ayşe"], strict=False))


@pytest.mark.parametrize("text, stop", [("\\d", "\\d"), ("C:\\dir", "C:\\dir"), ("\\n\\t", "\n\t"),
                                        ("\\x41\\u00e9\\101", "AéA"), ("\\\\", "\\")])
def test_stop_escapes_decode_without_warnings(text, stop):
    """An unknown escape stays as typed, silently (Python's own decoder warns about it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SAMPLE.parse_stop(text) == stop


@pytest.mark.parametrize("path", ["sample.py", "gpt_jax/sampling.py", "benchmarks/generation.py"])
def test_sources_compile_without_warnings(path):
    source = (ROOT / path).read_text(encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(source, path, "exec")


def test_interactive_on_a_terminal_ends_quietly_at_ctrl_d(one_line_run):
    """Input from a terminal (line editing on): Ctrl-D ends with exit 0, a newline on stderr for the
    cursor, and stdout holding the answer alone."""
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--out_dir={one_line_run}",
                                    "--interactive", "--max_new_tokens=8", "--temperature=0"],
                                   stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(controller, b"ROMEO\n\x04")  # a line, then Ctrl-D
        stdout, stderr = process.communicate(timeout=300)
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == 0, stderr
    assert stdout.split(SEPARATOR) == [stdout.split(SEPARATOR)[0], ""] and stdout.startswith("ROMEO")
    assert len(stdout) == len("ROMEO") + 8 + 1 + len(SEPARATOR)
    assert stderr.splitlines()[0].startswith("sample.py: type a prompt") and stderr.splitlines()[1] == ""
