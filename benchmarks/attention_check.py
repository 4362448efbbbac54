"""Check the fused attention kernels of this machine against the XLA reference.

    python benchmarks/attention_check.py

On an NVIDIA GPU: cuDNN flash attention; on a TPU: the Pallas kernel; on a CPU: the Pallas kernel in
Pallas's interpreter (the same check the test suite runs). For each, the forward output and the
gradients of q, k and v are compared with ``attention_xla`` on the same bfloat16 inputs (float32 on
CPU), and a whole GPT loss with ``attention=<kernel>`` with the loss under ``attention=xla``.
Tolerances are ``attention.ATTENTION_TOLERANCE``. Exits 1 if any comparison fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpt_jax import attention, model  # noqa: E402
from gpt_jax.config import make_config  # noqa: E402


def main() -> int:
    backend = jax.default_backend()
    kernel = {"gpu": "cudnn", "tpu": "pallas", "cpu": "pallas"}.get(backend)
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    tol = attention.ATTENTION_TOLERANCE[jnp.dtype(dtype).name]
    context = contextlib.nullcontext()
    if backend == "cpu":
        from jax.experimental.pallas import tpu as pltpu

        context = pltpu.force_tpu_interpret_mode()
    fused = {"cudnn": attention.attention_cudnn, "pallas": attention.attention_pallas}[kernel]
    failures = 0
    B, H, K = (4, 6, 64) if backend != "cpu" else (1, 2, 64)  # the interpreter is slow
    for T in ((256, 1024) if backend != "cpu" else (256,)):
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, H, K), dtype) for i in range(3))
        visible = jnp.tril(jnp.ones((T, T), dtype=bool))

        def ref(q, k, v, visible=visible):
            return attention.attention_xla(q, k, v, visible)

        with context:
            out = jax.jit(fused)(q, k, v)
            grads = jax.jit(jax.grad(lambda *a: fused(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(
                q, k, v)
        ref_out = jax.jit(ref)(q, k, v)
        ref_grads = jax.jit(jax.grad(lambda *a: ref(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(
            q, k, v)
        diffs = {"out": float(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)).max())}
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            # gradients are sums over T terms: compared relative to their own scale
            scale = float(jnp.abs(r.astype(jnp.float32)).max()) or 1.0
            diffs[f"d{name}"] = float(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)).max()) / scale
        ok = all(d <= tol for d in diffs.values())
        failures += not ok
        shown = ", ".join(f"{n} {d:.2e}" for n, d in diffs.items())
        print(f"{kernel} T={T} {jnp.dtype(dtype).name}: {shown} (tolerance {tol}) {'ok' if ok else 'FAIL'}")
    if backend != "cpu":
        cfg = make_config("shakespeare_char", vocab_size=65, dropout=0.0, attention=kernel)
        params = model.init_params(cfg, jax.random.PRNGKey(0))
        x = jax.random.randint(jax.random.PRNGKey(1), (8, cfg.block_size), 0, 65)
        y = jnp.roll(x, -1, axis=1)
        loss = jax.jit(model.loss_fn, static_argnums=1)
        fused_loss = float(loss(params, cfg, x, y))
        xla_loss = float(loss(params, dataclasses.replace(cfg, attention="xla"), x, y))
        ok = abs(fused_loss - xla_loss) <= tol
        failures += not ok
        print(f"GPT loss, attention={kernel} {fused_loss:.5f} vs xla {xla_loss:.5f} {'ok' if ok else 'FAIL'}")
    print(f"{'all ok' if not failures else f'{failures} FAILED'} on {jax.devices()[0].device_kind}; "
          "reproduce: python benchmarks/attention_check.py")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
