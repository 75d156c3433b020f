"""
Collect harness results of several checkpoints into one table like the paper's Tables 2-3.

    python -m scripts.eval_table out/medium_mha out/medium_tpa out/medium_mla   # their newest harness results
    python -m scripts.eval_table out/*_medium --shots=2 --names=MHA,T6
    python -m scripts.eval_table out/medium_tpa/harness_0100000_20261202-101500 out/x/harness.json

Each argument is a run directory (its newest harness_*/ folder), a results folder or a harness.json written by
`python -m eval.harness`. One table per shot setting: a row per checkpoint, a column per task (the paper's
metric), the average last. Limited runs (--limit) and averages over fewer than the paper's tasks are marked.
"""

import argparse
import glob
import json
import os
import sys

if __package__ in (None, ""):  # run as `python scripts/eval_table.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path):
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "harness_*", "harness.json")), key=os.path.getmtime)
        path = found[-1] if found else os.path.join(path, "harness.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: run python -m eval.harness --out_dir=... first")
    with open(path) as f:
        return json.load(f)


def tables(results, names, shots=None):
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    from eval.harness import PAPER_NAMES
    out = []
    all_shots = sorted({row["shots"] for r in results for row in r["rows"]})
    limited = any(r.get("limit") for r in results)
    for s in [x for x in all_shots if shots is None or x in shots]:
        lines = [f"{s}-shot", "", "| Method | " + " | ".join(PAPER_NAMES.get(t, t) for t in tasks) + " | Avg |",
                 "|---" * (len(tasks) + 2) + "|"]
        for name, r in zip(names, results):
            row = next((x for x in r["rows"] if x["shots"] == s), None)
            if row is None:
                continue
            cells = [row["scores"].get(t, {}).get("value") for t in tasks]
            avg = "-" if row["avg"] is None else f"{row['avg']:.2f}" + (" (partial)" if row.get("avg_partial") else "")
            name = f"{name} (limit {r['limit']:g})" if r.get("limit") else name
            lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" if c is not None else "-" for c in cells)
                         + f" | {avg} |")
        out.append("\n".join(lines))
    if limited:
        out.append("Rows marked (limit N) scored at most N examples per task: not comparable with full runs.")
    versions = sorted({r.get("lm_eval_version", "unknown") for r in results})
    out.append(f"lm-eval {', '.join(versions)}")
    return "\n\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--names", default=None, help="comma-separated row names (default: the run folders)")
    parser.add_argument("--shots", default=None, help="comma-separated shot settings to show")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else [os.path.basename(os.path.normpath(r)) for r in args.runs]
    shots = [int(s) for s in args.shots.split(",")] if args.shots else None
    print(tables([load(r) for r in args.runs], names, shots))
