"""Train-step speed on any backend: ms/iter, tokens/s, achieved TFLOP/s, MFU and compile time.

    python benchmarks/accelerator.py [--shape=shakespeare_char|gpt2|both] [--steps=50] [--repeats=3]
        [--warmup=3]
        [--key=value ...]   # any config override: --dtype=float32, --attention=xla, --fsdp=True, ...
    python benchmarks/accelerator.py --time_to_loss=1.47 --dataset=PATH [--key=value ...]

Shapes: ``shakespeare_char`` (the preset: 6 layers, 384 wide, block 256, batch 64, vocabulary 65) and
``gpt2`` (GPT-2 124M: 12 layers, 12 heads, 768 wide, block 1024, batch 12, vocabulary 50304, no
dropout, as nanoGPT's bench.py). Random tokens; the data pipeline is not timed. The step is the one
``train.py`` runs, on a mesh over every device. FLOPs per token are nanoGPT's estimate, 6N + 12·L·H·Q·T
(N the parameters without the position table), and MFU divides the achieved rate by the devices' bf16
dense peak (table below; ``--peak_tflops`` for others).

``--time_to_loss=X`` trains the ``shakespeare_char`` preset through ``train.py`` in a subprocess and
reports the wall clock from its start (imports, data, compile included) to the first evaluation with
validation loss <= X.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bf16 dense peak TFLOP/s per device (a JAX device: a GPU, a TPU chip, or a v2/v3 TPU core).
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
    "A10": 125.0, "T4": 65.0, "V100": 125.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v4": 275.0, "TPU v3": 61.5, "TPU v2": 22.5,
}
SHAPES = {
    "shakespeare_char": ("shakespeare_char", {"vocab_size": 65}),
    "gpt2": (None, {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "batch_size": 12,
                    "vocab_size": 50304, "dropout": 0.0, "bias": False}),
}


def peak_tflops(device_kind: str) -> float | None:
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100" before "H10"-like prefixes
        if name.lower() in device_kind.lower():
            return PEAK_TFLOPS[name]
    return None


def flops_per_token(cfg, n_params: int) -> float:
    """nanoGPT's estimate: 6N + 12·L·H·Q·T, N without the position table."""
    n = n_params - (cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0)
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


def speed(shape: str, overrides: dict, steps: int, repeats: int, warmup: int, peak: float | None) -> dict:
    import jax
    import numpy as np
    from cpu_speed import time_steps

    from gpt_jax import sharding
    from gpt_jax.attention import attention_impl, compute_dtype
    from gpt_jax.config import make_config
    from gpt_jax.model import count_params
    from gpt_jax.state import init_state
    from gpt_jax.training import make_train_step

    preset, shape_values = SHAPES[shape]
    cfg = make_config(preset, **{**shape_values, **overrides})
    mesh = sharding.make_mesh()
    sharding.check_batch(cfg, mesh)
    state = init_state(cfg, mesh)
    rng = np.random.default_rng(0)
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size
    lead = (A,) if A > 1 else ()
    batch_sh = sharding.batch_sharding(mesh, leading=len(lead))
    x, y = (sharding.put_global(rng.integers(0, cfg.vocab_size, (*lead, B, T), dtype=np.int32), batch_sh)
            for _ in range(2))
    t0 = time.perf_counter()
    step = make_train_step(cfg, mesh).lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    times, state = time_steps(step, state, x, y, steps, repeats, warmup)
    seconds = statistics.median(times)
    tokens = A * B * T
    flops = flops_per_token(cfg, count_params(state.params)) * tokens
    device = jax.devices()[0]
    peak = peak or peak_tflops(device.device_kind)
    tflops = flops / seconds / 1e12
    return {
        "shape": shape, "device": f"{jax.device_count()} x {device.device_kind}",
        "backend": jax.default_backend(), "jax": jax.__version__,
        "params_M": count_params(state.params) / 1e6, "dtype": str(compute_dtype(cfg)),
        "attention": attention_impl(cfg, T, with_dropout=cfg.dropout > 0), "tokens_per_iter": tokens,
        "ms_per_iter": seconds * 1000, "repeats_ms": [t * 1000 for t in times],
        "tokens_per_s": tokens / seconds, "tflops": tflops,
        "mfu": tflops / (peak * jax.device_count()) if peak else None, "compile_s": compile_s,
    }


def time_to_loss(target: float, overrides: list[str]) -> dict:
    """Runs train.py with the shakespeare_char preset; wall clock to the first val loss <= target."""
    out_dir = Path(next((a.split("=", 1)[1] for a in overrides if a.startswith("--out_dir=")),
                        "out-time-to-loss"))
    metrics = out_dir / "metrics.jsonl"
    if (out_dir / "checkpoints").exists():
        sys.exit(f"accelerator.py: error: {out_dir} holds a previous run; pass another --out_dir")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "configs/shakespeare_char.py",
                             "--progress=False", f"--out_dir={out_dir}", *overrides], cwd=ROOT)
    reached, seen = None, []
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            seen = [json.loads(line) for line in lines if line.strip().endswith("}")]
            hit = next((r for r in seen if r.get("val_loss", 9e9) <= target), None)
            if hit and reached is None:
                reached = (time.perf_counter() - start, hit["step"], hit["val_loss"])
        if done:
            break
        time.sleep(0.05)
    evals = [(r["step"], round(r["val_loss"], 4)) for r in seen if "val_loss" in r]
    return {"target": target, "reached": reached is not None,
            "wall_s": reached[0] if reached else None, "step": reached[1] if reached else None,
            "val_loss": reached[2] if reached else None, "total_s": time.perf_counter() - start,
            "evals": evals, "returncode": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per device, if not in the table")
    parser.add_argument("--time_to_loss", type=float, default=None)
    args, rest = parser.parse_known_args()
    command = "python benchmarks/accelerator.py " + " ".join(sys.argv[1:])
    if args.time_to_loss is not None:
        result = time_to_loss(args.time_to_loss, rest)
        print(json.dumps(result))
        if result["reached"]:
            print(f"val loss {result['val_loss']:.4f} <= {args.time_to_loss} at step {result['step']} after "
                  f"{result['wall_s']:.1f} s wall clock (start-up and compile included)")
        else:
            print(f"val loss {args.time_to_loss} not reached (evaluations: {result['evals']})")
        print(f"reproduce: {command}")
        return
    from gpt_jax.config import parse_overrides

    overrides = parse_overrides(rest)
    for shape in (list(SHAPES) if args.shape == "both" else [args.shape]):
        r = speed(shape, overrides, args.steps, args.repeats, args.warmup, args.peak_tflops)
        print(json.dumps(r))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak known; --peak_tflops)"
        print(f"{shape} on {r['device']} ({r['dtype']}, attention {r['attention']}): "
              f"{r['ms_per_iter']:.2f} ms/iter, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tflops']:.2f} TFLOP/s, MFU {mfu}, compile {r['compile_s']:.1f} s")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
