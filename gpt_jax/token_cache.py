"""Token files on disk: written once with a manifest, checked at every open, rebuilt when damaged.

A cache folder ``<parent>/<key>/`` holds one ``<split>.bin`` per split (the token ids, flat, in the
manifest's dtype) and ``manifest.json``: the format, tokenizer, dtype, source and, per split, its
token count, byte size, sha256, a sampled digest and the file's mtime when written. Opening checks
every size exactly and the sampled digest (cheap: 64 spread-out 4 KiB chunks); a file whose mtime
changed since was written again, so its full sha256 is checked too, and its ids against the vocabulary.
A folder that does not check out (no manifest included) is named in one warning and rebuilt.

Writers never meet: building a key holds ``<parent>/.<key>.lock`` (flock), and after taking it looks
again, since another process may have built the cache meanwhile. Files are written into a fresh
``.tmp-*`` folder whose ``writer.lock`` the writer holds until it renames the folder into place; any
later open removes the ``.tmp-*`` folders of writers that died (their lock is free). Folders and
files get the permissions of the umask, as any other file the user writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from gpt_jax.errors import DataError, TokenizerError
from gpt_jax.tokenizer import Tokenizer, tokenizer_from_json

FORMAT = 2  # 1: meta.json without sizes or checksums, text not normalised
MANIFEST = "manifest.json"
_WRITER_LOCK = "writer.lock"
_TMP_PREFIX = ".tmp-"
_SAMPLES, _SAMPLE_BYTES = 64, 4096
_READ_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Built:
    """What a build function gives: the tokenizer, each split's token ids (int arrays, in one or more
    chunks, produced as they are written) and a readable name of the source."""

    tokenizer: Tokenizer
    splits: Mapping[str, Iterable[np.ndarray]]
    source: str


@dataclasses.dataclass(frozen=True)
class TokenFiles:
    """An opened cache: the tokenizer and each split's ids, read-only and memory-mapped."""

    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    source: str


class _Damaged(Exception):
    """A cache folder that does not check out; the message says which file and what is wrong."""


def open_or_build(cache: Path, splits: tuple[str, ...], build: Callable[[], Built]) -> TokenFiles:
    """The token files in ``cache``, built with ``build()`` first when missing or damaged.

    A damaged cache is named in one warning (UserWarning) and rebuilt. Raises DataError, one line, when
    the cache cannot be written (a read-only, unwritable or missing parent folder, or one under a file).
    """
    remove_dead_writers(cache.parent)
    try:
        return _open(cache, splits)
    except _Damaged as e:
        problem = str(e) if os.path.lexists(cache) else ""
    with _build_lock(cache, problem):
        try:
            return _open(cache, splits)  # built by another process while we waited for the lock
        except _Damaged as e:
            problem = str(e) if os.path.lexists(cache) else ""
        with _tmp_folder(cache, problem) as tmp:
            if problem:
                warnings.warn(f"the token cache {cache} is damaged ({problem}); rebuilding it", stacklevel=2)
            built = build()
            try:
                _write(tmp, built)
                _publish(tmp, cache)
            except OSError as e:
                raise _unwritable(cache, e, problem) from None
    return _open(cache, splits)


