"""Prepared token files as a dataset, and batches that are a pure function of the step.

``load_data`` opens the token files of a dataset (``gpt_jax.prepare`` makes them on first use, and
again when the source changes) memory-mapped, so a second run starts at once and a batch reads only its
own windows, whatever the corpus size.

Random streams: every random draw of data is numpy's default generator seeded with
``[seed, stream, step]``; the streams are named here, once, so no two kinds of batch share one.
"""

from __future__ import annotations

import dataclasses
import mmap

import numpy as np

from gpt_jax.config import Config
from gpt_jax.errors import DataError
from gpt_jax.prepare import SPLITS, prepare
from gpt_jax.tokenizer import Tokenizer

TRAIN_STREAMS = {"train": 0, "val": 1}  # the batches of TokenData.get_batch
EVAL_STREAMS = {"train": 2, "val": 3}  # the fixed evaluation batches of TokenData.eval_batches


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
    window_BxT1 = _windows(tokens, starts_B, block_size + 1).astype(np.int32)
    return window_BxT1[:, :-1], window_BxT1[:, 1:]


def _windows(tokens: np.ndarray, starts_B: np.ndarray, length: int) -> np.ndarray:
    """``tokens[s:s + length]`` for each start: [B, length]. The pages a memory-mapped file's windows were
    read through are handed back to the kernel at once: pages touched through a mapping stay in the
    process's resident memory, which would grow towards the corpus size over a long run (nanoGPT
    re-creates its memmap at every batch for that reason). The mapping itself stays, so a training keeps
    reading the file it opened even when the corpus is prepared again meanwhile."""
    window_BxL = np.array(tokens[starts_B[:, None] + np.arange(length)])
    mapping = getattr(tokens, "_mmap", None)  # np.memmap's mmap object; None for a view or an array
    if mapping is not None:
        size, page = tokens.dtype.itemsize, mmap.PAGESIZE
        base = tokens.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts in the mapping
        for s in starts_B.tolist():
            first = (base + s * size) // page * page
            mapping.madvise(mmap.MADV_DONTNEED, first, base + (s + length) * size - first)
    return window_BxL


def load_data(cfg: Config) -> TokenData:
    """The tokenised dataset named by ``cfg.dataset``, prepared first when not yet (``gpt_jax.prepare``).

    A damaged or out-of-date cache is named in a warning and prepared again. Raises DataError for a
    missing, empty, unreadable or non-UTF-8 source, ``source_file`` given with another dataset, or a
    ``data_dir`` that cannot be written.
    """
    files = prepare(cfg)
    return TokenData(files.tokenizer, files.splits["train"], files.splits["val"], source=files.source)
