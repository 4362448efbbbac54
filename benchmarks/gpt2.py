"""GPT-2 124M from a Hugging Face folder: import time, and sample.py's tokens/s at batch 1 and 10.

    python benchmarks/gpt2.py [--folder=DIR] [--max_new_tokens=200] [--batch_sizes=1,10] [--repeats=3]

Without ``--folder`` a GPT-2 124M of random weights is written first (config.json, model.safetensors
with every GPT-2 array at its real shape, and a synthetic byte-level vocabulary of GPT-2's size, 50,257
ids; speed depends on none of the values). Import: ``gpt_jax.load_pretrained(folder)`` in this process
after a first call (files in the page cache, modules imported), median of ``--repeats``. Sampling:
``python sample.py --init_from=FOLDER`` run as a user runs it (its own report of tokens/s, compile
excluded). Where transformers and torch are installed, the same model loaded and sampled by them
(``from_pretrained``, ``generate`` with a KV cache) is measured beside it, interleaved, as a reference.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt_jax import hf  # noqa: E402
from gpt_jax.tokenizer import EOT, byte_level_alphabet  # noqa: E402

N_LAYER, N_HEAD, N_EMBD, N_POSITIONS, VOCAB = 12, 12, 768, 1024, 50257


def write_random_gpt2(folder: Path) -> None:
    """GPT-2 124M's arrays at their shapes (N(0, 0.02) weights), its config, and a vocabulary of its size
    whose every token is a merge of two earlier ones."""
    rng = np.random.default_rng(0)
    D = N_EMBD
    shapes = {"wte.weight": (VOCAB, D), "wpe.weight": (N_POSITIONS, D), "ln_f.weight": (D,),
              "ln_f.bias": (D,)}
    for i in range(N_LAYER):
        for name, shape in {"ln_1": (D,), "ln_2": (D,), "attn.c_attn": (D, 3 * D), "attn.c_proj": (D, D),
                            "mlp.c_fc": (D, 4 * D), "mlp.c_proj": (4 * D, D)}.items():
            shapes[f"h.{i}.{name}.weight"] = shape
            shapes[f"h.{i}.{name}.bias"] = (shape[-1],)
    weights = {f"transformer.{k}": (rng.standard_normal(s, dtype=np.float32) * 0.02
                                    + (1.0 if k.endswith("weight") and len(s) == 1 else 0.0))
               for k, s in shapes.items()}
    folder.mkdir(parents=True)
    from safetensors.numpy import save_file

    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": N_LAYER,
              "n_head": N_HEAD, "n_embd": D, "n_positions": N_POSITIONS, "vocab_size": VOCAB,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": VOCAB - 1,
              "eos_token_id": VOCAB - 1}
    (folder / "config.json").write_text(json.dumps(config))
    tokens = list(byte_level_alphabet())
    known, merges = set(tokens), []
    while len(tokens) < VOCAB - 1:
        a, b = tokens[rng.integers(len(tokens))], tokens[rng.integers(min(len(tokens), 2000))]
        if a + b not in known and len(a + b) <= 12:
            tokens.append(a + b)
            known.add(a + b)
            merges.append(f"{a} {b}")
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab[EOT] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def time_import(folder: Path, repeats: int) -> float:
    import jax

    hf.load_pretrained(str(folder))  # modules imported, files cached
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, _, _ = hf.load_pretrained(str(folder))
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def sample_rate(folder: Path, batch: int, n: int) -> tuple[float, float]:
    """(tokens/s, compile s) as sample.py reports them."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--init_from={folder}", "--start=The",
         f"--num_samples={batch}", f"--max_new_tokens={n}", "--no-stream", "--seed=1"],
        capture_output=True, text=True, check=True)
    match = re.search(r"\(([\d,]+) tokens/s; compile ([\d.]+) s excluded\)", result.stderr)
    return float(match.group(1).replace(",", "")), float(match.group(2))


def reference(folder: Path, batch: int, n: int) -> tuple[float, float] | None:
    """(from_pretrained s, generate tokens/s) of transformers on the same folder, or None without it."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    load_s = time.perf_counter() - t0
    prompt = torch.full((batch, 1), 464, dtype=torch.long)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=True, pad_token_id=VOCAB - 1)  # warm up
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0,
                       pad_token_id=VOCAB - 1)
    return load_s, batch * n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="a GPT-2 model folder (default: a random 124M one)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--batch_sizes", default="1,10")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "gpt2-random"
        if not args.folder:
            t0 = time.perf_counter()
            write_random_gpt2(folder)
            print(f"wrote a random GPT-2 124M to {folder} in {time.perf_counter() - t0:.1f} s")
        size = (folder / "model.safetensors").stat().st_size if (folder / "model.safetensors").exists() else 0
        print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
              f"model.safetensors {size / 2**20:.0f} MiB")
        seconds = time_import(folder, args.repeats)
        ref = reference(folder, 1, 8)
        ref_load = f"; transformers from_pretrained {ref[0]:.2f} s" if ref else ""
        print(f"import (load_pretrained, median of {args.repeats}): {seconds:.2f} s{ref_load}")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            ours, theirs = [], []
            for _ in range(args.repeats):  # interleaved with the reference
                ours.append(sample_rate(folder, batch, args.max_new_tokens))
                ref = reference(folder, batch, args.max_new_tokens)
                if ref:
                    theirs.append(ref[1])
            rate = statistics.median(r for r, _ in ours)
            compile_s = statistics.median(c for _, c in ours)
            line = (f"sample.py --init_from, batch {batch}: {rate:,.0f} tokens/s (compile {compile_s:.1f} s "
                    "excluded)")
            if theirs:
                ref_rate = statistics.median(theirs)
                line += f"; transformers generate {ref_rate:,.0f} tokens/s; ratio {rate / ref_rate:.2f}"
            print(line)
    print("reproduce: python benchmarks/gpt2.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
