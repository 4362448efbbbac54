"""The course's GPT: post-norm blocks, its own output layer (lm_head), constant learning rate AdamW (torch's
defaults), no clipping."""
dataset = "tiny_shakespeare"
out_dir = "out-course-gpt"

n_layer = 4
n_head = 4
n_embd = 384
block_size = 128
batch_size = 32
dropout = 0.2
bias = True
norm_position = "post"
tie_embeddings = False

learning_rate = 3e-4
decay_lr = False
warmup_iters = 0
min_lr = 3e-4
max_iters = 3000
beta2 = 0.999
weight_decay = 0.01
grad_clip = 0.0
eval_interval = 250
eval_iters = 100
log_interval = 10
