"""Preparing corpora: every source kind, parallel workers, pieces, manifests, bad input, interruption."""

import dataclasses
import gzip
import io
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_jax import prepare
from gpt_jax.config import make_config
from gpt_jax.data import load_data
from gpt_jax.errors import DataError
from gpt_jax.prepare import is_validation
from gpt_jax.tokenizer import BpeTokenizer, ByteTokenizer, CharTokenizer, normalize_text

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the wind and İpek's ağaç, öğretmen ışık; 42 rivers\r\nO\u0308zlem said".split(" ")


def text_of(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)) + "\n"


def tar_bytes(members: dict[str, bytes], compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """A folder with every source kind, and its documents (name, text) read by hand, in order."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("every_kind")
    docs: dict[str, str] = {}

    def doc(name: str, words: int = 40) -> bytes:
        docs[name] = text_of(rng, words)
        return docs[name].encode()

    (root / "sub" / "deeper").mkdir(parents=True)  # written in the order prepare reads: sorted paths
    lines = [json.dumps({"id": i, "text": doc(f"c.jsonl:{i + 1}", 20).decode()}) for i in range(15)]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    gz_lines = [json.dumps({"text": doc(f"d.jsonl.gz:{i + 1}", 10).decode()}) for i in range(15)]
    (root / "d.jsonl.gz").write_bytes(gzip.compress("\n".join(gz_lines).encode()))
    (root / "e.tar").write_bytes(tar_bytes({f"e/{i}.txt": doc(f"e.tar/e/{i}.txt") for i in range(6)}))
    (root / "f.tar.xz").write_bytes(tar_bytes({f"{i}.txt.gz": gzip.compress(doc(f"f.tar.xz/{i}.txt.gz"))
                                               for i in range(6)}, "xz"))
    (root / "g.xz").write_bytes(lzma.compress(doc("g.xz")))  # a bare .xz holding text
    # OpenWebText's layout: an archive of .xz files that are themselves tar archives of .txt files
    inner = {f"urlsf_{j}.xz": lzma.compress(tar_bytes({f"{i}.txt": doc(f"owt.tar/urlsf_{j}.xz/{i}.txt")
                                                       for i in range(4)})) for j in range(3)}
    (root / "owt.tar").write_bytes(tar_bytes(inner))
    for i in range(12):
        (root / f"plain_{i:02d}.txt").write_bytes(doc(f"plain_{i:02d}.txt"))
    (root / "sub" / "a.txt.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + doc("sub/a.txt.gz")))
    (root / "sub" / "deeper" / "b.txt.xz").write_bytes(lzma.compress(doc("sub/deeper/b.txt.xz", 3000)))
    (root / "README.md").write_text("not a document")
    (root / ".hidden.txt").write_text("not a document")
    return root, list(docs.items())


def by_hand(docs: list[tuple[str, str]], tokenizer, val_fraction: float) -> dict[str, np.ndarray]:
    """The ids prepare should write: each document normalised, encoded, followed by end-of-text."""
    splits = {"train": [], "val": []}
    for name, text in docs:
        ids = tokenizer.encode(normalize_text(text))
        if tokenizer.eot_id is not None:
            ids = np.append(ids, tokenizer.eot_id)
        splits["val" if is_validation(name, val_fraction) else "train"].append(ids)
    return {k: np.concatenate(v) for k, v in splits.items()}


@pytest.mark.parametrize("tokenizer,num_proc", [("byte", 1), ("bpe", 1), ("char", 2), ("bpe", 2)])
def test_every_source_kind_prepares_to_the_tokens_read_by_hand(every_kind, tmp_path, tokenizer, num_proc,
                                                               small_pieces):
    folder, docs = every_kind
    cfg = make_config(dataset=str(folder), data_dir=str(tmp_path), tokenizer=tokenizer, num_proc=num_proc,
                      vocab_size=400 if tokenizer == "bpe" else 0, val_fraction=0.2)
    data = load_data(cfg)
    expected = by_hand(docs, data.tokenizer, 0.2)
    assert np.array_equal(data.train, expected["train"]) and np.array_equal(data.val, expected["val"])
    assert data.train.dtype == np.uint16
    manifest = json.loads(next((tmp_path / "tokens").glob("*/manifest.json")).read_text())
    assert manifest["prepared"]["documents"] == {
        "train": sum(not is_validation(n, 0.2) for n, _ in docs),
        "val": sum(is_validation(n, 0.2) for n, _ in docs)}
    assert manifest["sources"]["files"] == 20 and "README.md" not in json.dumps(manifest["sources"])


def test_a_bpe_is_trained_on_the_training_documents_only(every_kind, tmp_path):
    folder, docs = every_kind
    cfg = make_config(dataset=str(folder), data_dir=str(tmp_path), tokenizer="bpe", vocab_size=400,
                      val_fraction=0.2)
    train_docs = [normalize_text(t) for n, t in docs if not is_validation(n, 0.2)]
    assert load_data(cfg).tokenizer == BpeTokenizer.train(train_docs, vocab_size=400)


def test_a_large_single_text_is_cut_into_jobs_and_pieces_without_changing_a_token(
        shakespeare_file, tmp_path, monkeypatch):
    """Jobs of 64 KiB in two workers and pieces of 4 KiB in this process give the ids of encoding the
    whole text at once, and nanoGPT's split of it (its first 90 % of characters)."""
    text = normalize_text(shakespeare_file.read_text(encoding="utf-8"))
    cut = int(len(text) * 0.9)
    bpe = BpeTokenizer.train([text[:cut]], vocab_size=500)
    monkeypatch.setattr(prepare, "_JOB_BYTES", 1 << 16)
    cfg = make_config(dataset=str(shakespeare_file), tokenizer="bpe", vocab_size=500, num_proc=2,
                      data_dir=str(tmp_path / "jobs"))
    data = load_data(cfg)
    assert data.tokenizer == bpe
    assert np.array_equal(data.train, bpe.encode(text[:cut]))
    assert np.array_equal(data.val, bpe.encode(text[cut:]))
    monkeypatch.setattr(prepare, "_PIECE_BYTES", 1 << 12)
    small = load_data(dataclasses.replace(cfg, num_proc=1, data_dir=str(tmp_path / "pieces")))
    assert np.array_equal(small.train, data.train) and np.array_equal(small.val, data.val)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\n\r.'sİı\u0308é€😀\t")), max_size=400))
def test_pieces_tokenise_as_the_whole_text(text):
    raw = ("\ufeff" + text).encode("utf-8")
    pieces = list(prepare._pieces(io.BufferedReader(io.BytesIO(raw), 16), "t.txt", first=True))
    assert "".join(pieces) == normalize_text(text)
    tok = _small_bpe()
    assert np.array_equal(np.concatenate([tok.encode(p) for p in pieces] + [np.zeros(0, np.int32)]),
                          tok.encode(normalize_text(text)))


def _small_bpe() -> BpeTokenizer:
    global _BPE
    if _BPE is None:
        _BPE = BpeTokenizer.train(["ab ab\n\n abab 's İı é€ ... ab.\nab\r\n" * 50], vocab_size=280)
    return _BPE


_BPE = None


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of a few bytes, so that small test texts are cut into many."""
    monkeypatch.setattr(prepare, "_PIECE_BYTES", 16)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=300))
def test_the_fast_bpe_encoder_gives_the_ids_of_the_tokenizers_one(text):
    tok = _small_bpe()
    assert tok._fast is not None
    normalised = tok.normalize(text).encode("utf-8", "replace").decode("utf-8")
    assert tok.encode(text).tolist() == tok._tok.encode(normalised, add_special_tokens=False).ids


def test_a_changed_source_is_prepared_again_and_named(every_kind, tmp_path):
    folder, _ = every_kind
    copy = tmp_path / "corpus"
    copy.mkdir()
    for name in ("plain_00.txt", "plain_01.txt", "c.jsonl"):
        (copy / name).write_bytes((folder / name).read_bytes())
    cfg = make_config(dataset=str(copy), data_dir=str(tmp_path / "cache"), tokenizer="byte", val_fraction=0.3)
    before = load_data(cfg)
    (copy / "plain_01.txt").write_text("a new text\n")
    (copy / "new.txt").write_text("another\n")
    with pytest.warns(UserWarning, match=r"the source changed since .* was prepared \(plain_01.txt changed, "
                                         r"new.txt is new\); preparing it again"):
        after = load_data(cfg)
    assert len(after.train) + len(after.val) != len(before.train) + len(before.val)
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")] == [
        next(p.name for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith("."))]


def test_errors_skip_skips_and_counts_bad_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [f"good_{i}.txt" for i in range(20)]
    for name in good:
        (corpus / name).write_text(f"{name} is fine\n")
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    (corpus / "lines.jsonl").write_text('{"text": "kept"}\n{"body": "no text"}\nnot json\n')
    cfg = make_config(dataset=str(corpus), data_dir=str(tmp_path / "cache"), tokenizer="byte", errors="skip",
                      val_fraction=0.3)
    with pytest.warns(UserWarning, match=r"skipped 3 documents of .* \(not JSON: 1, no 'text': 1, "
                                         r"not UTF-8: 1\)|skipped 3 documents"):
        data = load_data(cfg)
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert "café" not in text and "kept" in text and all(f"{n} is fine" in text for n in good)
    manifest = json.loads(next((tmp_path / "cache" / "tokens").glob("*/manifest.json")).read_text())
    assert manifest["prepared"]["skipped"] == {"not UTF-8": 1, "no 'text'": 1, "not JSON": 1}


def test_a_single_text_with_errors_skip_drops_the_lines_that_are_not_utf8(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"first line\n" + "caf\xe9\n".encode("latin-1") + b"last line\n" * 20)
    data = load_data(make_config(dataset=str(path), data_dir=str(tmp_path), tokenizer="byte", errors="skip"))
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert text == "first line\n" + "last line\n" * 20


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_tfds_text_dataset_by_name(tmp_path, num_proc):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=300):
        source = tfds.data_source("imdb_reviews", split="train")
        docs = [(f"imdb_reviews/train/{i}", source[i]["text"]) for i in range(len(source))]
        cfg = make_config(dataset="tfds:imdb_reviews", data_dir=str(tmp_path), tokenizer="byte",
                          num_proc=num_proc)
        data = load_data(cfg)
    expected = by_hand(docs, ByteTokenizer(), 0.1)
    assert np.array_equal(data.train, expected["train"]) and np.array_equal(data.val, expected["val"])


def test_empty_documents_add_no_end_of_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text(f"doc {i}\n" if i % 2 else "")
    data = load_data(make_config(dataset=str(corpus), data_dir=str(tmp_path), tokenizer="byte",
                                 val_fraction=0.3))
    assert int((np.asarray(data.train) == 256).sum() + (np.asarray(data.val) == 256).sum()) == 10


def test_a_tfds_feature_that_does_not_exist_is_named(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5), pytest.raises(
            DataError, match=r"tfds:imdb_reviews:body has no feature 'body' \(its features: 'label', "
                             r"'text'\)"):
        load_data(make_config(dataset="tfds:imdb_reviews:body", data_dir=str(tmp_path), tokenizer="byte"))


def test_the_cache_key_holds_the_size_of_a_bpe(tmp_path):
    cfg = make_config(dataset=str(tmp_path), tokenizer="bpe", vocab_size=300)
    assert prepare._tokenizer_identity(cfg) == {"kind": "bpe", "vocab_size": 300}
    assert prepare._tokenizer_identity(make_config(dataset=str(tmp_path), tokenizer="bpe")) == {
        "kind": "bpe", "vocab_size": 4096}


# --- bad input: exit 2, one line, nothing left in the cache ------------------------------------------


def _bad_gzip(folder: Path) -> None:
    (folder / "ok.txt").write_text("fine\n")
    (folder / "broken.txt.gz").write_bytes(gzip.compress(b"some text\n" * 100)[:-30])


def _not_an_archive(folder: Path) -> None:
    (folder / "fake.tar.xz").write_bytes(b"not xz at all")


def _not_utf8(folder: Path) -> None:
    (folder / "ok.txt").write_text("fine\n")
    (folder / "latin1.txt").write_bytes(b"line one\nline two\ncaf\xe9\n")


def _jsonl_without_field(folder: Path) -> None:
    (folder / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"body": "three", "id": 3}\n')


def _bad_json(folder: Path) -> None:
    (folder / "a.jsonl").write_text('{"text": "one"}\n{"text": \n')


def _nothing(folder: Path) -> None:
    (folder / "notes.md").write_text("no documents here")


BAD_INPUTS = {
    "truncated .gz": (_bad_gzip, r"cannot read broken.txt.gz \(.*\): .*; it is damaged or incomplete"),
    "not an archive": (_not_an_archive, r"cannot read fake.tar.xz \(.*\): .*; it is damaged or incomplete"),
    "not UTF-8": (_not_utf8, r"latin1.txt line 3: byte 0xe9 at column 4 is not UTF-8; convert it to UTF-8, "
                             r"or pass --errors=skip to skip such documents"),
    "JSONL line without the field": (_jsonl_without_field, r"a.jsonl line 3 has no 'text' field \(its "
                                                           r"fields: 'body', 'id'\); pass --text_field=body; "
                                                           r"fix it, or pass --errors=skip"),
    "JSONL line that is not JSON": (_bad_json, r"a.jsonl line 2 is not JSON \(Expecting value at column "
                                               r"\d+\)"),
    "JSONL line that is an array": (lambda f: (f / "a.jsonl").write_text('["text"]\n'),
                                    r"a.jsonl line 1 holds an array, not an object with a 'text' field"),
    "JSONL text that is null": (lambda f: (f / "a.jsonl").write_text('{"text": null}\n'),
                                r"a.jsonl line 1: its 'text' is null, not text"),
    "only empty documents": (lambda f: [(f / f"{i}.txt").write_text("") for i in range(30)],
                             r"dataset .* is empty; give files with text in them"),
    "empty folder": (_nothing, r"holds no text files"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(tmp_path, case):
    make, message = BAD_INPUTS[case]
    folder = tmp_path / "corpus"
    folder.mkdir()
    make(folder)
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.prepare", f"--dataset={folder}", "--tokenizer=byte",
                           f"--data_dir={tmp_path / 'cache'}", "--num_proc=2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m gpt_jax.prepare: error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]
    tokens = tmp_path / "cache" / "tokens"
    assert not tokens.exists() or not [p for p in tokens.iterdir() if not p.name.startswith(".")
                                       and p.suffix != ".lock" or p.name.startswith(".tmp-")]


def test_the_command_line_prepares_what_train_would_use(tmp_path):
    text = "Bir varmış, bir yokmuş.\n" * 50
    (tmp_path / "a.txt").write_text(text)
    train_bytes = len(text[:int(len(text) * 0.9)].encode())
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.prepare", f"--dataset={tmp_path / 'a.txt'}",
                           "--tokenizer=byte", f"--data_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"train {train_bytes:,} tokens" in proc.stdout and not proc.stderr
    cfg = make_config(dataset=str(tmp_path / "a.txt"), tokenizer="byte", data_dir=str(tmp_path / "cache"))
    assert len(load_data(cfg).train) == train_bytes


@pytest.mark.slow
def test_a_prepare_killed_mid_way_is_redone_never_used(tmp_path):
    rng = np.random.default_rng(1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt.gz").write_bytes(gzip.compress(text_of(rng, 60_000).encode(), 1))
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "gpt_jax.prepare", f"--dataset={corpus}", "--tokenizer=byte",
            f"--data_dir={cache}", "--num_proc=2"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not list((cache / "tokens").glob(".tmp-*/scratch/*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not [p for p in (cache / "tokens").iterdir() if not p.name.startswith(".")]  # nothing published
    cfg = make_config(dataset=str(corpus), tokenizer="byte", data_dir=str(cache))
    redone = load_data(cfg)
    fresh = load_data(dataclasses.replace(cfg, data_dir=str(tmp_path / "fresh"), num_proc=1))
    assert np.array_equal(redone.train, fresh.train) and np.array_equal(redone.val, fresh.val)
    assert not list((cache / "tokens").glob(".tmp-*"))  # the dead writer's folder was removed


def test_batches_read_from_a_large_token_file_do_not_grow_resident_memory(tmp_path):
    from gpt_jax.data import random_windows

    path = tmp_path / "train.bin"
    (np.arange(100_000_000) % 60_000).astype(np.uint16).tofile(path)  # 200 MB
    tokens = np.memmap(path, dtype=np.uint16, mode="r")

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    random_windows(tokens, 0, 0, 64, 256, 0)
    before = resident_mb()
    for step in range(3000):  # would touch most of the file's 49,000 pages through the mapping
        random_windows(tokens, step, 0, 64, 256, 0)
    assert resident_mb() - before < 20


def test_random_windows_read_a_file_as_they_index_an_array(tmp_path):
    from gpt_jax.data import random_windows

    ids = np.random.default_rng(0).integers(0, 60000, 10_000).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    mapped = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    for step in range(5):
        a, b = random_windows(mapped, step, 3, 8, 32, 1), random_windows(ids, step, 3, 8, 32, 1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[0].dtype == np.int32


def test_a_char_vocabulary_comes_from_every_document(every_kind, tmp_path):
    folder, docs = every_kind
    data = load_data(make_config(dataset=str(folder), data_dir=str(tmp_path), num_proc=1))
    assert isinstance(data.tokenizer, CharTokenizer)
    assert data.tokenizer.chars == "".join(sorted(set("".join(normalize_text(t) for _, t in docs))))


def test_the_command_line_says_when_the_corpus_was_ready_and_what_a_data_path_argument_means(tmp_path):
    (tmp_path / "a.txt").write_text("Bir varmış, bir yokmuş.\n" * 50)
    args = [sys.executable, "-m", "gpt_jax.prepare", f"--dataset={tmp_path / 'a.txt'}", "--tokenizer=byte",
            f"--data_dir={tmp_path / 'cache'}"]
    first, second = (subprocess.run(args, capture_output=True, text=True, timeout=120) for _ in range(2))
    assert "prepared in" in first.stdout and "already prepared" in second.stdout
    wrong = subprocess.run([*args[:3], str(tmp_path / "a.txt")], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and f"did you mean --dataset={tmp_path / 'a.txt'}?" in wrong.stderr


def test_a_bpe_smaller_than_asked_says_so(tmp_path):
    (tmp_path / "a.txt").write_text("ab ab ab\n" * 100)
    with pytest.warns(UserWarning, match=r"the BPE has \d+ tokens, not the 4,096 asked for"):
        load_data(make_config(dataset=str(tmp_path / "a.txt"), tokenizer="bpe", data_dir=str(tmp_path)))


def test_windows_line_ends_and_text_without_ascii_are_cut_cleanly(tmp_path, monkeypatch):
    """CRLF lines and CJK lines are cut between lines; a piece with no place to cut at all is cut at a
    character boundary, never inside a character."""
    monkeypatch.setattr(prepare, "_PIECE_BYTES", 64)
    monkeypatch.setattr(prepare, "_MAX_PIECE_BYTES", 256)
    bpe = _small_bpe()
    tokyo = "東京は日本の首都です。"
    for text in ("ab ab.\r\nabab 's\r\n" * 40, f"{tokyo}\n" * 40, tokyo * 40):
        raw = text.encode()
        pieces = list(prepare._pieces(io.BufferedReader(io.BytesIO(raw), 64), "t.txt", first=True))
        assert len(pieces) > 5 and "".join(pieces) == normalize_text(text)
        assert max(len(p.encode()) for p in pieces) <= 256 + 64
        if "\n" in text:
            whole = bpe.encode(normalize_text(text))
            assert np.array_equal(np.concatenate([bpe.encode(p) for p in pieces]), whole)


def test_a_bare_xz_or_gz_is_sniffed_as_an_archive_even_when_its_first_stream_is_short():
    archive = tar_bytes({"a.txt": b"the text of a\n"})
    for compression, compress in (("xz", lzma.compress), ("gz", gzip.compress)):
        raw = compress(archive[:100]) + compress(archive[100:])
        kind, stream = prepare._sniffed(prepare._decompressed(io.BytesIO(raw), compression))
        assert kind == "tar" and stream.read() == archive
        assert prepare._sniffed(io.BytesIO(b"plain text"))[0] == "txt"
