"""
Data-prep throughput and peak memory for 1, 2, 4, 8, 16 workers.

    python -m benchmarks.bench_prepare --source=path/to/enwiki_wikiextractor_train.jsonl.xz --repeat=4

The source (JSON lines, optionally compressed) is first written as parquet (FineWeb-Edu's format, the path the
hub data takes) and as plain JSON lines, `repeat` times over, so that the runs are long enough to time; this is
not timed. Peak memory is the largest sum of the resident memory of the benchmark process and its workers,
sampled every 50 ms as the proportional set size (shared pages counted once); the run with 1/repeat of the source shows that it does not grow with the source's size.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import psutil

if __package__ in (None, ""):  # run as `python benchmarks/bench_prepare.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data.prepare as prep


def peak_rss(fn):
    """(result, seconds, peak bytes of this process and its children while fn runs)."""
    me, peak, done = psutil.Process(), [0], threading.Event()

    def watch():
        while not done.is_set():
            try:
                procs = [me] + me.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.time()
    try:
        result = fn()
    finally:
        seconds = time.time() - t0
        done.set()
        t.join()
    return result, seconds, peak[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--formats", default="parquet,jsonl")
    parser.add_argument("--out", default="benchmarks/prepare.jsonl")
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = tempfile.mkdtemp()
    with prep._open_compressed(args.source) if os.path.splitext(args.source)[1] in prep.COMPRESSION else open(args.source, "rb") as f:
        texts = [json.loads(line)["text"] for line in f.read().decode().split("\n") if line.strip()]
    files = {}
    for fmt in args.formats.split(","):
        for rep in (1, args.repeat):
            path = os.path.join(tmp, f"src_x{rep}.{fmt}")
            if fmt == "parquet":  # row groups of 256 documents, like FineWeb's files
                pq.write_table(pa.table({"text": texts * rep}), path, row_group_size=256)
            else:
                with open(path, "w") as out:
                    for _ in range(rep):
                        out.writelines(json.dumps({"text": t}) + "\n" for t in texts)
            files[fmt, rep] = path
    rows = []
    cores = os.cpu_count()
    for fmt in args.formats.split(","):
        runs = [(int(w), args.repeat) for w in args.workers.split(",")] + [(max(map(int, args.workers.split(","))), 1)]
        for workers, rep in runs:
            out_dir = os.path.join(tmp, f"out_{fmt}_{workers}_{rep}")
            meta, seconds, peak = peak_rss(lambda: prep.prepare(
                [files[fmt, rep]], out_dir, "bench", "bench", workers=workers, shard_size=10 ** 7,
                val_tokens=10 ** 5, progress=False))
            tokens = sum(meta["tokens"].values())
            rows.append(dict(format=fmt, workers=workers, source_copies=rep, tokens=tokens, seconds=seconds,
                             tokens_per_s=tokens / seconds, peak_pss_mib=peak / 2 ** 20, cores=cores))
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out_dir)
    shutil.rmtree(tmp)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{cores} cores | source: {os.path.basename(args.source)} x {args.repeat}")
    print("| format | workers | tokens | seconds | tokens/s | speed-up | parallel efficiency | peak memory (PSS, all processes) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = [s for s in rows if s["format"] == r["format"] and s["workers"] == 1 and s["source_copies"] == r["source_copies"]]
        speedup = r["tokens_per_s"] / base[0]["tokens_per_s"] if base else None
        eff = f"{100 * speedup / r['workers']:.0f}%" if speedup else "-"
        print(f"| {r['format']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s'] / 1e6:.2f}M | "
              f"{f'{speedup:.2f}x' if speedup else '-'} | {eff} | {r['peak_pss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
