"""Text sources, tokenised arrays cached on disk, and batches that are a pure function of the step.

Sources:
- ``tiny_shakespeare``: through a tensorflow-datasets builder that writes array_record files and is
  read back with ``tfds.data_source``, so TensorFlow is never needed. The text comes from
  ``--source_file``, from tfds's manual directory, or from the copy shipped in ``gpt_jax/corpora``, so
  a first run needs no network. Train is tfds ``train``; validation is ``validation+test``, exactly
  nanoGPT's last 10%.
- a path: a UTF-8 text file, or a folder of ``.txt`` files read in sorted order and joined; the first
  ``1 - val_fraction`` is train, the rest validation.

Every source's text passes ``normalize_text`` (no byte-order mark, ``\\n`` line endings, NFC) before
the vocabulary is built. The tokenised splits are written once under ``<data_dir>/tokens/<key>/``
(``gpt_jax.token_cache``: a manifest, checked at every open) and memory-mapped afterwards, so a second
run starts at once. The key hashes the source's identity (paths, sizes, modification times), the split
rule and the cache format.

Random streams: every random draw of data is numpy's default generator seeded with
``[seed, stream, step]``; the streams are named here, once, so no two kinds of batch share one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
)

SPLITS = ("train", "val")
TRAIN_STREAMS = {"train": 0, "val": 1}  # the batches of TokenData.get_batch
EVAL_STREAMS = {"train": 2, "val": 3}  # the fixed evaluation batches of TokenData.eval_batches
BPE_VOCAB_SIZE = 4096  # --tokenizer=bpe with vocab_size 0
_BPE_CHUNK = 1 << 20  # characters of training text handed to the BPE trainer at a time


@dataclasses.dataclass(frozen=True)
class TokenData:
    """A tokenizer and the token ids of each split (read-only, possibly memory-mapped)."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    source: str

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {name!r}")
        return self.train if name == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """Each split needs at least one window of ``block_size + 1`` tokens."""
        for name in SPLITS:
            n = len(self.split(name))
            if n < block_size + 1:
                raise DataError(
                    f"the {name} split of {self.source} has {n} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}; use a smaller --block_size or a longer corpus"
                )

    def get_batch(self, split: str, step: int, seed: int, batch_size: int, block_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of ``step``: int32 ``x, y`` of shape [batch_size, block_size], y = x
        shifted by one; random windows of the split, a pure function of the arguments."""
        return random_windows(self.split(split), step, seed, batch_size, block_size, TRAIN_STREAMS[split])

    def eval_batches(self, split: str, seed: int, batch_size: int, block_size: int, eval_iters: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The fixed evaluation batches of a split: int32 x and y of shape [eval_iters, batch_size,
        block_size].

        The same at every evaluation (so successive estimates compare like with like) and drawn from
        their own random streams, apart from the training batches.
        """
        tokens, stream = self.split(split), EVAL_STREAMS[split]
        pairs = [random_windows(tokens, i, seed, batch_size, block_size, stream) for i in range(eval_iters)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def random_windows(tokens: np.ndarray, step: int, seed: int, batch_size: int, block_size: int,
                   stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of ``tokens``: int32 ``x, y`` of shape [batch_size, block_size], y = x shifted.

    A pure function of its arguments (numpy's default generator seeded with ``[seed, stream, step]``),
    which is what makes resuming exact: the data position is the step.
    """
    rng = np.random.default_rng([seed, stream, step])
    starts_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    window_BxT1 = np.asarray(tokens[starts_B[:, None] + np.arange(block_size + 1)], dtype=np.int32)
    return window_BxT1[:, :-1], window_BxT1[:, 1:]


def load_data(cfg: Config) -> TokenData:
    """The tokenised dataset named by ``cfg.dataset``, from the token cache when it checks out.

    A damaged cache is named in a warning and rebuilt. Raises DataError for a missing, empty or
    non-UTF-8 source, ``source_file`` given with a path dataset, or a ``data_dir`` that cannot be written.
    """
    source, identity = _describe_source(cfg)
    key = hashlib.sha256(json.dumps(
        {"format": token_cache.FORMAT, "source": identity, "tokenizer": _tokenizer_identity(cfg)},
        sort_keys=True).encode()).hexdigest()[:20]
    cache = expand(cfg.data_dir) / "tokens" / key
    files = token_cache.open_or_build(cache, SPLITS, lambda: _build(cfg, source))
    return TokenData(files.tokenizer, files.splits["train"], files.splits["val"], source=files.source)


def _describe_source(cfg: Config) -> tuple[str, dict]:
    """A readable name of the source and a JSON description that changes when its content does."""
    if cfg.dataset in TFDS_DATASETS:
        if cfg.source_file:  # checked at every run, not only when the cache is first built
            _check_source_file(cfg.source_file)
        return cfg.dataset, {"tfds": cfg.dataset, "version": TINY_SHAKESPEARE_VERSION}
    if cfg.source_file:
        raise DataError(
            f"source_file is a local copy of the download of {' or '.join(TFDS_DATASETS)}, but dataset "
            f"{cfg.dataset!r} is a path; leave out --source_file, or give that file as --dataset"
        )
    path = expand(cfg.dataset)
    if not path.exists():
        raise DataError(
            f"dataset {cfg.dataset!r} is neither a known dataset ({', '.join(TFDS_DATASETS)}) "
            "nor an existing file or folder; check the path"
        )
    files = _text_files(path)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return str(path), {"files": stats, "val_fraction": cfg.val_fraction}


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"folder {path} holds no .txt files; give a text file or a folder of them")
    return files


def _tokenizer_identity(cfg: Config) -> Any:
    """What makes one tokenizer choice tokenise differently from another (part of the cache key)."""
    if cfg.tokenizer == "char":
        return "char"  # the key of caches written before there was a choice
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.vocab_size or BPE_VOCAB_SIZE}
    if cfg.tokenizer == "gpt2" and cfg.encoding_file:
        path = expand(cfg.encoding_file)
        stat = path.stat() if path.is_file() else None
        return {"kind": "gpt2", "file": str(path.resolve()), "size": stat and stat.st_size,
                "mtime_ns": stat and stat.st_mtime_ns}
    return {"kind": cfg.tokenizer}


def make_tokenizer(cfg: Config, train_text: str, val_text: str) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names, for a corpus of these splits (normalised text): the
    characters of both (char), or a BPE trained on the training split only (bpe, ``cfg.vocab_size``
    ids, 4096 when 0). Raises TokenizerError (gpt2 without its encoding, a BPE size too small)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        chunks = (train_text[i:i + _BPE_CHUNK] for i in range(0, len(train_text), _BPE_CHUNK))
        return BpeTokenizer.train(chunks, vocab_size=cfg.vocab_size or BPE_VOCAB_SIZE)
    if cfg.tokenizer == "gpt2":
        return Gpt2Tokenizer.load(str(expand(cfg.encoding_file)) if cfg.encoding_file else None)
    return CharTokenizer.from_text(train_text + val_text)


def _build(cfg: Config, source: str) -> token_cache.Built:
    """Read and normalise the source's splits and tokenise them: what the token cache stores."""
    train_text, val_text = _read_splits(cfg, source)
    tokenizer = make_tokenizer(cfg, train_text, val_text)
    return token_cache.Built(tokenizer, {"train": _encoded(tokenizer, train_text),
                                         "val": _encoded(tokenizer, val_text)}, source)


def _encoded(tokenizer: Tokenizer, text: str) -> Iterator[np.ndarray]:
    yield tokenizer.encode(text)  # lazily: while the cache writes, not before


def _read_splits(cfg: Config, source: str) -> tuple[str, str]:
    """(train, validation) text of the source, normalised."""
    if cfg.dataset in TFDS_DATASETS:
        return read_tiny_shakespeare(expand(cfg.data_dir) / "tfds", cfg.source_file or None)
    text = "".join(read_text(f) for f in _text_files(expand(cfg.dataset)))
    if not text:
        raise DataError(f"dataset {source} is empty; give a file with text in it")
    cut = int(len(text) * (1.0 - cfg.val_fraction))
    return text[:cut], text[cut:]


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
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
            "convert it to UTF-8 or remove the binary file"
        ) from None


# --- tensorflow-datasets ------------------------------------------------------------------------

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_VERSION = "1.0.0"
TFDS_DATASETS = ("tiny_shakespeare",)
_MANUAL_NAMES = ("input.txt", "tinyshakespeare.txt")


def packaged_tiny_shakespeare() -> Path:
    """The char-rnn ``input.txt`` shipped inside gpt_jax (``gpt_jax/corpora/tinyshakespeare.txt``)."""
    return Path(str(importlib.resources.files("gpt_jax.corpora") / "tinyshakespeare.txt"))


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
