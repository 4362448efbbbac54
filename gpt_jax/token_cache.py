"""Token files on disk: written once with a manifest, checked at every open, rebuilt when damaged.

A cache folder ``<parent>/<key>/`` holds one ``<split>.bin`` per split (the token ids, flat, in the
manifest's dtype) and ``manifest.json``: the format, tokenizer, dtype, source, the sources it was made
from (``describe_sources``), what the build noted, and per split its token count, byte size, sha256,
a sampled digest and the file's mtime when written. Opening checks every size exactly and the sampled
digest (cheap: 64 spread-out 4 KiB chunks); a file whose mtime changed since was written again, so its
full sha256 is checked too, and its ids against the vocabulary. A folder that does not check out (no
manifest included), or that was made from sources that changed since, is named in one warning and
rebuilt.

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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt_jax.errors import DataError, TokenizerError
from gpt_jax.tokenizer import Tokenizer, tokenizer_from_json

FORMAT = 3  # 2: no sources in the manifest; 1: meta.json without sizes or checksums
MANIFEST = "manifest.json"
_WRITER_LOCK = "writer.lock"
_TMP_PREFIX = ".tmp-"
_SAMPLES, _SAMPLE_BYTES = 64, 4096
_READ_BYTES = 1 << 20
_LISTED_FILES = 10_000


@dataclasses.dataclass(frozen=True)
class TokenFiles:
    """An opened cache: the tokenizer and each split's ids, read-only and memory-mapped."""

    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    source: str
    built: bool = False  # made by this call, not found ready


class _Damaged(Exception):
    """A cache folder that does not check out; the message says which file and what is wrong."""

    def rebuilding(self, cache: Path) -> str:
        return f"the token cache {cache} is damaged ({self}); rebuilding it"


class _OutOfDate(_Damaged):
    """A sound cache folder made from sources that have changed since."""

    def rebuilding(self, cache: Path) -> str:
        return f"the source changed since {cache} was prepared ({self}); preparing it again"


def open_or_build(cache: Path, splits: tuple[str, ...], build: Callable[[Writer], None],
                  sources: dict[str, Any] | None = None) -> TokenFiles:
    """The token files in ``cache``, built with ``build(writer)`` first when missing, damaged or out of
    date.

    ``sources`` describes what the files are made from (``describe_sources``); a cache whose manifest
    describes other sources is out of date. ``build`` gets a ``Writer``: it calls ``start`` once with
    the tokenizer, then ``append`` any number of times, in order, per split; a build that raises leaves
    nothing behind. A damaged or out-of-date cache is named in one warning (UserWarning) and rebuilt.
    Raises DataError, one line, when the cache cannot be written (a read-only, unwritable or missing
    parent folder, or one under a file).
    """
    remove_dead_writers(cache.parent)
    try:
        return _open(cache, splits, sources)
    except _Damaged as e:
        problem = e if os.path.lexists(cache) else None
    with _build_lock(cache, str(problem or "")):
        remove_dead_writers(cache.parent)  # a writer we waited for may have died
        try:
            return _open(cache, splits, sources)  # built by another process while we waited for the lock
        except _Damaged as e:
            problem = e if os.path.lexists(cache) else None
        with _tmp_folder(cache, str(problem or "")) as tmp:
            if problem:
                warnings.warn(problem.rebuilding(cache), stacklevel=2)
            writer = Writer(tmp, splits, sources)
            try:
                build(writer)
                writer.finish()
                _publish(tmp, cache)
            except OSError as e:
                raise _unwritable(cache, e, str(problem or "")) from None
            finally:
                writer.close()
    return dataclasses.replace(_open(cache, splits, sources), built=True)


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


def _open(cache: Path, splits: tuple[str, ...], sources: dict[str, Any] | None) -> TokenFiles:
    tokenizer, dtype, source, records, manifest = _read_manifest(cache, splits)
    if sources is not None and manifest.get("sources", {}).get("digest") != sources["digest"]:
        raise _OutOfDate(_what_changed(manifest.get("sources", {}), sources))
    arrays = {name: _open_split(cache / f"{name}.bin", records[name], dtype, tokenizer.vocab_size)
              for name in splits}
    return TokenFiles(tokenizer, arrays, source)


def _read_manifest(cache: Path, splits: tuple[str, ...]) -> tuple[Tokenizer, np.dtype, str, dict, dict]:
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
    return tokenizer, dtype, str(source), records, manifest


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


