# MLA (latents 512/256, as the paper's runs) Medium (353M): the paper's recipe, global batch 480 x 1024 tokens (paper: 20 x 3 x 8 GPUs. LR as in the configs; App. H.1 says 3e-4 / 6e-5 (docs/DESIGN.md sec. 5)).
# Heads come from model.SIZES (parameter-matched); --attn=<other> sweeps a variant.
size, attn = "medium", "mla"
batch_size, gradient_accumulation_steps = 20, 24
learning_rate, min_lr = 6e-4, 3e-5
