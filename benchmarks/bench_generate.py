"""
Decoding speed of whole models: Medium-size models of every mechanism (random weights, bf16), on a CUDA GPU.

    python -m benchmarks.bench_generate                      # B in {1, 16}, contexts 1K, 8K, 32K
    python -m benchmarks.bench_generate --quick

For each (mechanism, B, context) the cache is filled with random values up to the context, and decode steps
(one token per sequence) are timed with CUDA events in each --modes: "fused graph" (batch-1 T6 only:
engine.fused_decode_step captured in a CUDA graph, what `sample.py` runs for T6 at batch 1 with --cuda_graph),
"compiled graph" (the torch.compile'd step captured in a CUDA graph, what `sample.py --compile=True` runs),
"cuda graph" (the eager step captured), "eager" (kv_len = the exact length, no mask); the fastest is reported,
with every mode's time.
Lower bound per step: (weights + cache bytes read) / the device-to-device copy bandwidth measured in the same
run. Also: the largest context whose cache fits the GPU at B=16 (computed, then allocated to check).
"""

import argparse
import json
import os
import sys

import torch

if __package__ in (None, ""):  # run as `python benchmarks/bench_generate.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import KVCache, compiled_decode_step, cuda_graph_step, fused_decode_ok, fused_decode_step
from model import GPT, model_config
from benchmarks.bench_decode import copy_bandwidth

ATTNS = ["tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla"]


def build(attn, max_len):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(model_config("medium", attn, block_size=max_len))
    with torch.no_grad():
        for block in model.transformer.h:  # zero-init projections would make every step trivially equal
            block.attn.c_proj.weight.normal_(0, 0.02)
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def time_decode(model, B, ctx, mode, steps=20, warmup=3):
    """(ms per step, cache bytes in use) of decode steps in mode "fused graph", "compiled graph", "cuda graph" or
    "eager"; None where the mode does not apply."""
    max_len = ctx + steps + warmup + 4
    cache = KVCache(model, B, max_len)
    if mode == "fused graph" and not fused_decode_ok(cache):
        return None
    for layer in cache.layers:
        for t in layer.values():
            t.normal_(0, 0.5)
    cache.seek(ctx)
    tok = torch.randint(0, 50257, (B,), device="cuda")
    if mode != "eager":
        decode = {"compiled graph": compiled_decode_step, "fused graph": lambda: fused_decode_step}
        step = cuda_graph_step(cache, decode[mode]() if mode in decode else None)
    else:  # kv_len = the exact length; one-token steps of equal rows need no mask
        step = cache.step
    for _ in range(warmup):
        tok = step(tok).argmax(-1)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        tok = step(tok).argmax(-1)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, cache.nbytes() * ctx / max_len


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/generate.jsonl", help="append the rows as JSON lines to this file")
    parser.add_argument("--attns", default=",".join(ATTNS))
    parser.add_argument("--Bs", default="1,16")
    parser.add_argument("--contexts", default="1024,8192,32768")
    parser.add_argument("--modes", default="fused graph,compiled graph,cuda graph",
                        help="of: fused graph, compiled graph, cuda graph, eager")
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    total_mem = torch.cuda.mem_get_info()[1]
    print(f"{name}: copy bandwidth {bw / 1e9:.0f} GB/s, memory {total_mem / 2 ** 30:.1f} GiB", flush=True)
    contexts = [int(c) for c in args.contexts.split(",")] if not args.quick else [1024, 32768]
    rows = []
    for attn in args.attns.split(",") if not args.quick else ["tpa", "mha"]:
        model = build(attn, max(contexts) + 64)
        weight_bytes = model.num_params() * 2
        for B in [int(b) for b in args.Bs.split(",")]:
            for ctx in contexts:
                times = {}
                for mode in args.modes.split(","):
                    try:
                        t = time_decode(model, B, ctx, mode)
                        if t is not None:
                            times[mode] = t
                    except torch.cuda.OutOfMemoryError:
                        continue
                    finally:
                        torch.cuda.empty_cache()
                if not times:
                    rows.append(dict(attn=attn, B=B, context=ctx, oom=True))
                    continue
                mode = min(times, key=lambda k: times[k][0])
                ms, cache_bytes = times[mode]
                bound_ms = (weight_bytes + cache_bytes) / bw * 1e3
                rows.append(dict(device=name, attn=attn, B=B, context=ctx, ms_per_step=ms, tokens_per_s=B / ms * 1e3,
                                 kv_cache_gib=cache_bytes / 2 ** 30, bound_ms=bound_ms, pct_of_bound=100 * bound_ms / ms,
                                 mode=mode, ms_by_mode={k: v[0] for k, v in times.items()}))
                print(json.dumps(rows[-1]), flush=True)
        # the largest context at B=16 that fits: what is free beside the model, less 2 GiB of working space
        per_token = model.kv_cache_elems_per_token() * 2 * 16
        fit = int((torch.cuda.mem_get_info()[0] - 2 * 2 ** 30) // per_token)
        try:
            c = KVCache(model, 16, fit)
            ok = True
            del c
        except torch.cuda.OutOfMemoryError:
            ok = False
        torch.cuda.empty_cache()
        rows.append(dict(attn=attn, max_context_B16=fit, allocated=ok, kv_bytes_per_token=model.kv_cache_elems_per_token() * 2))
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:  # the file keeps every earlier run's rows
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\nMedium models, bf16, {name}, copy bandwidth {bw / 1e9:.0f} GB/s")
    modes = args.modes.split(",")
    print("| mechanism | B | context | ms / step | tokens/s | KV cache | lower bound | % of bound | best mode | "
          + " | ".join(f"ms ({m})" for m in modes) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(modes))
    for r in rows:
        if "ms_per_step" in r:
            print(f"| {r['attn']} | {r['B']} | {r['context']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['kv_cache_gib']:.2f} GiB | {r['bound_ms']:.3f} ms | {r['pct_of_bound']:.0f}% | {r['mode']} | "
                  + " | ".join(f"{r['ms_by_mode'][m]:.3f}" if m in r["ms_by_mode"] else "-" for m in modes) + " |")
        elif r.get("oom"):
            print(f"| {r['attn']} | {r['B']} | {r['context']} | out of memory | | | | | |")
    print(f"\n| mechanism | KV bytes / token | largest context at B=16 on this GPU ({total_mem / 2 ** 30:.0f} GiB, weights and 2 GiB kept) |")
    print("|---|---|---|")
    for r in rows:
        if "max_context_B16" in r:
            print(f"| {r['attn']} | {r['kv_bytes_per_token']:,} | {r['max_context_B16']:,}"
                  f"{'' if r['allocated'] else ' (allocation failed)'} |")
    get = {(r["attn"], r["B"], r["context"]): r for r in rows if "ms_per_step" in r}
    if ("tpa", 16, 32768) in get and ("mha", 16, 32768) in get:
        print(f"T6 / MHA tokens/s at B=16, 32K: {get['tpa', 16, 32768]['tokens_per_s'] / get['mha', 16, 32768]['tokens_per_s']:.2f}x")
    if ("tpa", 1, 32768) in get:
        print(f"T6 at B=1, 32K: {get['tpa', 1, 32768]['pct_of_bound']:.0f}% of the lower bound")


if __name__ == "__main__":
    main()
