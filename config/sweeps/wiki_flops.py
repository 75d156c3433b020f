# The one-GPU comparison at equal training FLOPs: each of the six variants of config/sweeps/wiki_lr.py at its best
# learning rate there (best_from), over two seeds, trained for the FLOPs MHA spends on 20M tokens (798M
# FLOPs per token at Small and T = 1024, GPT.flops_per_token in model.py): a variant that costs more per token (T6:
# 908M) trains fewer tokens, one that costs less trains more, and each cosine ends with its budget, so the report
# compares finished runs. Run it after wiki_lr.py:
#   python -m scripts.sweep config/sweeps/wiki_flops.py
#   python -m scripts.compare out/sweep_wiki_lr out/sweep_wiki_flops out/sweep_wiki_time --out=report_wiki
exec(open("config/sweeps/wiki_time.py").read())  # the six variants at their best LR, two seeds; the recipe and data
time_of = ""
max_flops = 611 * 32768 * 798_087_168  # MHA's 611 steps of 32,768 tokens (20M) at 798,087,168 FLOPs per token:
# its runs here are then its token-budget runs, which reuse_from copies instead of training them again
out_root = "out/sweep_wiki_flops"
