import dataclasses
import json
import shutil
import warnings

import jax
import numpy as np
import pytest

from gpt_jax.checkpoint import Checkpointer, config_from_metadata, load_checkpoint
from gpt_jax.errors import CheckpointError, NoCheckpointError
from gpt_jax.runlock import RunLock
from gpt_jax.state import abstract_state, init_state
from gpt_jax.training import setup_data, train


@pytest.fixture
def trained(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, always_save_checkpoint=True, keep_checkpoints=3)
    return train(cfg)


def test_round_trip_restores_state_and_metadata(tiny_cfg, tmp_path):
    cfg, data = setup_data(tiny_cfg)
    state = init_state(cfg)
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(7, state, {"config": cfg.to_dict(), "note": "hello"})
        ckpt.wait()
    with Checkpointer(tmp_path / "run") as ckpt:
        step, restored, meta = ckpt.restore(lambda meta: abstract_state(cfg))
    assert step == 7 and meta["note"] == "hello"
    assert type(restored.opt_state) is type(state.opt_state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_load_checkpoint_for_notebooks(trained):
    params, cfg, tokenizer, meta = load_checkpoint(trained.config.out_dir)
    assert cfg == trained.config
    assert tokenizer == trained.tokenizer
    assert meta["metrics"]["step"] == 20
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained.state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


# orbax leaves an asyncio callback behind when a read fails; it is harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_step_falls_back_with_a_warning(trained):
    directory = Checkpointer(trained.config.out_dir).directory
    for f in (directory / "20" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 16)
    with pytest.warns(UserWarning, match="step 20 .* cannot be restored"):
        params, cfg, _, meta = load_checkpoint(trained.config.out_dir)
    assert meta["metrics"]["step"] == 10


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints in .*train first or check --out_dir"):
        load_checkpoint(tmp_path / "nothing")


def test_no_good_step_is_a_clear_error(trained):
    directory = Checkpointer(trained.config.out_dir).directory
    for step in directory.iterdir():
        shutil.rmtree(step / "state")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint in .*step 20"):
        load_checkpoint(trained.config.out_dir)


def _edit_vocabulary(out_dir, edit):
    for path in (Checkpointer(out_dir, read_only=True).directory).glob("*/meta/metadata"):
        meta = json.loads(path.read_text())
        meta["tokenizer"]["chars"] = edit(meta["tokenizer"]["chars"])
        path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, problem", [
    (lambda chars: chars[1:], "vocabulary has 64 characters but the model has vocab_size 65"),
    (lambda chars: chars + "é", "vocabulary has 66 characters but the model has vocab_size 65"),
    (lambda chars: chars[:-1] + chars[-2], "duplicate"),
    (lambda chars: "", "empty"),
])
def test_an_edited_vocabulary_is_refused_naming_the_checkpoint(trained, tmp_path, edit, problem):
    out = tmp_path / "copy"
    shutil.copytree(trained.config.out_dir, out)
    _edit_vocabulary(out, edit)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as caught:
        load_checkpoint(out)
    message = str(caught.value)
    assert str(out) in message and "step 20: " in message and problem in message
    assert "\n" not in message


def test_a_step_pruned_while_it_is_read_is_not_called_damaged(trained, monkeypatch):
    """Between listing the steps and reading the newest, a running training prunes it: the reader lists
    again and takes the next, without a warning."""
    directory = Checkpointer(trained.config.out_dir, read_only=True).directory
    pruned = []

    def target_for(meta):
        if not pruned:  # prune the step being read, as orbax does: rename it away
            newest = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
            (directory / str(newest)).rename(directory.parent / "pruned-away")
            pruned.append(newest)
        return abstract_state(config_from_metadata(meta))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Checkpointer(trained.config.out_dir, read_only=True) as ckpt:
            step, _, meta = ckpt.restore(target_for)
    assert pruned == [20] and step == 10 == meta["metrics"]["step"]


@pytest.mark.parametrize("error", [FileNotFoundError, NotADirectoryError])
def test_listing_retries_when_orbax_sees_a_step_go_between_two_checks(trained, monkeypatch, error):
    """orbax checks a step with exists() then is_dir(): a prune between the two is NotADirectoryError."""
    import orbax.checkpoint as ocp

    real, calls = ocp.CheckpointManager, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error("Path is not a directory: checkpoints/39")
        return real(*args, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(trained.config.out_dir)[3]["metrics"]["step"] == 20
    assert len(calls) == 2


def test_a_save_in_progress_is_not_reported_but_an_abandoned_one_is(trained, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained.config.out_dir, out)
    partial = out / "checkpoints" / "30.orbax-checkpoint-tmp-99"
    partial.mkdir()
    with RunLock(out):  # a live training writes here
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_checkpoint(out)[3]["metrics"]["step"] == 20
    with pytest.warns(UserWarning, match="step 30 .* was never completed .* ignoring it"):
        load_checkpoint(out)


def test_a_failed_write_names_its_cause(tmp_path):
    with Checkpointer(tmp_path / "run") as ckpt:
        for error, advice in [(PermissionError(13, "Permission denied"), "permission denied: make the "),
                              (OSError(28, "No space left on device"), "free disk space (the disk is full)")]:
            ckpt._saving = 5

            def fail(error=error):
                raise error

            with pytest.raises(CheckpointError, match=r"cannot write checkpoint step 5 .*") as caught:
                ckpt._check(fail)
            assert advice in str(caught.value)
            assert ("free disk" in str(caught.value)) == ("No space" in str(error))


@pytest.mark.slow
def test_readers_while_a_training_saves_and_prunes(tmp_path, shakespeare_file, data_dir):
    """load_checkpoint in a loop while train.py saves at every third step and keeps two: every read
    returns a complete step, with no warning and no error."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, TINY, cli_args

    out = tmp_path / "copy"
    run = {**TINY, "max_iters": 60, "lr_decay_iters": 60, "eval_interval": 3, "eval_iters": 1,
           "always_save_checkpoint": True, "keep_checkpoints": 2}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *cli_args(shakespeare_file, data_dir, out, run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            while proc.poll() is None:
                try:
                    steps.append(load_checkpoint(out)[3]["metrics"]["step"])
                except NoCheckpointError:
                    time.sleep(0.05)  # not yet a first checkpoint
    finally:
        proc.kill()
        stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr[-2000:]
    assert len(set(steps)) >= 3 and steps == sorted(steps)
