"""Train-step speed of a preset: milliseconds per step, tokens/s and compile time.

    python benchmarks/cpu_speed.py [--preset=shakespeare_char_cpu] [--steps=100] [--repeats=5]

Random tokens of the preset's shape (the data pipeline is not timed; it is a numpy gather of a few
kilobytes). The figure is the median over repeats of the mean step time of each repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpt_jax.config import make_config  # noqa: E402
from gpt_jax.model import count_params  # noqa: E402
from gpt_jax.state import init_state  # noqa: E402
from gpt_jax.training import make_train_step  # noqa: E402


def compiled_step(preset: str, vocab_size: int = 65):
    """(config, fresh state, x, y, the compiled train step, compile seconds) for random tokens."""
    cfg = make_config(preset, vocab_size=vocab_size)
    state = init_state(cfg)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), dtype=np.int32)
            for _ in range(2))
    t0 = time.perf_counter()
    compiled = make_train_step(cfg).lower(state, x, y).compile()
    return cfg, state, x, y, compiled, time.perf_counter() - t0


def time_steps(compiled, state, x, y, steps: int, repeats: int, warmup: int = 5
               ) -> tuple[list[float], object]:
    """Seconds per step of each repeat of ``steps`` steps (after ``warmup`` untimed steps), and the
    state."""
    for _ in range(warmup):
        state, _ = compiled(state, x, y)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, x, y)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / steps)
    return times, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare_char_cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab_size", type=int, default=65)
    args = parser.parse_args()

    cfg, state, x, y, compiled, compile_s = compiled_step(args.preset, args.vocab_size)
    times, state = time_steps(compiled, state, x, y, args.steps, args.repeats)
    ms = statistics.median(times) * 1000
    tokens = cfg.batch_size * cfg.block_size
    print(f"preset {args.preset}: {count_params(state.params) / 1e6:.2f}M params, "
          f"batch {cfg.batch_size} x block {cfg.block_size} = {tokens} tokens/step, "
          f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(f"train step: {ms:.1f} ms/step (repeats: {', '.join(f'{t * 1000:.1f}' for t in times)}), "
          f"{tokens / (ms / 1000):,.0f} tokens/s, compile {compile_s:.1f} s")
    print(f"reproduce: python benchmarks/cpu_speed.py --preset={args.preset} --steps={args.steps} "
          f"--repeats={args.repeats}")


if __name__ == "__main__":
    main()
