"""Tokenizers behind one small interface (``Tokenizer``), saved to and restored from checkpoint metadata.

- ``CharTokenizer``: one token per distinct character of the training text, as in the course;
- ``ByteTokenizer``: the UTF-8 bytes (ids 0..255) plus end-of-text (256), so no text is out of vocabulary;
- ``BpeTokenizer``: a byte-level BPE trained on the corpus with Hugging Face ``tokenizers``;
- ``Gpt2Tokenizer``: GPT-2's own encoding through ``tiktoken`` (or any ranks file in its format).

``tokenizer_from_json`` restores any of them from what its ``to_json`` wrote.

Text hygiene: training text and prompts pass through the same ``normalize_text`` (no byte-order mark,
``\\n`` line endings, Unicode NFC), so a prompt typed in decomposed form (``"O\\u0308"``, as macOS
keyboards give) encodes like the composed text the model was trained on. The character tokenizer records
its normalisation, so vocabularies saved before it existed keep their behaviour; the other tokenizers
always normalise.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from gpt_jax.errors import ConfigError, TokenizerError

NORMALIZATIONS = ("", "nfc")  # "": text as given (vocabularies saved before text hygiene); "nfc"
KINDS = ("char", "byte", "bpe", "gpt2")
UNKNOWN_POLICIES = ("error", "skip", "replace")  # CharTokenizer.encode's choices for unknown characters
EOT = "<|endoftext|>"  # the end-of-text token of the BPE and GPT-2 tokenizers
_MAX_NAMED = 10  # unknown characters named in one error message

# Control characters have no Unicode name (unicodedata.name fails); these are the ones text holds.
_CONTROL_NAMES = {"\0": "NULL", "\t": "CHARACTER TABULATION", "\n": "LINE FEED", "\v": "LINE TABULATION",
                  "\f": "FORM FEED", "\r": "CARRIAGE RETURN", "\x1b": "ESCAPE", "\x7f": "DELETE"}
_UNNAMED = {"Cc": "CONTROL CHARACTER", "Co": "PRIVATE USE CHARACTER", "Cs": "SURROGATE",
            "Cn": "UNASSIGNED CHARACTER"}


def check_ids(ids: np.ndarray, vocab_size: int, what: str | None = None,
              error: type[Exception] = ConfigError) -> np.ndarray:
    """``ids`` as int32 if they are integer token ids in [0, vocab_size); else ``error`` (ConfigError
    unless given), naming ``what`` when given (a model would read an id outside the vocabulary as a
    zero, NaN or wrapped-around row; a tokenizer cannot decode it)."""
    if ids.size and ids.dtype.kind not in "iu":
        raise error(f"{what} must hold integer token ids (encode text with the tokenizer), got {ids.dtype}"
                    if what else f"token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise error(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}"
                    + (f" in {what}" if what else ""))
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


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers.

    ``kind`` is one of ``KINDS``; token ids are ``0..vocab_size-1``; ``eot_id`` is the end-of-text id
    that separates documents (None for ``char``, which has none). ``encode`` normalises first
    (``normalize``) and returns int32 ids of shape [N]; ``decode`` takes any int sequence or array, raises
    TokenizerError for an id outside the vocabulary, renders end-of-text as nothing and never fails on
    bytes that are not valid UTF-8 (they become U+FFFD). ``unknown`` lists the characters ``encode``
    cannot take (always empty but for ``char``). ``to_json`` is JSON-safe and names the ``kind``.
    ``token_bytes`` gives the UTF-8 bytes each id stands for, int32 [vocab_size] (0 for end-of-text),
    which turns a loss per token into bits per byte.
    """

    kind: str
    vocab_size: int
    eot_id: int | None

    def normalize(self, text: str) -> str: ...

    def unknown(self, text: str) -> list[str]: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, tokens: Any) -> str: ...

    def to_json(self) -> dict[str, Any]: ...

    def token_bytes(self) -> np.ndarray: ...


