# The one-GPU comparison at equal training time: each of the six variants of config/sweeps/wiki_lr.py at its
# best learning rate there (best_from), trained for the time MHA takes for 20M tokens. Each variant's tokens/s is
# the median of its finished runs in that sweep (calibrate_from: the GPU kind they ran on defines the time; a
# variant with no such runs gets a 30-step calibration run on this machine), kept in out_root/calibration.json and
# reused on resume, so each run's cosine ends when its time is up and the report compares finished runs. Run it
# after wiki_lr.py has finished:
#   python -m scripts.sweep config/sweeps/wiki_time.py
#   python -m scripts.compare out/sweep_wiki_lr out/sweep_wiki_time --out=report_wiki   # both budgets, one report
exec(open("config/sweeps/wiki_lr.py").read())  # the same recipe and data
variants = [dict(name=a, attn=a) for a in ("mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa")]  # not the two T6 controls
best_from = "out/sweep_wiki_lr"
calibrate_from = best_from  # each variant's tokens/s from its finished runs there (same GPU kind), no calibration runs
reuse_from = best_from  # MHA's runs there are its runs here (the same 611 steps): copied, not trained again
grid = {}
best_seeds = []
seeds = [1337, 1338]
max_tokens = 0
time_of = "mha:20000000"
out_root = "out/sweep_wiki_time"
