"""Prepare a corpus: its sources, streamed through a tokenizer in worker processes, into token files.

``python -m gpt_jax.prepare [CONFIG] --dataset=... --tokenizer=... [--data_dir=...]`` takes the keys of
``train.py``; ``train.py`` runs the same ``prepare`` when the corpus is not prepared yet.

Sources (``--dataset``):
- ``tiny_shakespeare``: the char-rnn text through a tensorflow-datasets builder that needs no TensorFlow
  (from ``--source_file``, tfds's manual directory, or the copy shipped in ``gpt_jax/corpora``); train is
  its first 90 %, validation the rest, exactly nanoGPT's split.
- one text file (``.txt``, ``.txt.gz``, ``.txt.xz``): one document; its first ``1 - val_fraction`` of
  characters are train, the rest validation (nanoGPT's rule).
- many documents: a folder (searched recursively; hidden files and other kinds are passed over) of
  ``.txt`` / ``.txt.gz`` / ``.txt.xz`` files (a document each), ``.jsonl`` / ``.jsonl.gz`` /
  ``.jsonl.xz`` files (a document per line, its ``text_field``), and ``.tar`` / ``.tar.gz`` / ``.tgz`` /
  ``.tar.xz`` archives of any of these (a bare ``.gz`` or ``.xz`` is read as an archive when it holds
  one, as OpenWebText's do, else as text); or one such ``.jsonl`` or archive file.
- ``tfds:NAME[/CONFIG][:FEATURE]``: the ``train`` split of a tensorflow-datasets dataset, one document
  per example (``FEATURE``, default ``text_field``), read with ``tfds.data_source``; the dataset must be
  prepared in the ``array_record`` format, which tfds can do without TensorFlow only for some datasets.

Documents go to validation by a hash of their name (``is_validation``), a deterministic
``val_fraction`` of them whatever the order or number of workers; each is followed by the tokenizer's
end-of-text token where it has one. Text is normalised (``normalize_text``) before tokenising.

Files are read in pieces (about 1 MiB, cut at a line end between two characters that are not white
space, so a piece tokenises as it would inside the whole text), by ``num_proc`` worker processes, each
writing the ids of its files to scratch files that are appended in order to ``train.bin`` / ``val.bin``:
memory stays bounded whatever the corpus size. The token cache (``gpt_jax.token_cache``) publishes the files
with their manifest in one rename, and holds a lock so that one process prepares while the others wait.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import gzip
import hashlib
import importlib.resources
import io
import itertools
import json
import lzma
import math
import multiprocessing
import os
import sys
import tarfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpt_jax import token_cache
from gpt_jax.config import Config, expand
from gpt_jax.errors import DataError
from gpt_jax.tokenizer import (
    BpeTokenizer,
    ByteTokenizer,
    CharTokenizer,
    Gpt2Tokenizer,
    Tokenizer,
    normalize_text,
    tokenizer_from_json,
)

SPLITS = ("train", "val")
BPE_VOCAB_SIZE = 4096  # --tokenizer=bpe with vocab_size 0
BPE_TRAIN_BYTES = 64 << 20  # training text a BPE is trained on, taken evenly from across the corpus
TFDS_PREFIX = "tfds:"
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".tar": "tar", ".tgz": "tar"}
COMPRESSIONS = {".gz": "gz", ".xz": "xz"}
_PIECE_BYTES = 1 << 20  # text read and tokenised at a time
_MAX_PIECE_BYTES = 8 << 20  # a piece with no clean place to cut is cut anyway (see _cut_at)
_FLUSH_TOKENS = 1 << 20  # ids a job buffers before writing them
_JOB_BYTES = 16 << 20  # a single text file is cut into jobs of about this size
_SMALL = 4 << 20  # a corpus read faster than worker processes start, unless num_proc is given
_TFDS_JOB_EXAMPLES = 1024  # tfds examples handed to a worker at a time
NEWLINE = b"\n"


def prepare(cfg: Config) -> token_cache.TokenFiles:
    """The token files of ``cfg.dataset`` for ``cfg.tokenizer``: opened from the cache when they check
    out, else prepared (a damaged or out-of-date cache is named in a warning and prepared again).

    Raises DataError (one line, naming the file and line where there is one) for a missing, empty,
    unreadable or corrupt source, text that is not UTF-8 (unless ``errors="skip"``), a JSONL line
    without its text, or a ``data_dir`` that cannot be written; nothing half-written is left behind.
    """
    source = _source(cfg)
    key = hashlib.sha256(json.dumps(
        {"format": token_cache.FORMAT, "source": source.identity, "tokenizer": _tokenizer_identity(cfg),
         "split": source.rule}, sort_keys=True).encode()).hexdigest()[:20]
    cache = expand(cfg.data_dir) / "tokens" / key
    return token_cache.open_or_build(cache, SPLITS, source.build, sources=source.describe())


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether the document called ``name`` belongs to the validation split: the first 8 bytes of its
    blake2b hash, as a fraction of 2**64, fall below ``val_fraction``. Names are paths relative to the
    dataset folder (``sub/a.txt``), ``FILE:LINE`` for JSONL lines (lines count from 1), ``ARCHIVE/MEMBER``
    inside archives, and ``NAME/train/INDEX`` for tfds examples."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def packaged_tiny_shakespeare() -> Path:
    """The char-rnn ``input.txt`` shipped inside gpt_jax (``gpt_jax/corpora/tinyshakespeare.txt``)."""
    return Path(str(importlib.resources.files("gpt_jax.corpora") / "tinyshakespeare.txt"))


def read_text(path: Path) -> str:
    """A UTF-8 text file, normalised (``normalize_text``). Raises DataError if it is not UTF-8 or cannot
    be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        return normalize_text(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(str(path), data, e, 1, "convert it to UTF-8")) from None