def tokenizer_from_json(data: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``to_json`` described, of any kind. A description without ``kind`` is a character
    vocabulary (checkpoints written before the other kinds existed). Raises TokenizerError, one line, for
    an unknown kind or a broken description."""
    if not isinstance(data, dict):
        raise TokenizerError(f"unsupported tokenizer description: {str(data)[:80]}")
    kind = data.get("kind", "char")
    if kind == "char":
        return CharTokenizer.from_json({**data, "kind": "char"})
    if kind == "byte":
        return ByteTokenizer.from_json(data)
    if kind == "bpe":
        return BpeTokenizer.from_json(data)
    if kind == "gpt2":
        return Gpt2Tokenizer.from_json(data)
    raise TokenizerError(f"unknown tokenizer kind {str(kind)[:40]!r}; expected one of {KINDS}")


def _check_ids_in_range(tokens: Any, vocab_size: int) -> np.ndarray:
    """``tokens`` as a flat int32 array; TokenizerError for ids that are not integers in [0, vocab_size)."""
    return check_ids(np.asarray(tokens).reshape(-1), vocab_size, error=TokenizerError)


_SURROGATE = re.compile("[\ud800-\udfff]")


# GPT-2's pre-tokenizer pattern, which Hugging Face's ByteLevel pre-tokenizer also uses (Radford et al.
# 2019, the encoder.py of openai/gpt-2).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): character -> the byte it stands for. Printable Latin-1
    bytes stand for themselves; the other 68 bytes, in order, for U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _codepoints(text: str) -> np.ndarray:
    """The code points of ``text``: uint32 [len(text)] (a lone surrogate included)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _utf8(text: str) -> bytes:
    """``text`` in UTF-8; a lone surrogate (which UTF-8 cannot hold: a str made from undecodable bytes
    with ``surrogateescape``) becomes U+FFFD, as tiktoken does."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """``chars[i]`` is the character of token ``i``; the vocabulary is sorted.

    ``normalization`` is what ``encode`` does to text first: ``"nfc"`` is ``normalize_text``, ``""``
    nothing (vocabularies saved before text hygiene existed).
    """

    chars: str
    normalization: str = ""

    kind: ClassVar[str] = "char"
    eot_id: ClassVar[None] = None  # a character vocabulary has no end-of-text token

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

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """``normalize(text)`` -> int32 token ids of shape [N].

        ``unknown`` says what happens to characters outside the vocabulary: ``"error"`` (the default)
        raises TokenizerError naming them; ``"skip"`` drops them; ``"replace"`` puts the replacement
        character in their place (``replacement``: a space if the vocabulary has one, else its first
        character). N is ``len(normalize(text))`` but with ``"skip"``. Any other ``unknown`` is a
        TokenizerError.
        """
        if unknown not in UNKNOWN_POLICIES:
            raise TokenizerError(f"unknown={unknown!r} is not one of {UNKNOWN_POLICIES}")
        cps_N = _codepoints(self.normalize(text))
        table = self._table
        ids_N = table[np.minimum(cps_N, len(table) - 1)]
        known_N = ids_N >= 0
        if known_N.all():
            return ids_N
        if unknown == "skip":
            return ids_N[known_N]
        if unknown == "replace":
            return np.where(known_N, ids_N, self._index[self.replacement]).astype(np.int32)
        missing = "".join(chr(c) for c in dict.fromkeys(cps_N[~known_N].tolist()))
        raise TokenizerError(
            f"text has characters outside the vocabulary: {describe_characters(missing)}; "
            "remove them or train on a corpus that contains them"
        )

    @functools.cached_property
    def _table(self) -> np.ndarray:
        """Code point -> token id, -1 for characters outside the vocabulary: int32 [largest + 2] (the
        last entry stands for every larger code point)."""
        cps = _codepoints(self.chars)
        table = np.full(int(cps.max()) + 2, -1, dtype=np.int32)
        table[cps] = np.arange(len(cps), dtype=np.int32)
        return table

    @property
    def replacement(self) -> str:
        """What ``encode(..., unknown="replace")`` puts for a character outside the vocabulary: a space
        if the vocabulary has one, else its first character."""
        return " " if " " in self._index else self.chars[0]

    def decode(self, tokens: Any) -> str:
        """Token ids (any int sequence or array) -> text."""
        chars = self.chars
        return "".join(chars[i] for i in _check_ids_in_range(tokens, len(chars)).tolist())

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes each id stands for: int32 [vocab_size] (for bits per byte)."""
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], dtype=np.int32)

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


