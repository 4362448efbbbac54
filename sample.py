"""Sample from a trained model: ``python sample.py --out_dir=DIR [--start=TEXT|FILE:path] ...``, or from
GPT-2's weights: ``python sample.py --init_from=gpt2`` (or a Hugging Face model folder).

``--interactive`` is the course's chat loop: type a prompt, get its completion; ``/help`` lists the
commands, ``/quit`` or the end of input (Ctrl-D) ends it. Generation runs with a KV cache in compiled
chunks of steps, compiled once before the first prompt and never again.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from gpt_jax import cli
from gpt_jax.checkpoint import load_checkpoint
from gpt_jax.errors import ConfigError, GptJaxError, TokenizerError
from gpt_jax.sampling import OUTPUT_BYTES_PER_TOKEN, Generator, check_fits, make_settings

SEPARATOR = "---------------"
DEFAULT_START = "\n"
# Host memory a printed token takes on top of the generated output: decoding builds a list of the ids
# and one of the characters (a pointer each), then the text (up to 4 bytes a character) and its copy
# behind the prompt.
TEXT_BYTES_PER_TOKEN = 24
BANNER = "sample.py: type a prompt and press Enter; /help lists the commands; /quit or Ctrl-D ends"
HELP = """commands:
  /help   this list
  /quit   end the session (so does Ctrl-D, the end of input)
any other line is a prompt (a single word after / is taken for a command): its completion is
printed; Ctrl-C stops at once"""


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="sample.py", allow_abbrev=False,
                           description="Generate text from a checkpoint directory written by train.py, or "
                                       "from GPT-2's weights.")
    p.add_argument("--out_dir", default=None, help="the training run's out_dir (with --init_from=resume)")
    p.add_argument("--init_from", default="resume",
                   help="resume (the checkpoint in --out_dir), or GPT-2 weights: gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl or a Hugging Face model folder (default: resume)")
    p.add_argument("--encoding_file", default="",
                   help="GPT-2 weights without vocab.json: a local tiktoken ranks file (default: tiktoken's)")
    p.add_argument("--start", default=None,
                   help="the prompt, or FILE:path to read it from a UTF-8 file (default: '\\n')")
    p.add_argument("--num_samples", type=int, default=1, help="samples drawn in parallel (default: 1)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens per sample (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: keep the most likely tokens up to this mass (default: off)")
    p.add_argument("--stop", action="append", default=[],
                   help="end a sample where it produces this text; backslash escapes such as \\n are "
                        "understood; may be repeated (default: none)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print characters as they are produced (default: on for one sample on a terminal)")
    p.add_argument("--interactive", action="store_true",
                   help="chat loop: read prompts from standard input until /quit (default: off)")
    p.add_argument("--window_keep", type=int, default=None,
                   help="tokens kept when the context window is full; block_size reproduces nanoGPT's "
                        "sliding crop (default: block_size // 2)")
    p.add_argument("--unknown", choices=("error", "skip", "replace"), default="error",
                   help="char models: what to do with prompt characters outside the vocabulary: error "
                   "(default, naming them), skip them, or replace them (by a space when it is in the "
                   "vocabulary)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    return p


def read_prompt(start: str) -> str:
    """The prompt text of ``--start``: the text itself, or the UTF-8 file of ``FILE:path`` as it is (line
    endings included: the tokenizer normalises text as it did the training text)."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{1,3}|[xuU]|.?)", re.DOTALL)
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b",
            "f": "\f", "v": "\v"}


def parse_stop(text: str) -> str:
    """``--stop``'s text with Python's backslash escapes decoded (``\\n``, ``\\t``, ``\\x41``, ``\\u00e9``,
    octal); an unknown escape such as ``\\d`` stays as typed. Every other character stays as it is."""
    def unescape(match: re.Match) -> str:
        code = match.group(1)
        if code in ("", "x", "u", "U"):
            raise ConfigError(f"--stop={text!r} has a broken backslash escape (write \\\\ for a backslash)")
        if code[0] in "xuU01234567":
            value = int(code[1:], 16) if code[0] in "xuU" else int(code, 8)
            if value > sys.maxunicode:
                raise ConfigError(f"--stop={text!r} has an escape beyond Unicode: \\{code}")
            return chr(value)
        return _ESCAPED.get(code, "\\" + code)

    stop = _ESCAPE.sub(unescape, text)
    if not stop:
        raise ConfigError("--stop is empty; give the text that ends a sample, e.g. --stop='\\n\\n'")
    return stop


_UTF8_LONGEST = 4  # bytes of the longest UTF-8 character


