"""
Training throughput: runs train.py for a few iterations per setting and reads its metrics.jsonl.

    python -m benchmarks.bench_train --data_dir=data/wiki                        # Small T6 vs MHA, mb 16 x 1024
    python -m benchmarks.bench_train --data_dir=data/wiki --runs=medium_tpa:20,xl_tpa:6
    python -m benchmarks.bench_train --data_dir=data/wiki --runs=small_tpa:16 --nproc=2   # DDP scaling
    python -m benchmarks.bench_train --data_dir=data/wiki --runs=small_tpa:16,small_mha:16 \
        --settings="bf16: ; float8: --float8=True" --rounds=2 --out=benchmarks/train.jsonl  # an A/B, interleaved

A run is config_name:micro_batch (one micro-step per GPU per iteration, compiled, bf16 autocast; --grad_accum=K
makes K micro-steps per GPU per iteration, as the configs' global batch does: the optimizer step is then shared by
K micro-steps). Reported:
the median tokens/s and MFU of the log lines after the first (compilation is excluded by train.py), and the
peak memory. With --nproc > 1 each run is also made on 1 GPU and the scaling efficiency is printed.

--settings compares ways of running the same runs on one machine: "LABEL: ARGS; LABEL: ARGS", where ARGS are
train.py keys (--key=value), optionally after environment variables for that setting (NAME=value, e.g.
PYTHONPATH=... for an optional package). Each run is made under every setting, the settings taking turns, and
--rounds=N repeats the whole order N times, so that a machine's drift shows instead of passing for a
difference. The table gives each setting's median over the rounds and its ratio to the first setting. Every
result goes to --out as soon as it is measured (a run cut off by --timeout, or a killed job, keeps the rows
before it).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys

if __package__ in (None, ""):  # run as `python benchmarks/bench_train.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_settings(text, extra):
    """[(label, env, train.py args)] from "LABEL: ARGS; ...", each setting's args after the common ones (extra)."""
    if not text:
        return [("", {}, list(extra))]
    settings = []
    for part in filter(str.strip, text.split(";")):
        label, sep, rest = part.partition(":")
        label, words = label.strip(), rest.split()
        if not sep or not re.fullmatch(r"[\w.+-]+", label):
            raise SystemExit(f"--settings: {part.strip()!r} must be LABEL: ARGS, the label made of letters, digits "
                             f"and _ . + - (e.g. \"fa4: --sdpa_backend=fa4\")")
        is_env = [bool(re.match(r"[A-Z_][A-Z0-9_]*=", w)) for w in words]  # NAME=value, not --key=value
        env = dict(w.split("=", 1) for w, e in zip(words, is_env) if e)
        args = [w for w, e in zip(words, is_env) if not e]
        if not all(a.startswith("--") and "=" in a for a in args):
            raise SystemExit(f"--settings: {label}: write train.py keys as --key=value and environment variables as "
                             f"NAME=value, got {rest.strip()!r}")
        settings.append((label, env, list(extra) + args))
    labels = [label for label, _, _ in settings]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--settings: the labels {labels} repeat one")
    return settings


def run(config, micro_batch, nproc, data_dir, iters, out_root, extra, grad_accum=1, label="", env=None,
        timeout=None):
    out_dir = os.path.join(out_root, f"{config}_mb{micro_batch}_x{nproc}" + (f"_ga{grad_accum}" if grad_accum > 1 else "")
                           + (f"_{label}" if label else ""))
    what = dict(config=config, micro_batch=micro_batch, nproc=nproc, **({"label": label} if label else {}))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # this script's own run folder from an earlier measurement: train.py starts afresh
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    cmd += [f"config/{config}.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--batch_size={micro_batch}",
            f"--gradient_accumulation_steps={grad_accum * nproc}", f"--max_iters={iters}", "--log_interval=10",
            f"--eval_interval={10 * iters}", "--eval_tokens=65536", "--keep_checkpoints=1", "--warmup_iters=10"] + extra
    # a session of its own: a run past --timeout is stopped with every process it started (torchrun's workers)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, **(env or {})))
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException as e:  # past --timeout, or Ctrl-C / SIGTERM (a job's time limit): the run must not
        os.killpg(p.pid, signal.SIGKILL)  # outlive us and hold the GPU, which its own session would let it do
        p.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return dict(what, error=[f"timed out after {timeout:g} s"])
    if p.returncode != 0:
        print(out[-2000:], err[-4000:])
        return dict(what, error=err.strip().splitlines()[-1:])
    # what train.py warned about (an option that fell back, say), once each: the row says what it measured
    warnings = list(dict.fromkeys(line.strip()[:300] for line in (out + err).splitlines() if "warning" in line.lower()))
    logs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = [m for m in logs if "tokens_per_s" in m][1:] or [m for m in logs if "tokens_per_s" in m]
    header = json.load(open(os.path.join(out_dir, "header.json")))
    return dict(what, grad_accum=grad_accum, device=header["device"],
                tokens_per_s=statistics.median(m["tokens_per_s"] for m in steps),
                mfu=statistics.median(m["mfu"] for m in steps) if "mfu" in steps[0] else None,
                mem_gib=max(m.get("mem_gib", 0) for m in logs), loss=steps[-1]["loss"],
                params=header["params"], flops_per_token=header["flops_per_token"],
                # what ran, as train.py recorded it: the settings passed through, the kernels in effect
                train_args=" ".join(extra), env=env or {}, kernel_choices=header.get("kernel_choices"),
                warnings=warnings[:5], sdpa_backend=header.get("sdpa_backend"),
                float8_layers=len((header.get("float8_layers") or {}).get("converted", [])))


