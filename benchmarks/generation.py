"""Generation speed: tokens/s with the KV cache against full recomputation, and compile time.

    python benchmarks/generation.py [--preset=shakespeare_char_cpu] [--max_new_tokens=500]
                                    [--batch_sizes=1,10] [--repeats=5] [--naive_repeats=1]

Random weights of the preset's shape (speed does not depend on training), a one-character prompt,
temperature 1. Three ways are timed: cached with the default window (re-prefill half a window when
full), cached with window_keep=block_size (nanoGPT's sliding crop, exact, a full forward per token
past the window) and the full-recompute reference with nanoGPT's crop (what nanoGPT's generate does,
but compiled as one loop, run in chunks of steps like the others). Figures are medians over repeats,
compile and first run excluded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from gpt_jax.config import make_config  # noqa: E402
from gpt_jax.model import count_params, init_params  # noqa: E402
from gpt_jax.sampling import Generator, make_settings  # noqa: E402


def measure(cfg, params, batch: int, n: int, keep: int | None, cached: bool, repeats: int):
    settings = make_settings(cfg, num_samples=batch, max_new_tokens=n, window_keep=keep)
    generator = Generator(cfg, settings, cached=cached)
    t0 = time.perf_counter()
    generator.compile(params)
    compile_s = time.perf_counter() - t0
    generator(params, [0], jax.random.PRNGKey(0))  # first run
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = generator(params, [0], jax.random.PRNGKey(r + 1))
        rates.append(sum(t.size for t in out.tokens) / (time.perf_counter() - t0))
    return statistics.median(rates), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare_char_cpu")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--batch_sizes", default="1,10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive_repeats", type=int, default=1)
    args = parser.parse_args()

    cfg = make_config(args.preset, vocab_size=65)
    params = init_params(cfg, jax.random.PRNGKey(0))
    W = cfg.block_size
    print(f"preset {args.preset}: {count_params(params) / 1e6:.2f}M params, block_size {W}, "
          f"{args.max_new_tokens} new tokens, backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), jax {jax.__version__}")
    ways = [(f"cached, window_keep={W // 2} (default)", None, True, args.repeats),
            (f"cached, window_keep={W} (nanoGPT crop)", W, True, args.repeats),
            ("full recompute (nanoGPT crop)", W, False, args.naive_repeats)]
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for name, keep, cached, repeats in ways:
            rate, compile_s = measure(cfg, params, batch, args.max_new_tokens, keep, cached, repeats)
            print(f"batch {batch:3d}  {name:40s} {rate:10,.0f} tokens/s   compile {compile_s:.1f} s")
    print(f"reproduce: python benchmarks/generation.py --preset={args.preset} "
          f"--max_new_tokens={args.max_new_tokens} --batch_sizes={args.batch_sizes} "
          f"--repeats={args.repeats} --naive_repeats={args.naive_repeats}")


if __name__ == "__main__":
    main()
