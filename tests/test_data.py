import numpy as np
import pytest

from gpt_jax.config import make_config
from gpt_jax.data import EVAL_STREAMS, TRAIN_STREAMS, load_data, random_windows
from gpt_jax.errors import DataError
from gpt_jax.prepare import is_validation

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


def test_a_folder_puts_whole_documents_in_each_split(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    names = [f"{i:02d}.txt" for i in range(12)] + ["sub/b.txt"]
    for i, name in enumerate(names):
        (corpus / name).write_text(f"document {i}. ")
    (corpus / "notes.md").write_text("ignored")
    (corpus / ".hidden.txt").write_text("ignored")
    data = load_data(make_config(dataset=str(corpus), data_dir=str(tmp_path / "cache"), val_fraction=0.3))
    val = [n for n in names if is_validation(n, 0.3)]
    assert 0 < len(val) < len(names)
    assert data.tokenizer.decode(data.val) == "".join(f"document {names.index(n)}. " for n in val)
    assert data.tokenizer.decode(data.train) == "".join(
        f"document {i}. " for i, n in enumerate(names) if n not in val)


def test_token_cache_is_reused_and_keyed_by_content(tmp_path):
    text = tmp_path / "wizard_of_oz.txt"
    text.write_text("Dorothy lived in the midst of the great Kansas prairies. " * 4)
    cfg = make_config(dataset=str(text), data_dir=str(tmp_path / "cache"))

    def caches():
        return sorted(p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir())

    first = load_data(cfg)
    assert isinstance(first.train, np.memmap)
    assert len(caches()) == 1
    built = caches()
    second = load_data(cfg)
    assert np.array_equal(first.train, second.train)
    assert caches() == built
    text.write_text("Toto, I've a feeling we're not in Kansas anymore. " * 4)
    with pytest.warns(UserWarning, match=r"the source changed since .* was prepared \(wizard_of_oz.txt "
                                         r"changed\); preparing it again"):
        third = load_data(cfg)
    assert caches() == built  # prepared again in its place
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


def test_eval_batches_are_fixed_and_drawn_from_their_own_streams(shakespeare):
    xs, ys = shakespeare.eval_batches("val", seed=1337, batch_size=4, block_size=8, eval_iters=3)
    assert xs.shape == ys.shape == (3, 4, 8) and xs.dtype == np.int32
    assert np.array_equal(xs[:, :, 1:], ys[:, :, :-1])
    for i in range(3):
        x, y = random_windows(shakespeare.val, i, 1337, 4, 8, stream=3)
        assert np.array_equal(xs[i], x) and np.array_equal(ys[i], y)
    assert np.array_equal(xs, shakespeare.eval_batches("val", 1337, 4, 8, 3)[0])
    assert not np.array_equal(xs[0], shakespeare.get_batch("val", 0, 1337, 4, 8)[0])


def test_every_kind_of_batch_has_its_own_random_stream():
    streams = [*TRAIN_STREAMS.values(), *EVAL_STREAMS.values()]
    assert len(set(streams)) == len(streams)
    assert TRAIN_STREAMS == {"train": 0, "val": 1} and EVAL_STREAMS == {"train": 2, "val": 3}  # as saved runs


def test_windows_are_taken_from_the_split():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = random_windows(tokens, 0, 0, 64, 10, stream=0)
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
    with pytest.raises(DataError, match=r"latin1.txt line 1: byte 0xe9 at column 4 is not UTF-8; convert it "
                                        r"to UTF-8, or pass --errors=skip to skip such lines"):
        load_data(make_config(dataset=str(tmp_path / "latin1.txt"), data_dir=str(tmp_path)))


def test_folder_without_text_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match=r"holds no text files \(.txt, .jsonl or .tar files, plain or .gz "):
        load_data(make_config(dataset=str(tmp_path / "corpus"), data_dir=str(tmp_path)))


