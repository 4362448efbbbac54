"""GPT-2 / Hugging Face weights in and out (gpt_jax.hf), proven against the reference implementation:
transformers' GPT2LMHeadModel on PyTorch builds a small random GPT-2 here (nothing is downloaded); its
logits and ours agree, our exports load in transformers with our logits, import -> export is bitwise."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import ROOT, TINY
from gpt_jax import hf
from gpt_jax.config import Config, make_config
from gpt_jax.errors import ConfigError, GptJaxError
from gpt_jax.model import init_params, logits_fn
from gpt_jax.sampling import generate

TOLERANCE = 1e-4  # float32 logits of a 2-layer model, PyTorch vs XLA
# Merges as BPE training makes them: each token is what merging its word gives (" the" -> Ġt, he -> Ġthe).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("t", "h"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "u"),
          ("Ġ", "a"), ("Ġ", "s")]
VOCAB_SIZE = 256 + len(MERGES) + 1  # bytes, merges, <|endoftext|>


def write_gpt2_tokenizer_files(folder: Path) -> None:
    """A small GPT-2-style tokenizer (vocab.json, merges.txt), spelled with transformers' own byte
    alphabet: the 256 bytes, ten merges, end-of-text last."""
    alphabet = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))


def reference_model(n_positions: int = 64, tie: bool = True, seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB_SIZE,
                                     n_positions=n_positions, bos_token_id=VOCAB_SIZE - 1,
                                     eos_token_id=VOCAB_SIZE - 1, tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms are 0 and 1 at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> tuple[Path, transformers.GPT2LMHeadModel]:
    folder = tmp_path_factory.mktemp("hf") / "small-gpt2"
    model = reference_model()
    model.save_pretrained(folder)
    write_gpt2_tokenizer_files(folder)
    return folder, model


def torch_logits(model, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.numpy()


def random_tokens(shape, vocab_size=VOCAB_SIZE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape).astype(np.int32)


def test_imported_gpt2_gives_the_reference_logits(gpt2_folder):
    folder, model = gpt2_folder
    params, cfg, tokenizer = hf.load_pretrained(str(folder))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 64, 64, VOCAB_SIZE)
    assert cfg.bias and cfg.tie_embeddings and cfg.pos_encoding == "learned" and cfg.norm_position == "pre"
    assert tokenizer.kind == "gpt2" and tokenizer.eot_id == VOCAB_SIZE - 1
    tokens = random_tokens((2, 64))
    ours = np.asarray(logits_fn(params, cfg, tokens))
    assert ours.shape == (2, 64, VOCAB_SIZE)
    np.testing.assert_allclose(ours, torch_logits(model, tokens), atol=TOLERANCE, rtol=0)
    # The same weights in the scanned layout (as training lays them out with scan_layers), and with a
    # shorter context (the position table cropped).
    scanned = dataclasses.replace(cfg, scan_layers=True)
    np.testing.assert_allclose(np.asarray(logits_fn(hf.pretrained_params(scanned), scanned, tokens)), ours,
                               atol=1e-5, rtol=0)
    short_params, short, _ = hf.load_pretrained(str(folder), block_size=16)
    assert short_params["wpe"].shape == (16, 64)
    np.testing.assert_allclose(np.asarray(logits_fn(short_params, short, tokens[:, :16])),
                               torch_logits(model, tokens[:, :16]), atol=TOLERANCE, rtol=0)


def test_the_gpt2_tokenizer_of_a_model_folder_encodes_as_transformers(gpt2_folder):
    folder, _ = gpt2_folder
    _, _, tokenizer = hf.load_pretrained(str(folder))
    reference = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = "the other thing in there: an outer sound, then sand and the end\n  ünïcode ∑"
    assert tokenizer.encode(text).tolist() == reference.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_pytorch_bin_files_are_read_without_pytorch_exactly(gpt2_folder, tmp_path):
    folder, model = gpt2_folder
    state = model.state_dict()  # lm_head.weight shares wte's storage
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    odd = {"transposed": base.T, "offset_view": base[1:, 2:], "bf16": base.to(torch.bfloat16),
           "ints": torch.arange(5), "half": base.half()}
    torch.save({**state, **odd}, tmp_path / "mixed.bin")
    read = hf.read_torch_file(tmp_path / "mixed.bin")
    for name, tensor in {**state, **odd}.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = read[name].astype(np.float32) if name == "bf16" else read[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype or name == "bf16"
        np.testing.assert_array_equal(got, expected)

    bin_folder = tmp_path / "bin-model"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder)
    write_gpt2_tokenizer_files(bin_folder)
    torch.save(state, bin_folder / "pytorch_model.bin")
    from_bin, _, _ = hf.load_pretrained(str(bin_folder))
    from_safetensors, _, _ = hf.load_pretrained(str(folder))
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, from_safetensors)

    # A file that would run code when unpickled (here: make a folder) is refused, and nothing runs.
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(folder / "config.json", evil)
    with zipfile.ZipFile(evil / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_RunsCode(str(marker)), protocol=2))
    with pytest.raises(ConfigError, match="cannot read the weights .*posix.mkdir is not part of a saved"):
        hf.read_weights(evil)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_import_then_export_round_trips_the_weights_and_tokenizer_bitwise(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    params, cfg, tokenizer = hf.load_pretrained(str(folder))
    dest = hf.save_pretrained(params, cfg, tokenizer, tmp_path / "exported")
    original, exported = load_file(folder / "model.safetensors"), load_file(dest / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name in original:
        assert original[name].dtype == exported[name].dtype
        assert original[name].tobytes() == exported[name].tobytes(), name
    assert json.loads((dest / "vocab.json").read_text()) == json.loads((folder / "vocab.json").read_text())
    assert merge_lines(dest / "merges.txt") == merge_lines(folder / "merges.txt")
    reloaded = transformers.AutoTokenizer.from_pretrained(dest)
    text = "then the outer sands sang: in there"
    assert reloaded.encode(text) == tokenizer.encode(text).tolist()


def test_an_untied_gpt_jax_model_with_the_gpt2_tokenizer_exports_with_our_logits(tmp_path):
    cfg = make_config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB_SIZE,
                      tokenizer="gpt2", bias=True, tie_embeddings=False, dropout=0.0)
    params = _perturbed(init_params(cfg, jax.random.PRNGKey(3)))
    assert params["lm_head"]["kernel"].shape == (32, 320)  # padded to a multiple of 64
    tokenizer = _small_gpt2_tokenizer(tmp_path)
    dest = hf.save_pretrained(params, cfg, tokenizer, tmp_path / "out")
    model = transformers.GPT2LMHeadModel.from_pretrained(dest).eval()
    tokens = random_tokens((2, 32), seed=1)
    np.testing.assert_allclose(torch_logits(model, tokens), np.asarray(logits_fn(params, cfg, tokens)),
                               atol=TOLERANCE, rtol=0)
    back, back_cfg, _ = hf.load_pretrained(str(dest))  # the same model (the padding rows are zeros)
    assert not back_cfg.tie_embeddings
    for name, array in hf.weights_from_params(params, cfg).items():
        np.testing.assert_array_equal(hf.weights_from_params(back, back_cfg)[name], array)


def merge_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def _perturbed(params):
    """Init params with random biases and norm offsets, so each is seen by the comparison."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