def make_tokenizer(cfg: Config, chars: str = "", training_text: Callable[[], Iterable[str]] = tuple
                   ) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names, for a corpus whose normalised text has these distinct
    ``chars`` (char) and training text (bpe: ``training_text()`` gives it in pieces; ``cfg.vocab_size``
    ids, 4096 when 0). Raises TokenizerError (gpt2 without its encoding, a BPE size too small, no
    characters)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return BpeTokenizer.train(training_text(), vocab_size=cfg.vocab_size or BPE_VOCAB_SIZE)
    if cfg.tokenizer == "gpt2":
        return Gpt2Tokenizer.load(str(expand(cfg.encoding_file)) if cfg.encoding_file else None)
    return CharTokenizer("".join(sorted(set(chars))), normalization="nfc")


def _check_bpe_size(cfg: Config, tokenizer: Tokenizer) -> None:
    """Warn when a BPE came out smaller than asked (its training text had no more pairs to merge)."""
    asked = cfg.vocab_size or BPE_VOCAB_SIZE
    if tokenizer.kind == "bpe" and tokenizer.vocab_size < asked:
        warnings.warn(f"the BPE has {tokenizer.vocab_size:,} tokens, not the {asked:,} asked for: its "
                      "training text has no more pairs to merge", stacklevel=2)


def _tokenizer_identity(cfg: Config) -> Any:
    """What makes one tokenizer choice tokenise differently from another (part of the cache key)."""
    if cfg.tokenizer == "char":
        return "char"
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.vocab_size or BPE_VOCAB_SIZE}
    if cfg.tokenizer == "gpt2" and cfg.encoding_file:
        path = expand(cfg.encoding_file)
        stat = path.stat() if path.is_file() else None
        return {"kind": "gpt2", "file": str(path.resolve()), "size": stat and stat.st_size,
                "mtime_ns": stat and stat.st_mtime_ns}
    return {"kind": cfg.tokenizer}


# --- sources --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _File:
    """A source file: its path, its name in document names, what it holds and how it is compressed."""

    path: str
    name: str
    kind: str  # txt, jsonl, tar, or sniff (a bare .gz / .xz: an archive if it holds one, else text)
    compression: str  # "", gz or xz
    size: int
    mtime_ns: int


def file_kind(name: str) -> tuple[str, str] | None:
    """(kind, compression) of a file name: kind txt, jsonl, tar or sniff (a ``.gz``/``.xz`` with no
    other extension: an archive if it holds one, else text), compression "", gz or xz; None for a file
    of another kind (``.md``, ``.json.gz``, ...)."""
    lower = name.lower()
    if lower.endswith(".tgz"):
        return "tar", "gz"
    stem, ext = os.path.splitext(lower)
    compression = COMPRESSIONS.get(ext, "")
    if compression:
        stem, ext = os.path.splitext(stem)
    kind = KINDS.get(ext)
    if kind is None and compression and not ext:  # OpenWebText's urlsf_subset00-1_data.xz
        return "sniff", compression
    return (kind, compression) if kind else None


class _Source:
    """A dataset: how it is named in the cache key, what it is made from, and how it is prepared."""

    identity: Any
    rule: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def build(self, writer: token_cache.Writer) -> None:
        raise NotImplementedError


def _source(cfg: Config) -> _Source:
    if cfg.dataset in TFDS_DATASETS:
        return _TinyShakespeare(cfg)
    if cfg.source_file:
        raise DataError(
            f"source_file is a local copy of the download of {' or '.join(TFDS_DATASETS)}, but dataset "
            f"{cfg.dataset!r} is not that; leave out --source_file, or give that file as --dataset"
        )
    if cfg.dataset.startswith(TFDS_PREFIX):
        return _Tfds(cfg)
    path = expand(cfg.dataset)
    if not path.exists():
        raise DataError(
            f"dataset {cfg.dataset!r} is neither a known dataset ({', '.join(TFDS_DATASETS)}, "
            f"{TFDS_PREFIX}NAME) nor an existing file or folder; check the path"
        )
    files = _list_files(path)
    if path.is_file() and files[0].kind == "txt":
        return _SingleText(cfg, path, files[0])
    return _Documents(cfg, path, files)


def _list_files(path: Path) -> list[_File]:
    """The source files under ``path`` (itself if a file), in sorted order of their relative paths."""
    if path.is_file():
        kind = file_kind(path.name)
        if kind is None:
            raise DataError(f"{path} is not a kind of file gpt_jax reads ({_KINDS_READ}); give one of "
                            "those, or a folder of them")
        return [_stat_file(path, path.name, *kind)]
    found = []
    for p in sorted(path.rglob("*")):
        relative = p.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not p.is_file():
            continue
        kind = file_kind(p.name)
        if kind is not None:
            found.append(_stat_file(p, relative.as_posix(), *kind))
    if not found:
        raise DataError(f"folder {path} holds no text files ({_KINDS_READ}); give a folder with some")
    return found


_KINDS_READ = ".txt, .jsonl or .tar files, plain or .gz / .xz"


def _stat_file(path: Path, name: str, kind: str, compression: str) -> _File:
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return _File(str(path.resolve()), name, kind, compression, stat.st_size, stat.st_mtime_ns)


# --- Tiny Shakespeare, in memory ----------------------------------------------------------------------

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_VERSION = "1.0.0"
TFDS_DATASETS = ("tiny_shakespeare",)
_MANUAL_NAMES = ("input.txt", "tinyshakespeare.txt")


class _TinyShakespeare(_Source):
    """Tiny Shakespeare through the TF-free tfds builder: small, so read and tokenised in memory."""

    def __init__(self, cfg: Config):
        if cfg.source_file:  # checked at every run, not only when the cache is first built
            _check_source_file(cfg.source_file)
        self.cfg = cfg
        self.identity = {"tfds": cfg.dataset, "version": TINY_SHAKESPEARE_VERSION}
        self.rule = {}

    def describe(self) -> dict[str, Any]:
        return token_cache.describe_sources([], **self.identity)

    def build(self, writer: token_cache.Writer) -> None:
        train, val = read_tiny_shakespeare(expand(self.cfg.data_dir) / "tfds", self.cfg.source_file or None)
        tokenizer = make_tokenizer(self.cfg, train + val, lambda: _chunks(train))
        _check_bpe_size(self.cfg, tokenizer)
        writer.start(tokenizer, self.cfg.dataset)
        writer.append("train", tokenizer.encode(train))
        writer.append("val", tokenizer.encode(val))


