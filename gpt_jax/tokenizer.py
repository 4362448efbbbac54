"""Character-level tokenizer, as in the course: one token per distinct character.

Text hygiene: training text and prompts pass through the same ``normalize_text`` (no byte-order mark,
``\\n`` line endings, Unicode NFC), so a prompt typed in decomposed form (``"O\\u0308"``, as macOS
keyboards give) encodes like the composed text the model was trained on. The tokenizer records its
normalisation, so vocabularies saved before it existed keep their behaviour.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import unicodedata
from collections.abc import Iterable
from typing import Any

import numpy as np

from gpt_jax.errors import ConfigError, TokenizerError

NORMALIZATIONS = ("", "nfc")  # "": text as given (vocabularies saved before text hygiene); "nfc"
_MAX_NAMED = 10  # unknown characters named in one error message

# Control characters have no Unicode name (unicodedata.name fails); these are the ones text holds.
_CONTROL_NAMES = {"\0": "NULL", "\t": "CHARACTER TABULATION", "\n": "LINE FEED", "\v": "LINE TABULATION",
                  "\f": "FORM FEED", "\r": "CARRIAGE RETURN", "\x1b": "ESCAPE", "\x7f": "DELETE"}
_UNNAMED = {"Cc": "CONTROL CHARACTER", "Co": "PRIVATE USE CHARACTER", "Cs": "SURROGATE",
            "Cn": "UNASSIGNED CHARACTER"}


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """``ids`` as int32 if they are integer token ids in [0, vocab_size); else ConfigError naming
    ``what`` (a model would read an id outside the vocabulary as a zero, NaN or wrapped-around row)."""
    if ids.dtype.kind not in "iu":
        raise ConfigError(f"{what} must hold integer token ids (encode text with the tokenizer), got "
                          f"{ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ConfigError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()} in {what}")
    return ids.astype(np.int32)


def normalize_text(text: str) -> str:
    """Text hygiene: drop a leading byte-order mark (U+FEFF), turn ``\\r\\n`` and ``\\r`` into ``\\n``,
    and compose to Unicode NFC (``"O\\u0308"`` -> ``"Ö"``)."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def describe_characters(chars: Iterable[str]) -> str:
    """Characters named readably, for messages: ``'\\u0308' (U+0308 COMBINING DIAERESIS), '\\n' (U+000A
    LINE FEED)``; after the first ten, how many more."""
    chars = list(chars)
    named = [_describe(c) for c in chars[:_MAX_NAMED]]
    if len(chars) > _MAX_NAMED:
        named.append(f"and {len(chars) - _MAX_NAMED} more")
    return ", ".join(named)


def _describe(c: str) -> str:
    category = unicodedata.category(c)
    # A combining mark would print on the quote before it, and invisible ones not at all: escape them.
    shown = repr(c) if c.isprintable() and category[0] != "M" else f"'{c.encode('unicode_escape').decode()}'"
    name = unicodedata.name(c, "") or _CONTROL_NAMES.get(c) or _UNNAMED.get(category, "UNNAMED CHARACTER")
    return f"{shown} (U+{ord(c):04X} {name})"


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """``chars[i]`` is the character of token ``i``; the vocabulary is sorted.

    ``normalization`` is what ``encode`` does to text first: ``"nfc"`` is ``normalize_text``, ``""``
    nothing (vocabularies saved before text hygiene existed).
    """

    chars: str
    normalization: str = ""

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise TokenizerError(f"unknown text normalization {self.normalization!r}; expected one of "
                                 f"{NORMALIZATIONS}")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text`` after ``normalize_text``. Raises TokenizerError for empty text."""
        chars = sorted(set(normalize_text(text)))
        if not chars:
            raise TokenizerError("cannot build a vocabulary from empty text")
        return cls("".join(chars), normalization="nfc")

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def normalize(self, text: str) -> str:
        """``text`` as ``encode`` sees it: normalised as this vocabulary's training text was."""
        return normalize_text(text) if self.normalization == "nfc" else text

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``normalize(text)`` outside the vocabulary, in order of appearance."""
        index = self._index
        return list(dict.fromkeys(c for c in self.normalize(text) if c not in index))

    def encode(self, text: str) -> np.ndarray:
        """``normalize(text)`` -> int32 token ids of shape [len(normalize(text))].

        Raises TokenizerError naming the characters outside the vocabulary.
        """
        text = self.normalize(text)
        index = self._index
        try:
            return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError:
            raise TokenizerError(
                f"text has characters outside the vocabulary: {describe_characters(self.unknown(text))}; "
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
        data = {"kind": "char", "chars": self.chars}
        if self.normalization:
            data["normalization"] = self.normalization
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CharTokenizer:
        """The tokenizer ``to_json`` described. Raises TokenizerError, one line, for a description that
        is not a character vocabulary or is inconsistent (empty, duplicated or unsorted characters)."""
        if not isinstance(data, dict) or data.get("kind") != "char":
            raise TokenizerError(f"unsupported tokenizer description: {str(data)[:80]}")
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise TokenizerError(f"the vocabulary is not a string of characters: {str(chars)[:80]}")
        _check_vocabulary(chars)
        return cls(chars, normalization=data.get("normalization", ""))


def _check_vocabulary(chars: str) -> None:
    """A saved vocabulary must be as ``from_text`` made it: distinct characters, sorted, at least one."""
    if not chars:
        raise TokenizerError("the vocabulary is empty")
    duplicated = [c for c, n in collections.Counter(chars).items() if n > 1]
    if duplicated:
        raise TokenizerError(f"the vocabulary has duplicated characters: {describe_characters(duplicated)}")
    i = next((i for i in range(1, len(chars)) if chars[i] < chars[i - 1]), None)
    if i is not None:
        raise TokenizerError(f"the vocabulary is not sorted: {describe_characters(chars[i - 1:i + 1])} at "
                             f"positions {i - 1} and {i}")
