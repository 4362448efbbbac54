"""nanoGPT's fine-tuning recipe (config/finetune_shakespeare.py): GPT-2 XL's weights fine-tuned on Tiny
Shakespeare, tokenised with GPT-2's own encoding, at a small constant learning rate for 20 steps.

The architecture and the tokenizer come from the weights (gpt_jax.hf). GPT-2 XL (1.5B parameters)
needs a large accelerator (about 25 GB for its weights, gradients and AdamW state); on a smaller one or
a CPU start from the 124M model: ``python train.py configs/finetune_shakespeare.py --init_from=gpt2``.
Rerunning the same command continues the checkpoints in out_dir.
"""
init_from = "gpt2-xl"
dataset = "tiny_shakespeare"
out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False

block_size = 1024
batch_size = 1
gradient_accumulation_steps = 32
dropout = 0.0

max_iters = 20
learning_rate = 3e-5
decay_lr = False
min_lr = 3e-5
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
