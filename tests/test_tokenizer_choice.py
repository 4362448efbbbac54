"""--tokenizer=char|byte|bpe|gpt2 end to end: a prepared folder of compressed documents tokenised with
each kind trains, checkpoints, resumes exactly and samples; the kind is part of the token cache's key
and of the checkpoint."""

import base64
import dataclasses
import gzip
import json

import jax
import numpy as np
import pytest

from gpt_jax import generate, load_checkpoint, load_data, make_config, train
from gpt_jax.errors import IncompatibleCheckpointError

TEXT = """Öğretmen İpek sınıfa girdi: "Günaydın çocuklar!" dedi. Çocuklar ayağa kalktı.
The teacher smiled, and the children sat down again; outside, the wind moved the trees.
Şu dağın ardında ılık bir göl var; çoban ağır ağır şarkı söylüyor. Işık, gölün üstünde titriyor.
"""


def write_small_gpt2_encoding(path):
    """A tiktoken ranks file (base64 token, rank per line): the 256 bytes and a few merges, so the gpt2
    code path runs without GPT-2's 50,257-token file (which needs a download)."""
    tokens = [bytes([i]) for i in range(256)] + [b"th", b"he", b"in", b" t", b"er"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "documents").mkdir()
    for i in range(24):
        (folder / "documents" / f"{i:02d}.txt.gz").write_bytes(gzip.compress(TEXT.encode()))
    lines = "".join(json.dumps({"text": TEXT}) + "\n" for _ in range(16))
    (folder / "documents" / "more.jsonl").write_text(lines, encoding="utf-8")
    write_small_gpt2_encoding(folder / "small.tiktoken")
    return folder


def config(kind, corpus, out_dir, **overrides):
    extra = {"bpe": {"vocab_size": 300}, "gpt2": {"encoding_file": str(corpus / "small.tiktoken")}}
    values = dict(dataset=str(corpus / "documents"), tokenizer=kind, data_dir=str(corpus / "data"),
                  out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                  max_iters=10, lr_decay_iters=10, warmup_iters=1, eval_interval=5, eval_iters=1,
                  log_interval=5, progress=False, dropout=0.0, always_save_checkpoint=True)
    return make_config(**{**values, **extra.get(kind, {}), **overrides})


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
def test_each_tokenizer_trains_resumes_exactly_and_samples(kind, corpus, tmp_path):
    train(config(kind, corpus, tmp_path / "halves", max_iters=5))
    resumed = train(config(kind, corpus, tmp_path / "halves", init_from="resume"))
    if kind == "bpe":  # resuming is tokenizer-agnostic past the token files: one bitwise check suffices
        straight = train(config(kind, corpus, tmp_path / "straight"))
        for a, b in zip(jax.tree_util.tree_leaves(straight.state), jax.tree_util.tree_leaves(resumed.state),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(resumed.state.step) == 10

    params, cfg, tok, meta = load_checkpoint(tmp_path / "halves")
    assert tok.kind == kind == cfg.tokenizer == meta["tokenizer"]["kind"]
    assert cfg.vocab_size == tok.vocab_size and tok.eot_id is not None
    assert tok.decode(tok.encode("Öğretmen İpek, ışık!")) == "Öğretmen İpek, ışık!"
    out = generate(params, cfg, tok.encode("Öğretmen"), jax.random.PRNGKey(0), max_new_tokens=24)
    assert out.tokens[0].shape == (24,) and isinstance(tok.decode(out.tokens[0]), str)


def test_the_tokenizer_is_part_of_the_cache_key_and_of_the_model(corpus, tmp_path):
    char, byte = (load_data(config(kind, corpus, tmp_path)) for kind in ("char", "byte"))
    assert char.tokenizer.kind == "char" and byte.tokenizer.kind == "byte"
    assert len(byte.train) > len(char.train)  # Turkish letters are two UTF-8 bytes
    train(config("char", corpus, tmp_path / "run", max_iters=5))
    with pytest.raises(IncompatibleCheckpointError, match="tokenizer 'char' -> 'byte'"):
        train(config("byte", corpus, tmp_path / "run", init_from="resume"))


def test_sample_cli_streams_multibyte_characters_whole_and_skips_unknown_characters(corpus, tmp_path, capsys):
    from conftest import load_script

    sample = load_script("sample.py")
    out = tmp_path / "run"
    train(config("byte", corpus, out, max_iters=20, lr_decay_iters=20, learning_rate=1e-2))
    capsys.readouterr()
    assert sample.main([f"--out_dir={out}", "--start=Öğ", "--max_new_tokens=40", "--stream", "--seed=3"]) == 0
    assert capsys.readouterr().out.startswith("Öğ")

    train(config("char", corpus, tmp_path / "char", max_iters=5))
    for unknown, expected in (("skip", "Öğretmen"), ("replace", "Öğretmen ")):
        capsys.readouterr()
        assert sample.main([f"--out_dir={tmp_path / 'char'}", "--start=Öğretmen€", "--max_new_tokens=5",
                            f"--unknown={unknown}"]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(expected) and printed[len(expected):len(expected) + 1] != "€"


def test_streamed_bytes_print_whole_characters():
    sample = pytest.importorskip("conftest").load_script("sample.py")
    from gpt_jax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    printer = sample.StreamPrinter(tok, stops=[])
    written = []
    printer._write = written.append
    for byte in "ğİ a".encode():
        printer.on_token(0, np.array([byte]), np.array([False]))
    assert "".join(written) == "ğİ a" and "\ufffd" not in "".join(written)


def test_a_gpt2_model_pads_its_embedding_to_a_multiple_of_64_and_outputs_the_vocabulary(corpus):
    import jax

    from gpt_jax.model import init_params, logits_fn, padded_vocab_size
    from gpt_jax.training import setup_data

    cfg, data = setup_data(config("gpt2", corpus, corpus))
    V = data.tokenizer.vocab_size
    assert cfg.vocab_size == V and V % 64 and padded_vocab_size(cfg) == -(-V // 64) * 64
    assert padded_vocab_size(dataclasses.replace(cfg, vocab_size=50257)) == 50304  # nanoGPT's
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert params["wte"].shape == (padded_vocab_size(cfg), cfg.n_embd)
    assert logits_fn(params, cfg, data.val[None, :8].astype("int32")).shape == (1, 8, V)
    assert padded_vocab_size(dataclasses.replace(cfg, tokenizer="byte")) == V


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_token_bytes_add_up_to_the_texts_utf8_bytes(kind, corpus):
    tok = load_data(config(kind, corpus, corpus)).tokenizer
    text = "Öğretmen İpek: ışık, the wind.\n"
    assert tok.token_bytes().shape == (tok.vocab_size,)
    assert tok.token_bytes()[tok.encode(text)].sum() == len(text.encode())


def test_every_evaluation_logs_the_validation_loss_in_bits_per_byte(corpus, tmp_path):
    import math

    cfg = config("char", corpus, tmp_path / "run", max_iters=5)
    result = train(cfg)
    data = load_data(cfg)
    ys = data.eval_batches("val", cfg.seed, cfg.batch_size, cfg.block_size, cfg.eval_iters)[1]
    bytes_per_token = len(data.tokenizer.decode(ys.reshape(-1)).encode()) / ys.size  # by hand
    assert bytes_per_token > 1  # Turkish letters: a char is not a byte
    evaluations = [r for r in result.history if "val_loss" in r]
    assert len(evaluations) == 2
    for r in evaluations:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / (math.log(2) * bytes_per_token), rel=1e-6)
