import numpy as np
import pytest

from gpt_jax.config import make_config
from gpt_jax.data import get_batch, load_data
from gpt_jax.errors import DataError

NANOGPT_TRAIN, NANOGPT_VAL = 1_003_854, 111_540


def test_tiny_shakespeare_through_tfds_has_nanogpts_splits(shakespeare):
    assert len(shakespeare.train) == NANOGPT_TRAIN
    assert len(shakespeare.val) == NANOGPT_VAL
    assert shakespeare.tokenizer.vocab_size == 65
    assert shakespeare.tokenizer.decode(shakespeare.train[:14]) == "First Citizen:"


def test_tfds_build_is_tensorflow_free(shakespeare):
    import sys

    assert "tensorflow" not in sys.modules


def test_file_path_gives_the_same_splits(shakespeare, shakespeare_file, tmp_path):
    data = load_data(make_config(dataset=str(shakespeare_file), data_dir=str(tmp_path)))
    assert (len(data.train), len(data.val)) == (NANOGPT_TRAIN, NANOGPT_VAL)
    assert np.array_equal(data.train, shakespeare.train)
    assert np.array_equal(data.val, shakespeare.val)


def test_folder_of_text_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("abcdefghij" * 5)
    (corpus / "sub" / "b.txt").write_text("klmnopqrst" * 5)
    (corpus / "notes.md").write_text("ignored")
    data = load_data(make_config(dataset=str(corpus), data_dir=str(tmp_path / "cache"), val_fraction=0.2))
    assert (len(data.train), len(data.val)) == (80, 20)
    assert data.tokenizer.decode(data.val) == "klmnopqrst" * 2


def test_token_cache_is_reused_and_keyed_by_content(tmp_path):
    text = tmp_path / "wizard_of_oz.txt"
    text.write_text("Dorothy lived in the midst of the great Kansas prairies. " * 4)
    cfg = make_config(dataset=str(text), data_dir=str(tmp_path / "cache"))
    first = load_data(cfg)
    assert isinstance(first.train, np.memmap)
    caches = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(caches) == 1
    second = load_data(cfg)
    assert np.array_equal(first.train, second.train)
    assert list((tmp_path / "cache" / "tokens").iterdir()) == caches
    text.write_text("Toto, I've a feeling we're not in Kansas anymore. " * 4)
    third = load_data(cfg)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2
    assert third.tokenizer.decode(third.train[:4]) == "Toto"


def test_get_batch_is_a_pure_function_of_step_and_seed(shakespeare):
    x1, y1 = shakespeare.get_batch("train", 7, 1337, 8, 32)
    x2, y2 = shakespeare.get_batch("train", 7, 1337, 8, 32)
    assert x1.dtype == np.int32 and x1.shape == (8, 32) and y1.shape == (8, 32)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.array_equal(x1[:, 1:], y1[:, :-1])
    assert not np.array_equal(x1, shakespeare.get_batch("train", 8, 1337, 8, 32)[0])
    assert not np.array_equal(x1, shakespeare.get_batch("train", 7, 1338, 8, 32)[0])
    assert not np.array_equal(x1, shakespeare.get_batch("val", 7, 1337, 8, 32)[0])


def test_windows_are_taken_from_the_split():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, 0, 0, 64, 10)
    assert np.all(y == x + 1)
    assert x.min() >= 0 and y.max() <= 99
    starts = x[:, 0]
    assert len(np.unique(starts)) > 30  # random windows, not one position


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="neither a known dataset .* nor an existing file"):
        load_data(make_config(dataset=str(tmp_path / "nope.txt"), data_dir=str(tmp_path)))


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_data(make_config(dataset=str(tmp_path / "empty.txt"), data_dir=str(tmp_path)))


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3 is 0xe9\)"):
        load_data(make_config(dataset=str(tmp_path / "latin1.txt"), data_dir=str(tmp_path)))


def test_folder_without_text_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_data(make_config(dataset=str(tmp_path / "corpus"), data_dir=str(tmp_path)))


def test_corpus_shorter_than_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 100)
    data = load_data(make_config(dataset=str(tmp_path / "short.txt"), data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"the val split .* has 10 tokens, fewer than block_size \+ 1 = 17"):
        data.check_block_size(16)


def test_wrong_download_is_refused(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare")
    cfg = make_config(source_file=str(fake), data_dir=str(tmp_path))
    with pytest.raises(DataError, match="is not the Tiny Shakespeare input.txt"):
        load_data(cfg)


def test_tfds_manual_directory_is_used_offline(shakespeare_file, tmp_path):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "input.txt").write_bytes(shakespeare_file.read_bytes())
    data = load_data(make_config(data_dir=str(tmp_path)))
    assert len(data.val) == NANOGPT_VAL
