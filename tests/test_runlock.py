"""One run per out_dir, and out_dir problems found before anything is written."""

import os
import socket

import pytest

from gpt_jax.errors import CheckpointError
from gpt_jax.runlock import RunLock, active_holder, prepare_out_dir


def test_a_good_out_dir_is_created(tmp_path):
    assert prepare_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("make, message", [
    (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a directory"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "run", "lies under .*/f, which is a file"),
    (lambda t: (t / "link").symlink_to(t / "nowhere") or t / "link", "is a symbolic link to .*nowhere, "
                                                                       "which does not exist"),
    (lambda t: t / ("x" * 300), "out_dir is too long for the file system"),
    (lambda t: t / ("x/" * 3000), "out_dir is too long for the file system"),
])
def test_an_unusable_out_dir_is_a_one_line_error(tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message) as caught:
        prepare_out_dir(make(tmp_path))
    assert "\n" not in str(caught.value) and "--out_dir" in str(caught.value)


def test_the_holder_of_a_lock_is_known_while_it_lives(tmp_path):
    assert active_holder(tmp_path) is None
    with RunLock(tmp_path):
        assert active_holder(tmp_path)["pid"] == os.getpid()
    assert active_holder(tmp_path) is None  # released cleanly: the file is empty
    # a run killed with its lock file filled in: its process is gone
    (tmp_path / ".lock").write_text(f'{{"pid": 999999999, "host": "{socket.gethostname()}"}}')
    assert active_holder(tmp_path) is None