def test_corpus_shorter_than_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 100)
    data = load_data(make_config(dataset=str(tmp_path / "short.txt"), data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"the val split .* has 10 tokens, fewer than block_size \+ 1 = 17"):
        data.check_block_size(16)


def test_a_different_file_is_refused_saying_what_differs(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare\r\n")
    cfg = make_config(source_file=str(fake), data_dir=str(tmp_path))
    message = (r"input.txt is not the Tiny Shakespeare input.txt: after text hygiene it has 16 bytes and "
               r"sha256 [0-9a-f]{12}\.\.\., the char-rnn input.txt 1,115,394 bytes and sha256 "
               r"86c4e6aa9db7\.\.\.; leave out --source_file to use the copy shipped with gpt_jax")
    with pytest.raises(DataError, match=message):
        load_data(cfg)


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test: tfds must find its text without one."""
    import tensorflow_datasets as tfds

    def download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)


def test_a_first_run_offline_takes_the_copy_shipped_in_the_package(shakespeare, tmp_path, no_network,
                                                                   capfd):
    data = load_data(make_config(data_dir=str(tmp_path)))
    assert np.array_equal(data.train, shakespeare.train) and np.array_equal(data.val, shakespeare.val)
    assert "Download" not in capfd.readouterr().out  # nothing was downloaded, and nothing says so


def test_tfds_manual_directory_is_used_offline(shakespeare_file, tmp_path, no_network):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "input.txt").write_bytes(shakespeare_file.read_bytes())
    data = load_data(make_config(data_dir=str(tmp_path)))
    assert len(data.val) == NANOGPT_VAL


def test_a_copy_with_windows_line_endings_and_a_bom_is_accepted(shakespeare, shakespeare_file, tmp_path):
    windows = tmp_path / "input.txt"
    windows.write_bytes(b"\xef\xbb\xbf" + shakespeare_file.read_bytes().replace(b"\n", b"\r\n"))
    data = load_data(make_config(source_file=str(windows), data_dir=str(tmp_path)))
    assert np.array_equal(data.train, shakespeare.train) and np.array_equal(data.val, shakespeare.val)


def test_source_file_with_a_path_dataset_is_refused(shakespeare_file, tmp_path):
    cfg = make_config(dataset=str(shakespeare_file), source_file=str(shakespeare_file),
                      data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"source_file is a local copy of the download of tiny_shakespeare, "
                                        r"but dataset .* is not that; leave out --source_file"):
        load_data(cfg)


def test_text_files_are_normalised_before_the_vocabulary_is_built(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    a, b = "a0.txt", next(f"b{i}.txt" for i in range(100) if is_validation(f"b{i}.txt", 0.5))
    assert not is_validation(a, 0.5)
    (corpus / a).write_bytes("\ufeffBir öğretmen\r\n".encode())
    (corpus / b).write_bytes("\ufeffO\u0308g\u0306retmen\rAyşe\n".encode())  # each document's BOM goes
    data = load_data(make_config(dataset=str(corpus), data_dir=str(tmp_path / "cache"), val_fraction=0.5))
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert text == "Bir öğretmen\nÖğretmen\nAyşe\n"
    assert not set("\r\ufeff\u0308\u0306") & set(data.tokenizer.chars)
    assert data.tokenizer.normalization == "nfc"


def test_source_file_is_checked_even_when_the_cache_is_ready(shakespeare, data_dir, tmp_path):
    """The prepared dataset is there (the session's data_dir), yet a missing or wrong --source_file is
    still named: the option is never silently ignored."""
    wrong = tmp_path / "short.txt"
    wrong.write_text("To be, or not to be\n" * 100)
    for source, message in [(tmp_path / "nope.txt", "does not exist"),
                            (wrong, "is not the Tiny Shakespeare")]:
        with pytest.raises(DataError, match=message):
            load_data(make_config(source_file=str(source), data_dir=str(data_dir)))