def _chunks(text: str) -> Iterator[str]:
    return (text[i:i + _PIECE_BYTES] for i in range(0, len(text), _PIECE_BYTES))


def read_tiny_shakespeare(tfds_dir: Path, source_file: str | None = None) -> tuple[str, str]:
    """(train, validation + test) text of Tiny Shakespeare, prepared with tfds on first use.

    The text is taken, in order, from ``source_file``, from ``<tfds_dir>/downloads/manual/`` (tfds's
    manual directory, as ``input.txt`` or ``tinyshakespeare.txt``), from the copy shipped with gpt_jax,
    or, should that be missing, from the internet. It must be the char-rnn input.txt after text hygiene
    (a copy with Windows line endings or a byte-order mark is); DataError otherwise.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    if source_file is not None:
        _check_source_file(source_file)
    builder = _tiny_shakespeare_builder()(
        data_dir=str(tfds_dir), file_format="array_record", source_file=source_file
    )
    # tfds prints "Downloading and preparing dataset ..." even when nothing is downloaded (the text
    # comes from the copy shipped with gpt_jax): a misleading line for an offline user.
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    splits = builder.as_data_source()

    def text(split: str) -> str:
        return "".join(bytes(r["text"]).decode("utf-8") for r in splits[split])

    return text("train"), text("validation") + text("test")


def _tiny_shakespeare_builder() -> type:
    """The builder class, defined on first use so that importing gpt_jax does not import tfds."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds

    class TinyShakespeareText(tfds.core.GeneratorBasedBuilder):
        """Tiny Shakespeare as one text example per split (90/5/5 by characters), TF-free."""

        VERSION = tfds.core.Version(TINY_SHAKESPEARE_VERSION)
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the char-rnn input.txt in the manual directory."

        def __init__(self, *, source_file: str | None = None, **kwargs):
            self._source_file = source_file
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Tiny Shakespeare, the char-rnn corpus.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                homepage="https://github.com/karpathy/char-rnn",
            )

        def _split_generators(self, dl_manager):
            text = _verified_text(*self._locate(dl_manager))
            i = int(len(text) * 0.9)
            train, rest = text[:i], text[i:]
            j = int(len(rest) * 0.5)
            return {"train": self._generate_examples(train),
                    "validation": self._generate_examples(rest[:j]),
                    "test": self._generate_examples(rest[j:])}

        def _generate_examples(self, text):
            yield 0, {"text": text}

        def _locate(self, dl_manager) -> tuple[Path, str]:
            """The copy to use, and what a user does instead if it is not the right text."""
            if self._source_file:
                return Path(self._source_file), "leave out --source_file to use the copy shipped with gpt_jax"
            manual = Path(self.data_dir_root) / "downloads" / "manual"
            for name in _MANUAL_NAMES:
                if (manual / name).is_file():
                    return manual / name, "remove it to use the copy shipped with gpt_jax"
            if packaged_tiny_shakespeare().is_file():
                return packaged_tiny_shakespeare(), "reinstall gpt_jax"
            try:
                return Path(dl_manager.download(TINY_SHAKESPEARE_URL)), "download it again"
            except Exception as e:  # any network failure: tell the user how to go offline
                raise DataError(
                    f"could not download Tiny Shakespeare ({type(e).__name__}); put input.txt in "
                    f"{manual} or pass --source_file=PATH"
                ) from None

    _BUILDER = TinyShakespeareText
    return _BUILDER


_BUILDER: type | None = None


def _check_source_file(source_file: str) -> None:
    """DataError unless ``source_file`` is a copy of the Tiny Shakespeare input.txt."""
    path = expand(source_file)
    if not path.is_file():
        raise DataError(f"source_file {source_file} does not exist; give the path of input.txt")
    _verified_text(path, "leave out --source_file to use the copy shipped with gpt_jax")


def _verified_text(path: Path, remedy: str) -> str:
    """The normalised text of a Tiny Shakespeare copy; DataError saying what differs unless it is the
    char-rnn input.txt (whose text is already normalised: ASCII with \\n line endings)."""
    data = path.read_bytes()
    try:
        data = normalize_text(data.decode("utf-8")).encode("utf-8")
    except UnicodeDecodeError:
        pass  # not text at all: its size and checksum say so
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(
            f"{path} is not the Tiny Shakespeare input.txt: after text hygiene it has {len(data):,} bytes "
            f"and sha256 {digest[:12]}..., the char-rnn input.txt {TINY_SHAKESPEARE_BYTES:,} bytes and "
            f"sha256 {TINY_SHAKESPEARE_SHA256[:12]}...; {remedy}"
        )
    return data.decode("utf-8")


# --- streamed sources: jobs, run in worker processes ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    """One worker's share: a file (or a byte range of a single text), or tfds examples' text."""

    index: int
    file: _File | None = None
    start: int = 0
    stop: int | None = None  # end of the byte range; None: to the end of the file
    cut: int | None = None  # single text: characters of this range in train (None: all of them)
    texts: tuple[tuple[str, str | bytes], ...] = ()  # tfds: (name, text) of examples start..stop

    @property
    def size(self) -> int:
        """Bytes of the file (or range) to read; tfds: examples."""
        return (self.file.size if self.stop is None else self.stop) - self.start


