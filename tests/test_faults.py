"""Training survives faults: kill -9, stop signals, damaged checkpoints, NaNs, a busy or full disk.

The command-line cases run ``train.py`` in subprocesses and act on what it has written so far
(``metrics.jsonl`` grows one line per step with ``log_interval=1``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, cli_args
from gpt_jax.checkpoint import load_checkpoint
from gpt_jax.errors import CheckpointError, NonFiniteLossError, RunLockedError
from gpt_jax.runlock import RunLock
from gpt_jax.training import train

# Small and frequent: a checkpoint every 5 steps (always), a metrics line every step.
RUN = {**TINY, "dropout": 0.1, "max_iters": 60, "lr_decay_iters": 60, "eval_interval": 5, "log_interval": 1,
       "always_save_checkpoint": True, "keep_checkpoints": 2}
TIMING = ("tokens_per_sec", "elapsed_s")


def train_args(shakespeare_file, data_dir, out, **changes) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"),
            *cli_args(shakespeare_file, data_dir, out, {**RUN, **changes})]


def start(args) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)


def finish(args) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(out: Path, ref: Path) -> None:
    """Final parameters bitwise equal, and the metrics of every step equal (timings aside)."""
    params, ref_params = load_checkpoint(out)[0], load_checkpoint(ref)[0]
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert records(out) == records(ref)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_file, data_dir, shakespeare):
    """An uninterrupted run of RUN."""
    ref = tmp_path_factory.mktemp("reference") / "out"
    finish(train_args(shakespeare_file, data_dir, ref))
    return ref


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_kill_9_at_random_moments_then_resume_is_exact(tmp_path, shakespeare_file, data_dir, reference):
    """SIGKILL at random steps and right after a checkpoint save starts (its files half written),
    resume each time: the final parameters and every step's metrics equal the uninterrupted run's."""
    out = tmp_path / "out"
    rng = random.Random(0)
    moments = [("step", rng.randrange(3, 20)), ("save", None), ("step", rng.randrange(30, 45)),
               ("save", None)]
    partial_saves = 0
    for i, (kind, at) in enumerate(moments):
        proc = start(train_args(shakespeare_file, data_dir, out, init_from="resume" if i else "scratch"))
        begin = steps_logged(out)
        if kind == "step":
            wait_for(lambda at=at: steps_logged(out) >= at, proc)
        else:  # the metrics line of a save is written as soon as the save has started
            wait_for(lambda b=begin: any(r.get("checkpoint") and r["step"] > b for r in records(out)), proc)
        proc.kill()
        proc.wait()
        partial_saves += any(".orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finish(train_args(shakespeare_file, data_dir, out, init_from="resume"))
    assert_same_run(out, reference)
    assert partial_saves >= 1  # at least one kill landed inside a save


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit(tmp_path, shakespeare_file, data_dir, reference):
    out = tmp_path / "out"
    for i, (sig, code) in enumerate([(signal.SIGTERM, 0), (signal.SIGINT, 130)]):
        proc = start(train_args(shakespeare_file, data_dir, out, init_from="resume" if i else "scratch"))
        begin = steps_logged(out)
        wait_for(lambda b=begin: steps_logged(out) >= b + 3, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code, stderr[-3000:]
        name = "SIGTERM" if sig == signal.SIGTERM else "interrupt"
        stopped = int(stdout.split(f"stopped by {name} at step ", 1)[1].split(";")[0])
        assert stopped in {int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()}
        assert "Traceback" not in stderr
    # The run resumed from the stop checkpoints ends exactly where the uninterrupted one does.
    finish(train_args(shakespeare_file, data_dir, out, init_from="resume"))
    assert_same_run(out, reference)


def test_a_second_ctrl_c_exits_at_once(tmp_path, shakespeare_file, data_dir):
    out = tmp_path / "out"
    proc = start(train_args(shakespeare_file, data_dir, out, max_iters=100_000, lr_decay_iters=100_000,
                            eval_interval=100_000))
    wait_for(lambda: steps_logged(out) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # two signals sent together would arrive as one
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr


def test_a_busy_out_dir_is_refused_and_a_stale_lock_taken_over(tiny_cfg, shakespeare):
    out = Path(tiny_cfg.out_dir)
    with RunLock(out):
        with pytest.raises(RunLockedError, match=rf"{out} is in use by another training run \(pid "
                                                 rf"{os.getpid()} on .*\); wait for it to finish"):
            train(tiny_cfg, shakespeare)
    # A lock file left filled in by a run that died (the kernel released its flock).
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with pytest.warns(UserWarning, match=r"taking over .*\.lock: its last holder \(pid 999999 on elsewhere"):
        train(tiny_cfg, shakespeare)
    assert (out / ".lock").read_text() == ""  # released cleanly


def test_a_busy_out_dir_from_the_command_line(tmp_path, shakespeare_file, data_dir):
    out = tmp_path / "out"
    with RunLock(out):
        result = subprocess.run(train_args(shakespeare_file, data_dir, out), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2 and "is in use by another training run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def damaged_source(tmp_path_factory, shakespeare_file, data_dir, shakespeare):
    """A run with checkpoints at steps 10 and 20 (always saved, 3 kept)."""
    from gpt_jax.config import make_config

    out = tmp_path_factory.mktemp("damaged") / "out"
    cfg = make_config(source_file=str(shakespeare_file), data_dir=str(data_dir), out_dir=str(out),
                      always_save_checkpoint=True, keep_checkpoints=3, **TINY)
    train(cfg, shakespeare, log=lambda msg: None)
    return cfg


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(files, key=lambda p: -p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    biggest = _data_files(step_dir)[0]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def _corrupt(step_dir: Path) -> None:
    biggest = _data_files(step_dir)[0]
    data = bytearray(biggest.read_bytes())
    for i in range(64, len(data), 97):
        data[i] ^= 0xFF
    biggest.write_bytes(bytes(data))


DAMAGE = {
    "truncated array file": _truncate,
    "corrupted array file": _corrupt,
    "missing metadata file": lambda d: (d / "meta" / "metadata").unlink(),
    "missing state directory": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_step_falls_back_to_the_previous_one(damaged_source, tmp_path, damage, shakespeare):
    out = tmp_path / "out"
    shutil.copytree(damaged_source.out_dir, out)
    good = load_checkpoint(out, step=10)[0]
    DAMAGE[damage](out / "checkpoints" / "20")
    with pytest.warns(UserWarning, match=r"checkpoint step 20 in .* trying an older step"):
        params, _, _, meta = load_checkpoint(out)
    assert meta["metrics"]["step"] == 10
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(good), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # training resumes from step 10 too
    cfg = dataclasses.replace(damaged_source, out_dir=str(out), init_from="resume", max_iters=30)
    with pytest.warns(UserWarning, match="checkpoint step 20"):
        result = train(cfg, shakespeare, log=lambda msg: None)
    assert int(result.state.step) == 30
    # with every step damaged, a clear error
    for step in (10, 30):
        DAMAGE[damage](out / "checkpoints" / str(step))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint in"):
        load_checkpoint(out)


def test_an_empty_step_and_a_leftover_partial_save_are_skipped(damaged_source, tmp_path, shakespeare):
    out = tmp_path / "out"
    shutil.copytree(damaged_source.out_dir, out)
    (out / "checkpoints" / "30").mkdir()  # an empty step directory
    partial = out / "checkpoints" / "25.orbax-checkpoint-tmp-1234"  # what a kill during a save leaves
    shutil.copytree(out / "checkpoints" / "20", partial)
    with pytest.warns(UserWarning) as caught:
        _, _, _, meta = load_checkpoint(out)
    messages = " ".join(str(w.message) for w in caught)
    assert meta["metrics"]["step"] == 20
    assert "checkpoint step 30 in" in messages and "checkpoint step 25 in" in messages
    assert "never completed" in messages
    cfg = dataclasses.replace(damaged_source, out_dir=str(out), init_from="resume", max_iters=30)
    with pytest.warns(UserWarning, match="removing it"):
        train(cfg, shakespeare, log=lambda msg: None)
    assert not partial.exists()


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(damaged_source, tmp_path,
                                                                          shakespeare):
    out = tmp_path / "out"
    shutil.copytree(damaged_source.out_dir, out)
    before = load_checkpoint(out)[0]
    cfg = dataclasses.replace(damaged_source, out_dir=str(out), init_from="resume", max_iters=40,
                              learning_rate=1e30, min_lr=1e30, warmup_iters=0, grad_clip=0.0)
    logged = []
    with pytest.raises(NonFiniteLossError, match=r"the training loss is (nan|inf) at step 2\d; training "
                                                 r"stopped, and the last good checkpoint, step 20 in .* is "
                                                 r"untouched\. Lower --learning_rate"):
        train(cfg, shakespeare, log=logged.append)
    assert "resuming with changed settings" in logged[0]
    assert "learning_rate 0.003 -> 1e+30" in logged[0]
    after, _, _, meta = load_checkpoint(out)
    assert meta["metrics"]["step"] == 20
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_refuses_a_different_model_and_says_other_changes(damaged_source, tmp_path, shakespeare):
    out = tmp_path / "out"
    shutil.copytree(damaged_source.out_dir, out)
    resume = dataclasses.replace(damaged_source, out_dir=str(out), init_from="resume")
    message = r"cannot resume step 20 of .*: the model differs \(n_layer 2 -> 3; n_embd 32 -> 48\); keep"
    with pytest.raises(CheckpointError, match=message):
        train(dataclasses.replace(resume, n_layer=3, n_embd=48), shakespeare)
    logged = []
    result = train(dataclasses.replace(resume, max_iters=25, dropout=0.1), shakespeare, log=logged.append)
    assert int(result.state.step) == 25
    assert logged[0] == "resuming with changed settings: dropout 0.0 -> 0.1; max_iters 20 -> 25"


@pytest.mark.slow
def test_a_full_disk_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
        damaged_source, tmp_path, shakespeare_file, data_dir):
    """The resumed run cannot write files past 16 KiB (the operating system's file-size limit stands
    in for a full disk): its first save fails, the error says so, and step 20 restores as before."""
    out = tmp_path / "out"
    shutil.copytree(damaged_source.out_dir, out)
    before = load_checkpoint(out)[0]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    args = train_args(shakespeare_file, data_dir, out, **{**TINY, "always_save_checkpoint": True,
                                                           "keep_checkpoints": 1, "dropout": 0.0,
                                                           "init_from": "resume", "max_iters": 30})
    # ulimit -f counts KiB; with SIGXFSZ ignored, writes past the limit fail with EFBIG.
    command = "trap '' XFSZ; ulimit -f 16; exec " + " ".join(shlex.quote(a) for a in args)
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: cannot write checkpoint step 30 in ")
    assert "File too large" in last and "the newest complete checkpoint is step 20; free disk space" in last
    assert "permission" not in last
    after, _, _, meta = load_checkpoint(out)
    assert meta["metrics"]["step"] == 20
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_damaged_step_is_one_warning_line_on_the_command_line(damaged_source, tmp_path):
    """Falling back from a corrupted step says so in one line, naming the cause, with no traceback of
    the storage library's."""
    out = tmp_path / "out"
    shutil.copytree(damaged_source.out_dir, out)
    _corrupt(out / "checkpoints" / "20")
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}",
                             "--max_new_tokens=5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "tokens in" in lines[1], result.stderr[-3000:]
    assert lines[0].startswith("sample.py: warning: checkpoint step 20 in ")
    assert "Error reading" in lines[0] and lines[0].endswith("trying an older step")
