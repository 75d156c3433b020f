# The paper's Small comparison (124M; the paper reports Small in its downstream Tables 11 and 13): T6 and the five
# baselines with the paper's recipe (config/small_*.py: AdamW 6e-4 -> 3e-5, global batch 480 x 1024, 2000 warmup steps):
#   python data/prepare.py fineweb-edu --version=100B --max_tokens=10_000_000_000 --out_dir=data/fineweb-edu-100B-10B
# Budget: 10B tokens (20,346 steps, a fifth of the paper's 50B; the cosine ends with the budget). At Medium size the
# paper's curves already separate the variants at 9.8B tokens (T6 2.859, MHA 2.900). About an hour per T6 run on
# 8 GPUs at the ~380K tokens/s per GPU measured on an H200 (benchmarks/RESULTS.md), six for the sweep;
# --max_tokens=49_152_000_000 is the paper's full run. One seed; --seeds=[1337,1338] adds the spread.
#   python -m scripts.sweep config/sweeps/small_fineweb.py --nproc=8
base = "config/small_tpa.py"
variants = [dict(name=a, attn=a) for a in ("mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa")]
seeds = [1337]
max_tokens = 10_000_000_000
train = dict(data_dir="data/fineweb-edu-100B-10B", eval_interval=1000, eval_tokens=10 * 2 ** 20)
final_eval_tokens = 100 * 2 ** 20
out_root = "out/sweep_small_fineweb"