def remove_dead_writers(parent: Path) -> None:
    """Remove the ``.tmp-*`` folders in ``parent`` whose writer died (its lock is free); leave live ones.

    Best effort: nothing is removed where ``parent`` cannot be written.
    """
    try:
        names = [n for n in os.listdir(parent) if n.startswith(_TMP_PREFIX)]
    except OSError:
        return
    for name in names:
        try:
            # Created if missing: a folder between its writer's mkdir and lock, or a writer that died
            # there. The writer checks, once it holds its lock, that the folder is still there.
            fd = os.open(parent / name / _WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(parent / name, ignore_errors=True)
        except OSError:
            pass  # a live writer holds it
        finally:
            os.close(fd)


# --- reading --------------------------------------------------------------------------------------


def _open(cache: Path, splits: tuple[str, ...]) -> TokenFiles:
    tokenizer, dtype, source, records = _read_manifest(cache, splits)
    arrays = {name: _open_split(cache / f"{name}.bin", records[name], dtype, tokenizer.vocab_size)
              for name in splits}
    return TokenFiles(tokenizer, arrays, source)


def _read_manifest(cache: Path, splits: tuple[str, ...]) -> tuple[Tokenizer, np.dtype, str, dict]:
    try:
        manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged(f"it has no {MANIFEST}") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise _Damaged(f"{MANIFEST} cannot be read: {e}") from None
    try:
        if manifest["format"] != FORMAT:
            raise _Damaged(f"{MANIFEST} has format {manifest['format']!r}, not {FORMAT}")
        tokenizer = tokenizer_from_json(manifest["tokenizer"])
        dtype = np.dtype(manifest["dtype"])
        records = {name: _Record(**manifest["splits"][name]) for name in splits}
        source = manifest["source"]
    except (KeyError, TypeError, ValueError, TokenizerError) as e:
        raise _Damaged(f"{MANIFEST} is malformed ({type(e).__name__}: {e})") from None
    if dtype.kind != "u":
        raise _Damaged(f"{MANIFEST} gives dtype {dtype}, not an unsigned integer type")
    for name, r in records.items():
        if not r.is_consistent(dtype):
            raise _Damaged(f"{MANIFEST} is inconsistent: {name} has {r.tokens!r} tokens of {dtype} in "
                           f"{r.bytes!r} bytes")
    return tokenizer, dtype, str(source), records


@dataclasses.dataclass(frozen=True)
class _Record:
    """A split file as written: ``tokens`` ids in ``bytes`` bytes, their checksums, the file's mtime."""

    tokens: int
    bytes: int
    sha256: str
    sampled: str
    mtime_ns: int

    def is_consistent(self, dtype: np.dtype) -> bool:
        sizes = (self.tokens, self.bytes, self.mtime_ns)
        return all(type(n) is int for n in sizes) and self.bytes == self.tokens * dtype.itemsize


def _open_split(path: Path, record: _Record, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    """The split's ids, memory-mapped, once its size and sampled digest match its record (and, if it
    was written since, its sha256 and the range of its ids)."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise _Damaged(f"{path.name} cannot be read: {e.strerror}") from None
    if stat.st_size != record.bytes:
        raise _Damaged(f"{path.name} has {stat.st_size:,} bytes, its manifest says {record.bytes:,}")
    if _sampled_digest(path, stat.st_size) != record.sampled:
        raise _Damaged(f"{path.name} differs from its manifest (sampled checksum)")
    if stat.st_mtime_ns != record.mtime_ns:  # written since: only the whole content can vouch for it
        sha256, top = _full_check(path, dtype)
        if top >= vocab_size:
            raise _Damaged(f"{path.name} holds token id {top}, outside the vocabulary of {vocab_size}")
        if sha256 != record.sha256:
            raise _Damaged(f"{path.name} was modified since it was written (sha256 differs from its "
                           "manifest)")
    if record.tokens == 0:
        return np.zeros(0, dtype)  # an empty file cannot be memory-mapped
    return np.memmap(path, dtype=dtype, mode="r")


def _sampled_digest(path: Path, size: int) -> str:
    """blake2b of the size and ``_SAMPLES`` evenly spaced chunks (the whole file when that is smaller):
    cheap at every open, and it sees truncation, zero-filling and rewrites of any extent."""
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            digest.update(f.read())
        else:
            for i in range(_SAMPLES):
                f.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _full_check(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(sha256, largest id) of a split file, read in bounded chunks; -1 for an empty file."""
    sha256, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):  # a multiple of the itemsize: the size was checked
            sha256.update(chunk)
            top = max(top, int(np.frombuffer(chunk, dtype).max()))
    return sha256.hexdigest(), top


# --- writing --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(cache: Path, problem: str) -> Iterator[None]:
    """Hold ``<parent>/.<key>.lock``: one builder per cache key at a time, across processes.

    ``problem`` (why the cache is rebuilt) goes into the DataError raised if the lock cannot be made.
    """
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache.parent / f".{cache.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _unwritable(cache, e, problem) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _tmp_folder(cache: Path, problem: str) -> Iterator[Path]:
    """A new ``.tmp-*`` folder next to ``cache`` whose ``writer.lock`` is held until the block ends;
    removed then unless it was renamed away. Raises DataError (with ``problem``) if it cannot be made.
    """
    while True:
        path = cache.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            os.mkdir(path, 0o777)  # the umask applies, unlike mkdtemp's 0o700
        except FileExistsError:
            continue
        except OSError as e:
            raise _unwritable(cache, e, problem) from None
        fd = _lock_writer(path)
        if fd is not None:
            break
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _lock_writer(path: Path) -> int | None:
    """The fd holding ``path/writer.lock``; None if a cleaner took the new folder for a dead writer's."""
    lock = path / _WRITER_LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.stat(lock)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _unwritable(cache: Path, error: OSError, problem: str) -> DataError:
    """The one-line error for a cache that cannot be written: where, why, what to do."""
    what = (f"the token cache {cache} is damaged ({problem}) and cannot be rebuilt in {cache.parent}"
            if problem else f"cannot write the token cache in {cache.parent}")
    file = next((p for p in (cache, *cache.parents) if p.exists() and not p.is_dir()), None)
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and file is not None:
        return DataError(f"{what}: {file} is a file; give --data_dir a folder")
    fix = "make it writable or give" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "give"
    return DataError(f"{what}: {error.strerror}; {fix} --data_dir a folder you can write to")


def _write(tmp: Path, built: Built) -> None:
    """The split files and, last, the manifest, into ``tmp``; ids are checked against the vocabulary."""
    vocab_size = built.tokenizer.vocab_size
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    records = {name: _write_split(tmp / f"{name}.bin", chunks, dtype, vocab_size)
               for name, chunks in built.splits.items()}
    manifest = {"format": FORMAT, "tokenizer": built.tokenizer.to_json(), "dtype": dtype.name,
                "source": built.source, "splits": {n: dataclasses.asdict(r) for n, r in records.items()}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _write_split(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype, vocab_size: int) -> _Record:
    sha256, tokens = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for ids in chunks:
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"token ids {ids.min()}..{ids.max()} outside a vocabulary of {vocab_size}")
            ids = np.ascontiguousarray(ids, dtype=dtype)
            f.write(ids.data)
            sha256.update(ids.data)
            tokens += ids.size
    stat = os.stat(path)
    return _Record(tokens=tokens, bytes=stat.st_size, sha256=sha256.hexdigest(),
                   sampled=_sampled_digest(path, stat.st_size), mtime_ns=stat.st_mtime_ns)


def _publish(tmp: Path, cache: Path) -> None:
    """Rename ``tmp`` to ``cache``; a damaged ``cache`` is first moved aside (into a locked ``.tmp-*``
    folder, so a kill before its removal leaves it to the next cleaner)."""
    if os.path.lexists(cache):
        with _tmp_folder(cache, problem="") as aside:
            os.rename(cache, aside / "damaged")
            os.rename(tmp, cache)
    else:
        os.rename(tmp, cache)
    (cache / _WRITER_LOCK).unlink()
