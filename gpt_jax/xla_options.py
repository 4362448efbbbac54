"""How our compiled functions run on each backend: XLA compiler options, and on CPU the host allocator.

Both are chosen at first compile, never at import, so that importing gpt_jax neither initialises a
backend (jax.distributed needs that order) nor changes the process.
"""

from __future__ import annotations

import ctypes
import functools

import jax

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """For the train and eval steps on CPU: matrix products through XLA's Eigen path rather than its
    YNNPACK fusions, which measured slower for the train step (``benchmarks/cpu_speed.py`` compares
    them); the cached decode loop measured the other way and does not use this. Nothing changes on
    other backends. On CPU this also keeps freed host memory (``keep_freed_host_memory``)."""
    if jax.default_backend() != "cpu":
        return None
    keep_freed_host_memory()
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to keep the memory a process frees instead of handing it back to the OS.

    XLA's CPU runtime allocates the temporaries of every call afresh, tens of megabytes per train step
    of the ``shakespeare_char_cpu`` preset (``compiled.memory_analysis()``). glibc serves blocks that
    large with ``mmap`` and unmaps them on free, so every step page-faults and zeroes thousands of new
    pages, a large share of a small model's step (``benchmarks/cpu_speed.py`` measures it). Taking
    large blocks from the heap and never trimming it lets each step reuse the pages of the last.
    Process-wide: a process keeps the memory it has peaked at. Returns whether the setting took
    (False without glibc, e.g. on macOS).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) & bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
