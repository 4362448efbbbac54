"""Many devices and hosts: sharded steps equal the single-device step, checkpoints cross device counts.

Multi-device cases run in subprocesses: 8 simulated CPU devices (tests/multidevice.py), or two
processes joined by ``jax.distributed`` on localhost. The test process itself has one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, cli_args
from gpt_jax import sharding
from gpt_jax.checkpoint import load_checkpoint
from gpt_jax.config import make_config
from gpt_jax.errors import ConfigError
from gpt_jax.training import train

TOLERANCE = 1e-5  # float32 sums in another order: observed differences are below 1e-6


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, shakespeare_file, data_dir, shakespeare):
    """One subprocess with 8 devices: the step comparisons, then an FSDP training run into OUT_DIR."""
    tmp = tmp_path_factory.mktemp("eight")
    out, npz = tmp / "out", tmp / "params.npz"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice.py"), str(out), str(npz),
                           str(shakespeare_file), str(data_dir)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out, npz


def test_fsdp_splits_the_largest_divisible_dimension():
    assert sharding._fsdp_spec((64, 96), 8) == jax.sharding.PartitionSpec(None, "data")
    assert sharding._fsdp_spec((96, 64), 8) == jax.sharding.PartitionSpec("data", None)
    assert sharding._fsdp_spec((65, 32), 8) == jax.sharding.PartitionSpec(None, "data")
    assert sharding._fsdp_spec((65, 7), 8) == jax.sharding.PartitionSpec()  # nothing divides: replicated
    assert sharding._fsdp_spec((), 8) == jax.sharding.PartitionSpec()
    assert sharding._fsdp_spec((64, 96), 1) == jax.sharding.PartitionSpec()


def test_batch_must_divide_over_devices():
    sharding.check_batch(make_config(batch_size=3), sharding.make_mesh(jax.devices()[:1]))
    fake = type("Mesh8", (), {"size": 8})()
    with pytest.raises(ConfigError, match=r"batch_size 12 must be divisible by the number of devices "
                                          r"\(8\); try --batch_size=16"):
        sharding.check_batch(make_config(batch_size=12), fake)


# The two users of the 8-device fixture share one worker, so its subprocess runs once.
@pytest.mark.slow
@pytest.mark.xdist_group("eight_devices")
def test_sharded_steps_equal_the_single_device_step(eight_devices):
    results = eight_devices[0]["steps"]
    assert set(results) == {"data", "fsdp", "fsdp+accumulation"}
    for name, r in results.items():
        assert r["params"] < TOLERANCE and r["loss"] < TOLERANCE, (name, r)
    assert not results["data"]["sharded_params"]  # data parallel: parameters replicated
    assert results["fsdp"]["sharded_params"] and results["fsdp+accumulation"]["sharded_params"]


@pytest.mark.xdist_group("eight_devices")
def test_checkpoint_written_on_8_devices_restores_and_resumes_on_1(eight_devices, shakespeare_file,
                                                                   data_dir, shakespeare):
    results, out, npz = eight_devices
    written = results["train"]
    assert written == {"devices": 8, "step": 10}
    assert jax.device_count() == 1
    params, cfg, _, meta = load_checkpoint(out)
    assert cfg.fsdp and meta["metrics"]["step"] == 10
    saved = np.load(npz)
    for i, leaf in enumerate(jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])  # bitwise
    cfg = make_config(out_dir=str(out), source_file=str(shakespeare_file), data_dir=str(data_dir),
                      fsdp=True, always_save_checkpoint=True, init_from="resume", **TINY)
    result = train(cfg, shakespeare, log=lambda msg: None)
    assert int(result.state.step) == TINY["max_iters"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_one_resumes(tmp_path, shakespeare_file, data_dir, shakespeare):
    """Two processes on localhost (one CPU device each) train and checkpoint; one process resumes,
    and ends where a single process that never stopped does."""
    def train_py(out, **changes):
        values = {**TINY, "batch_size": 4, "eval_interval": 5, "always_save_checkpoint": True, **changes}
        return [sys.executable, str(ROOT / "train.py"), *cli_args(shakespeare_file, data_dir, out, values)]

    out, ref = tmp_path / "out", tmp_path / "ref"
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(train_py(out, max_iters=10), env={**env, "JAX_PROCESS_ID": str(i)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert "done: step 10" in outputs[0][0]
    assert "step" not in outputs[1][0]  # only process 0 logs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10]  # written once, not twice
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]

    def single(args):
        proc = subprocess.run(args, cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "resuming from step 10" in single(train_py(out, init_from="resume"))
    single(train_py(ref))
    resumed, uninterrupted = load_checkpoint(out)[0], load_checkpoint(ref)[0]
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(uninterrupted),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOLERANCE)
