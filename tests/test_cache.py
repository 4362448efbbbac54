"""The token cache is never silently wrong: damage is named in one warning and rebuilt, an unwritable
cache is a one-line error, dead writers' leftovers go, and files get the umask's permissions."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from gpt_jax.config import make_config
from gpt_jax.data import load_data
from gpt_jax.errors import DataError
from gpt_jax.tokenizer import CharTokenizer

WORDS = ("Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry, who was a farmer, "
         "and Aunt Em, who was the farmer's wife.\n").split(" ")


def _corpus_text(n_words: int) -> str:
    rng = np.random.default_rng(0)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


@pytest.fixture
def cfg(tmp_path):
    """A small corpus file and its own data_dir."""
    corpus = tmp_path / "oz.txt"
    corpus.write_text(_corpus_text(4000))
    return make_config(dataset=str(corpus), data_dir=str(tmp_path / "data"))


def cache_of(cfg) -> Path:
    (folder,) = [p for p in (Path(cfg.data_dir) / "tokens").iterdir() if not p.name.startswith(".")]
    return folder


def load_warning(cfg) -> tuple[object, list[str]]:
    """load_data(cfg) and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(cfg)
    return data, [str(w.message) for w in caught]


def test_a_cache_is_published_with_a_manifest_of_sizes_and_checksums(cfg):
    data = load_data(cfg)
    cache = cache_of(cfg)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["source"] == cfg.dataset
    assert CharTokenizer.from_json(manifest["tokenizer"]) == data.tokenizer
    for name, ids in (("train", data.train), ("val", data.val)):
        record, path = manifest["splits"][name], cache / f"{name}.bin"
        assert record["tokens"] == len(ids) and record["bytes"] == path.stat().st_size == 2 * len(ids)
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["mtime_ns"] == path.stat().st_mtime_ns and record["sampled"]
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "train.bin", "val.bin"]


def _truncate(cache: Path, name: str, fraction: float) -> None:
    path = cache / f"{name}.bin"
    os.truncate(path, int(path.stat().st_size * fraction))


