"""train.py and sample.py as a person runs them: in subprocesses, judged by exit code and output."""

import functools
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, TINY, cli_args, load_script, run_script
from gpt_jax.config import FIELDS
from gpt_jax.errors import ConfigError, GptJaxError
from gpt_jax.tokenizer import CharTokenizer, describe_characters


def tiny_args(shakespeare_file, data_dir, out_dir):
    return cli_args(shakespeare_file, data_dir, out_dir, TINY)


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
    for name, field in FIELDS.items():  # a description and the value the default preset gives it
        assert field.metadata["help"].split()[0] in result.stdout, name
    assert "context length in tokens [64]" in " ".join(result.stdout.split())  # shakespeare_char_cpu
    bigram = " ".join(run_script("train.py", "configs/bigram.py", "--help").stdout.split())
    assert "context length in tokens [8]" in bigram and "those of configs/bigram.py" in bigram
    sample = run_script("sample.py", "--help")
    for option in ("--out_dir", "--start", "--num_samples", "--max_new_tokens", "--temperature",
                   "--top_k", "--top_p", "--seed", "--stop", "--stream", "--interactive", "--window_keep"):
        assert option in sample.stdout


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _binary(tmp: Path) -> Path:
    return _write(tmp / "binary.txt", bytes(range(128, 256)))


def _dangling(tmp: Path) -> Path:
    link = tmp / "link"
    link.symlink_to(tmp / "nowhere")
    return link


def _damaged_copy(trained: Path, tmp: Path) -> Path:
    """A copy of the trained run whose every step has lost its metadata."""
    out = tmp / "damaged"
    shutil.copytree(trained, out)
    for meta in (out / "checkpoints").glob("*/meta/metadata"):
        meta.write_text("{not json")
    return out