def _small_gpt2_tokenizer(tmp_path):
    from gpt_jax.tokenizer import Gpt2Tokenizer

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    write_gpt2_tokenizer_files(folder)
    return Gpt2Tokenizer.load(folder / "vocab.json")


def test_trained_gpt_jax_run_exports_from_the_command_line(tiny_cfg, tmp_path, capsys):
    """A tiny char model trained a few steps (no biases): export writes a folder transformers loads with
    our logits and greedy continuation, which load_pretrained reads back; and an .npz of the params."""
    from gpt_jax import export
    from gpt_jax.checkpoint import load_checkpoint
    from gpt_jax.training import train

    cfg = make_config(**{**tiny_cfg.to_dict(), "max_iters": 4, "eval_interval": 4,
                         "always_save_checkpoint": True})
    train(cfg)
    assert export.main([f"--out_dir={cfg.out_dir}", f"--to={tmp_path / 'hf'}"]) == 0
    params, cfg, tokenizer, _ = load_checkpoint(cfg.out_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = random_tokens((2, cfg.block_size), cfg.vocab_size, seed=2)
    np.testing.assert_allclose(torch_logits(model, tokens), np.asarray(logits_fn(params, cfg, tokens)),
                               atol=TOLERANCE, rtol=0)
    prompt = tokens[0, :5]
    ours = generate(params, cfg, prompt, jax.random.PRNGKey(0), max_new_tokens=12, temperature=0.0)
    with torch.no_grad():
        theirs = model.generate(torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=12,
                                min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert theirs[0, 5:].tolist() == ours.tokens[0].tolist()  # the same greedy continuation
    back, back_cfg, back_tokenizer = hf.load_pretrained(str(tmp_path / "hf"))
    assert back_tokenizer == tokenizer and back_cfg.vocab_size == cfg.vocab_size
    np.testing.assert_allclose(np.asarray(logits_fn(back, back_cfg, tokens)),
                               np.asarray(logits_fn(params, cfg, tokens)), atol=TOLERANCE, rtol=0)

    assert export.main([f"--out_dir={cfg.out_dir}", f"--to={tmp_path / 'p.npz'}", "--format=npz"]) == 0
    with np.load(tmp_path / "p.npz") as arrays:
        np.testing.assert_array_equal(arrays["h_1/attn/c_attn/kernel"],
                                      params["h_1"]["attn"]["c_attn"]["kernel"])
        assert len(arrays.files) == len(jax.tree_util.tree_leaves(params))
    with pytest.raises(ConfigError, match="already exists"):
        export.main([f"--out_dir={cfg.out_dir}", f"--to={tmp_path / 'hf'}"])
    assert "wrote a Hugging Face GPT-2 model folder" in capsys.readouterr().err


def test_models_without_a_gpt2_form_are_refused_with_every_reason(tmp_path):
    cfg = make_config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40, norm_position="post",
                      pos_encoding="sinusoidal")
    params = init_params(cfg, jax.random.PRNGKey(0))
    from gpt_jax.tokenizer import ByteTokenizer

    with pytest.raises(ConfigError, match="norm_position=post.*;.*pos_encoding|pos_encoding=sinusoidal.*"
                                          "norm_position=post"):
        hf.save_pretrained(params, cfg, ByteTokenizer(), tmp_path / "refused")
    assert not any(tmp_path.iterdir())
    assert hf.save_pretrained(params, cfg, ByteTokenizer(), tmp_path / "ok.npz", format="npz").is_file()


def test_pretrained_weights_fix_the_architecture(gpt2_folder):
    folder, _ = gpt2_folder
    with pytest.raises(ConfigError, match="takes n_layer, bias from the pretrained weights"):
        make_config(init_from=str(folder), n_layer=4, bias=False)
    with pytest.raises(ConfigError, match=r"n_embd=48 \(its weights: 64\)"):
        hf.pretrained_config(Config(init_from=str(folder), n_embd=48, n_head=4, block_size=16))
    with pytest.raises(ConfigError, match="block_size=128 is longer than the 64 positions"):
        hf.pretrained_config(make_config(init_from=str(folder), block_size=128))
    cfg = hf.pretrained_config(make_config(init_from=str(folder), block_size=32, dropout=0.1))
    assert (cfg.n_layer, cfg.block_size, cfg.dropout, cfg.tokenizer) == (2, 32, 0.1, "gpt2")
    assert cfg.encoding_file == str(folder / "vocab.json")


def test_configs_our_gpt_cannot_reproduce_are_refused_with_every_reason(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    config = json.loads((odd / "config.json").read_text())
    config.update(activation_function="relu", layer_norm_epsilon=1e-6)
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="activation_function is 'relu'.*; layer_norm_epsilon is 1e-06"):
        hf.load_pretrained(str(odd))


def test_gpt2_names_come_from_the_hugging_face_cache_or_fail_saying_how_to_get_them(gpt2_folder, tmp_path,
                                                                                     monkeypatch):
    folder, model = gpt2_folder
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="gpt2-medium is not in the Hugging Face cache .*snapshot_download"):
        hf.load_pretrained("gpt2-medium")
    with pytest.raises(ConfigError, match="is no folder and no GPT-2 name; give scratch"):
        hf.model_dir(str(tmp_path / "no-such-model"))
    # The cache's layout: models--ORG--NAME/snapshots/REVISION/, refs/main naming the revision.
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    shutil.copytree(folder, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    params, cfg, _ = hf.load_pretrained("gpt2")
    assert cfg.init_from == "gpt2"
    tokens = random_tokens((1, 64), seed=3)
    np.testing.assert_allclose(np.asarray(logits_fn(params, cfg, tokens)), torch_logits(model, tokens),
                               atol=TOLERANCE, rtol=0)
    # The README's example, with this small model standing in for GPT-2.
    readme = (ROOT / "README.md").read_text().split("## GPT-2 and Hugging Face", 1)[1].split("\n## ", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", readme, re.S).group(1), namespace)
    assert namespace["model"].config.n_layer == 2


@pytest.mark.slow
def test_finetune_preset_runs_resumes_exactly_and_samples(gpt2_folder, shakespeare_file, data_dir, tmp_path,
                                                          capsys):
    """configs/finetune_shakespeare.py from the small GPT-2: the first evaluation is the imported model's
    loss; stopping at step 2 and running the same command again gives the uninterrupted run's weights;
    --init_from=resume continues it too."""
    from conftest import load_script
    from gpt_jax.checkpoint import load_checkpoint
    from gpt_jax.data import load_data
    from gpt_jax.training import evaluate, train

    folder, _ = gpt2_folder
    small = dict(init_from=str(folder), source_file=str(shakespeare_file), data_dir=str(data_dir),
                 block_size=32, gradient_accumulation_steps=2, batch_size=2, eval_interval=2, eval_iters=2,
                 max_iters=4, progress=False, always_save_checkpoint=True)
    straight = make_config("finetune_shakespeare", **small, out_dir=str(tmp_path / "straight"))
    result = train(straight)
    pretrained, cfg, _ = hf.load_pretrained(str(folder), block_size=32)
    data = load_data(result.config)
    first = next(r for r in result.history if "val_loss" in r)
    assert first["step"] == 0
    assert first["val_loss"] == pytest.approx(evaluate(pretrained, result.config, data)["val"], abs=1e-5)

    split = dict(small, out_dir=str(tmp_path / "split"))
    train(make_config("finetune_shakespeare", **{**split, "max_iters": 2}))
    train(make_config("finetune_shakespeare", **split))  # the same command again: continues step 2
    a, _, _, _ = load_checkpoint(straight.out_dir)
    b, _, _, _ = load_checkpoint(split["out_dir"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    resumed = train(make_config("finetune_shakespeare", **{**split, "init_from": "resume", "max_iters": 5}))
    assert int(resumed.state.step) == 5 and resumed.config.n_layer == 2  # the weights' model, continued

    sample = load_script("sample.py")
    capsys.readouterr()
    for args in ([f"--out_dir={straight.out_dir}"], [f"--init_from={folder}"]):
        assert sample.main([*args, "--start=the", "--max_new_tokens=8", "--seed=1"]) == 0
        assert capsys.readouterr().out.startswith("the")
    with pytest.raises(ConfigError, match="drop --out_dir"):
        sample.main([f"--init_from={folder}", f"--out_dir={straight.out_dir}"])


def test_hf_config_describes_gpt2():
    cfg = Config(**{**TINY, "vocab_size": 65})
    from gpt_jax.tokenizer import CharTokenizer

    config = hf.hf_config(cfg, CharTokenizer.from_text("abc"))
    reference = transformers.GPT2Config(**config)
    assert (reference.n_layer, reference.n_embd, reference.n_positions) == (cfg.n_layer, cfg.n_embd,
                                                                             cfg.block_size)
    assert reference.activation_function == "gelu_new" and reference.layer_norm_epsilon == 1e-5


def _damaged_copy(folder: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def _edit_weights(edit):
    def damage(copy: Path):
        from safetensors.numpy import save_file

        weights = load_file(copy / "model.safetensors")
        edit(weights)
        save_file(weights, copy / "model.safetensors")
    return damage


def _edit_config(**values):
    def damage(copy: Path):
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **values}))
    return damage


def _set_array(name: str, array_or_cut):
    def edit(weights):
        key = f"transformer.{name}"
        weights[key] = array_or_cut(weights[key]) if callable(array_or_cut) else array_or_cut
    return _edit_weights(edit)


def _replace_in(file: str, old: str, new: str):
    return lambda copy: (copy / file).write_text((copy / file).read_text().replace(old, new))


def _eot_first(copy: Path):
    vocab = json.loads((copy / "vocab.json").read_text())
    others = {k: v + 1 for k, v in vocab.items() if k != "<|endoftext|>"}
    (copy / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, **others}))


