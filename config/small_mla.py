# MLA (latents 512/256, as the paper's runs) Small (124M): the paper's recipe, global batch 480 x 1024 tokens (paper: 24 x 5 x 4 GPUs; 30 x 16 also divides over 1, 2, 4, 8 GPUs).
# Heads come from model.SIZES (parameter-matched); --attn=<other> sweeps a variant.
size, attn = "small", "mla"
batch_size, gradient_accumulation_steps = 30, 16
learning_rate, min_lr = 6e-4, 3e-5