def _json_kind(data: Any, kind: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise TokenizerError(f"not a {kind} tokenizer description: {str(data)[:80]}")
    return data


class ByteTokenizer:
    """The UTF-8 bytes of the normalised text: ids 0..255 are the bytes, 256 is end-of-text."""

    kind: ClassVar[str] = "byte"
    vocab_size: ClassVar[int] = 257
    eot_id: ClassVar[int] = 256

    def normalize(self, text: str) -> str:
        return normalize_text(text)

    def unknown(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> np.ndarray:
        """``normalize(text)`` -> its UTF-8 bytes as int32 ids [N] (a lone surrogate as U+FFFD)."""
        return np.frombuffer(_utf8(self.normalize(text)), dtype=np.uint8).astype(np.int32)

    def decode(self, tokens: Any) -> str:
        """Ids -> text; end-of-text ids render as nothing and bytes that are not UTF-8 as U+FFFD."""
        ids = _check_ids_in_range(tokens, self.vocab_size)
        return ids[ids != self.eot_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes each id stands for: int32 [257], 1 per byte and 0 for end-of-text."""
        return np.array([1] * 256 + [0], dtype=np.int32)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "byte", "normalization": "nfc"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ByteTokenizer:
        _json_kind(data, "byte")
        if data.get("normalization", "nfc") != "nfc":
            raise TokenizerError(f"a byte tokenizer normalises to NFC, not {data['normalization']!r}")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash("byte")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BpeTokenizer:
    """A byte-level BPE (GPT-2's scheme) trained with Hugging Face ``tokenizers``.

    Every byte is in the initial alphabet, so no text is out of vocabulary, and decoding the ids of a
    text gives back the normalised text exactly. ``<|endoftext|>`` is the end-of-text token; in text it
    is plain text (``encode`` never produces the end-of-text id). ``to_json`` carries the whole trained
    tokenizer, so a checkpoint needs nothing else.
    """

    kind: ClassVar[str] = "bpe"
    MIN_VOCAB_SIZE: ClassVar[int] = 258  # 256 bytes, end-of-text, and at least one merge

    def __init__(self, tokenizer: Any):
        """``tokenizer``: a ``tokenizers.Tokenizer`` as ``train`` makes it (use ``train``/``from_json``)."""
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in text is text, not the token
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        eot_id = tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise TokenizerError(f"the BPE tokenizer has no {EOT} token")
        self.eot_id: int = eot_id
        ids = set(tokenizer.get_vocab(with_added_tokens=True).values())
        if ids != set(range(self.vocab_size)):
            raise TokenizerError(f"the BPE tokenizer's ids are not 0..{self.vocab_size - 1}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> BpeTokenizer:
        """A BPE of at most ``vocab_size`` tokens (fewer when the texts have fewer pairs to merge),
        trained on ``texts`` (any iterable of documents, read once, one at a time; each is normalised).
        Raises TokenizerError for ``vocab_size`` under 258 (the bytes, end-of-text and one merge)."""
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < cls.MIN_VOCAB_SIZE:
            raise TokenizerError(f"a BPE vocabulary needs at least {cls.MIN_VOCAB_SIZE} tokens (256 bytes, "
                                 f"end-of-text and one merge), got vocab_size={vocab_size!r}")
        tok = HfTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.encode_special_tokens = True
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((_utf8(normalize_text(t)).decode("utf-8") for t in texts), trainer=trainer)
        return cls(tok)

    def normalize(self, text: str) -> str:
        return normalize_text(text)

    def unknown(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> np.ndarray:
        """``normalize(text)`` -> int32 token ids [N] (a lone surrogate as U+FFFD)."""
        text = _utf8(self.normalize(text)).decode("utf-8")
        if self._fast is not None:
            return np.asarray(self._fast.encode_ordinary(text), dtype=np.int32)
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    @functools.cached_property
    def _fast(self) -> Any:
        """The same BPE as a ``tiktoken`` encoding (same pre-tokenizer pattern, ranks = ids), about ten
        times faster than the ``tokenizers`` encoder, which gives the same ids; None when the ids do not
        follow the merge order (then rank-order merging could differ), and ``_tok`` encodes."""
        import tiktoken

        model = json.loads(self._tok.to_str())["model"]
        vocab = model["vocab"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        made = [vocab.get(a + b, -1) for a, b in merges]
        in_order = all(a < b for a, b in itertools.pairwise([255, *made]))
        if not in_order:
            return None
        to_byte = byte_level_alphabet()
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
        return tiktoken.Encoding("gpt_jax_bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: self.eot_id})

    def decode(self, tokens: Any) -> str:
        """Ids -> text; end-of-text ids render as nothing and bytes that are not UTF-8 as U+FFFD."""
        ids = _check_ids_in_range(tokens, self.vocab_size)
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes each id stands for: int32 [vocab_size], 0 for end-of-text. A byte-level
        token is written with one character per byte (GPT-2's byte-to-unicode alphabet)."""
        return np.array([0 if i == self.eot_id else len(self._tok.id_to_token(i))
                         for i in range(self.vocab_size)], dtype=np.int32)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bpe", "normalization": "nfc", "tokenizer": self._tok.to_str()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BpeTokenizer:
        from tokenizers import Tokenizer as HfTokenizer

        _json_kind(data, "bpe")
        saved = data.get("tokenizer")
        if not isinstance(saved, str):
            raise TokenizerError(f"the BPE description has no tokenizer string: {str(saved)[:80]}")
        try:
            tok = HfTokenizer.from_str(saved)
        except Exception as e:  # tokenizers raises a bare Exception for a broken description
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"the saved BPE tokenizer cannot be read: {message[:200]}") from None
        if type(tok.model).__name__ != "BPE":
            raise TokenizerError(f"the saved tokenizer is a {type(tok.model).__name__}, not a BPE")
        return cls(tok)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BpeTokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self._tok.to_str())

    def __reduce__(self):  # worker processes get it through its description
        return tokenizer_from_json, (self.to_json(),)

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size})"


