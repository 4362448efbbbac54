#!/usr/bin/env bash
# The accelerator checks of the scale-out work, in one run (about 6 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh PATH/TO/tinyshakespeare.txt
# 1. fused attention kernels against the XLA reference; 2. step speed of the shakespeare_char preset
# and of GPT-2 124M (bf16, auto attention); 3. wall clock of train.py to val loss <= 1.47.
# Runs from the repository root without installing: it needs jax, flax, optax, orbax-checkpoint, numpy
# and tqdm, not tensorflow-datasets (the text file is read directly with --dataset=PATH, same splits).
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=${1:?usage: bash benchmarks/gpu_check.sh PATH/TO/tinyshakespeare.txt}
python -c "import jax; print(jax.__version__, jax.devices())"
python benchmarks/attention_check.py
python benchmarks/accelerator.py --shape=both --steps=50 --repeats=3
python benchmarks/accelerator.py --shape=shakespeare_char --steps=50 --repeats=3 --attention=xla
out=$(mktemp -d)
python benchmarks/accelerator.py --time_to_loss=1.47 --dataset="$TEXT" --data_dir="$out/data" \
    --out_dir="$out/run"