class StreamPrinter:
    """Prints sample 0 as it is produced, holding back text that may be the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.pending, self.printed, self.undecoded = "", "", []

    def start(self, prompt: str) -> None:
        self.pending = self.printed = ""
        self.undecoded = []
        self._write(prompt)

    def on_token(self, step: int, tokens_B, done_B) -> None:
        if done_B[0]:
            return
        self.undecoded.append(int(tokens_B[0]))
        text = self.tokenizer.decode(self.undecoded)
        if text.endswith("\ufffd") and len(self.undecoded) < _UTF8_LONGEST:
            return  # byte and BPE tokens: a character may still be arriving, a byte at a time
        self.undecoded = []
        self.pending += text
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])),
                   default=0)
        if any(s in self.pending for s in self.stops):
            return  # the stop is reached; the final text comes from the result
        self._write(self.pending[:len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold:]

    def finish(self, text: str) -> None:
        """Print what remains of the final ``text`` (the authoritative result)."""
        self._write(text[len(self.printed):])

    def _write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.printed += text


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {args.seed}")
    stops = [parse_stop(s) for s in args.stop]
    prompt = None if args.interactive else read_prompt(DEFAULT_START if args.start is None else args.start)
    stream = args.stream if args.stream is not None else args.num_samples == 1 and sys.stdout.isatty()
    if stream and args.num_samples != 1:
        raise ConfigError("--stream prints one sample; use --num_samples=1")

    params, cfg, tokenizer = load_model(args)
    if args.start is None and not args.interactive and tokenizer.unknown(DEFAULT_START):
        raise TokenizerError("the default prompt, a newline, is not in this model's vocabulary (its "
                             "training text has no line breaks); give a prompt with --start=TEXT")
    settings = make_settings(
        cfg, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stops=[tokenizer.encode(s) for s in stops], window_keep=args.window_keep, stream=stream)
    check_fits(cfg, settings, host_bytes_per_token=OUTPUT_BYTES_PER_TOKEN + TEXT_BYTES_PER_TOKEN)
    printer = StreamPrinter(tokenizer, stops) if stream else None
    generator = Generator(cfg, settings, on_token=printer.on_token if printer else None)
    t0 = time.perf_counter()
    generator.compile(params)
    compile_s = time.perf_counter() - t0

    session = Session(generator, params, tokenizer, jax.random.PRNGKey(args.seed), printer, args.unknown)
    if args.interactive:
        session.chat()
    else:
        session.answer(prompt, fail=True)
    tokens, seconds = session.tokens, session.seconds
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s; "
          f"compile {compile_s:.1f} s excluded)", file=sys.stderr)
    return 0


def load_model(args: argparse.Namespace) -> tuple:
    """(params, config, tokenizer): the checkpoint of ``--out_dir``, or the weights ``--init_from`` names."""
    if args.init_from == "resume":
        if not args.out_dir:
            raise ConfigError("give --out_dir=DIR (a run of train.py), or --init_from=gpt2 (or another GPT-2 "
                              "name, or a Hugging Face model folder)")
        return load_checkpoint(args.out_dir, args.step)[:3]
    if args.init_from in ("scratch", "auto"):
        raise ConfigError(f"sample.py --init_from takes resume (a run in --out_dir) or pretrained weights "
                          f"(gpt2, ..., or a model folder), not {args.init_from}")
    if args.out_dir or args.step is not None:
        raise ConfigError(f"--init_from={args.init_from} samples from pretrained weights; drop --out_dir and "
                          "--step (or drop --init_from to sample from the run)")
    from gpt_jax.hf import load_pretrained

    return load_pretrained(args.init_from, encoding_file=args.encoding_file)


def encode_prompt(tokenizer, text: str, unknown: str) -> np.ndarray:
    """``text`` as token ids; a char vocabulary treats characters it lacks as ``unknown`` says (byte, bpe
    and gpt2 tokenizers encode any text)."""
    if tokenizer.kind == "char":
        return tokenizer.encode(text, unknown=unknown)
    return tokenizer.encode(text)


class Session:
    """Prompts in, completions out, through one compiled generator; counts kept tokens and time."""

    def __init__(self, generator, params, tokenizer, key, printer: StreamPrinter | None,
                 unknown: str = "error"):
        self.generator, self.params, self.tokenizer, self.unknown = generator, params, tokenizer, unknown
        self.key, self.printer = key, printer
        self.tokens, self.seconds, self.calls = 0, 0.0, 0

    def answer(self, prompt: str, fail: bool) -> None:
        """Print the completion(s) of ``prompt``; a bad prompt raises (``fail``) or is reported."""
        try:
            tokens = encode_prompt(self.tokenizer, prompt, self.unknown)
            cropped = self.generator.crop(tokens)
        except GptJaxError as e:
            if fail:
                raise
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return
        if cropped.size < tokens.size:
            print(f"note: the prompt has {tokens.size} tokens; keeping its last {cropped.size} "
                  "(block_size)", file=sys.stderr)
        shown = self.tokenizer.decode(tokens)  # the text the model was given (normalised; --unknown applied)
        if self.printer is not None:
            self.printer.start(shown)
        key, self.calls = jax.random.fold_in(self.key, self.calls), self.calls + 1
        t0 = time.perf_counter()
        result = self.generator(self.params, cropped, key)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(t.size for t in result.tokens)
        texts = [shown + self.tokenizer.decode(t) for t in result.tokens]
        if self.printer is not None:
            self.printer.finish(texts[0])
            print(f"\n{SEPARATOR}", flush=True)
            return
        for text in texts:
            print(text)
            print(SEPARATOR, flush=True)

    def chat(self) -> None:
        """The course's chatbot: a prompt per line until /quit or the end of input (Ctrl-D)."""
        terminal = sys.stdin.isatty()
        if terminal:
            _line_editing()
        print(BANNER, file=sys.stderr, flush=True)
        while True:
            try:
                line = input("> " if terminal and sys.stdout.isatty() else "")
            except EOFError:
                if terminal:  # the cursor sits after the prompt mark
                    print(file=sys.stderr)
                return
            command = line.strip()
            if command == "/quit":
                return
            if command == "/help":
                print(HELP, file=sys.stderr, flush=True)
            elif re.fullmatch(r"/\w+", command):
                print(f"unknown command {command}; /help lists the commands", file=sys.stderr, flush=True)
            elif line:
                self.answer(line, fail=False)


def _line_editing() -> None:
    """Arrow keys and a history for ``input``, where Python has its readline module (not on Windows)."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on)
    except ImportError:
        pass


if __name__ == "__main__":
    cli.run(main, "sample.py")