# (script, arguments given the tmp dir T and the trained run R, what the one error line must say)
BAD_INPUTS = {
    # command lines
    "unknown key": ("train.py", lambda T, R: ["--n_layr=2"],
                    "unknown config key 'n_layr'; did you mean 'n_layer'?"),
    "not an integer": ("train.py", lambda T, R: ["--n_layer=abc"], "n_layer must be an integer, got 'abc'"),
    "heads do not divide": ("train.py", lambda T, R: ["--n_embd=100", "--n_head=3"],
                            "n_embd (100) must be divisible by n_head (3)"),
    "negative rate": ("train.py", lambda T, R: ["--learning_rate=-1"],
                      "learning_rate must be a finite number >= 0"),
    "dropout of 1.5": ("train.py", lambda T, R: ["--dropout=1.5"], "dropout must be in [0, 1), got 1.5"),
    "zero batch": ("train.py", lambda T, R: ["--batch_size=0"], "batch_size must be positive, got 0"),
    "min_lr above lr": ("train.py", lambda T, R: ["--learning_rate=0.1", "--min_lr=1"],
                        "min_lr (1.0) must not exceed learning_rate (0.1)"),
    "unknown dtype": ("train.py", lambda T, R: ["--dtype=float64"],
                      "dtype must be one of auto, float32, bfloat16"),
    "nanoGPT's float16": ("train.py", lambda T, R: ["--dtype=float16"], "dtype=float16 is not offered"),
    "nanoGPT's --device": ("train.py", lambda T, R: ["--device=cpu"],
                           "device is a nanoGPT setting with no counterpart here: JAX uses every GPU or TPU "
                           "it finds, else the CPU; to force the CPU run with the environment variable "
                           "JAX_PLATFORMS=cpu"),
    "nanoGPT's --compile": ("train.py", lambda T, R: ["--compile=False"], "always compiled with jax.jit"),
    "GPT-2 never downloaded": ("train.py", lambda T, R: ["--init_from=gpt2"],
                               "gpt2 is not in the Hugging Face cache"),
    "init_from mistyped": ("train.py", lambda T, R: ["--init_from=resum"],
                           "init_from='resum' is no folder and no GPT-2 name; did you mean resume?"),
    "GPT-2 with other sizes": ("train.py", lambda T, R: ["--init_from=gpt2", "--n_layer=3"],
                               "init_from=gpt2 takes n_layer from the pretrained weights"),
    "negative seed": ("train.py", lambda T, R: [*_tiny(T, "seed"), "--seed=-1"],
                      "seed must be in [0, 2**32)"),
    "huge seed": ("train.py", lambda T, R: [*_tiny(T, "seed"), f"--seed={2**64}"],
                  "seed must be in [0, 2**32)"),
    "model too large": ("train.py", lambda T, R: [*_tiny(T, "huge"), "--n_embd=100000", "--n_head=1"],
                        "GiB free; lower n_embd or n_layer"),
    "out_dir is a file": ("train.py", lambda T, R: [*_tiny(T, "x", out=_write(T / "file", "x"))],
                          "is a file, not a directory"),
    "out_dir under a file": ("train.py", lambda T, R: [*_tiny(T, "x", out=_write(T / "f2", "x") / "run")],
                             "which is a file"),
    "out_dir a dangling link": ("train.py", lambda T, R: [*_tiny(T, "x", out=_dangling(T))],
                                "is a symbolic link to"),
    "out_dir too long": ("train.py", lambda T, R: [*_tiny(T, "x", out=T / ("o" * 300))],
                         "out_dir is too long for the file system"),
    "config path with a folder": ("train.py", lambda T, R: ["my_experiments/bigram.py"],
                                  "config file 'my_experiments/bigram.py' not found"),
    "option without value": ("train.py", lambda T, R: ["--max_iters"], "expected one argument"),
    "cuDNN on a CPU": ("train.py", lambda T, R: [*_tiny(T, "cudnn"), "--attention=cudnn"],
                       "attention=cudnn cannot run: it needs an NVIDIA GPU"),
    # config files
    "no such preset": ("train.py", lambda T, R: ["no_such_preset"], "config file 'no_such_preset' not found"),
    "preset syntax error": ("train.py", lambda T, R: [str(_write(T / "bad.py", "n_layer = = 2\n"))],
                            "cannot read config file"),
    "preset unknown key": ("train.py", lambda T, R: [str(_write(T / "typo.py", "n_layr = 2\n"))],
                           "unknown config key 'n_layr'"),
    "preset expression": ("train.py", lambda T, R: [str(_write(T / "expr.py", "n_layer = 2 * x\n"))],
                          "n_layer must be a literal value"),
    "preset wrong type": ("train.py", lambda T, R: [str(_write(T / "type.py", "n_layer = 'four'\n"))],
                          "n_layer must be an integer, got 'four'"),
    "preset binary": ("train.py", lambda T, R: [str(_write(T / "bin.py", bytes(range(128, 256))))],
                      "cannot read config file"),
    # datasets
    "missing dataset": ("train.py", lambda T, R: [f"--dataset={T / 'missing.txt'}"],
                        "nor an existing file or folder"),
    "empty dataset": ("train.py", lambda T, R: [f"--dataset={_write(T / 'empty.txt', '')}",
                                                f"--data_dir={T}"],
                      "empty.txt is empty"),
    "binary dataset": ("train.py", lambda T, R: [f"--dataset={_binary(T)}", f"--data_dir={T}"],
                       "is not UTF-8; convert it to UTF-8"),
    "dataset too short": ("train.py", lambda T, R: [f"--dataset={_write(T / 's.txt', 'tiny')}",
                                                    f"--data_dir={T}"],
                          "fewer than block_size + 1"),
    "folder without text": ("train.py", lambda T, R: [f"--dataset={_write(T / 'f' / 'a.csv', 'x').parent}",
                                                      f"--data_dir={T}"], "holds no text files"),
    # checkpoints
    "resume with nothing": ("train.py", lambda T, R: [*_tiny(T, "none"), "--init_from=resume"],
                            "holds no checkpoint; train first, or pass --init_from=auto"),
    "scratch over a run": ("train.py", lambda T, R: _tiny(T, "x", out=R), "already holds checkpoints"),
    "resume another model": ("train.py", lambda T, R: [*_tiny(T, "x", out=R), "--init_from=resume",
                             "--n_layer=3"],
                             "the model differs (n_layer 2 -> 3)"),
    "sample without checkpoints": ("sample.py", lambda T, R: [f"--out_dir={T / 'nothing'}"],
                                   "no checkpoints in"),
    "sample a missing step": ("sample.py", lambda T, R: [f"--out_dir={R}", "--step=999"],
                              "no checkpoint step 999 in"),
    "sample damaged metadata": ("sample.py", lambda T, R: [f"--out_dir={_damaged_copy(R, T)}"],
                                "no usable checkpoint in"),
    "sample without out_dir": ("sample.py", lambda T, R: [], "give --out_dir=DIR (a run of train.py)"),
    # prompts and sampling settings
    "prompt file missing": ("sample.py", lambda T, R: [f"--out_dir={R}", f"--start=FILE:{T / 'nope.txt'}"],
                            "prompt file"),
    "prompt file binary": ("sample.py", lambda T, R: [f"--out_dir={R}", f"--start=FILE:{_binary(T)}"],
                           "is not UTF-8 text"),
    "empty prompt": ("sample.py", lambda T, R: [f"--out_dir={R}", "--start="], "the prompt is empty"),
    "character outside the vocabulary": ("sample.py", lambda T, R: [f"--out_dir={R}", "--start=ROMEO€"],
                                         "characters outside the vocabulary: '€'"),
    "negative temperature": ("sample.py", lambda T, R: [f"--out_dir={R}", "--temperature=-1"],
                             "temperature must be >= 0"),
    "top_k of 0": ("sample.py", lambda T, R: [f"--out_dir={R}", "--top_k=0"], "top_k must be in [1, 65]"),
    "top_p of 2": ("sample.py", lambda T, R: [f"--out_dir={R}", "--top_p=2"], "top_p must be in (0, 1]"),
    "samples not a number": ("sample.py", lambda T, R: [f"--out_dir={R}", "--num_samples=abc"],
                             "invalid int value: 'abc'"),
    "empty stop": ("sample.py", lambda T, R: [f"--out_dir={R}", "--stop="], "--stop is empty"),
    "stream of two": ("sample.py", lambda T, R: [f"--out_dir={R}", "--stream", "--num_samples=2"],
                      "--stream prints one sample"),
    "window_keep of 0": ("sample.py", lambda T, R: [f"--out_dir={R}", "--window_keep=0"],
                         "window_keep must be in [1, block_size=16]"),
}
_SOURCE: dict[str, str] = {}