class Writer:
    """The split files of a cache being built: ids appended in order, the manifest written last.

    ``scratch`` is a folder for the build's own temporary files (removed before the cache is
    published); ``info`` is a JSON-able dict the build may fill, kept in the manifest as ``prepared``.
    """

    def __init__(self, folder: Path, splits: tuple[str, ...], sources: dict[str, Any] | None):
        self.scratch = folder / "scratch"
        self.info: dict[str, Any] = {}
        self._folder, self._splits, self._sources = folder, splits, sources
        self._files: dict[str, Any] = {}
        self._sha256 = {name: hashlib.sha256() for name in splits}
        self._tokens = dict.fromkeys(splits, 0)
        self.tokenizer: Tokenizer | None = None

    def start(self, tokenizer: Tokenizer, source: str) -> np.dtype:
        """Open the split files for ``tokenizer``'s ids; the dtype they are stored in (uint16 when the
        vocabulary fits, else uint32)."""
        self.tokenizer, self._source = tokenizer, source
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        for name in self._splits:
            self._files[name] = open(self._folder / f"{name}.bin", "wb")  # noqa: SIM115 (closed in close)
        return self.dtype

    def append(self, split: str, ids: np.ndarray) -> None:
        """Append token ids (any integer array) to a split. ValueError for ids outside the vocabulary."""
        vocab_size = self.tokenizer.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token ids {ids.min()}..{ids.max()} outside a vocabulary of {vocab_size}")
        data = np.ascontiguousarray(ids, dtype=self.dtype).data
        self._files[split].write(data)
        self._sha256[split].update(data)
        self._tokens[split] += ids.size

    def append_file(self, split: str, path: Path) -> None:
        """Append a file of ids in ``dtype`` (a worker's output), read in bounded chunks."""
        with open(path, "rb") as f:
            while chunk := f.read(_READ_BYTES):  # a multiple of the itemsize
                self.append(split, np.frombuffer(chunk, self.dtype))

    def finish(self) -> None:
        """Close the split files and write the manifest."""
        if self.tokenizer is None:
            raise RuntimeError("the build never called Writer.start")
        self.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        records = {}
        for name in self._splits:
            path = self._folder / f"{name}.bin"
            stat = os.stat(path)
            records[name] = _Record(tokens=self._tokens[name], bytes=stat.st_size,
                                    sha256=self._sha256[name].hexdigest(),
                                    sampled=_sampled_digest(path, stat.st_size), mtime_ns=stat.st_mtime_ns)
        manifest = {"format": FORMAT, "tokenizer": self.tokenizer.to_json(), "dtype": self.dtype.name,
                    "source": self._source, "splits": {n: dataclasses.asdict(r) for n, r in records.items()},
                    "sources": self._sources or {}, "prepared": self.info}
        (self._folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def describe_sources(files: Iterable[tuple[str, int, int]], **extra: Any) -> dict[str, Any]:
    """What a cache is made from, for its manifest: ``(name, bytes, mtime_ns)`` of each file (listed
    when there are at most 10,000 of them) and their digest, plus any ``extra`` JSON values (in the
    digest too). Two descriptions with the same digest name the same content, as far as stat can tell.
    """
    files = [list(f) for f in files]
    digest = hashlib.sha256(json.dumps([files, extra], sort_keys=True).encode()).hexdigest()
    described = {"digest": digest, "files": len(files), "bytes": sum(f[1] for f in files), **extra}
    if len(files) <= _LISTED_FILES:
        described["list"] = files
    return described


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short account of how two ``describe_sources`` results differ."""
    if "list" in old and "list" in new:
        before, now = {f[0]: f[1:] for f in old["list"]}, {f[0]: f[1:] for f in new["list"]}
        changes = ([f"{n} changed" for n in now if n in before and now[n] != before[n]]
                   + [f"{n} is new" for n in now if n not in before]
                   + [f"{n} is gone" for n in before if n not in now])
        if changes:
            more = f", and {len(changes) - 3} more" if len(changes) > 3 else ""
            return ", ".join(changes[:3]) + more
    if "files" in old and "bytes" in old:
        return (f"{old['files']:,} files of {old['bytes']:,} bytes then, {new['files']:,} of "
                f"{new['bytes']:,} now")
    return "it was prepared from other sources"


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