@dataclasses.dataclass
class _Result:
    """What a job found: tokens and documents per split, characters, skipped documents by reason."""

    index: int
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    documents: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    chars: set[str] = dataclasses.field(default_factory=set)
    n_chars: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What every job of one pass needs (sent once to each worker)."""

    mode: str  # scan (characters) or encode (token ids into scratch files)
    single: bool  # one text cut in two, not documents
    val_fraction: float
    text_field: str
    errors: str
    scratch: str = ""
    tokenizer: dict[str, Any] | None = None  # to_json of the tokenizer (encode)
    dtype: str = "uint16"


class _BadDocument(Exception):
    """A document that cannot be used (not UTF-8, a JSONL line without its text): skipped or fatal."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Unwritable(Exception):
    """A scratch file that cannot be written (a full disk): not the source's fault."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


class _Runner:
    """Runs jobs of one pass; one per worker process (or one in the main process)."""

    def __init__(self, settings: _Settings, counter: Any):
        self.s = settings
        self.counter = counter
        self.tokenizer = tokenizer_from_json(settings.tokenizer) if settings.tokenizer else None
        self.dtype = np.dtype(settings.dtype)

    def run(self, job: _Job) -> _Result:
        result = _Result(job.index)
        outs = {split: _Out(Path(self.s.scratch) / f"{job.index}.{split}", self.dtype) for split in SPLITS}
        try:
            with _reading(job):
                self._run(job, result, outs)
        finally:
            for split, out in outs.items():
                out.close()
                result.tokens[split] = out.tokens
        return result

    def _run(self, job: _Job, result: _Result, outs: dict[str, _Out]) -> None:
        for split, pieces in self._documents(job, result):
            mark, seen = outs[split].tokens, _Result(job.index)
            try:
                for piece in pieces:
                    self._take(piece, split, outs, seen)
            except _BadDocument as e:
                self._skip(e, result)
                outs[split].rollback(mark)
                continue
            result.chars |= seen.chars
            result.n_chars += seen.n_chars
            if self.s.single:
                continue  # one text: no documents to separate
            if self.s.mode == "encode":
                if outs[split].tokens == mark:
                    continue  # an empty document is nothing, not an end-of-text
                if self.tokenizer.eot_id is not None:
                    outs[split].write(np.array([self.tokenizer.eot_id]))
            result.documents[split] += 1

    def _skip(self, e: _BadDocument, result: _Result) -> None:
        """Count a bad document with ``errors="skip"``; else the DataError that names it."""
        if self.s.errors == "strict":
            what = "lines" if self.s.single else "documents"
            fix = "convert it to UTF-8" if e.reason == "not UTF-8" else "fix it"
            raise DataError(f"{e}; {fix}, or pass --errors=skip to skip such {what}") from None
        result.skipped[e.reason] += 1

    def training_text(self, job: _Job, limit: int) -> Iterator[str]:
        """The normalised text of the job's training documents, bad ones skipped (or an error) as when
        encoding, up to ``limit`` characters of any one document."""
        result = _Result(job.index)
        with _reading(job):
            for split, pieces in self._documents(job, result):
                if split == "train":
                    try:
                        text = list(_up_to(pieces, limit))
                    except _BadDocument as e:
                        self._skip(e, result)
                        continue
                    yield from text

    def _take(self, piece: str, split: str, outs: dict, result: _Result) -> None:
        """A piece of normalised text: its characters noted (scan) or its ids written (encode)."""
        if self.s.mode == "scan":
            result.chars.update(piece)
            result.n_chars += len(piece)
        elif piece:
            outs[split].write(self.tokenizer.encode(piece))

    def _documents(self, job: _Job, result: _Result) -> Iterator[tuple[str, Iterable[str]]]:
        """(split, pieces of normalised text) of each document of the job."""
        if job.file is None:
            for name, text in job.texts:
                yield self._split_of(name), _example_text(text, name)
                self.counter.add(1)
            return
        if self.s.single:
            yield from self._single_text(job, result)
            return
        with _opened(job.file, self.counter) as stream:
            yield from self._file_documents(job.file.name, job.file.kind, stream)

    def _split_of(self, name: str) -> str:
        return "val" if is_validation(name, self.s.val_fraction) else "train"

    def _single_text(self, job: _Job, result: _Result) -> Iterator[tuple[str, Iterable[str]]]:
        """A byte range of one text: its pieces up to ``job.cut`` characters to train, the rest to val."""
        with _opened(job.file, self.counter, job.start, job.stop) as stream:
            pieces = _pieces(stream, job.file.name, first=job.start == 0,
                             skip=result.skipped if self.s.errors == "skip" else None,
                             first_line=lambda: _line_of(job.file, job.start))
            if job.cut is None or self.s.mode == "scan":
                yield "train", pieces
                return
            train, val = _cut_pieces(pieces, job.cut)
            yield "train", train
            yield "val", val

    def _file_documents(self, name: str, kind: str, stream: BinaryIO
                        ) -> Iterator[tuple[str, Iterable[str]]]:
        if kind == "sniff":
            kind, stream = _sniffed(stream)
        if kind == "txt":
            yield self._split_of(name), _pieces(stream, name, first=True)
        elif kind == "jsonl":
            for number, line in enumerate(stream, 1):
                if line.strip():
                    document = f"{name}:{number}"
                    text = _json_text(line, name, number, self.s.text_field)
                    yield self._split_of(document), text
        else:
            yield from self._archive_documents(name, stream)

    def _archive_documents(self, name: str, stream: BinaryIO) -> Iterator[tuple[str, Iterable[str]]]:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                kind = file_kind(member.name) if member.isfile() else None
                if kind is None or any(p.startswith(".") for p in member.name.split("/")):
                    continue
                inner = _decompressed(tar.extractfile(member), kind[1])
                yield from self._file_documents(f"{name}/{member.name}", kind[0], inner)


class _Out:
    """A job's scratch file of one split: ids appended (buffered), rolled back to a mark."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.tokens = path, dtype, 0
        self._buffer: list[np.ndarray] = []
        self._written = 0  # tokens in the file; the rest are in the buffer
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        self._buffer.append(ids)
        self.tokens += ids.size
        if self.tokens - self._written >= _FLUSH_TOKENS:
            self._flush()

    def rollback(self, tokens: int) -> None:
        """Forget every id after the first ``tokens``."""
        if tokens >= self._written:
            kept = np.concatenate(self._buffer)[:tokens - self._written] if self._buffer else None
            self._buffer = [kept] if kept is not None else []
        else:
            self._buffer = []
            self._f.truncate(tokens * self.dtype.itemsize)
            self._f.seek(0, os.SEEK_END)
            self._written = tokens
        self.tokens = tokens

    def _flush(self) -> None:
        if not self._buffer:
            return
        try:
            if self._f is None:
                self._f = open(self.path, "wb")  # noqa: SIM115 (closed in close)
            self._f.write(np.concatenate(self._buffer).astype(self.dtype, copy=False).data)
        except OSError as e:
            raise _Unwritable(e) from None
        self._buffer, self._written = [], self.tokens

    def close(self) -> None:
        self._flush()
        if self._f is not None:
            self._f.close()


