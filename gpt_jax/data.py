"""Text sources, tokenised arrays cached on disk, and batches that are a pure function of the step.

Sources:
- ``tiny_shakespeare``: through a tensorflow-datasets builder that writes array_record files and is
  read back with ``tfds.data_source``, so TensorFlow is never needed. Train is tfds ``train``;
  validation is ``validation+test``, exactly nanoGPT's last 10%.
- a path: a UTF-8 text file, or a folder of ``.txt`` files read in sorted order and joined; the first
  ``1 - val_fraction`` is train, the rest validation.

The tokenised splits are written once as flat arrays under ``<data_dir>/tokens/<key>/`` and memory-
mapped afterwards, so a second run starts at once. The key hashes the source's identity (paths, sizes,
modification times), the split rule and the tokenizer kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gpt_jax.config import Config, expand
from gpt_jax.errors import DataError
from gpt_jax.tokenizer import CharTokenizer

SPLITS = ("train", "val")
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TokenData:
    """A tokenizer and the token ids of each split (read-only, possibly memory-mapped)."""

    tokenizer: CharTokenizer
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
        return get_batch(self.split(split), step, seed, batch_size, block_size, SPLITS.index(split))


def get_batch(tokens: np.ndarray, step: int, seed: int, batch_size: int, block_size: int,
              stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of ``tokens``: int32 ``x, y`` of shape [batch_size, block_size], y = x shifted.

    A pure function of its arguments (numpy's Philox-free default generator seeded with
    ``[seed, stream, step]``), which is what makes resuming exact: the data position is the step.
    """
    rng = np.random.default_rng([seed, stream, step])
    starts_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    window_BxT1 = np.asarray(tokens[starts_B[:, None] + np.arange(block_size + 1)], dtype=np.int32)
    return window_BxT1[:, :-1], window_BxT1[:, 1:]


def load_data(cfg: Config) -> TokenData:
    """The tokenised dataset named by ``cfg.dataset``, from the cache when it is there."""
    source, identity = _describe_source(cfg)
    key = hashlib.sha256(json.dumps(
        {"format": _CACHE_FORMAT, "source": identity, "tokenizer": "char"}, sort_keys=True
    ).encode()).hexdigest()[:20]
    cache = expand(cfg.data_dir) / "tokens" / key
    if not (cache / "meta.json").is_file():
        train_text, val_text = _read_splits(cfg, source)
        _write_cache(cache, train_text, val_text, source)
    return _read_cache(cache)


def _describe_source(cfg: Config) -> tuple[str, dict]:
    """A readable name of the source and a JSON description that changes when its content does."""
    if cfg.dataset in TFDS_DATASETS:
        return cfg.dataset, {"tfds": cfg.dataset, "version": TINY_SHAKESPEARE_VERSION}
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


def _read_splits(cfg: Config, source: str) -> tuple[str, str]:
    if cfg.dataset in TFDS_DATASETS:
        return read_tiny_shakespeare(expand(cfg.data_dir) / "tfds", cfg.source_file or None)
    text = "".join(_read_utf8(f) for f in _text_files(expand(cfg.dataset)))
    if not text:
        raise DataError(f"dataset {source} is empty; give a file with text in it")
    cut = int(len(text) * (1.0 - cfg.val_fraction))
    return text[:cut], text[cut:]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
            "convert it to UTF-8 or remove the binary file"
        ) from None


def _write_cache(cache: Path, train_text: str, val_text: str, source: str) -> None:
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        for name, text in zip(SPLITS, (train_text, val_text), strict=True):
            tokenizer.encode(text).astype(dtype).tofile(tmp / f"{name}.bin")
        meta = {"tokenizer": tokenizer.to_json(), "dtype": np.dtype(dtype).name, "source": source,
                "sizes": {"train": len(train_text), "val": len(val_text)}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process wrote the same cache first: theirs is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(cache: Path) -> TokenData:
    meta = json.loads((cache / "meta.json").read_text())
    arrays = [np.memmap(cache / f"{name}.bin", dtype=meta["dtype"], mode="r") if meta["sizes"][name]
              else np.zeros(0, meta["dtype"]) for name in SPLITS]
    return TokenData(CharTokenizer.from_json(meta["tokenizer"]), *arrays, source=meta["source"])


# --- tensorflow-datasets ------------------------------------------------------------------------

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_VERSION = "1.0.0"
TFDS_DATASETS = ("tiny_shakespeare",)
_MANUAL_NAMES = ("input.txt", "tinyshakespeare.txt")


def read_tiny_shakespeare(tfds_dir: Path, source_file: str | None = None) -> tuple[str, str]:
    """(train, validation + test) text of Tiny Shakespeare, prepared with tfds on first use.

    The download is taken, in order, from ``source_file``, from ``<tfds_dir>/downloads/manual/``
    (tfds's manual directory, as ``input.txt`` or ``tinyshakespeare.txt``), or from the internet.
    Its sha256 is checked in every case.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    if source_file is not None and not Path(source_file).is_file():
        raise DataError(f"source_file {source_file} does not exist; give the path of input.txt")
    builder = _tiny_shakespeare_builder()(
        data_dir=str(tfds_dir), file_format="array_record", source_file=source_file
    )
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
            text = _verified_text(self._locate(dl_manager))
            i = int(len(text) * 0.9)
            train, rest = text[:i], text[i:]
            j = int(len(rest) * 0.5)
            return {"train": self._generate_examples(train),
                    "validation": self._generate_examples(rest[:j]),
                    "test": self._generate_examples(rest[j:])}

        def _generate_examples(self, text):
            yield 0, {"text": text}

        def _locate(self, dl_manager) -> Path:
            if self._source_file:
                return Path(self._source_file)
            manual = Path(self.data_dir_root) / "downloads" / "manual"
            for name in _MANUAL_NAMES:
                if (manual / name).is_file():
                    return manual / name
            try:
                return Path(dl_manager.download(TINY_SHAKESPEARE_URL))
            except Exception as e:  # any network failure: tell the user how to go offline
                raise DataError(
                    f"could not download Tiny Shakespeare ({type(e).__name__}); put input.txt in "
                    f"{manual} or pass --source_file=PATH"
                ) from None

    _BUILDER = TinyShakespeareText
    return _BUILDER


_BUILDER: type | None = None


def _verified_text(path: Path) -> str:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(
            f"{path} is not the Tiny Shakespeare input.txt (sha256 {digest[:12]}..., expected "
            f"{TINY_SHAKESPEARE_SHA256[:12]}...); download it again"
        )
    return data.decode("utf-8")
