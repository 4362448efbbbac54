import base64
import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_jax.errors import TokenizerError
from gpt_jax.tokenizer import (
    KINDS,
    BpeTokenizer,
    ByteTokenizer,
    CharTokenizer,
    Gpt2Tokenizer,
    Tokenizer,
    describe_characters,
    normalize_text,
    tokenizer_from_json,
)


def test_vocabulary_is_the_sorted_distinct_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.vocab_size == 8


def test_round_trip(shakespeare):
    tok = shakespeare.tokenizer
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 65


def test_unknown_characters_are_named_readably():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"outside the vocabulary: 'x' \(U\+0078 LATIN SMALL LETTER X\), "
                                             r"'é' \(U\+00E9 LATIN SMALL LETTER E WITH ACUTE\); remove them"):
        tok.encode("abxcéx")
    with pytest.raises(TokenizerError, match=r": '\\n' \(U\+000A LINE FEED\); "):
        tok.encode("ab\nc")


def test_invisible_and_combining_characters_are_escaped_and_named():
    assert describe_characters("\u0308") == r"'\u0308' (U+0308 COMBINING DIAERESIS)"
    assert describe_characters("\t\x00") == r"'\t' (U+0009 CHARACTER TABULATION), '\x00' (U+0000 NULL)"
    assert describe_characters("\x01") == r"'\x01' (U+0001 CONTROL CHARACTER)"
    assert describe_characters("\u200b") == r"'\u200b' (U+200B ZERO WIDTH SPACE)"
    assert describe_characters("€") == "'€' (U+20AC EURO SIGN)"
    assert describe_characters("abcdefghijklm").endswith("'j' (U+006A LATIN SMALL LETTER J), and 3 more")


def test_json_round_trip():
    tok = CharTokenizer.from_text("zyx \n")
    assert CharTokenizer.from_json(tok.to_json()) == tok
    assert tok.to_json()["normalization"] == "nfc"


def test_decode_rejects_ids_out_of_range():
    with pytest.raises(TokenizerError, match="token ids must be in"):
        CharTokenizer.from_text("ab").decode([0, 2])


def test_empty_text_has_no_vocabulary():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


# --- text hygiene ----------------------------------------------------------------------------------

def test_normalize_text_drops_a_bom_unifies_line_endings_and_composes():
    assert normalize_text("\ufeffa\r\nb\rc\n") == "a\nb\nc\n"
    assert normalize_text("O\u0308g\u0306retmen") == "Öğretmen"
    assert normalize_text("a\ufeffb") == "a\ufeffb"  # only a leading byte-order mark is one


def test_a_decomposed_prompt_encodes_like_the_composed_text():
    tok = CharTokenizer.from_text("Öğretmen Ayşe\n")
    assert np.array_equal(tok.encode("O\u0308g\u0306retmen"), tok.encode("Öğretmen"))
    assert tok.normalize("O\u0308g\u0306retmen") == "Öğretmen"


def test_training_text_is_normalised_before_the_vocabulary_is_built():
    tok = CharTokenizer.from_text("\ufeffBir\r\nO\u0308g\u0306retmen\r")
    assert tok.chars == "\nBeimnrtÖğ"
    assert tok.decode(tok.encode("\ufeffBir\r\nO\u0308g\u0306retmen\r")) == "Bir\nÖğretmen\n"


def test_a_vocabulary_saved_before_text_hygiene_keeps_its_behaviour():
    old = CharTokenizer.from_json({"kind": "char", "chars": "\n\rab"})
    assert old.normalization == ""
    assert old.to_json() == {"kind": "char", "chars": "\n\rab"}
    assert old.decode(old.encode("a\r\nb")) == "a\r\nb"


