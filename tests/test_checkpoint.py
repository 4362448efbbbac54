import dataclasses
import shutil

import jax
import numpy as np
import pytest

from gpt_jax.checkpoint import Checkpointer, load_checkpoint
from gpt_jax.errors import CheckpointError
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
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="could be restored .*step 20: "):
        load_checkpoint(trained.config.out_dir)