# GPT-2's pre-tokenising pattern (tiktoken's "r50k" pattern; Radford et al. 2019, the released encoder).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_N_VOCAB = 50257  # 50,256 ranks and <|endoftext|>


def read_ranks_file(path: str | os.PathLike) -> dict[bytes, int]:
    """The ranks of a ``.tiktoken`` file (one ``<base64 token> <rank>`` per line) or of a Hugging Face
    GPT-2 ``vocab.json`` (``read_vocab_json``): ranks 0..N-1, and every single byte among the tokens (so
    no text is out of vocabulary). TokenizerError, one line, naming the file (and line) otherwise.

    The file is read directly (not through tiktoken's download cache, which keys files by path and would
    serve an old copy of a file that changed).
    """
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read the encoding file {os.fspath(path)}: {e.strerror or e}") from None
    json_vocab = os.fspath(path).endswith(".json")
    ranks = read_vocab_json(path, content) if json_vocab else _read_tiktoken(path, content)
    return _checked_ranks(os.fspath(path), ranks)


def _checked_ranks(where: str, ranks: dict[bytes, int]) -> dict[bytes, int]:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{where}: the ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: {len(missing)} single bytes have no rank (the first: "
                             f"{missing[0]}); a byte-level encoding needs all 256")
    return ranks


