import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_jax.errors import TokenizerError
from gpt_jax.tokenizer import CharTokenizer


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


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"outside the vocabulary: 'xé'"):
        tok.encode("abxcéx")


def test_json_round_trip():
    tok = CharTokenizer.from_text("zyx \n")
    assert CharTokenizer.from_json(tok.to_json()) == tok


def test_decode_rejects_ids_out_of_range():
    with pytest.raises(TokenizerError, match="token ids must be in"):
        CharTokenizer.from_text("ab").decode([0, 2])


def test_empty_text_has_no_vocabulary():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


# --- properties over arbitrary text ----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_any_text_round_trips_through_its_own_vocabulary(text):
    tok = CharTokenizer.from_text(text)
    assert list(tok.chars) == sorted(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert CharTokenizer.from_json(tok.to_json()) == tok


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1), st.text(min_size=1))
def test_characters_outside_the_vocabulary_are_named(vocabulary_text, text):
    tok = CharTokenizer.from_text(vocabulary_text)
    unknown = [c for c in dict.fromkeys(text) if c not in tok.chars]
    if not unknown:
        assert tok.decode(tok.encode(text)) == text
        return
    with pytest.raises(TokenizerError) as error:
        tok.encode(text)
    assert f"outside the vocabulary: {''.join(unknown)!r}" in str(error.value)
