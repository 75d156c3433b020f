# The one-GPU comparison at equal training time: each of the six variants of config/sweeps/wiki_lr.py at its
# best learning rate there (best_from), trained for the time MHA takes for 20M tokens on this GPU. A 30-step
# calibration per variant measures its tokens/s on this machine first (kept in out_root/calibration.json and
# reused on resume), so each run's cosine ends when its time is up, and the report compares finished runs. Run it
# on the GPU kind that ran wiki_lr.py, after that sweep has finished:
#   python -m scripts.sweep config/sweeps/wiki_time.py
#   python -m scripts.compare out/sweep_wiki_lr out/sweep_wiki_time --out=report_wiki   # both budgets, one report
exec(open("config/sweeps/wiki_lr.py").read())  # the same recipe and data
variants = [dict(name=a, attn=a) for a in ("mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa")]  # not the two T6 controls
best_from = "out/sweep_wiki_lr"
grid = {}
best_seeds = []
seeds = [1337, 1338]
max_tokens = 0
time_of = "mha:20000000"
out_root = "out/sweep_wiki_time"
