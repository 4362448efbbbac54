import numpy as np
import pytest

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
