"""A PyTorch twin of the model and recipe, to measure the baseline on the same machine.

    python benchmarks/torch_reference.py speed   [--steps=100] [--repeats=5]
    python benchmarks/torch_reference.py quality --text=PATH [--seed=1337]

The architecture and training recipe follow nanoGPT's `shakespeare_char` CPU run (pre-norm blocks, no
biases, tied embeddings, exact GELU, AdamW with decay on matrices, warmup + cosine, clipping at 1.0),
written here for comparison. It needs torch, which gpt_jax does not depend on; install it apart.
Quality is reported with the same estimators as benchmarks/quality.py: 20 random validation batches
(nanoGPT's eval_iters) and 1000.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, ITERS, WD, BETAS, CLIP = 1e-3, 1e-4, 100, 2000, 0.1, (0.9, 0.99), 1.0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, D // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, D))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TorchGPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * N_LAYER) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = min((it - WARMUP) / (ITERS - WARMUP), 1.0)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def make(vocab: int):
    model = TorchGPT(vocab)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def step(model, opt, it, x, y):
    for group in opt.param_groups:
        group["lr"] = lr_at(it)
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss


def batch(data: np.ndarray):
    ix = torch.randint(len(data) - BLOCK, (BATCH,))
    x = torch.stack([torch.from_numpy(data[i:i + BLOCK].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
    return x, y


def speed(args) -> None:
    model, opt = make(65)
    x = torch.randint(65, (BATCH, BLOCK))
    y = torch.randint(65, (BATCH, BLOCK))
    for it in range(5):
        step(model, opt, it, x, y)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for it in range(args.steps):
            step(model, opt, it, x, y)
        times.append((time.perf_counter() - t0) / args.steps)
    ms = statistics.median(times) * 1000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {ms:.1f} ms/step "
          f"(repeats: {', '.join(f'{t * 1000:.1f}' for t in times)}), "
          f"{BATCH * BLOCK / (ms / 1000):,.0f} tokens/s")
    print(f"reproduce: python benchmarks/torch_reference.py speed --steps={args.steps} "
          f"--repeats={args.repeats}")


@torch.no_grad()
def estimate(model, data: np.ndarray, n: int) -> float:
    model.eval()
    loss = sum(model(*batch(data)).item() for _ in range(n)) / n
    model.train()
    return loss


def quality(args) -> None:
    torch.manual_seed(args.seed)
    text = open(args.text, encoding="utf-8").read()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    cut = int(0.9 * len(ids))
    train, val = ids[:cut], ids[cut:]
    model, opt = make(len(chars))
    t0 = time.perf_counter()
    for it in range(ITERS):
        step(model, opt, it, *batch(train))
    wall = time.perf_counter() - t0
    print(f"torch reference, seed {args.seed}: {ITERS} steps in {wall:.0f} s; val loss "
          f"{estimate(model, val, 20):.4f} over 20 batches, {estimate(model, val, 1000):.4f} over 1000 "
          f"(train {estimate(model, train, 1000):.4f})")
    print(f"reproduce: python benchmarks/torch_reference.py quality --text={args.text} --seed={args.seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["speed", "quality"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text", default="")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    speed(args) if args.mode == "speed" else quality(args)


if __name__ == "__main__":
    main()
