"""
Training throughput: runs train.py for a few iterations per setting and reads its metrics.jsonl.

    python -m benchmarks.bench_train --data_dir=data/wiki                        # Small T6 vs MHA, mb 16 x 1024
    python -m benchmarks.bench_train --data_dir=data/wiki --runs=medium_tpa:20,xl_tpa:6
    python -m benchmarks.bench_train --data_dir=data/wiki --runs=small_tpa:16 --nproc=2   # DDP scaling

A run is config_name:micro_batch (one micro-step per GPU per iteration, compiled, bf16 autocast; --grad_accum=K
makes K micro-steps per GPU per iteration, as the configs' global batch does: the optimizer step is then shared by
K micro-steps). Reported:
the median tokens/s and MFU of the log lines after the first (compilation is excluded by train.py), and the
peak memory. With --nproc > 1 each run is also made on 1 GPU and the scaling efficiency is printed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

if __package__ in (None, ""):  # run as `python benchmarks/bench_train.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(config, micro_batch, nproc, data_dir, iters, out_root, extra, grad_accum=1):
    out_dir = os.path.join(out_root, f"{config}_mb{micro_batch}_x{nproc}" + (f"_ga{grad_accum}" if grad_accum > 1 else ""))
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    cmd += [f"config/{config}.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--batch_size={micro_batch}",
            f"--gradient_accumulation_steps={grad_accum * nproc}", f"--max_iters={iters}", "--log_interval=10",
            f"--eval_interval={10 * iters}", "--eval_tokens=65536", "--keep_checkpoints=1", "--warmup_iters=10"] + extra
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-4000:])
        return dict(config=config, micro_batch=micro_batch, nproc=nproc, error=p.stderr.strip().splitlines()[-1:])
    logs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = [m for m in logs if "tokens_per_s" in m][1:] or [m for m in logs if "tokens_per_s" in m]
    header = json.load(open(os.path.join(out_dir, "header.json")))
    return dict(config=config, micro_batch=micro_batch, nproc=nproc, grad_accum=grad_accum, device=header["device"],
                tokens_per_s=statistics.median(m["tokens_per_s"] for m in steps),
                mfu=statistics.median(m["mfu"] for m in steps) if "mfu" in steps[0] else None,
                mem_gib=max(m.get("mem_gib", 0) for m in logs), loss=steps[-1]["loss"],
                params=header["params"], flops_per_token=header["flops_per_token"],
                # what ran, as train.py recorded it: the settings passed through, the kernels in effect
                train_args=" ".join(extra), kernel_choices=header.get("kernel_choices"),
                sdpa_backend=header.get("sdpa_backend"), float8_layers=len((header.get("float8_layers") or
                                                                            {}).get("converted", [])))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--runs", default="small_tpa:16,small_mha:16")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-steps per GPU per iteration")
    parser.add_argument("--out_root", default="out/bench_train")
    parser.add_argument("--out", default=None, help="append the results as JSON lines to this file")
    args, extra = parser.parse_known_args()  # anything else is passed to train.py, e.g. --compile=False
    args.extra = extra
    results = []
    for spec in args.runs.split(","):
        config, mb = spec.split(":")
        for nproc in sorted({1, args.nproc}):
            r = run(config, int(mb), nproc, args.data_dir, args.iters, args.out_root, args.extra, args.grad_accum)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print("\n| run | micro-batch | GPUs | device | tokens/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['micro_batch']} | {r['nproc']} | - | error: {r['error']} | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mb = f"{r['micro_batch']} x {r['grad_accum']} micro-steps" if r["grad_accum"] > 1 else r["micro_batch"]
        print(f"| {r['config']} | {mb} | {r['nproc']} | {r['device']} | {r['tokens_per_s']:,.0f} | {mfu} "
              f"| {r['mem_gib']:.1f} GiB |")
    ok = [r for r in results if "error" not in r]
    for r in ok:
        if r["nproc"] > 1:
            one = [s for s in ok if s["config"] == r["config"] and s["nproc"] == 1]
            if one:
                print(f"{r['config']}: {r['nproc']}-GPU scaling efficiency "
                      f"{100 * r['tokens_per_s'] / (r['nproc'] * one[0]['tokens_per_s']):.1f}%")
    by = {r["config"]: r for r in ok if r["nproc"] == 1}
    if "small_tpa" in by and "small_mha" in by and by["small_mha"]["mfu"]:
        t, m = by["small_tpa"], by["small_mha"]
        print(f"T6 / MHA MFU ratio: {t['mfu'] / m['mfu']:.3f}; T6 tokens/s vs the prior 257.7k: "
              f"{t['tokens_per_s'] / 257.7e3:.2f}x")


if __name__ == "__main__":
    main()
