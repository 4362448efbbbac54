"""The course's first model: a bigram table of next-character logits on Tiny Shakespeare."""
model = "bigram"
dataset = "tiny_shakespeare"
out_dir = "out-bigram"

block_size = 8
batch_size = 32
dropout = 0.0

learning_rate = 1e-2
min_lr = 1e-3
max_iters = 3000
warmup_iters = 0
weight_decay = 0.0
beta2 = 0.99
eval_interval = 300
eval_iters = 100
log_interval = 50
