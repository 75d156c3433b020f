# Quick start: a tiny T6 on tiny Shakespeare (python data/prepare.py shakespeare first).
# A few minutes on a laptop CPU, seconds on a GPU; then: python sample.py --out_dir=out/quickstart
out_dir = "out/quickstart"
data_dir = "data/shakespeare"
size, attn = "tiny", "tpa"
n_layer, n_embd, n_head, head_dim = 4, 128, 4, 32
block_size, batch_size, gradient_accumulation_steps = 128, 16, 1
learning_rate, min_lr = 2e-3, 2e-4
max_iters, lr_decay_iters, warmup_iters = 600, 600, 50
eval_interval, log_interval, eval_tokens = 200, 20, 32768
compile = False