def _overwrite(cache: Path, name: str, value: int) -> None:
    path = cache / f"{name}.bin"
    np.full(path.stat().st_size // 2, value, np.uint16).tofile(path)


DAMAGE = {  # what is done to a good cache, and what the warning must say
    "train.bin truncated to 10%": (lambda c: _truncate(c, "train", 0.1),
                                   r"train.bin has [\d,]+ bytes, its manifest says [\d,]+"),
    "ids beyond the vocabulary": (lambda c: _overwrite(c, "train", 60_000),
                                  "train.bin differs from its manifest"),
    "both splits zero-filled": (lambda c: (_overwrite(c, "train", 0), _overwrite(c, "val", 0)),
                                "train.bin differs from its manifest"),
    "odd length": (lambda c: (c / "val.bin").open("ab").write(b"\0"), r"val.bin has [\d,]+ bytes"),
    "empty split file": (lambda c: _truncate(c, "val", 0), "val.bin has 0 bytes"),
    "split file deleted": (lambda c: (c / "val.bin").unlink(), "val.bin cannot be read: No such file"),
    "broken manifest": (lambda c: (c / "manifest.json").write_text('{"format": 2, "tok'),
                        "manifest.json cannot be read"),
    "manifest of another shape": (lambda c: (c / "manifest.json").write_text("[]"),
                                  "manifest.json is malformed"),
    "manifest deleted": (lambda c: (c / "manifest.json").unlink(), "it has no manifest.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_named_in_one_warning_and_rebuilt(cfg, damage):
    good = load_data(cfg)
    train, val = np.array(good.train), np.array(good.val)
    cache = cache_of(cfg)
    make_damage, message = DAMAGE[damage]
    make_damage(cache)
    data, warned = load_warning(cfg)
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith(f"the token cache {cache} is damaged (")
    assert warned[0].endswith("); rebuilding it")
    assert re.search(message, warned[0]), warned[0]
    assert np.array_equal(data.train, train) and np.array_equal(data.val, val)
    assert load_warning(cfg)[1] == []  # rebuilt for good
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.fixture
def big_cfg(tmp_path):
    """A corpus whose split files are larger than the sampled part of the digest."""
    corpus = tmp_path / "oz.txt"
    corpus.write_text(_corpus_text(60_000))
    return make_config(dataset=str(corpus), data_dir=str(tmp_path / "data"))


def _rewrite_token(path: Path, index: int, value: int) -> None:
    """Change one token id, as a later write would: the mtime moves on."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(2 * index)
        f.write(np.uint16(value).tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_a_file_written_since_is_checked_in_full(big_cfg):
    data = load_data(big_cfg)
    train, vocab = np.array(data.train), data.tokenizer.vocab_size
    path = cache_of(big_cfg) / "train.bin"
    assert path.stat().st_size > 64 * 4096
    # Token 2050 lies between the first two sampled 4 KiB chunks: only the full sha256 sees it.
    _rewrite_token(path, 2050, (train[2050] + 1) % vocab)
    data, warned = load_warning(big_cfg)
    assert len(warned) == 1 and "train.bin was modified since it was written (sha256 differs" in warned[0]
    assert np.array_equal(data.train, train)


def test_ids_outside_the_vocabulary_are_found_when_a_file_was_written_since(big_cfg):
    good = load_data(big_cfg)
    vocab = good.tokenizer.vocab_size
    _rewrite_token(cache_of(big_cfg) / "train.bin", 2050, vocab + 3)
    data, warned = load_warning(big_cfg)
    assert len(warned) == 1
    assert f"train.bin holds token id {vocab + 3}, outside the vocabulary of {vocab}" in warned[0]
    assert int(data.train.max()) < vocab


def test_a_file_touched_but_unchanged_is_accepted(big_cfg):
    good = np.array(load_data(big_cfg).train)
    path = cache_of(big_cfg) / "train.bin"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    data, warned = load_warning(big_cfg)
    assert warned == [] and np.array_equal(data.train, good)


# --- writers ----------------------------------------------------------------------------------------

def test_stale_folders_of_dead_writers_are_removed_and_live_ones_kept(cfg):
    load_data(cfg)
    tokens = cache_of(cfg).parent
    dead, live, unlocked = tokens / ".tmp-dead", tokens / ".tmp-live", tokens / ".tmp-nolock"
    for folder in (dead, live, unlocked):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 1000)
    (dead / "writer.lock").touch()
    fd = os.open(live / "writer.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer at work, in another process as far as flock knows
        load_data(cfg)
        assert not dead.exists() and not unlocked.exists()
        assert (live / "train.bin").exists()
    finally:
        os.close(fd)
    load_data(cfg)
    assert not live.exists()


STUCK_WRITER = """
import pathlib, sys, time
from gpt_jax.config import make_config
from gpt_jax.data import load_data
from gpt_jax.tokenizer import CharTokenizer

def stuck(self, text):
    pathlib.Path(sys.argv[3]).touch()
    time.sleep(600)

CharTokenizer.encode = stuck
load_data(make_config(dataset=sys.argv[1], data_dir=sys.argv[2]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_writer_killed_while_tokenising_leaves_nothing_behind(cfg, tmp_path, sig):
    marker = tmp_path / "tokenising"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, cfg.dataset, cfg.data_dir, str(marker)],
                            stderr=subprocess.PIPE)
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        tokens = Path(cfg.data_dir) / "tokens"
        assert [p for p in tokens.iterdir() if p.name.startswith(".tmp-")]  # caught mid-write
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    data, warned = load_warning(cfg)
    assert warned == [] and len(data.train) > 0
    assert [p.name for p in tokens.iterdir() if p.name.startswith(".tmp-")] == []


def test_two_builders_of_one_cache_take_turns(cfg, monkeypatch):
    from gpt_jax import prepare

    builds = []
    make_tokenizer = prepare.make_tokenizer

    def slow_make_tokenizer(*args, **kwargs):
        builds.append(args)
        time.sleep(0.5)  # long enough that the other thread arrives while this one builds
        return make_tokenizer(*args, **kwargs)

    monkeypatch.setattr(prepare, "make_tokenizer", slow_make_tokenizer)
    results = [None, None]

    def load(i):
        results[i] = load_data(cfg)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert np.array_equal(results[0].train, results[1].train)


def test_a_cache_gets_the_permissions_of_the_umask(cfg):
    old = os.umask(0o022)
    try:
        load_data(cfg)
    finally:
        os.umask(old)
    cache = cache_of(cfg)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in cache.iterdir()} == {
        "manifest.json": 0o644, "train.bin": 0o644, "val.bin": 0o644}


# --- folders that cannot be written -----------------------------------------------------------------

@contextlib.contextmanager
def permissions_enforced():
    """File permissions as an ordinary user meets them. Root passes them by CAP_DAC_OVERRIDE: drop it from
    this thread's effective capabilities (capabilities are per thread on Linux) for the block."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    caps = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words
    assert libc.capget(header, caps) == 0, ctypes.get_errno()
    saved = list(caps)
    caps[0] &= ~(1 << 1)  # CAP_DAC_OVERRIDE
    assert libc.capset(header, caps) == 0, ctypes.get_errno()
    try:
        yield
    finally:
        caps[:] = saved
        assert libc.capset(header, caps) == 0, ctypes.get_errno()


@contextlib.contextmanager
def read_only(*folders: Path):
    modes = [f.stat().st_mode for f in folders]
    for f in folders:
        f.chmod(0o555)
    try:
        with permissions_enforced():
            yield
    finally:
        for f, mode in zip(folders, modes, strict=True):
            f.chmod(mode)


def test_a_damaged_cache_in_a_read_only_data_dir_is_a_one_line_error(cfg):
    load_data(cfg)
    cache = cache_of(cfg)
    _truncate(cache, "train", 0.1)
    with read_only(Path(cfg.data_dir), cache.parent, cache), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as error:
            load_data(cfg)
    message = str(error.value)
    assert "\n" not in message and not caught
    assert message.startswith(f"the token cache {cache} is damaged (train.bin has ")
    assert message.endswith(f"and cannot be rebuilt in {cache.parent}: Permission denied; make it writable "
                            "or give --data_dir a folder you can write to")


def test_a_read_only_data_dir_at_first_use_is_a_one_line_error(cfg):
    data_dir = Path(cfg.data_dir)
    data_dir.mkdir()
    with read_only(data_dir), pytest.raises(DataError) as error:
        load_data(cfg)
    assert str(error.value) == (f"cannot write the token cache in {data_dir / 'tokens'}: Permission denied; "
                                "make it writable or give --data_dir a folder you can write to")


@pytest.mark.parametrize("under", ["", "sub"], ids=["a file", "under a file"])
def test_a_data_dir_that_is_a_file_is_a_one_line_error(cfg, tmp_path, under):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    data_dir = file / under if under else file
    bad = make_config(dataset=cfg.dataset, data_dir=str(data_dir))
    with pytest.raises(DataError) as error:
        load_data(bad)
    assert str(error.value) == (f"cannot write the token cache in {data_dir / 'tokens'}: {file} is a file; "
                                "give --data_dir a folder")
