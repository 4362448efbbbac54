"""Sample from a trained model: ``python sample.py --out_dir=DIR [--start=TEXT|FILE:path] ...``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gpt_jax import cli
from gpt_jax.errors import ConfigError


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="sample.py", allow_abbrev=False,
                           description="Generate text from a checkpoint directory written by train.py.")
    p.add_argument("--out_dir", required=True, help="the training run's out_dir (required)")
    p.add_argument("--start", default="\n",
                   help="the prompt, or FILE:path to read it from a file (default: '\\n')")
    p.add_argument("--num_samples", type=int, default=1, help="samples drawn in parallel (default: 1)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens per sample (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    return p


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompt = read_prompt(args.start)

    import jax

    from gpt_jax.checkpoint import load_checkpoint
    from gpt_jax.sampling import generate

    params, cfg, tokenizer, meta = load_checkpoint(args.out_dir, args.step)
    prompt_tokens = tokenizer.encode(prompt)
    t0 = time.perf_counter()
    tokens = generate(params, cfg, prompt_tokens, jax.random.PRNGKey(args.seed), args.max_new_tokens,
                      args.temperature, args.top_k, args.top_p, args.num_samples)
    seconds = time.perf_counter() - t0
    for row in tokens:
        print(prompt + tokenizer.decode(row))
        print("---------------")
    n = tokens.size
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:.0f} tokens/s, compile included)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, "sample.py")
