# float8 against bf16 on the one-GPU budget: Small T6 and MHA with torchao's rowwise float8 GEMMs (train.py
# --float8=True; Ada, Hopper or newer), each at its best learning rate in config/sweeps/wiki_lr.py (best_of) and
# over the same two seeds, so each pairs seed by seed with its bf16 runs there. Run it after wiki_lr.py:
#   python -m scripts.sweep config/sweeps/wiki_float8.py
#   python -m scripts.compare out/sweep_wiki_lr out/sweep_wiki_float8 --reference=tpa --out=report_float8_tpa
#   python -m scripts.compare out/sweep_wiki_lr out/sweep_wiki_float8 --reference=mha --out=report_float8_mha
# The report's interval for tpa_float8 against tpa (mha_float8 against mha) says whether float8's loss is within
# seed noise of bf16's; its tokens/s column what float8 buys at Small (where the GEMMs are small).
exec(open("config/sweeps/wiki_lr.py").read())  # the same recipe and data
best_from = "out/sweep_wiki_lr"
variants = [dict(name="tpa_float8", attn="tpa", float8=True, best_of="tpa"),
            dict(name="mha_float8", attn="mha", float8=True, best_of="mha")]
grid = {}
seeds = [1337, 1338]  # the seeds of wiki_lr.py's best points (seeds, then best_seeds)
best_seeds = []
out_root = "out/sweep_wiki_float8"