def _json_type(value: Any) -> str:
    """How JSON calls a value's type: null, a number, an array, ..."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _up_to(pieces: Iterable[str], limit: int) -> Iterator[str]:
    """The pieces until they hold ``limit`` characters (the last one may pass it)."""
    seen = 0
    for piece in pieces:
        if seen >= limit:
            return
        seen += len(piece)
        yield piece


def _example_text(text: str | bytes, name: str) -> Iterator[str]:
    """A tfds example's text (bytes are UTF-8), normalised, as one piece."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadDocument("not UTF-8", _not_utf8(f"example {name}", text, e, None, "")) from None
    yield normalize_text(text)


def _cut_pieces(pieces: Iterator[str], cut: int) -> tuple[Iterator[str], Iterator[str]]:
    """The pieces split at character ``cut``: (those before, those after); the first must be consumed
    first."""
    rest: list[str] = []

    def before() -> Iterator[str]:
        seen = 0
        for piece in pieces:
            if seen + len(piece) <= cut:
                seen += len(piece)
                yield piece
            else:
                yield piece[:cut - seen]
                rest.append(piece[cut - seen:])
                return

    def after() -> Iterator[str]:
        yield from rest
        yield from pieces

    return before(), after()


# --- reading files ------------------------------------------------------------------------------------


class _Counter:
    """Bytes read so far, for the progress bar (a shared multiprocessing value in workers)."""

    def __init__(self, value: Any = None):
        self.shared = value
        self.value = 0

    def add(self, n: int) -> None:
        if self.shared is None:
            self.value += n
        else:
            with self.shared.get_lock():
                self.shared.value += n

    def read(self) -> int:
        return self.value if self.shared is None else self.shared.value


class _CountingReader(io.RawIOBase):
    """A file's bytes from ``start`` to ``stop``, each read added to a counter."""

    def __init__(self, f: BinaryIO, counter: _Counter, start: int, stop: int | None):
        self.f, self.counter = f, counter
        self.left = None if stop is None else stop - start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        if self.left is not None:
            view = view[:self.left]
        n = self.f.readinto(view)
        if self.left is not None:
            self.left -= n
        self.counter.add(n)
        return n


@contextlib.contextmanager
def _opened(file: _File, counter: _Counter, start: int = 0, stop: int | None = None) -> Iterator[BinaryIO]:
    """The file's (decompressed) bytes, each byte read from disk counted."""
    try:
        f = open(file.path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise _unreadable(file, e) from None
    with f:
        yield _decompressed(io.BufferedReader(_CountingReader(f, counter, start, stop), _PIECE_BYTES),
                            file.compression)


_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, tarfile.TarError)


@contextlib.contextmanager
def _reading(job: _Job) -> Iterator[None]:
    """Errors from reading a job's source file (writing raises _Unwritable) as its one-line DataError."""
    try:
        yield
    except _READ_ERRORS as e:
        if job.file is None:  # tfds examples were read by the main process: not a file's fault
            raise
        raise _unreadable(job.file, e) from None


def _unreadable(file: _File, e: BaseException) -> DataError:
    """The one-line error for a source file that cannot be read or decompressed."""
    what = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return DataError(f"cannot read {file.name} ({file.path}): {what}; it is damaged or incomplete, or not "
                     "what its name says: download it again or remove it")


