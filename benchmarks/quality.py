"""Final validation loss of a preset trained on Tiny Shakespeare, as nanoGPT reports it.

    python benchmarks/quality.py [--preset=shakespeare_char_cpu] [--source_file=PATH] [--out_dir=DIR]

Trains the preset from scratch (its own eval_iters, as nanoGPT's estimate), then also evaluates the
final parameters on 1000 validation batches for a figure with less sampling noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt_jax.config import make_config  # noqa: E402
from gpt_jax.training import evaluate, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare_char_cpu")
    parser.add_argument("--source_file", default="", help="a local copy of input.txt (offline)")
    parser.add_argument("--out_dir", default="")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="gpt_jax_quality_")
    cfg = make_config(args.preset, out_dir=out_dir, source_file=args.source_file, seed=args.seed,
                      progress=False)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    last = [r for r in result.history if "val_loss" in r][-1]
    rates = [r["tokens_per_sec"] for r in result.history if r.get("tokens_per_sec")]
    data_cfg = dataclasses.replace(result.config, eval_iters=1000)
    from gpt_jax.data import load_data

    wide = evaluate(result.state.params, data_cfg, load_data(data_cfg))
    print(f"preset {args.preset}, seed {args.seed}: {int(result.state.step)} steps in {wall:.0f} s "
          f"(median {sorted(rates)[len(rates) // 2]:,.0f} tokens/s)")
    print(f"final val loss {last['val_loss']:.4f} (train {last['train_loss']:.4f}) over "
          f"{cfg.eval_iters} batches; best {result.best_val_loss:.4f}")
    print(f"final val loss over 1000 batches: {wide['val']:.4f} (train {wide['train']:.4f})")
    print(f"reproduce: python benchmarks/quality.py --preset={args.preset} --seed={args.seed}"
          + (f" --source_file={args.source_file}" if args.source_file else ""))


if __name__ == "__main__":
    main()
