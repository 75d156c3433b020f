"""
The paper's Table 1 for our configs: parameters and KV cache of every (size, mechanism).

    python -m scripts.model_table                 # markdown, the 24 paper configs
    python -m scripts.model_table --json          # a JSON list of objects
    python -m scripts.model_table --sizes=tiny,small --attns=tpa,mha

Models are built on the meta device, so this takes seconds and no memory. The "paper" columns are
the totals of the official modules with the paper's head counts, for comparison.
"""

import argparse
import json
import os
import sys

import torch

if __package__ in (None, ""):  # run as `python scripts/model_table.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, SIZES, model_config

# total parameters (millions) of the official modules with the paper's head counts
PAPER_PARAMS_M = {
    "small": dict(mha=123.57, mqa=123.57, gqa=123.57, mla=123.09, tpa_kvonly=124.38, tpa=124.34),
    "medium": dict(mha=353.45, mqa=353.45, gqa=353.45, mla=353.86, tpa_kvonly=353.16, tpa=353.99),
    "large": dict(mha=772.13, mqa=772.13, gqa=772.13, mla=773.63, tpa_kvonly=773.05, tpa=773.70),
    "xl": dict(mha=1554.89, mqa=1554.89, gqa=1554.89, mla=1558.37, tpa_kvonly=1559.50, tpa=1555.81),
}
ATTNS = ["mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa"]


def table(sizes, attns, **overrides):
    rows = []
    for size in sizes:
        mha_params = None
        for attn in attns:
            with torch.device("meta"):
                model = GPT(model_config(size, attn, **overrides))
            c = model.config
            kv_layer = model.transformer.h[0].attn.kv_cache_elems_per_token()
            attn_layer = model.attn_params_per_layer()
            if attn == "mha":
                mha_params = attn_layer
            rows.append(dict(
                size=size, variant=attn, n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head,
                n_kv_head=c.n_kv_head if attn in ("mha", "mqa", "gqa") else None, head_dim=c.head_dim,
                params_total=model.num_params(), params_paper=round(PAPER_PARAMS_M.get(size, {}).get(attn, 0) * 1e6) or None,
                attn_params_per_layer=attn_layer,
                attn_params_vs_mha=round(attn_layer / mha_params, 3) if mha_params else None,
                kv_elems_per_token_per_layer=kv_layer,
                kv_bytes_per_token_per_layer=2 * kv_layer,  # bf16
                kv_elems_per_token=model.kv_cache_elems_per_token(),
                kv_bytes_per_token=2 * model.kv_cache_elems_per_token(),
                flops_per_token=model.flops_per_token(),
            ))
    return rows


def markdown(rows):
    head = ("| size | variant | L | d | heads (kv) | params | official | attn params / layer (x MHA) "
            "| KV elems / token / layer | KV bf16 / token / layer | KV bf16 / token (model) | train GFLOPs / token |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        heads = f"{r['n_head']}" + (f" ({r['n_kv_head']})" if r["n_kv_head"] is not None else "")
        paper = f"{r['params_paper'] / 1e6:.2f}M" if r["params_paper"] else "-"
        ratio = f" ({r['attn_params_vs_mha']:.3f})" if r["attn_params_vs_mha"] else ""
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['n_layer']} | {r['n_embd']} | {heads} | {r['params_total'] / 1e6:.2f}M "
            f"| {paper} | {r['attn_params_per_layer'] / 1e6:.3f}M{ratio} | {r['kv_elems_per_token_per_layer']} "
            f"| {r['kv_bytes_per_token_per_layer']} B | {r['kv_bytes_per_token'] / 1024:.1f} KiB "
            f"| {r['flops_per_token'] / 1e9:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium,large,xl", help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--attns", default=",".join(ATTNS), help="comma-separated mechanisms")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of markdown")
    args = parser.parse_args()
    rows = table(args.sizes.split(","), args.attns.split(","))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
