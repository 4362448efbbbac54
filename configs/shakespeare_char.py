"""nanoGPT's GPU recipe for character-level Tiny Shakespeare (config/train_shakespeare_char.py)."""
dataset = "tiny_shakespeare"
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 64
dropout = 0.2
bias = False

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0
