"""Character-level tokenizer, as in the course: one token per distinct character."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gpt_jax.errors import TokenizerError


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """``chars[i]`` is the character of token ``i``; the vocabulary is sorted."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise TokenizerError("cannot build a vocabulary from empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def _index(self) -> dict[str, int]:
        # Built on first use and kept: the dataclass is frozen, so bypass its __setattr__.
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {c: i for i, c in enumerate(self.chars)}
            object.__setattr__(self, "_index_cache", index)
        return index

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the vocabulary, in order of appearance."""
        index = self._index
        return list(dict.fromkeys(c for c in text if c not in index))

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 token ids of shape [len(text)]."""
        index = self._index
        try:
            return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError:
            missing = "".join(self.unknown(text))
            raise TokenizerError(
                f"text has characters outside the vocabulary: {missing!r}; "
                "remove them or train on a corpus that contains them"
            ) from None

    def decode(self, tokens: Any) -> str:
        """Token ids (any int sequence or array) -> text."""
        chars = self.chars
        ids = np.asarray(tokens).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(chars)):
            raise TokenizerError(f"token ids must be in [0, {len(chars)}), got {ids.min()}..{ids.max()}")
        return "".join(chars[i] for i in ids.tolist())

    def to_json(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CharTokenizer:
        if data.get("kind") != "char" or not isinstance(data.get("chars"), str):
            raise TokenizerError(f"unsupported tokenizer description: {str(data)[:80]}")
        return cls(data["chars"])