def _decompressed(stream: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gz":
        return gzip.GzipFile(fileobj=stream)
    if compression == "xz":
        return lzma.LZMAFile(stream)
    return stream


def _sniffed(stream: BinaryIO) -> tuple[str, BinaryIO]:
    """(``tar`` or ``txt``, the same bytes as a stream): a tar archive starts with a header whose POSIX
    magic "ustar" is at offset 257."""
    head = stream.read(512)
    kind = "tar" if len(head) >= 262 and head[257:262] == b"ustar" else "txt"
    return kind, io.BufferedReader(_Prefixed(head, stream), _PIECE_BYTES)


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        return self.stream.readinto(buffer)


def _pieces(stream: BinaryIO, name: str, first: bool, skip: collections.Counter | None = None,
            first_line: Callable[[], int] = lambda: 1) -> Iterator[str]:
    """The stream's text in normalised pieces of about ``_PIECE_BYTES``, each cut after a clean line end
    (``_is_clean``: tokenising the pieces one by one gives the ids of the whole text), or, when none comes
    for ``_MAX_PIECE_BYTES``, at a character boundary (``_cut_at``). ``first``: the stream starts the text
    (a byte-order mark there is dropped).

    Raises _BadDocument for bytes that are not UTF-8, naming the line (``first_line()`` is the number of
    the stream's first line, asked only then); with ``skip`` (one text, where a document is the whole
    text) such lines are dropped instead and counted in ``skip["lines"]``.
    """
    carry, lines = b"", 0
    while True:
        block = stream.read(_PIECE_BYTES)
        data = carry + block
        if not data:
            return
        cut = len(data) if not block else _cut_at(data, len(carry))
        if cut is None:
            carry = data
            continue
        piece, carry = data[:cut], data[cut:]
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as e:
            if skip is None:
                raise _BadDocument("not UTF-8", _not_utf8(name, piece, e, first_line() + lines, "")) from None
            text = _utf8_lines(piece, skip)
        yield normalize_text(text) if first else normalize_text("\n" + text)[1:]
        first, lines = False, lines + piece.count(b"\n")


def _utf8_lines(data: bytes, skip: collections.Counter) -> str:
    """The lines of ``data`` that are UTF-8; the others counted in ``skip["lines"]``."""
    kept = []
    for line in data.splitlines(keepends=True):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            skip["lines"] += 1
    return "".join(kept)


def _cut_at(data: bytes, old: int) -> int | None:
    """Where to end a piece of ``data`` (whose first ``old`` bytes were searched before): after its last
    clean line end (``_is_clean``); None to read on; or, past ``_MAX_PIECE_BYTES``, at a character
    boundary, before an ASCII byte where there is one."""
    i = len(data) - 1
    while (i := data.rfind(NEWLINE, max(0, old - 8), i)) > 0:  # usually the last line end is clean
        if _is_clean(data, i):
            return i + 1
    if len(data) < _MAX_PIECE_BYTES:
        return None
    starts = [j for j in range(len(data) - 1, max(0, len(data) - 4096), -1)
              if data[j] & 0xC0 != 0x80 and data[j] != 0x0A and data[j - 1] != 0x0D]
    return next((j for j in starts if data[j] < 0x80), starts[0] if starts else len(data))


def _is_clean(data: bytes, i: int) -> bool:
    """Whether the line feed ``data[i]`` (after an optional carriage return) sits between two characters
    that are not white space: cut there, tokenising each side apart gives the ids of the whole (no
    pre-tokenizer pattern of a BPE spans such a line end, and NFC composes nothing across it)."""
    before = data[max(0, i - 5):i - 1 if data[i - 1:i] == b"\r" else i].decode("utf-8", "ignore")[-1:]
    after = data[i + 1:i + 5].decode("utf-8", "ignore")[:1]
    return bool(before) and bool(after) and not before.isspace() and not after.isspace()


def _not_utf8(name: str, data: bytes, e: UnicodeDecodeError, first_line: int | None, fix: str) -> str:
    """``NAME line L: byte 0xNN at column C is not UTF-8``, and ``fix`` if given."""
    where = ""
    if first_line is not None:
        where = f" line {first_line + data.count(NEWLINE, 0, e.start)}"
    column = e.start - data.rfind(NEWLINE, 0, e.start)
    return (f"{name}{where}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8"
            + (f"; {fix}" if fix else ""))


def _line_of(file: _File, offset: int) -> int:
    """The line number (from 1) of byte ``offset`` of an uncompressed file: counted when needed, for
    an error message."""
    with open(file.path, "rb") as f:
        return 1 + sum(f.read(min(_PIECE_BYTES, offset - i)).count(NEWLINE)
                       for i in range(0, offset, _PIECE_BYTES))


def _json_text(line: bytes, name: str, number: int, field: str) -> Iterator[str]:
    """The normalised text of one JSONL line (one piece); _BadDocument when it has none."""
    where = f"{name} line {number}"
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _BadDocument("not UTF-8", _not_utf8(name, line, e, number, "")) from None
    except json.JSONDecodeError as e:
        raise _BadDocument("not JSON", f"{where} is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise _BadDocument("not JSON", f"{where} holds {_json_type(record)}, not an object with a "
                           f"{field!r} field")
    if field not in record:
        texts = [k for k, v in record.items() if isinstance(v, str)]
        fix = f"--text_field={texts[0]}" if len(texts) == 1 else "--text_field=NAME"
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise _BadDocument(f"no {field!r}", f"{where} has no {field!r} field (its fields: {fields}); pass "
                           + fix)
    if not isinstance(record[field], str):
        raise _BadDocument(f"no {field!r}", f"{where}: its {field!r} is {_json_type(record[field])}, not "
                           "text")
    yield normalize_text(record[field])


# --- streamed sources: the passes -----------------------------------------------------------------------


class _Streamed(_Source):
    """A source read by jobs in worker processes: first a scan when the tokenizer or the split needs
    one (characters for char, the character count of a single text), then the encode pass."""

    single = False
    unit = "B"  # what a job's size counts

    def __init__(self, cfg: Config):
        self.cfg = cfg
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.num_proc = cfg.num_proc or cores or 1

    def jobs(self) -> list[_Job]:
        raise NotImplementedError

    def load(self, job: _Job) -> _Job:
        """The job as a worker gets it (tfds: with its examples' text)."""
        return job

    def settings(self, mode: str, **kwargs: Any) -> _Settings:
        return _Settings(mode, self.single, self.cfg.val_fraction, self.cfg.text_field, self.cfg.errors,
                         **kwargs)

    def build(self, writer: token_cache.Writer) -> None:
        jobs = self.jobs()
        chars = ""
        if self.cfg.tokenizer == "char" or self.single:
            scan = _run(self, jobs, self.settings("scan"), "reading")
            jobs = self.place_cut(jobs, scan)
            chars = "".join(set().union(*(r.chars for r in scan)))
            if not chars:
                raise DataError(f"dataset {self.cfg.dataset} is empty; give files with text in them")
        if self.cfg.tokenizer == "bpe" and self.cfg.progress and sum(j.size for j in jobs) >= _SMALL:
            print(f"prepare: training a BPE of {self.cfg.vocab_size or BPE_VOCAB_SIZE:,} tokens on up to "
                  f"{BPE_TRAIN_BYTES >> 20} MiB of the training documents", file=sys.stderr)
        tokenizer = make_tokenizer(self.cfg, chars, lambda: self.training_text(jobs))
        _check_bpe_size(self.cfg, tokenizer)
        dtype = writer.start(tokenizer, self.cfg.dataset)
        writer.scratch.mkdir()
        settings = self.settings("encode", scratch=str(writer.scratch), tokenizer=tokenizer.to_json(),
                                 dtype=dtype.name)
        try:
            results = _run(self, jobs, settings, "tokenising", writer)
        except _Unwritable as e:  # the token cache reports it, as any write error
            raise e.error from None
        self.check(results, writer)

    def place_cut(self, jobs: list[_Job], scan: list[_Result]) -> list[_Job]:
        return jobs

    def training_text(self, jobs: list[_Job]) -> Iterator[str]:
        """Training text for a BPE, about ``BPE_TRAIN_BYTES``, from jobs spread evenly over the corpus."""
        runner = _Runner(self.settings("encode"), _Counter())
        every = max(1, math.ceil(sum(j.size for j in jobs) / BPE_TRAIN_BYTES)) if self.unit == "B" else 1
        taken = 0
        for job in jobs[::every]:
            for piece in runner.training_text(self.load(job), BPE_TRAIN_BYTES - taken):
                yield piece
                taken += len(piece)
            if taken >= BPE_TRAIN_BYTES:
                return

    def check(self, results: list[_Result], writer: token_cache.Writer) -> None:
        tokens = {s: sum(r.tokens[s] for r in results) for s in SPLITS}
        documents = {s: sum(r.documents[s] for r in results) for s in SPLITS}
        skipped = sum((r.skipped for r in results), collections.Counter())
        writer.info.update(tokens=tokens, documents=documents, skipped=dict(skipped))
        if skipped:
            counts = ", ".join(f"{reason}: {n:,}" for reason, n in skipped.most_common())
            n = sum(skipped.values())
            what = ("line" if self.single else "document") + ("s" if n != 1 else "")
            warnings.warn(f"skipped {n:,} {what} of {self.cfg.dataset} ({counts})", stacklevel=2)
        if not tokens["train"] + tokens["val"]:
            raise DataError(f"dataset {self.cfg.dataset} is empty"
                            + (" once what cannot be read is skipped" if skipped else "")
                            + "; give files with text in them")
        share, f = tokens["val"] / (tokens["train"] + tokens["val"]), self.cfg.val_fraction
        if not self.single and tokens["val"] and tokens["train"] and not f / 2 <= share <= 2 * f:
            warnings.warn(f"the validation split of {self.cfg.dataset} holds {share:.0%} of its tokens, not "
                          f"about {f:.0%}: its {sum(documents.values()):,} documents go whole to one split "
                          "or the other; give more documents, or one text file", stacklevel=2)
        for split in SPLITS:
            if not tokens[split]:
                raise DataError(
                    f"the {split} split of {self.cfg.dataset} is empty: each of its "
                    f"{sum(documents.values()):,} documents goes to validation with probability "
                    f"val_fraction={self.cfg.val_fraction} (by a hash of its name); give more documents or "
                    "a different --val_fraction, or give one text file (split at its last part)")


class _SingleText(_Streamed):
    """One text file: cut into byte ranges (when not compressed) read by parallel jobs."""

    single = True

    def __init__(self, cfg: Config, path: Path, file: _File):
        super().__init__(cfg)
        self.file = file
        self.identity = {"path": file.path}
        self.rule = {"val_fraction": cfg.val_fraction, "errors": cfg.errors}

    def describe(self) -> dict[str, Any]:
        return token_cache.describe_sources([(self.file.name, self.file.size, self.file.mtime_ns)])

    def jobs(self) -> list[_Job]:
        if self.file.compression or self.file.size <= _JOB_BYTES:
            return [_Job(0, self.file)]
        bounds = [0]
        with open(self.file.path, "rb") as f:
            while bounds[-1] + _JOB_BYTES < self.file.size:
                f.seek(bounds[-1] + _JOB_BYTES)
                cut = None
                while cut is None:
                    window = f.read(1 << 16)
                    if len(window) < 8:
                        break
                    i = window.find(NEWLINE, 5)
                    while cut is None and 0 < i < len(window) - 5:
                        cut = f.tell() - len(window) + i + 1 if _is_clean(window, i) else None
                        i = window.find(NEWLINE, i + 1)
                    f.seek(-5, os.SEEK_CUR)
                if cut is None:
                    break
                bounds.append(cut)
        bounds.append(self.file.size)
        return [_Job(i, self.file, a, b) for i, (a, b) in enumerate(itertools.pairwise(bounds))]

    def place_cut(self, jobs: list[_Job], scan: list[_Result]) -> list[_Job]:
        """The jobs with the character where validation begins: nanoGPT's ``int(n * (1 - f))``."""
        total = sum(r.n_chars for r in scan)
        cut, placed = int(total * (1.0 - self.cfg.val_fraction)), []
        for job, result in zip(jobs, scan, strict=True):
            placed.append(dataclasses.replace(job, cut=min(max(cut, 0), result.n_chars)))
            cut -= result.n_chars
        return placed


class _Documents(_Streamed):
    """A folder, a JSONL file or an archive: many documents, one job per file."""

    def __init__(self, cfg: Config, path: Path, files: list[_File]):
        super().__init__(cfg)
        self.files = files
        self.identity = {"path": str(path.resolve())}
        self.rule = {"val_fraction": cfg.val_fraction, "errors": cfg.errors, "text_field": cfg.text_field}

    def describe(self) -> dict[str, Any]:
        return token_cache.describe_sources((f.name, f.size, f.mtime_ns) for f in self.files)

    def jobs(self) -> list[_Job]:
        return [_Job(i, f) for i, f in enumerate(self.files)]


class _Tfds(_Streamed):
    """``tfds:NAME[/CONFIG][:FEATURE]``: the train split of a tensorflow-datasets dataset. The main
    process reads the examples (``tfds.data_source``) as each job is handed out; workers tokenise."""

    unit = "examples"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.name, _, feature = cfg.dataset[len(TFDS_PREFIX):].partition(":")
        self.feature = feature or cfg.text_field
        if not self.name:
            raise DataError(f"dataset {cfg.dataset!r} names no tfds dataset; give "
                            "tfds:NAME[/CONFIG][:FEATURE]")
        self.identity = {"tfds": self.name, "feature": self.feature}
        self.rule = {"val_fraction": cfg.val_fraction, "errors": cfg.errors}
        self._source: Any = None

    def data_source(self) -> Any:
        if self._source is None:
            self._source = _tfds_data_source(self.name, expand(self.cfg.data_dir) / "tfds", self.cfg.dataset)
        return self._source

    def describe(self) -> dict[str, Any]:
        return token_cache.describe_sources([], **self.identity, examples=len(self.data_source()))

    def jobs(self) -> list[_Job]:
        n = len(self.data_source())
        return [_Job(i, start=a, stop=min(a + _TFDS_JOB_EXAMPLES, n))
                for i, a in enumerate(range(0, n, _TFDS_JOB_EXAMPLES))]

    def load(self, job: _Job) -> _Job:
        source, texts = self.data_source(), []
        for i in range(job.start, job.stop):
            example = source[i]
            if self.feature not in example:
                raise DataError(f"{self.cfg.dataset} has no feature {self.feature!r} (its features: "
                                f"{', '.join(map(repr, example))}); give tfds:NAME:FEATURE")
            text = example[self.feature]
            texts.append((f"{self.name}/train/{i}", text if isinstance(text, str) else bytes(text)))
        return dataclasses.replace(job, texts=tuple(texts))


def _tfds_data_source(name: str, data_dir: Path, dataset: str) -> Any:
    """The train split of tfds dataset ``name`` as a random-access data source, prepared first if
    needed; DataError saying why when tfds cannot (an unknown name, a builder that needs TensorFlow)."""
    import tensorflow_datasets as tfds

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return tfds.data_source(name, split="train", data_dir=str(data_dir), download=True,
                                    builder_kwargs={"file_format": "array_record"})
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"{dataset}: tensorflow-datasets has no dataset {name!r}; see its catalogue for "
                        "the names") from None
    except ImportError as e:
        raise DataError(f"{dataset}: preparing this dataset needs {e.name or 'a module that is missing'} "
                        "(its tfds builder is not TensorFlow-free); prepare it in array_record format "
                        "where that is installed, or give its text as files") from None
    except Exception as e:  # tfds raises many kinds (download, checksum, missing manual files)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DataError(f"{dataset}: tensorflow-datasets could not prepare it ({type(e).__name__}: "
                        f"{first})") from None


