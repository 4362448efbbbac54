"""Meshes and shardings: one code path for one CPU, the devices of one host, and many hosts.

A run has one ``jax.sharding.Mesh`` with a single ``data`` axis over every device of every process
(one device is a mesh of size 1). Batches are split along it: ``batch_size`` is the global batch and
each device sees ``batch_size / devices`` rows. Parameters and optimizer state are replicated, or, with
``fsdp``, each array is split along its largest dimension that the device count divides (arrays with no
such dimension stay replicated); XLA inserts the gathers and reduce-scatters. The axis type is Auto: with
Explicit axes the embedding lookup on a sharded batch cannot be typed.

Many processes: ``initialize_distributed`` starts JAX's own runtime; every process then builds the same
global batch description but hands only its own rows to ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gpt_jax.config import Config
from gpt_jax.errors import ConfigError

DATA = "data"
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def wants_distributed(cfg_distributed: bool = False) -> bool:
    return cfg_distributed or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(cfg_distributed: bool = False) -> bool:
    """Start JAX's multi-process runtime if asked (``--distributed``) or configured by environment.

    ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are passed on;
    without them JAX detects the cluster itself (Cloud TPU pods, SLURM, ...). Must run before anything
    else touches a JAX backend. Returns whether the runtime was started.
    """
    if not wants_distributed(cfg_distributed):
        return False
    if jax.distributed.is_initialized():
        return True
    env = {name: os.environ.get(name) for name in _DISTRIBUTED_ENV}
    try:
        num = int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None
        pid = int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None
    except ValueError:
        raise ConfigError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                          f"{env['JAX_NUM_PROCESSES']!r} and {env['JAX_PROCESS_ID']!r}") from None
    try:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=num,
                                   process_id=pid)
    except (ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot start the multi-process runtime ({first}); set JAX_COORDINATOR_ADDRESS="
                          "host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run on a cluster JAX "
                          "detects") from None
    return True


def is_primary() -> bool:
    """Whether this process writes logs, metrics and metadata (process 0)."""
    return jax.process_index() == 0


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    return Mesh(devices, (DATA,), axis_types=(AxisType.Auto,))


def available_memory(device: Any = None) -> int:
    """Bytes a computation can still allocate on ``device`` (default: the first device).

    Accelerators report their allocator's limit less what is in use (``Device.memory_stats``); on a
    CPU it is the host's available memory (``MemAvailable`` of /proc/meminfo, else free pages).
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_batch(cfg: Config, mesh: Mesh) -> None:
    n = mesh.size
    if cfg.batch_size % n:
        up = -(-cfg.batch_size // n) * n
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the number of devices ({n}); "
                          f"try --batch_size={up}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Rows split over ``data``, after ``leading`` unsplit axes (micro-batches, eval batches)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), DATA))


def _fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % n == 0]
    if n == 1 or not dims:
        return PartitionSpec()
    return PartitionSpec(*[DATA if d == dims[0] else None for d in range(len(shape))])


def tree_shardings(abstract: Any, mesh: Mesh, fsdp: bool) -> Any:
    """A NamedSharding per leaf of ``abstract`` (shapes of a pytree): replicated, or FSDP."""
    def leaf(x):
        return NamedSharding(mesh, _fsdp_spec(x.shape, mesh.size) if fsdp else PartitionSpec())

    return jax.tree_util.tree_map(leaf, abstract)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying shardings: a restore target for orbax."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process can describe: each process uploads only the
    part its own devices hold (its rows of the batch)."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    index = _local_index(sharding, array.shape)
    return jax.make_array_from_process_local_data(sharding, array[index], array.shape)


def _local_index(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array this process's devices hold (contiguous along each axis)."""
    slices = list(sharding.addressable_devices_indices_map(shape).values())
    index = []
    for axis, size in enumerate(shape):
        starts = [s[axis].indices(size)[0] for s in slices]
        stops = [s[axis].indices(size)[1] for s in slices]
        index.append(slice(min(starts), max(stops)))
    return tuple(index)
