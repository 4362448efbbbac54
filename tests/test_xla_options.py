"""The CPU backend's settings: compiled steps keep freed host memory, so the large temporaries XLA
allocates at every call reuse pages instead of faulting in fresh ones."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# Minor page faults of writing a 64 MiB block from malloc, measured on its second allocation (after
# one free), before and after the train step's compiler options are first built. (Not numpy: it asks
# for huge pages, which XLA's allocations do not get.)
SCRIPT = """
import ctypes
import resource
from gpt_jax.xla_options import compiler_options

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_second_allocation():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 * 2**20)
        ctypes.memset(block, 1, 64 * 2**20)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = faults_of_second_allocation()
options = compiler_options()
print(untuned, faults_of_second_allocation(), options)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's (mallopt)")
def test_cpu_steps_keep_freed_host_memory():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""}, check=True).stdout.split(maxsplit=2)
    untuned, tuned, options = int(out[0]), int(out[1]), out[2]
    assert "ynn_fusion_type" in options
    # 64 MiB is 16,384 pages; kept memory is written again without faulting.
    assert tuned < 1000 and tuned < untuned, (untuned, tuned)