def _tiny(tmp: Path, name: str, out: Path | None = None) -> list[str]:
    return tiny_args(_SOURCE["file"], _SOURCE["data_dir"], out or tmp / name)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, tmp_path, trained_dir, shakespeare_file, data_dir):
    """Every bad input: exit code 2, one line ``<script>: error: <what is wrong>``, no traceback."""
    _SOURCE.update(file=str(shakespeare_file), data_dir=str(data_dir))
    script, make_args, message = BAD_INPUTS[case]
    result = run_script(script, *make_args(tmp_path, trained_dir[0]))
    assert result.returncode == 2, (case, result.stderr[-2000:])
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    # one error line, last; before it only one-line warnings (a damaged step skipped, say)
    assert lines[-1].startswith(f"{script}: error: "), (case, result.stderr[-2000:])
    assert all(x.startswith(f"{script}: warning: ") for x in lines[:-1]), (case, result.stderr[-2000:])
    assert message in lines[-1], (case, lines[-1])
    assert "Traceback" not in result.stderr




# --- the prompt path, over arbitrary input -------------------------------------------------------------

SAMPLE = load_script("sample.py")
PROMPT_VOCAB = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=1)
def _generator():
    from gpt_jax.config import make_config
    from gpt_jax.sampling import Generator, make_settings
    tok = CharTokenizer.from_text(PROMPT_VOCAB)
    cfg = make_config(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8)
    return tok, Generator(cfg, make_settings(cfg))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_prompt_text_is_cropped_or_refused_with_a_clear_error(text):
    """Whatever the prompt: its last block_size characters go to the model, or a GptJaxError says why
    (empty, or which characters are unknown) — never another exception."""
    tok, generator = _generator()
    assert SAMPLE.read_prompt(text) == text or text.startswith("FILE:")
    try:
        cropped = generator.crop(tok.encode(text))
    except GptJaxError as e:
        unknown = tok.unknown(text)
        assert (f"outside the vocabulary: {describe_characters(unknown)};" in str(e)) if unknown else (
            tok.normalize(text) == "" and "the prompt is empty" in str(e))
        return
    assert tok.decode(cropped) == tok.normalize(text)[-16:]


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=PROMPT_VOCAB + "é€\x00"))
def test_a_prompt_file_reads_back_exactly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(text, encoding="utf-8", newline="")
    assert SAMPLE.read_prompt(f"FILE:{path}") == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_stop_text_parses_or_is_refused_with_a_clear_error(text):
    try:
        stop = SAMPLE.parse_stop(text)
    except ConfigError as e:
        assert "--stop" in str(e)
        return
    assert isinstance(stop, str) and stop
    if "\\" not in text:
        assert stop == text  # without escapes, the text itself (accents and all)


def test_stop_escapes_are_decoded():
    assert SAMPLE.parse_stop("\\n\\n") == "\n\n" and SAMPLE.parse_stop("é\\t€") == "é\t€"
