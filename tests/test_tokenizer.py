import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_jax.errors import TokenizerError
from gpt_jax.tokenizer import CharTokenizer, describe_characters, normalize_text


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
