"""XLA compiler options for our compiled functions, chosen per backend at first use."""

from __future__ import annotations

import functools

import jax


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """For the train and eval steps on CPU: matrix products through XLA's Eigen path rather than its
    YNNPACK fusions, about 10% faster on a 2-core x86 machine (benchmarks/cpu_speed.py). The cached
    decode loop is faster with YNNPACK and does not use this. Nothing changes on other backends.
    Called at first compile, never at import, so that importing gpt_jax does not initialise a
    backend (jax.distributed needs that order)."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else None
