"""train.py and sample.py as a person runs them: in subprocesses, judged by exit code and output."""

import json

import pytest

from conftest import TINY, run_script
from gpt_jax.config import FIELDS


def tiny_args(shakespeare_file, data_dir, out_dir, **extra):
    values = {**TINY, "source_file": shakespeare_file, "data_dir": data_dir, "out_dir": out_dir, **extra}
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def trained_dir(shakespeare_file, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_script("train.py", *tiny_args(shakespeare_file, data_dir, out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_train_without_config_names_the_default_preset(trained_dir):
    out, result = trained_dir
    lines = result.stdout.splitlines()
    assert lines[0] == "config: shakespeare_char_cpu (default on cpu; pass a config file to choose)"
    assert "step 20: train loss" in result.stdout
    assert (out / "checkpoints").is_dir()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20


def test_sample_prints_samples_and_speed(trained_dir, tmp_path):
    out, _ = trained_dir
    result = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=3",
                        "--max_new_tokens=30", "--seed=7")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 4 and samples[-1] == ""
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 30 + 1 for s in samples[:3])
    assert "90 tokens in" in result.stderr and "tokens/s" in result.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:")
    again = run_script("sample.py", f"--out_dir={out}", f"--start=FILE:{prompt}", "--max_new_tokens=5",
                       "--temperature=0")
    assert again.returncode == 0 and again.stdout.startswith("JULIET:")


def test_streaming_prints_what_batch_mode_prints(trained_dir):
    out, _ = trained_dir
    common = [f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=40", "--seed=3"]
    plain = run_script("sample.py", *common)
    streamed = run_script("sample.py", *common, "--stream")
    assert plain.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout


def test_stop_string_ends_the_sample(trained_dir):
    out, _ = trained_dir
    common = [f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=60", "--seed=3"]
    full = run_script("sample.py", *common).stdout.split("\n---------------")[0]
    stop = full[len("ROMEO:") + 10:][:2]  # two characters the sample produces
    for flag in ([], ["--stream"]):
        cut = run_script("sample.py", *common, f"--stop={stop}", *flag)
        assert cut.returncode == 0, cut.stderr
        text = cut.stdout.split("\n---------------")[0]
        assert text == "ROMEO:" + full[len("ROMEO:"):].split(stop)[0]


def test_interactive_chat_loop(trained_dir):
    import subprocess
    import sys

    from conftest import ROOT

    out, _ = trained_dir
    lines = "First\nBad€\n" + "x" * 40 + "\nSecond\n/quit\nNever\n"
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}", "--interactive",
                             "--max_new_tokens=12", "--temperature=0"], input=lines, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split("---------------\n")
    # each answer is the prompt, then its completion
    assert [a.startswith(p) for a, p in zip(answers[:3], ["First", "x" * 40, "Second"], strict=True)] == [
        True] * 3
    assert len(answers) == 4 and answers[3] == ""
    assert "error: text has characters outside the vocabulary: '€'" in result.stderr
    assert "note: the prompt has 40 tokens; keeping its last 16 (block_size)" in result.stderr
    assert "36 tokens in" in result.stderr


def test_help_lists_every_option_with_its_default():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for name in FIELDS:
        assert f"--{name}" in result.stdout
    assert result.stdout.count("(default:") >= len(FIELDS)
    sample = run_script("sample.py", "--help")
    for option in ("--out_dir", "--start", "--num_samples", "--max_new_tokens", "--temperature",
                   "--top_k", "--top_p", "--seed", "--stop", "--stream", "--interactive", "--window_keep"):
        assert option in sample.stdout


def bad_inputs(tmp):
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("tiny")
    (tmp / "binary.txt").write_bytes(bytes(range(256)))
    return [
        ("train.py", ["--n_layr=2"], "unknown config key 'n_layr'; did you mean 'n_layer'?"),
        ("train.py", ["--n_layer=abc"], "n_layer must be an integer, got 'abc'"),
        ("train.py", ["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
        ("train.py", ["--learning_rate=-1"], "learning_rate must be a finite number >= 0"),
        ("train.py", ["no_such_preset"], "config file 'no_such_preset' not found"),
        ("train.py", [f"--dataset={tmp / 'missing.txt'}"], "nor an existing file or folder"),
        ("train.py", [f"--dataset={tmp / 'empty.txt'}", f"--data_dir={tmp}"], "empty.txt is empty"),
        ("train.py", [f"--dataset={tmp / 'binary.txt'}", f"--data_dir={tmp}"], "is not UTF-8 text"),
        ("train.py", [f"--dataset={tmp / 'short.txt'}", f"--data_dir={tmp}"], "fewer than block_size + 1"),
        ("sample.py", [], "the following arguments are required: --out_dir"),
        ("sample.py", [f"--out_dir={tmp / 'nothing'}"], "no checkpoints in"),
        ("sample.py", ["--out_dir=x", "--num_samples=abc"], "invalid int value: 'abc'"),
        ("sample.py", ["--out_dir=x", f"--start=FILE:{tmp / 'nope.txt'}"], "prompt file"),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    for script, args, message in bad_inputs(tmp_path):
        result = run_script(script, *args)
        assert result.returncode == 2, (script, args, result.stderr)
        lines = [x for x in result.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), (args, result.stderr)
        assert message in lines[0], (args, lines[0])
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--start=ROMEO€"], "characters outside the vocabulary: '€'"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--top_k=0"], "top_k must be in [1, 65]"),
    (["--top_p=2"], "top_p must be in (0, 1]"),
    (["--start="], "the prompt is empty"),
    (["--stop="], "--stop is empty"),
    (["--stream", "--num_samples=2"], "--stream prints one sample"),
    (["--window_keep=0"], "window_keep must be in [1, block_size=16]"),
])
def test_bad_sampling_inputs(trained_dir, args, message):
    out, _ = trained_dir
    result = run_script("sample.py", f"--out_dir={out}", *args)
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
