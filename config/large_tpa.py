# T6 (TPA) Large (773M): the paper's recipe, global batch 480 x 1024 tokens (paper: 15 x 4 x 8 GPUs).
# Heads come from model.SIZES (parameter-matched); --attn=<other> sweeps a variant.
size, attn = "large", "tpa"
batch_size, gradient_accumulation_steps = 15, 32
learning_rate, min_lr = 2e-4, 1e-5
