"""Turkish is a first-class language: a Turkish corpus trains, is saved and samples, and its letters
(İ/ı, ç, ğ, ö, ş, ü, in either Unicode form) survive every step."""

import unicodedata

import jax
import numpy as np

from gpt_jax import generate, load_checkpoint, make_config, score_text, train

TEXT = """Küçük İpek, ığdır'dan gelen öğretmenine şöyle sordu: "Işık neden bu kadar hızlı?"
Öğretmen gülümsedi: "Çünkü ışığın yolunda hiçbir şey onu yavaşlatmaz, İpek."
Çocuklar ağaçların gölgesinde oturdu; rüzgâr yaprakları hışırdattı.
Ünlü bir kural: Türkçede hiçbir kelime Ğ harfiyle başlamaz.
Şu dağın ardında, ılık bir gölün kıyısında, yaşlı bir çoban ağır ağır şarkı söylüyordu.
"""


def test_a_turkish_corpus_trains_saves_and_samples_with_its_letters_intact(tmp_path):
    corpus = tmp_path / "masal.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    cfg = make_config(dataset=str(corpus), data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                      n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=40,
                      lr_decay_iters=40, warmup_iters=4, eval_interval=40, eval_iters=2, log_interval=40,
                      learning_rate=1e-2, dropout=0.0, progress=False, always_save_checkpoint=True)
    result = train(cfg, log=lambda msg: None)
    letters = "İıçğöşüÇĞÖŞÜ"
    assert set(letters) <= set(result.tokenizer.chars)

    params, cfg, tok, _ = load_checkpoint(cfg.out_dir)
    assert tok.decode(tok.encode(letters)) == letters
    decomposed = unicodedata.normalize("NFD", "Öğretmen İpek")  # O + ¨, g + ˘, I + ˙
    assert decomposed != "Öğretmen İpek" and tok.decode(tok.encode(decomposed)) == "Öğretmen İpek"

    prompt = tok.encode("Öğretmen")
    out = generate(params, cfg, prompt, jax.random.PRNGKey(0), max_new_tokens=80, temperature=0.8)
    sample = tok.decode(out.tokens[0])
    assert len(sample) == 80 and set(sample) <= set(tok.chars)
    assert np.array_equal(tok.encode(sample), np.asarray(out.tokens[0]))  # decodes and re-encodes exactly
    assert score_text(params, cfg, tok, TEXT).bits_per_char < np.log2(tok.vocab_size)  # it learned
