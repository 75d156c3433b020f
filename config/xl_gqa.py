# GQA (2 KV heads) XL (1.5B): the paper's recipe, global batch 480 x 1024 tokens (paper: 6 x 10 x 8 GPUs).
# Heads come from model.SIZES (parameter-matched); --attn=<other> sweeps a variant.
size, attn = "xl", "gqa"
batch_size, gradient_accumulation_steps = 6, 80
learning_rate, min_lr = 1e-4, 1e-5