@pytest.mark.parametrize("chars, message", [
    ("", "the vocabulary is empty"),
    ("abca", r"duplicated characters: 'a' \(U\+0061 LATIN SMALL LETTER A\)"),
    ("ab\n", r"not sorted: 'b' \(U\+0062 LATIN SMALL LETTER B\), '\\n' \(U\+000A LINE FEED\) at "
              "positions 1 and 2"),
    (["a", "b"], r"the vocabulary is not a string of characters: \['a', 'b'\]"),
    (None, "the vocabulary is not a string of characters: None"),
])
def test_an_inconsistent_saved_vocabulary_is_refused_in_one_line(chars, message):
    with pytest.raises(TokenizerError, match=message) as error:
        CharTokenizer.from_json({"kind": "char", "chars": chars, "normalization": "nfc"})
    assert "\n" not in str(error.value)


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(TokenizerError, match="unknown text normalization 'nfkc'"):
        CharTokenizer.from_json({"kind": "char", "chars": "ab", "normalization": "nfkc"})


# --- properties over arbitrary text ----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_any_text_round_trips_through_its_own_vocabulary(text):
    clean = normalize_text(text)
    if not clean:  # a lone byte-order mark
        return
    tok = CharTokenizer.from_text(text)
    assert list(tok.chars) == sorted(set(clean))
    ids = tok.encode(clean)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == clean
    assert CharTokenizer.from_json(tok.to_json()) == tok


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalisation_is_stable(text):
    clean = normalize_text(text)
    assert "\r" not in clean
    assert normalize_text(clean) == clean or clean.startswith("\ufeff")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1), st.text(min_size=1))
def test_characters_outside_the_vocabulary_are_named(vocabulary_text, text):
    if not normalize_text(vocabulary_text):
        return
    tok = CharTokenizer.from_text(vocabulary_text)
    unknown = [c for c in dict.fromkeys(normalize_text(text)) if c not in tok.chars]
    assert tok.unknown(text) == unknown
    if not unknown:
        assert tok.decode(tok.encode(text)) == normalize_text(text)
        return
    with pytest.raises(TokenizerError) as error:
        tok.encode(text)
    assert f"outside the vocabulary: {describe_characters(unknown)};" in str(error.value)


# --- the common interface: byte, BPE and GPT-2 tokenizers -------------------------------------------

MIXED = ("İstanbul'da ılık bir sabah: öğretmen Ayşe çocuklara şarkı söylüyor. Işık, ağaç, güneş.\n"
         "First Citizen:\nBefore we proceed any further, hear me speak.\n"
         "def f(x):\n    return {'a': [1, 2.5e-3]}  # 日本語 😀 Ωμέγα\t\r\n")


@pytest.fixture(scope="module")
def bpe():
    return BpeTokenizer.train(iter([MIXED] * 3 + [MIXED.upper()]), vocab_size=300)


def _write_ranks(path, tokens):
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return path


SMALL_MERGES = [b"th", b"the", b" t", b" the", b"er", b"in", b"ing", b"\xc4\xb1"]


@pytest.fixture
def small_gpt2(tmp_path):
    """A tiny tiktoken encoding in GPT-2's format: the 256 bytes and a few merges (no download)."""
    path = _write_ranks(tmp_path / "small.tiktoken", [bytes([b]) for b in range(256)] + SMALL_MERGES)
    return Gpt2Tokenizer.load(encoding_file=str(path))


def test_every_tokenizer_has_the_common_interface(bpe, small_gpt2):
    char = CharTokenizer.from_text("ab")
    for tok, kind, eot in [(char, "char", None), (ByteTokenizer(), "byte", 256), (bpe, "bpe", bpe.eot_id),
                           (small_gpt2, "gpt2", 256 + len(SMALL_MERGES))]:
        assert isinstance(tok, Tokenizer)
        assert tok.kind == kind and tok.eot_id == eot
        assert tok.kind in KINDS
        if eot is not None:
            assert 0 <= eot < tok.vocab_size
        ids = tok.encode("ab")
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert tok.decode(ids) == "ab"
        assert json.loads(json.dumps(tok.to_json()))["kind"] == kind
    assert ByteTokenizer().vocab_size == 257
    assert small_gpt2.vocab_size == 256 + len(SMALL_MERGES) + 1


