"""Prepare throughput and peak memory on a generated corpus; start-up and training speed on top of it.

    python benchmarks/prepare.py [--work=DIR] [--sizes_mb=256,1024] [--tokenizers=byte,bpe]
                                 [--num_procs=1,2] [--skip_training]

Generates, per size, a folder of text made of Tiny Shakespeare lines in random order (files of about
1 MB: 75 % .txt, 15 % .txt.gz, 5 % .txt.xz, 5 % .jsonl with a document per line), then for each
tokenizer and process count runs ``python -m gpt_jax.prepare`` on a fresh data_dir and prints the
throughput (uncompressed text MiB per second of wall time, start-up included) and the peak resident
memory of the whole process tree (sampled every 50 ms). Then it times a second run's start (a new
process: load_data on the prepared corpus and the first batch), and, unless --skip_training, the
in-loop training speed of a small GPT on the largest corpus against the same on Tiny Shakespeare,
interleaved, three times each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt_jax.prepare import packaged_tiny_shakespeare  # noqa: E402

FILE_BYTES = 1 << 20


def generate(folder: Path, size_mb: int, seed: int = 0) -> int:
    """A corpus of about ``size_mb`` MiB of text in many files; returns its uncompressed bytes."""
    lines = packaged_tiny_shakespeare().read_text(encoding="utf-8").splitlines(keepends=True)
    lines = np.array([line.encode() for line in lines], dtype=object)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    total, i = 0, 0
    while total < size_mb << 20:
        chosen = lines[rng.integers(0, len(lines), FILE_BYTES // 32)]
        text = b"".join(chosen)[:FILE_BYTES]
        kind = rng.random()
        sub = folder / f"part{i // 100:03d}"
        sub.mkdir(exist_ok=True)
        if kind < 0.75:
            (sub / f"{i:05d}.txt").write_bytes(text)
        elif kind < 0.90:
            (sub / f"{i:05d}.txt.gz").write_bytes(gzip.compress(text, 1))
        elif kind < 0.95:
            (sub / f"{i:05d}.txt.xz").write_bytes(lzma.compress(text, preset=0))
        else:
            docs = text.decode("utf-8", "ignore").split("\n\n")
            (sub / f"{i:05d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        total, i = total + len(text), i + 1
    return total


def tree_rss_mb(session: int) -> float:
    """Resident memory of every process in a session, MiB."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) == session:  # field 6, session id
                total += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24, rss in pages
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def run_prepare(corpus: Path, data_dir: Path, tokenizer: str, num_proc: int) -> tuple[float, float, str]:
    """(wall seconds, peak MiB of the process tree, command) of one prepare."""
    command = [sys.executable, "-m", "gpt_jax.prepare", f"--dataset={corpus}", f"--tokenizer={tokenizer}",
               f"--data_dir={data_dir}", f"--num_proc={num_proc}", "--progress=False"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, start_new_session=True, cwd=ROOT, stdout=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"prepare failed: {' '.join(command)}")
    return wall, peak, " ".join(command[1:])


START = """
import sys, time
t0 = time.perf_counter()
from gpt_jax.config import make_config
from gpt_jax.data import load_data
data = load_data(make_config(dataset=sys.argv[1], tokenizer=sys.argv[2], data_dir=sys.argv[3]))
data.get_batch("train", 0, 1337, 64, 256)
print(time.perf_counter() - t0, len(data.train))
"""


def second_start(corpus: Path, data_dir: Path, tokenizer: str) -> tuple[float, float]:
    """(wall seconds of a new process that opens the prepared corpus and draws a batch, of which the
    in-process part)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", START, str(corpus), tokenizer, str(data_dir)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    return time.perf_counter() - t0, float(out[0])


def training_speed(dataset: str, data_dir: Path, out_dir: Path) -> float:
    """Median in-loop tokens/s of 200 steps of shakespeare_char_cpu's GPT with the byte tokenizer."""
    from gpt_jax.config import make_config
    from gpt_jax.training import train

    cfg = make_config("shakespeare_char_cpu", dataset=dataset, tokenizer="byte", data_dir=str(data_dir),
                      out_dir=str(out_dir), max_iters=200, eval_interval=1000, eval_iters=2, log_interval=10,
                      progress=False, always_save_checkpoint=False)
    shutil.rmtree(out_dir, ignore_errors=True)
    result = train(cfg)
    rates = [r["tokens_per_sec"] for r in result.history if r.get("tokens_per_sec") and r["step"] > 20]
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="", help="where to generate (default: a temporary folder)")
    parser.add_argument("--sizes_mb", default="256,1024")
    parser.add_argument("--tokenizers", default="byte,bpe")
    parser.add_argument("--num_procs", default="1,2")
    parser.add_argument("--skip_training", action="store_true")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpt_jax_prepare_"))
    print(f"machine: {os.cpu_count()} cores; work folder {work}")
    print(f"reproduce: python benchmarks/prepare.py --sizes_mb={args.sizes_mb} "
          f"--tokenizers={args.tokenizers} --num_procs={args.num_procs}")
    largest = None
    for size in map(int, args.sizes_mb.split(",")):
        corpus = work / f"corpus_{size}mb"
        if not corpus.exists():
            t0 = time.perf_counter()
            text_bytes = generate(corpus, size)
            (work / f"corpus_{size}mb.bytes").write_text(str(text_bytes))
            files = sum(1 for p in corpus.rglob("*") if p.is_file())
            print(f"generated {corpus}: {text_bytes / 2**20:,.0f} MiB of text in {files:,} files "
                  f"({time.perf_counter() - t0:.0f} s)")
        text_bytes = int((work / f"corpus_{size}mb.bytes").read_text())
        for tokenizer in args.tokenizers.split(","):
            for num_proc in map(int, args.num_procs.split(",")):
                data_dir = work / f"data_{size}_{tokenizer}_{num_proc}"
                shutil.rmtree(data_dir, ignore_errors=True)
                wall, peak, command = run_prepare(corpus, data_dir, tokenizer, num_proc)
                rate = text_bytes / 2**20 / wall
                print(f"{size:>5} MiB  {tokenizer:<5} num_proc={num_proc}: {rate:6.1f} MiB/s ({wall:5.1f} s),"
                      f" peak RSS {peak:6.0f} MiB   [{command}]", flush=True)
            start, inside = second_start(corpus, data_dir, tokenizer)
            print(f"{size:>5} MiB  {tokenizer:<5} second run: load_data + first batch in a new process "
                  f"{start:.2f} s ({inside:.2f} s after imports)", flush=True)
        largest = (corpus, work / f"data_{size}_byte_{args.num_procs.split(',')[-1]}")
    if not args.skip_training and largest is not None:
        corpus, data_dir = largest
        speeds = {"large": [], "shakespeare": []}
        for _ in range(3):
            speeds["large"].append(training_speed(str(corpus), data_dir, work / "out"))
            speeds["shakespeare"].append(training_speed("tiny_shakespeare", work / "data_ts", work / "out"))
        large, small = np.median(speeds["large"]), np.median(speeds["shakespeare"])
        runs = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(*speeds.values(), strict=True))
        print(f"training, tokens/s (median of 3 interleaved runs of 200 steps): {corpus.name} {large:,.0f}, "
              f"tiny_shakespeare {small:,.0f}, ratio {large / small:.3f}  [runs: {runs}]")


if __name__ == "__main__":
    main()