def print_settings(results, labels):
    """Per run and setting: the median over the rounds and the ratio to the first setting's."""
    print(f"\n| run | GPUs | setting | tokens/s (median of {max(r.get('round', 1) for r in results)}) | "
          f"/ {labels[0]} | MFU | peak memory | each round |")
    print("|---|---|---|---|---|---|---|---|")
    runs = list(dict.fromkeys((r["config"], r["micro_batch"], r["nproc"]) for r in results))
    for config, mb, nproc in runs:
        first = None
        for label in labels:
            rows = [r for r in results if (r["config"], r["micro_batch"], r["nproc"], r.get("label", "")) ==
                    (config, mb, nproc, label)]
            ok = [r for r in rows if "error" not in r]
            if not ok:
                print(f"| {config}:{mb} | {nproc} | {label} | error: {rows[-1]['error']} | | | | |")
                continue
            tps = statistics.median(r["tokens_per_s"] for r in ok)
            first = tps if label == labels[0] else first
            ratio = f"{tps / first:.3f}" if first else "-"
            mfus = [r["mfu"] for r in ok if r["mfu"]]
            mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "-"
            each = ", ".join(f"{r['tokens_per_s']:,.0f}" if "error" not in r else "error" for r in rows)
            print(f"| {config}:{mb} | {nproc} | {label} | {tps:,.0f} | {ratio} | {mfu} | "
                  f"{max(r['mem_gib'] for r in ok):.2f} GiB | {each} |")
    for r in results:  # a setting that did not run as asked says so in its warnings
        for w in r.get("warnings", []):
            print(f"warning in {r['config']}:{r['micro_batch']} {r.get('label', '')}: {w}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--runs", default="small_tpa:16,small_mha:16")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-steps per GPU per iteration")
    parser.add_argument("--out_root", default="out/bench_train", help="where each run trains; a setting's folder is "
                        "replaced by its next measurement")
    parser.add_argument("--out", default=None, help="append the results as JSON lines to this file")
    parser.add_argument("--settings", default="", help='ways of running each run, taking turns: "LABEL: ARGS; '
                        'LABEL: ARGS" (ARGS: --key=value for train.py, NAME=value for the environment)')
    parser.add_argument("--rounds", type=int, default=1, help="times each run is made under each setting")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take (compilation included)")
    args, extra = parser.parse_known_args()  # anything else is passed to train.py, e.g. --compile=False
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwinds through run()'s cleanup
    settings = parse_settings(args.settings, extra)
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds} must be >= 1")
    results = []
    for k in range(args.rounds):
        for spec in args.runs.split(","):
            config, mb = spec.split(":")
            for nproc in sorted({1, args.nproc}):
                for label, env, train_args in settings:
                    r = run(config, int(mb), nproc, args.data_dir, args.iters, args.out_root, train_args,
                            args.grad_accum, label, env, args.timeout)
                    if args.rounds > 1:
                        r["round"] = k + 1
                    print(json.dumps(r), flush=True)
                    results.append(r)
                    if args.out:  # now: a later run that hangs or a killed job does not take this row with it
                        with open(args.out, "a") as f:
                            f.write(json.dumps(r) + "\n")
    if args.settings or args.rounds > 1:
        print_settings(results, [label for label, _, _ in settings])
        return
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