def _run(source: _Streamed, jobs: list[_Job], settings: _Settings, what: str,
         writer: token_cache.Writer | None = None) -> list[_Result]:
    """Run ``jobs`` in ``source.num_proc`` worker processes (in this one when 1), at most a few ahead of
    the oldest unfinished, handing each result, in job order, to the writer (its scratch files
    appended). A progress bar (after 2 s) shows what is read per second and the time left."""
    from tqdm import tqdm

    num_proc, load = min(source.num_proc, len(jobs)), source.load
    scaled = {"unit_scale": True, "unit_divisor": 1024} if source.unit == "B" else {}
    bar = tqdm(total=sum(j.size for j in jobs), desc=f"prepare: {what}", unit=source.unit,
               disable=not source.cfg.progress, delay=2.0, leave=False, **scaled)
    results = []

    def done(result: _Result) -> None:
        results.append(result)
        if writer is not None:
            for split in SPLITS:
                path = Path(settings.scratch) / f"{result.index}.{split}"
                if result.tokens[split]:
                    writer.append_file(split, path)
                path.unlink(missing_ok=True)

    with bar:
        if num_proc <= 1 or len(jobs) <= 1 or sum(j.size for j in jobs) < _SMALL and not source.cfg.num_proc:
            counter = _Counter()
            runner = _Runner(settings, counter)
            for job in jobs:
                done(runner.run(load(job)))
                bar.update(counter.read() - bar.n)
            return results
        shared = multiprocessing.get_context("spawn").Value("q", 0)
        with _without_main():
            pool = concurrent.futures.ProcessPoolExecutor(num_proc, multiprocessing.get_context("spawn"),
                                                          _start_worker, (settings, shared))
            try:
                pending: collections.deque = collections.deque()
                for job in [*jobs, None]:
                    if job is not None:
                        pending.append(pool.submit(_run_job, load(job)))
                    while pending and (job is None or len(pending) >= 2 * num_proc):
                        done(_wait(pending.popleft(), lambda: bar.update(shared.value - bar.n)))
            finally:  # after an error, the jobs not started are dropped
                pool.shutdown(wait=True, cancel_futures=True)
    return results


