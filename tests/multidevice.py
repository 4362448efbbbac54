"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (not a test module).

``python tests/multidevice.py OUT_DIR PARAMS.npz SOURCE DATA_DIR`` prints one JSON line with
- "steps": two train steps on 8 devices and on 1, for data parallelism, FSDP and FSDP with gradient
  accumulation: the largest parameter and loss differences, and whether parameters were sharded;
- "train": a short FSDP training run on 8 devices into OUT_DIR, its final parameters saved to
  PARAMS.npz for comparison after a restore elsewhere.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpt_jax import sharding, training  # noqa: E402
from gpt_jax.config import make_config  # noqa: E402
from gpt_jax.state import init_state  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, dropout=0.1, max_iters=20,
            warmup_iters=2, lr_decay_iters=20, eval_interval=10, eval_iters=2, log_interval=5,
            progress=False, learning_rate=3e-3, min_lr=3e-4)


def run_steps(cfg, mesh, steps: int = 2):
    """``steps`` updates on fixed random batches; returns (params on the host, losses)."""
    state = init_state(cfg, mesh)
    train_step = training.make_train_step(cfg, mesh)
    rng = np.random.default_rng(0)
    A, losses = cfg.gradient_accumulation_steps, []
    for _ in range(steps):
        x = rng.integers(0, cfg.vocab_size, (A * cfg.batch_size, cfg.block_size), dtype=np.int32)
        y = np.roll(x, -1, axis=1)
        if A > 1:
            x, y = (a.reshape(A, cfg.batch_size, cfg.block_size) for a in (x, y))
        state, metrics = train_step(state, x, y)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses, state


def max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def steps() -> dict:
    assert jax.device_count() == 8, jax.devices()
    one, eight = sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh()
    base = make_config(vocab_size=65, **TINY)
    results, references = {}, {}
    cases = {"data": {}, "fsdp": {"fsdp": True},
             "fsdp+accumulation": {"fsdp": True, "gradient_accumulation_steps": 2, "dropout": 0.0}}
    for name, change in cases.items():
        cfg = dataclasses.replace(base, **change)
        # The single-device reference takes the A micro-batches as one batch of A * B rows.
        # On one device FSDP is replication: one reference serves both.
        ref_cfg = dataclasses.replace(cfg, gradient_accumulation_steps=1, fsdp=False,
                                      batch_size=cfg.gradient_accumulation_steps * cfg.batch_size)
        if ref_cfg not in references:
            references[ref_cfg] = run_steps(ref_cfg, one)[:2]
        ref_params, ref_losses = references[ref_cfg]
        params, losses, state = run_steps(cfg, eight)
        specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params)}
        results[name] = {"params": max_diff(params, ref_params),
                         "loss": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
                         "sharded_params": any("data" in s for s in specs)}
    return results


def train(out_dir: str, npz: str, source: str, data_dir: str) -> dict:
    cfg = make_config(out_dir=out_dir, source_file=source, data_dir=data_dir, fsdp=True,
                      always_save_checkpoint=True, **{**TINY, "max_iters": 10})
    result = training.train(cfg, log=lambda msg: None)
    leaves = jax.tree_util.tree_leaves(jax.device_get(result.state.params))
    np.savez(npz, *leaves)
    return {"devices": jax.device_count(), "step": int(result.state.step)}


if __name__ == "__main__":
    print(json.dumps({"steps": steps(), "train": train(*sys.argv[1:])}))