@settings(max_examples=75, deadline=None)
@given(st.text())
def test_bytes_round_trip_any_text_exactly(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < 256))
    assert ids.tolist() == list(normalize_text(text).encode("utf-8"))
    assert tok.decode(ids) == normalize_text(text)
    assert tok.unknown(text) == []


@settings(max_examples=75, deadline=None)
@given(text=st.text())
def test_bpe_round_trips_any_text_exactly(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < bpe.vocab_size))
    assert bpe.eot_id not in ids.tolist()
    assert bpe.decode(ids) == normalize_text(text)
    assert bpe.unknown(text) == []


@settings(max_examples=75, deadline=None)
@given(st.text(alphabet=sorted(set(MIXED))))
def test_chars_round_trip_text_within_the_vocabulary(text):
    tok = CharTokenizer.from_text(MIXED)
    assert tok.unknown(text) == []
    assert tok.decode(tok.encode(text)) == normalize_text(text)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("the ring in thinking ılık\n"))))
def test_a_small_tiktoken_encoding_round_trips_the_text_it_covers(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "covered.tiktoken"
    if not path.exists():
        _write_ranks(path, [bytes([b]) for b in range(256)] + SMALL_MERGES)
    tok = Gpt2Tokenizer.load(encoding_file=path)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_the_small_encoding_merges_and_treats_end_of_text_in_text_as_text(small_gpt2):
    assert small_gpt2.encode("the").tolist() == [256 + SMALL_MERGES.index(b"the")]
    assert small_gpt2.encode("ı").tolist() == [256 + SMALL_MERGES.index(b"\xc4\xb1")]
    ids = small_gpt2.encode("a<|endoftext|>b")
    assert small_gpt2.eot_id not in ids.tolist()
    assert small_gpt2.decode(ids) == "a<|endoftext|>b"


def test_bpe_learns_merges_and_treats_end_of_text_in_text_as_text(bpe):
    assert bpe.vocab_size == 300
    assert len(bpe.encode(MIXED)) < len(MIXED.encode("utf-8")) * 0.8
    ids = bpe.encode("sabah<|endoftext|>sabah")
    assert bpe.eot_id not in ids.tolist()
    assert bpe.decode(ids) == "sabah<|endoftext|>sabah"


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
def test_end_of_text_ids_decode_to_nothing(kind, bpe, small_gpt2):
    tok = {"byte": ByteTokenizer(), "bpe": bpe, "gpt2": small_gpt2}[kind]
    ids = np.concatenate([tok.encode("bir"), [tok.eot_id], tok.encode("iki"), [tok.eot_id]])
    assert tok.decode(ids) == "biriki"


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
def test_a_decomposed_dotted_capital_i_encodes_like_the_composed_one(kind, bpe, small_gpt2):
    tok = {"byte": ByteTokenizer(), "bpe": bpe, "gpt2": small_gpt2}[kind]
    assert np.array_equal(tok.encode("I\u0307stanbul"), tok.encode("İstanbul"))
    assert tok.normalize("I\u0307") == "İ"
    assert tok.decode(tok.encode("I\u0307stanbul")) == "İstanbul"


def test_byte_ids_that_are_not_utf8_decode_with_the_replacement_character(bpe, small_gpt2):
    assert ByteTokenizer().decode([0x61, 0xC4, 0x62, 0xFF]) == "a\ufffdb\ufffd"
    assert ByteTokenizer().decode([0xC4]) == "\ufffd"
    # Byte-level BPE writes byte 0xC4 as the character "Ä" and 0xFF as "ÿ" (GPT-2's byte alphabet).
    lone = [bpe._tok.token_to_id("Ä"), bpe._tok.token_to_id("ÿ")]
    assert None not in lone
    assert bpe.decode(bpe.encode("a").tolist() + lone) == "a\ufffd\ufffd"
    assert small_gpt2.decode([0x61, 0xC4, 0xFF]) == "a\ufffd\ufffd"


def test_a_lone_surrogate_encodes_as_the_replacement_character(bpe, small_gpt2):
    for tok in (ByteTokenizer(), bpe, small_gpt2):
        assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


@pytest.mark.parametrize("ids", [[0, -1], [1, 10**6]])
@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_ids_outside_the_vocabulary_are_refused(kind, ids, bpe, small_gpt2):
    tok = {"char": CharTokenizer.from_text("ab"), "byte": ByteTokenizer(), "bpe": bpe,
           "gpt2": small_gpt2}[kind]
    with pytest.raises(TokenizerError, match="token ids must be in"):
        tok.decode(np.asarray(ids))
    with pytest.raises(TokenizerError, match="token ids must be in"):
        tok.decode([tok.vocab_size])


def test_ids_that_are_not_integers_are_refused(bpe, small_gpt2):
    for tok in (ByteTokenizer(), bpe, small_gpt2):
        with pytest.raises(TokenizerError, match="token ids must be integers, got float64"):
            tok.decode([0.5])


def test_every_kind_round_trips_through_json(bpe, small_gpt2):
    for tok in (CharTokenizer.from_text("Öğretmen\n"), ByteTokenizer(), bpe, small_gpt2):
        data = json.loads(json.dumps(tok.to_json()))
        again = tokenizer_from_json(data)
        assert again == tok and type(again) is type(tok)
        assert again.to_json() == tok.to_json()
        text = "Öğretmen\n" if tok.kind == "char" else MIXED
        assert again.encode(text).tolist() == tok.encode(text).tolist()
        assert pickle.loads(pickle.dumps(tok)) == tok  # worker processes receive tokenizers by pickle


def test_the_gpt2_description_carries_its_ranks_not_a_path(small_gpt2, tmp_path):
    data = small_gpt2.to_json()
    assert data["kind"] == "gpt2" and data["n_vocab"] == small_gpt2.vocab_size
    assert str(tmp_path) not in json.dumps(data)
    shutil.copy(tmp_path / "small.tiktoken", tmp_path / "copy.tiktoken")
    assert Gpt2Tokenizer.load(tmp_path / "copy.tiktoken") == small_gpt2  # the same tokens, the same tokenizer


def test_an_old_char_description_without_kind_still_loads():
    tok = tokenizer_from_json({"chars": "\n\rab"})
    assert tok == CharTokenizer("\n\rab") and tok.kind == "char"
    assert tokenizer_from_json({"chars": "ab", "normalization": "nfc"}) == CharTokenizer("ab", "nfc")


@pytest.mark.parametrize("data, message", [
    ({"kind": "wordpiece"}, "unknown tokenizer kind 'wordpiece'"),
    ([1, 2], "unsupported tokenizer description"),
    ({"kind": "bpe"}, "no tokenizer string"),
    ({"kind": "bpe", "tokenizer": "{not json"}, "the saved BPE tokenizer cannot be read"),
    ({"kind": "byte", "normalization": "nfkc"}, "normalises to NFC"),
    ({"kind": "gpt2", "encoding_file": 7}, "encoding_file is not a path"),
    ({"kind": "char", "chars": None}, "not a string of characters"),
])
def test_a_broken_description_is_one_line(data, message):
    with pytest.raises(TokenizerError, match=message) as error:
        tokenizer_from_json(data)
    assert "\n" not in str(error.value)


def test_a_gpt2_description_needs_no_file_and_refuses_edited_ranks(small_gpt2, tmp_path):
    data = small_gpt2.to_json()
    (tmp_path / "small.tiktoken").unlink()
    assert tokenizer_from_json(data).encode(MIXED).tolist() == small_gpt2.encode(MIXED).tolist()
    bytes_only = Gpt2Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, "bytes only")
    edited = {**data, "ranks": bytes_only.to_json()["ranks"]}
    with pytest.raises(TokenizerError, match="do not match their sha256"):
        tokenizer_from_json(edited)