def _wait(future: concurrent.futures.Future, tick: Callable[[], None]) -> _Result:
    """A job's result, calling ``tick`` while it runs; a worker's DataError is raised here."""
    while True:
        try:
            return future.result(timeout=0.2)
        except concurrent.futures.TimeoutError:
            tick()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError("a worker process of prepare died (killed, or out of memory); run again, with "
                            "a smaller --num_proc if memory is short") from None


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """Start worker processes without the main module: a spawned process imports the parent's main
    script (again) unless it is hidden, and a script that prepares data without an ``if __name__ ==
    "__main__":`` guard would then start workers of its own, without end. Workers need gpt_jax only."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


_WORKER: _Runner | None = None


def _start_worker(settings: _Settings, shared: Any) -> None:
    """A worker's set-up: its runner, and a watch that ends it when the main process is gone (killed,
    or stopped by a signal without shutting its workers down), since nothing else would."""
    global _WORKER
    _WORKER = _Runner(settings, _Counter(shared))
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_job(job: _Job) -> _Result:
    return _WORKER.run(job)


# --- command line ---------------------------------------------------------------------------------------


_PROG = "python -m gpt_jax.prepare"


def main(argv: list[str]) -> int:
    """``python -m gpt_jax.prepare [CONFIG] --key=value ...``: prepare the corpus a run would use."""
    from gpt_jax.cli import parse_config_args
    from gpt_jax.config import make_config

    preset, args = parse_config_args(_PROG, "Prepare (tokenise and cache) the corpus that train.py with "
                                     "the same options uses.", argv)
    cfg = make_config(preset, **args) if preset else make_config(**args)
    from gpt_jax.hf import pretrained_config  # a fine-tuning run's tokenizer is the weights'

    cfg = pretrained_config(cfg)
    start = time.perf_counter()
    files = prepare(cfg)
    counts = ", ".join(f"{name} {len(ids):,} tokens" for name, ids in files.splits.items())
    done = f"prepared in {time.perf_counter() - start:.1f} s" if files.built else "already prepared"
    print(f"{cfg.dataset}, {files.tokenizer.kind} tokenizer ({files.tokenizer.vocab_size:,} ids): {counts}; "
          f"{done}, under {expand(cfg.data_dir)}")
    return 0


if __name__ == "__main__":
    from gpt_jax import cli
    from gpt_jax.prepare import main as imported_main  # workers unpickle gpt_jax.prepare's functions

    cli.run(imported_main, _PROG)