def _index_as_a_list(copy: Path):
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors.index.json").write_text("[1, 2]")


DAMAGE = {
    "embedding rows": (_set_array("wte.weight", lambda w: w[:-10]),
                       r"wte.weight has shape \(257, 64\), but config.json's sizes make it \(267, 64\)"),
    "position rows": (_set_array("wpe.weight", np.zeros((100, 64), np.float32)),
                      r"wpe.weight has shape \(100, 64\)"),
    "a 1-D embedding": (_set_array("wte.weight", np.zeros(64, np.float32)), r"wte.weight has shape \(64,\)"),
    "an extra array": (_set_array("h.9.mlp.c_fc.weight", np.zeros(1, np.float32)),
                       "arrays a GPT-2 of 2 layers has not: h.9.mlp.c_fc.weight"),
    "a fractional size": (_edit_config(n_layer=2.7), "n_layer must be a positive integer, got 2.7"),
    "an infinite size": (_replace_in("config.json", '"n_layer": 2', '"n_layer": 1e400'),
                         "n_layer must be a positive integer"),
    "tie as a string": (_edit_config(tie_word_embeddings="false"),
                        "tie_word_embeddings must be true or false"),
    "a list for an index": (_index_as_a_list, "has no weight_map of array names to files"),
    "merges not pairs": (_replace_in("merges.txt", "Ġ t", "Ġ t x"), "is not a merges file"),
    "end-of-text first": (_eot_first, "GPT-2's layout puts it last"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_model_folder_is_refused_in_one_line(gpt2_folder, tmp_path, case):
    folder, _ = gpt2_folder
    damage, message = DAMAGE[case]
    with pytest.raises(GptJaxError, match=message) as error:
        hf.load_pretrained(str(_damaged_copy(folder, tmp_path, damage)))
    assert "\n" not in str(error.value)


def test_a_pytorch_tensor_outside_its_storage_is_refused_before_any_read(gpt2_folder, tmp_path):
    """A crafted file whose tensor claims more elements than its storage holds (reading it would read
    other memory, or crash)."""
    folder, _ = gpt2_folder
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in entries if name.endswith("data.pkl"))
    entries[pkl] = entries[pkl].replace(b"K\x04\x85", b"M\x00\x10\x85")  # size (4,) -> (4096,)
    assert entries[pkl] != zipfile.ZipFile(path).read(pkl)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(ConfigError, match=r"lies outside its storage"):
        hf.read_weights(_folder_with_bin(folder, tmp_path, path))


def _folder_with_bin(folder: Path, tmp_path: Path, weights: Path) -> Path:
    target = tmp_path / "bin-folder"
    target.mkdir()
    shutil.copy(folder / "config.json", target)
    shutil.copy(weights, target / "pytorch_model.bin")
    return target


def test_a_tokenizer_saved_by_transformers_alone_is_read(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    only_json = tmp_path / "only-tokenizer-json"
    shutil.copytree(folder, only_json)
    fast = transformers.GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    fast.backend_tokenizer.save(str(only_json / "tokenizer.json"))
    (only_json / "vocab.json").unlink()
    (only_json / "merges.txt").unlink()
    _, _, tokenizer = hf.load_pretrained(str(only_json))
    _, _, reference = hf.load_pretrained(str(folder))
    assert tokenizer == reference  # the same ranks, wherever they were read from


def test_export_destinations_that_cannot_be_written_are_one_line_errors(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    params, cfg, tokenizer = hf.load_pretrained(str(folder))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write .*a-file/model"):
        hf.save_pretrained(params, cfg, tokenizer, tmp_path / "a-file" / "model")
    with pytest.raises(ConfigError, match="names an .npz file, but the format is hf"):
        hf.save_pretrained(params, cfg, tokenizer, tmp_path / "model.npz", format="hf")
    with pytest.raises(ConfigError, match="the params do not fit the config"):
        hf.save_pretrained(params, dataclasses.replace(cfg, n_layer=1), tokenizer, tmp_path / "one-layer")
    # What an export killed midway left (its process is gone) is removed by the next export there.
    (tmp_path / ".model.tmp-999999999").mkdir()
    dest = hf.save_pretrained(params, cfg, tokenizer, tmp_path / "model")
    assert not (tmp_path / ".model.tmp-999999999").exists()
    assert (dest / "model.safetensors").stat().st_mode == (dest / "config.json").stat().st_mode
    assert hf.save_pretrained(params, cfg, tokenizer, tmp_path / "p.npz").is_file()  # npz by its name