def test_an_older_gpt2_description_naming_a_file_gone_or_changed_is_refused(small_gpt2, tmp_path):
    path = tmp_path / "small.tiktoken"
    older = {"kind": "gpt2", "normalization": "nfc", "encoding_file": str(path),
             "n_vocab": small_gpt2.vocab_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert tokenizer_from_json(older) == small_gpt2
    _write_ranks(path, [bytes([b]) for b in range(256)] + SMALL_MERGES[::-1])
    with pytest.raises(TokenizerError, match="changed since the tokenizer was saved"):
        tokenizer_from_json(older)
    path.unlink()
    with pytest.raises(TokenizerError, match=r"does not exist; .*--encoding_file=PATH") as error:
        tokenizer_from_json(older)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content, message", [
    (b"YQ== 0\nnot-a-line\n", r":2: not a '<base64 token> <rank>' line"),
    (b"YQ== 0\nYg== 5\n", "the ranks are not 0..1"),
    (b"YQ== 0\nYg== 1\n", "254 single bytes have no rank"),
])
def test_a_broken_ranks_file_is_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as error:
        Gpt2Tokenizer.load(encoding_file=path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_gpt2s_own_ranks_give_its_vocabulary_and_end_of_text(tmp_path):
    # GPT-2's file has 50,256 ranks; the fake one here has as many (the bytes, then filler tokens).
    filler = [b"%d" % i for i in range(1000, 1000 + 50256 - 256)]
    path = _write_ranks(tmp_path / "gpt2.tiktoken", [bytes([b]) for b in range(256)] + filler)
    tok = Gpt2Tokenizer.load(encoding_file=path)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode(tok.encode("1234 İ")) == "1234 İ"


def test_write_encoding_file_writes_the_ranks_back(small_gpt2, tmp_path):
    small_gpt2.write_encoding_file(tmp_path / "copy.tiktoken")
    assert (tmp_path / "copy.tiktoken").read_bytes() == (tmp_path / "small.tiktoken").read_bytes()


@pytest.mark.parametrize("vocab_size", [257, 0, 3.5])
def test_a_bpe_vocabulary_too_small_for_the_bytes_is_refused(vocab_size):
    with pytest.raises(TokenizerError, match="at least 258 tokens"):
        BpeTokenizer.train(["abc"], vocab_size=vocab_size)


def test_bpe_trains_from_a_generator_read_once():
    seen = []

    def documents():
        for i in range(20):
            seen.append(i)
            yield f"belge {i}: ılık su, İzmir.\n"

    tok = BpeTokenizer.train(documents(), vocab_size=270)
    assert seen == list(range(20))
    assert 258 <= tok.vocab_size <= 270
    assert tok.decode(tok.encode("belge 7: İzmir")) == "belge 7: İzmir"


# --- unknown characters for the char tokenizer -----------------------------------------------------

def test_unknown_characters_can_be_skipped_or_replaced():
    tok = CharTokenizer.from_text("ab c")
    assert tok.decode(tok.encode("axb éc", unknown="skip")) == "ab c"
    assert tok.replacement == " "
    assert tok.decode(tok.encode("axb éc", unknown="replace")) == "a b  c"
    with pytest.raises(TokenizerError, match=r"outside the vocabulary: 'x'"):
        tok.encode("axb", unknown="error")


def test_without_a_space_the_replacement_is_the_first_character():
    tok = CharTokenizer.from_text("bca")
    assert tok.replacement == "a"
    assert tok.decode(tok.encode("bxc", unknown="replace")) == "bac"


def test_an_unknown_policy_that_does_not_exist_is_refused():
    with pytest.raises(TokenizerError, match=r"unknown='ignore' is not one of \('error', 'skip', 'repl"):
        CharTokenizer.from_text("ab").encode("ab", unknown="ignore")


@settings(max_examples=75, deadline=None)
@given(st.text(), st.sampled_from(["skip", "replace"]))
def test_skip_and_replace_never_fail_and_keep_known_characters(text, unknown):
    tok = CharTokenizer.from_text(MIXED)
    clean = normalize_text(text)
    decoded = tok.decode(tok.encode(text, unknown=unknown))
    if unknown == "skip":
        assert decoded == "".join(c for c in clean if c in tok.chars)
    else:
        assert decoded == "".join(c if c in tok.chars else " " for c in clean)