def _ranks_text(ranks: dict[bytes, int]) -> bytes:
    """Ranks in the ``.tiktoken`` format: ``<base64 token> <rank>`` per line, in rank order."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)


def read_vocab_json(path: str | os.PathLike, content: bytes) -> dict[bytes, int]:
    """The ranks of a byte-level BPE's ``vocab.json`` (GPT-2's ``encoder.json``; its ``merges.txt``
    beside it) or of a Hugging Face ``tokenizer.json`` of a BPE: each token spelled in the byte-level
    alphabet, its id as its rank; ``<|endoftext|>`` must be the last id, and the ids must follow the
    order of the merges (then ranks and merges encode alike)."""
    where = os.fspath(path)
    try:
        data = json.loads(content)
        if isinstance(data.get("model"), dict):  # tokenizer.json
            if data["model"].get("type") != "BPE":
                raise TokenizerError(f"{where} is a {data['model'].get('type')} tokenizer, not a BPE")
            vocab = dict(data["model"]["vocab"])
            vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
            merges = [m.split(" ") if isinstance(m, str) else m for m in data["model"].get("merges", [])]
        else:
            vocab, merges = data, _merges_beside(where)
        to_byte = byte_level_alphabet()
        eot = vocab.pop(EOT, len(vocab))
        ranks = {bytes(to_byte[c] for c in token): int(i) for token, i in vocab.items()}
        made = [vocab.get(a + b, -1) for a, b in merges]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(f"{where} is not a byte-level BPE vocabulary (a JSON object of tokens spelled "
                             f"in GPT-2's byte alphabet): {type(e).__name__}: {str(e)[:80]}") from None
    if eot != len(ranks):
        raise TokenizerError(f"{where}: {EOT} has id {eot}, but GPT-2's layout puts it last, after the "
                             f"{len(ranks)} other tokens (train the BPE without special tokens, then add it)")
    if not all(a < b for a, b in itertools.pairwise([255, *made])):
        raise TokenizerError(f"{where}: the ids do not follow the order of the merges; GPT-2's encoding "
                             "merges by id")
    return ranks


def _merges_beside(vocab_file: str) -> list[list[str]]:
    """The merges of the ``merges.txt`` beside a ``vocab.json`` (none when there is no such file)."""
    merges_file = os.path.join(os.path.dirname(vocab_file), "merges.txt")
    if not os.path.isfile(merges_file):
        return []
    try:
        with open(merges_file, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line and not line.startswith("#")]
        pairs = [line.split(" ") for line in lines]
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {merges_file}: {type(e).__name__}: {str(e)[:80]}") from None
    if any(len(pair) != 2 for pair in pairs):
        raise TokenizerError(f"{merges_file} is not a merges file (two tokens, space-separated, on each "
                             "line)")
    return pairs


def _read_tiktoken(path: str | os.PathLike, content: bytes) -> dict[bytes, int]:
    lines = content.splitlines()
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{os.fspath(path)}:{number}: not a '<base64 token> <rank>' line of a "
                                 f".tiktoken encoding file: {line[:60]!r}") from None
    return ranks


class Gpt2Tokenizer:
    """GPT-2's encoding through ``tiktoken``: 50,257 ids, ``<|endoftext|>`` = 50256.

    ``load()`` asks tiktoken for ``"gpt2"`` (downloaded once, then read from tiktoken's cache, the folder
    in ``$TIKTOKEN_CACHE_DIR``). Offline, ``load(encoding_file=...)`` reads the ranks from a local
    ``.tiktoken`` file (write one where there is a network with ``write_encoding_file``) or a GPT-2
    model folder's ``vocab.json``. Any ranks in those formats work, with GPT-2's pattern: end-of-text is
    then the id after the last rank (50256 for GPT-2's own). In text, ``<|endoftext|>`` is plain text
    (``encode`` never produces the end-of-text id).
    """

    kind: ClassVar[str] = "gpt2"

    def __init__(self, encoding: Any, encoding_file: str | None = None):
        """``encoding``: a ``tiktoken.Encoding`` with ``<|endoftext|>`` (use ``load``/``from_json``);
        ``encoding_file``: where its ranks came from (None: tiktoken's own ``"gpt2"``)."""
        self._enc = encoding
        self.encoding_file = encoding_file
        self.vocab_size: int = encoding.n_vocab
        self.eot_id: int = encoding.eot_token

    @classmethod
    def load(cls, encoding_file: str | os.PathLike | None = None) -> Gpt2Tokenizer:
        """GPT-2's encoding: tiktoken's ``"gpt2"``, or the ranks of ``encoding_file`` (see the class).
        Raises TokenizerError, one line, for a missing or broken file, or for no network and no cache."""
        import tiktoken

        if encoding_file is None:
            try:
                return cls(tiktoken.get_encoding("gpt2"))
            except Exception as e:  # requests' connection errors, a blocked download, a bad cache ...
                raise TokenizerError(
                    f"cannot get GPT-2's encoding from tiktoken ({type(e).__name__}: no network, and no copy "
                    "downloaded before); on a machine with a network run `python -c \"from gpt_jax import "
                    "Gpt2Tokenizer; Gpt2Tokenizer.load().write_encoding_file('gpt2.tiktoken')\"`, copy "
                    "gpt2.tiktoken here and pass --encoding_file=gpt2.tiktoken") from None
        path = os.path.abspath(os.fspath(encoding_file))
        if not os.path.isfile(path):
            raise TokenizerError(f"the encoding file {path} does not exist; put GPT-2's ranks (a .tiktoken "
                                 "file, see Gpt2Tokenizer.write_encoding_file) there or pass its path with "
                                 "--encoding_file=PATH")
        return cls.from_ranks(read_ranks_file(path), path)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], source: str) -> Gpt2Tokenizer:
        """The encoding of ``ranks`` (checked: 0..N-1, every byte) with GPT-2's pattern; end-of-text is
        id N. ``source`` names where they came from, for messages. Raises TokenizerError."""
        import tiktoken

        ranks = _checked_ranks(source, ranks)
        eot_id = len(ranks)
        n_vocab = eot_id + 1
        try:
            encoding = tiktoken.Encoding(
                os.path.basename(source), pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                special_tokens={EOT: eot_id},
                explicit_n_vocab=n_vocab if n_vocab == GPT2_N_VOCAB else None)
        except Exception as e:
            raise TokenizerError(f"{source}: tiktoken cannot build an encoding from it: {str(e)[:160]}") \
                from None
        return cls(encoding, encoding_file=source)

    def ranks(self) -> dict[bytes, int]:
        """The encoding's mergeable ranks: token bytes -> id (every id but end-of-text)."""
        return dict(self._enc._mergeable_ranks)

    def write_encoding_file(self, path: str | os.PathLike) -> None:
        """Write this encoding's ranks to ``path`` in the ``.tiktoken`` format (for ``load`` offline)."""
        with open(path, "wb") as f:
            f.write(_ranks_text(self.ranks()))

    def normalize(self, text: str) -> str:
        return normalize_text(text)

    def unknown(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> np.ndarray:
        """``normalize(text)`` -> int32 token ids [N] (``encode_ordinary``: no special tokens)."""
        return np.asarray(self._enc.encode_ordinary(self.normalize(text)), dtype=np.int32)

    def decode(self, tokens: Any) -> str:
        """Ids -> text; end-of-text ids render as nothing and bytes that are not UTF-8 as U+FFFD."""
        ids = _check_ids_in_range(tokens, self.vocab_size)
        return self._enc.decode_bytes(ids[ids != self.eot_id].tolist()).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes each id stands for: int32 [vocab_size], 0 for end-of-text."""
        return np.array([0 if i == self.eot_id else len(self._enc.decode_single_token_bytes(i))
                         for i in range(self.vocab_size)], dtype=np.int32)

    def to_json(self) -> dict[str, Any]:
        """tiktoken's own encoding by name; ranks read from a file by content (zlib-compressed, base64,
        with their sha256), so that a checkpoint or an export needs no file, and two copies of one file
        describe the same tokenizer."""
        data = {"kind": "gpt2", "normalization": "nfc", "n_vocab": self.vocab_size}
        return data if self.encoding_file is None else {**data, **self._packed_ranks}

    @functools.cached_property
    def _packed_ranks(self) -> dict[str, str]:
        text = _ranks_text(self.ranks())
        return {"sha256": hashlib.sha256(text).hexdigest(),
                "ranks": base64.b64encode(zlib.compress(text, 9)).decode("ascii")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Gpt2Tokenizer:
        """The encoding again: from the ranks it carries, or tiktoken's; descriptions written before the
        ranks were carried name their file (TokenizerError if it is gone or changed)."""
        _json_kind(data, "gpt2")
        if "ranks" in data:
            return cls._unpack(data)
        encoding_file = data.get("encoding_file")
        if encoding_file is not None and not isinstance(encoding_file, str):
            raise TokenizerError(f"the GPT-2 description's encoding_file is not a path: "
                                 f"{encoding_file!r:.80}")
        tok = cls.load(encoding_file)
        if data.get("n_vocab", tok.vocab_size) != tok.vocab_size:
            raise TokenizerError(f"the encoding has {tok.vocab_size} ids but the saved tokenizer had "
                                 f"{data['n_vocab']}")
        if data.get("sha256") and encoding_file and data["sha256"] != _sha256(encoding_file):
            raise TokenizerError(f"the encoding file {encoding_file} changed since the tokenizer was saved")
        return tok

    @classmethod
    def _unpack(cls, data: dict[str, Any]) -> Gpt2Tokenizer:
        try:
            text = zlib.decompress(base64.b64decode(data["ranks"], validate=True))
        except (TypeError, ValueError, zlib.error):
            raise TokenizerError("the GPT-2 description's ranks cannot be read (not base64 of zlib data)") \
                from None
        if data.get("sha256") != hashlib.sha256(text).hexdigest():
            raise TokenizerError("the GPT-2 description's ranks do not match their sha256: it was edited")
        tok = cls.from_ranks(_read_tiktoken("the saved ranks", text), "the saved ranks")
        if data.get("n_vocab", tok.vocab_size) != tok.vocab_size:
            raise TokenizerError(f"the saved ranks make {tok.vocab_size} ids but the description says "
                                 f"{data['n_vocab']}")
        return tok

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Gpt2Tokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash((self.vocab_size, self.to_json().get("sha256")))

    def __reduce__(self):  # worker processes load it again from its description
        return tokenizer_from_json, (self.to_json(),)

    def __repr__(self) -> str:
        return f"Gpt2Tokenizer(encoding_file={self.encoding_file!r}, vocab_size={self.vocab_size})"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
