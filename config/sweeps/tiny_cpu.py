# The sweep machinery on a CPU in about a minute: 2 variants x 2 seeds of a tiny model on tiny Shakespeare
# (python data/prepare.py shakespeare first). It shows how a sweep, its resume and its report work; the
# numbers say nothing about the mechanisms (see wiki_lr.py and small_fineweb.py for that). The tests run it.
base = "config/quickstart.py"
variants = [dict(name="mha", attn="mha"), dict(name="tpa", attn="tpa")]
seeds = [1, 2]
max_iters = 40
train = dict(n_layer=2, n_embd=64, n_head=2, head_dim=32, block_size=32, batch_size=4, warmup_iters=4,
             learning_rate=3e-3, min_lr=3e-4, eval_interval=10, log_interval=5, eval_tokens=2048, device="cpu")
out_root = "out/sweep_tiny"
