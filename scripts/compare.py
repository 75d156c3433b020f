"""
Compare training runs: a table per variant with the mean and spread over seeds, plots, and how to reproduce them.

    python -m scripts.compare out/sweep_wiki                          # every run folder in it
    python -m scripts.compare out/small_mha out/small_tpa --out=reports/small
    python -m scripts.compare out/sweep/*_s1337 out/other/tpa_s1337 --group_by=attn --reference=mha

Reads only each run's header.json and metrics.jsonl (train.py writes both), so runs made on other machines
compare too: copy those two files per run. Runs are grouped by their variant (train.py's `variant`, which
scripts/sweep.py sets; else the folder's name without its _s<seed> suffix) or by any config key. Writes
DIR/report.md (default DIR: report/ beside the runs), DIR/summary.json and four plots: validation loss against
tokens, against training time and against training FLOPs (mean over seeds, min-max band), and the training loss.

Training time is the sum of step times as train.py logs them: compilation, evaluation and checkpoints are not in
it, so runs on the same device compare at equal compute time. Differences to the reference variant are paired
by seed where both ran the same seeds (the same data order), else they are a difference of means.
"""

import argparse
import json
import math
import os
import re
import shlex
import statistics
import time

import numpy as np

# keys of the config that name a run rather than define it: left out of the settings tables
RUN_KEYS = ("out_dir", "seed", "variant", "wandb_run_name", "init_from", "dry_run")
PAPER_ORDER = ["mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa"]  # the paper's tables


def read_jsonl(path):
    records = []
    for line in open(path):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return records


def load_run(path):
    """{path, name, header, metrics} of a run folder; ValueError if it is not one."""
    header_path = os.path.join(path, "header.json")
    try:
        header = json.load(open(header_path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header.json cannot be read ({e})") from e
    if not isinstance(header, dict) or not {"config", "model_config"} <= header.keys():
        raise ValueError(f"{header_path} was not written by train.py (no config / model_config)")
    metrics_path = os.path.join(path, "metrics.jsonl")
    metrics = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    return dict(path=path, name=os.path.basename(os.path.normpath(path)), header=header, metrics=metrics)


def find_runs(paths):
    """Run folders (with a header.json) or folders of run folders (a sweep's out_root), loaded."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "header.json")):
            runs.append(load_run(path))
            continue
        inner = sorted(os.path.join(path, d) for d in os.listdir(path)
                       if os.path.isfile(os.path.join(path, d, "header.json"))) if os.path.isdir(path) else []
        if not inner:
            what = "does not exist" if not os.path.exists(path) else \
                "is not a run folder (train.py writes header.json when a run starts) and holds none"
            raise ValueError(f"{path} {what}")
        runs.extend(load_run(p) for p in inner)
    names = [r["name"] for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # two folders of the same name from different places: name them by their parent too
        for r in runs:
            if r["name"] in dup:
                r["name"] = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(r["path"]))), r["name"])
    return runs


def by_iter(records, key):
    """Records holding key, one per iteration (the last written wins), in order."""
    return sorted({r["iter"]: r for r in records if key in r and "iter" in r}.values(), key=lambda r: r["iter"])


def summarize(run):
    """Per-run numbers and curves from its header and metrics."""
    h, cfg = run["header"], run["header"]["config"]
    train, val = by_iter(run["metrics"], "loss"), by_iter(run["metrics"], "val_loss")
    tokens_per_iter = h.get("tokens_per_iter") or cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
    # training time at each logged iteration: each log line's mean step time x the steps since the previous line
    # (a line without a timing, e.g. one covering only the compiled first step, counts at the run's median)
    dts = [r["dt_ms"] for r in train if "dt_ms" in r]
    median_dt = statistics.median(dts) / 1000 if dts else float("nan")
    iters, times, t, prev = [0], [0.0], 0.0, 0
    for r in train:
        t += (r["dt_ms"] / 1000 if "dt_ms" in r else median_dt) * (r["iter"] - prev)
        prev = r["iter"]
        iters.append(r["iter"])
        times.append(t)

    def time_at(it):
        if it <= iters[-1]:
            return float(np.interp(it, iters, times))
        return times[-1] + (it - iters[-1]) * median_dt

    flops_per_token = h.get("flops_per_token", float("nan"))
    curve = [dict(iter=r["iter"], tokens=r["iter"] * tokens_per_iter, time=time_at(r["iter"]),
                  flops=flops_per_token * r["iter"] * tokens_per_iter, val_loss=r["val_loss"]) for r in val]
    train_curve = [dict(iter=r["iter"], tokens=r["iter"] * tokens_per_iter, loss=r.get("loss_avg", r["loss"]))
                   for r in train]
    last_iter = max([r["iter"] for r in train + val] or [0])
    train_time = time_at(last_iter) if train else float("nan")
    tokens = last_iter * tokens_per_iter
    peak = h.get("peak_flops_per_device")
    tokens_per_s = tokens / train_time if train_time > 0 else float("nan")
    mems = [r["mem_gib"] for r in train if "mem_gib" in r]
    final_eval = by_iter(run["metrics"], "final_val_loss")
    harness = by_iter(run["metrics"], "harness")
    attn_params = h.get("attn_params_per_layer")
    if attn_params is None:  # headers written before train.py recorded it: count on the meta device
        try:
            import torch

            from model import GPT, GPTConfig
            with torch.device("meta"):
                attn_params = GPT(GPTConfig(**h["model_config"])).attn_params_per_layer()
        except Exception:  # a model this version of model.py cannot build
            attn_params = None
    world = h.get("world_size", 1)
    argv = h.get("argv") or ["train.py"]
    launcher = "python" if world == 1 else f"torchrun --standalone --nproc_per_node={world}"
    return dict(
        name=run["name"], path=run["path"], variant=cfg.get("variant") or re.sub(r"_s\d+$", "", run["name"]),
        seed=cfg.get("seed"), attn=h["model_config"].get("attn"), params=h.get("params"),
        attn_params_per_layer=attn_params, kv_bytes_per_token=2 * h["kv_cache_elems_per_token"]
        if "kv_cache_elems_per_token" in h else None,
        iters=last_iter, max_iters=cfg.get("max_iters"), tokens=tokens,
        complete=bool(val) and val[-1]["iter"] == cfg.get("max_iters"),
        final_val_loss=val[-1]["val_loss"] if val else None, best_val_loss=min(r["val_loss"] for r in val) if val else None,
        train_time_s=train_time, tokens_per_s=tokens_per_s,
        mfu=flops_per_token * tokens_per_s / (peak * world) if peak else None,
        peak_mem_gib=max(mems) if mems else None, device=f"{world} x {h.get('device', '?')}",
        git_commit=h.get("git_commit", "unknown"), command=f"{launcher} {shlex.join(argv)}",
        config=cfg, model_config=h["model_config"], curve=curve, train_curve=train_curve,
        final_eval=final_eval[-1] if final_eval else None, harness=harness[-1] if harness else None)


def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(values, digits=4, scale=1.0, unit=""):
    """'mean ± std' of the values (std only over 2 or more)."""
    m, s = mean_std(values)
    if m is None:
        return "-"
    out = f"{m * scale:,.{digits}f}"
    return out + (f" ± {s * scale:,.{digits}f}" if s else "") + unit


def duration(seconds):
    """mean ± std of durations, in seconds below two minutes, else minutes."""
    m, _ = mean_std(seconds)
    return fmt(seconds, 1, 1, " s") if m is not None and m < 120 else fmt(seconds, 1, 1 / 60, " min")


def count(n):
    """20.0M, 30.7K, 1.23B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def common_point(summaries):
    """The most tokens at which every run has a validation loss, or None."""
    sets = [{p["tokens"] for p in s["curve"]} for s in summaries if s["curve"]]
    common = set.intersection(*sets) if sets else set()
    common.discard(0)
    return max(common) if common else None


def val_at(s, tokens):
    return next((p["val_loss"] for p in s["curve"] if p["tokens"] == tokens), None)


def difference(group, ref, value):
    """(mean, spread, how) of value(run) in group minus ref: paired over common seeds when there are any."""
    a = {s["seed"]: value(s) for s in group if value(s) is not None}
    b = {s["seed"]: value(s) for s in ref if value(s) is not None}
    common = sorted(set(a) & set(b))
    if common:
        d = [a[k] - b[k] for k in common]
        return statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else None, \
            f"paired, {len(d)} seed{'s' if len(d) > 1 else ''}"
    if not a or not b:
        return None, None, ""
    (ma, sa), (mb, sb) = mean_std(list(a.values())), mean_std(list(b.values()))
    spread = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)) if sa is not None and sb is not None else None
    return ma - mb, spread, "unpaired"


def group_runs(summaries, group_by, reference):
    """{group: runs}: the reference first, then the paper's order of the mechanisms, then the others as they come."""
    groups = {}
    for s in summaries:
        key = s["variant"] if group_by == "variant" else s["config"].get(group_by, s["model_config"].get(group_by))
        groups.setdefault(str(key), []).append(s)
    order = list(groups)
    rank = lambda g: (g != reference, PAPER_ORDER.index(g) if g in PAPER_ORDER else len(PAPER_ORDER), order.index(g))
    return {g: groups[g] for g in sorted(groups, key=rank)}


def band(runs, key, x):
    """Mean x and the mean / min / max of key over the runs, at each iteration any run logged."""
    points = {}
    for s in runs:
        for p in s[key]:
            points.setdefault(p["iter"], []).append(p)
    out = []
    for it in sorted(points):
        ps = points[it]
        y = [p["val_loss" if key == "curve" else "loss"] for p in ps]
        out.append((statistics.fmean(p[x] for p in ps), statistics.fmean(y), min(y), max(y)))
    return out


def plot(groups, path, key, x, xlabel, xscale, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tops, lows = [], []
    for name, runs in groups.items():
        pts = [p for p in band(runs, key, x) if p[0] > 0 and not math.isnan(p[0])]
        if not pts:
            continue
        xs, mean, lo, hi = (np.array(v) for v in zip(*pts))
        line, = ax.plot(xs * xscale, mean, label=f"{name} ({len(runs)})", lw=1.5)
        if len(runs) > 1:
            ax.fill_between(xs * xscale, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        late = mean[xs >= 0.2 * xs.max()]  # the plot shows the last 80% of training: early losses are far off
        tops.append(late.max() if len(late) else mean.max())
        lows.append(lo.min())
    if tops:
        top, low = max(tops), min(lows)
        pad = 0.05 * (top - low) or 0.05
        ax.set_ylim(low - pad, top + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss" if key == "curve" else "training loss (mean over each log window)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="variant (runs)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def settings_tables(summaries, groups):
    """(shared settings, {key: {group: value}} for keys that differ between groups, keys that differ within one)."""
    keys = sorted({k for s in summaries for k in s["config"]} - set(RUN_KEYS))
    model_keys = sorted({k for s in summaries for k in s["model_config"]})
    shared, per_group, within = {}, {}, []
    for source, ks in (("config", keys), ("model_config", model_keys)):
        for k in ks:
            values = {json.dumps(s[source].get(k)) for s in summaries}
            if values == {"null"} and source == "config":  # a model key left to the size table: see model_config
                continue
            if len(values) == 1:
                if source == "config" or k not in shared:
                    shared[k] = summaries[0][source].get(k)
                continue
            by_group = {g: {json.dumps(s[source].get(k)) for s in runs} for g, runs in groups.items()}
            if any(len(v) > 1 for v in by_group.values()):
                within.append(k)
            per_group[k] = {g: ", ".join(sorted(v)) for g, v in by_group.items()}
    for k in list(shared):
        if k in per_group:
            del shared[k]
    return shared, per_group, within


def write_report(runs, out, group_by="variant", reference="mha"):
    """report.md, summary.json and the plots in out; returns the report's text."""
    summaries = [summarize(r) for r in runs]
    groups = group_runs(summaries, group_by, reference)
    ref = groups.get(reference)
    os.makedirs(out, exist_ok=True)
    common = common_point(summaries)
    equal_length = len({s["tokens"] for s in summaries}) == 1 and all(s["complete"] for s in summaries)
    # the number compared between variants: the final loss when every run has the same budget and finished,
    # else the loss at the most tokens every run has reached (an evaluation point they share)
    if equal_length:
        compared, compared_label = (lambda s: s["final_val_loss"]), "final val loss"
    elif common:
        compared, compared_label = (lambda s: val_at(s, common)), f"val loss at {count(common)} tokens"
    else:
        compared, compared_label = (lambda s: None), "no shared evaluation point"

    lines = [f"# Comparison of {len(summaries)} runs in {len(groups)} groups (by {group_by})", "",
             f"Written by `python -m scripts.compare` on {time.strftime('%Y-%m-%d %H:%M')} from each run's header.json "
             f"and metrics.jsonl.", ""]
    devices = sorted({s["device"] for s in summaries})
    if len(devices) > 1:
        lines += [f"**The runs used different devices ({', '.join(devices)}): time, tokens/s and MFU do not compare "
                  f"between them.**", ""]
    if not equal_length:
        lines += [f"The runs have different lengths or are not finished: differences use the **{compared_label}**"
                  + (" (the most tokens at which every run was evaluated)." if common else "."), ""]
    head = ["variant", "runs (seeds)", "params", "attn params / layer", "KV cache / token (bf16)", "tokens",
            "final val loss", "best val loss", "val ppl"]
    if not equal_length:
        head.append(compared_label)
    if ref:
        head.append(f"Δ vs {reference} ({'final' if equal_length else 'at shared tokens'})")
    head += ["train time", "tokens/s", "MFU", "peak memory", "device"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for name, runs in groups.items():
        seeds = ", ".join(str(s["seed"]) for s in runs)
        partial = "" if all(s["complete"] for s in runs) else " (partial)"
        tokens = {s["tokens"] for s in runs}
        row = [f"**{name}**" if name == reference else name, f"{len(runs)} ({seeds}){partial}",
               fmt([s["params"] for s in runs], 2, 1e-6, "M"),
               fmt([s["attn_params_per_layer"] for s in runs], 3, 1e-6, "M"),
               fmt([s["kv_bytes_per_token"] / 1024 if s["kv_bytes_per_token"] else None for s in runs], 1, 1, " KiB"),
               count(min(tokens)) + (f"-{count(max(tokens))}" if len(tokens) > 1 else ""),
               fmt([s["final_val_loss"] for s in runs]), fmt([s["best_val_loss"] for s in runs]),
               fmt([math.exp(s["final_val_loss"]) if s["final_val_loss"] is not None else None for s in runs], 2)]
        if not equal_length:
            row.append(fmt([compared(s) for s in runs]))
        d = (None, None, "")
        if ref:
            d = difference(runs, ref, compared) if name != reference else (None, None, "")
            row.append("-" if d[0] is None else f"{d[0]:+.4f}" + (f" ± {d[1]:.4f}" if d[1] is not None else "")
                       + f" ({d[2]})")
        row += [duration([s["train_time_s"] for s in runs]), fmt([s["tokens_per_s"] for s in runs], 0),
                fmt([s["mfu"] for s in runs], 1, 100, "%"), fmt([s["peak_mem_gib"] for s in runs], 1, 1, " GiB"),
                ", ".join(sorted({s["device"] for s in runs}))]
        lines.append("| " + " | ".join(row) + " |")
        values = [compared(s) for s in runs]
        table[name] = dict(runs=[s["name"] for s in runs], seeds=[s["seed"] for s in runs],
                           final_val_loss=mean_std([s["final_val_loss"] for s in runs]),
                           compared=mean_std(values), diff_vs_reference=d[:2] if ref else None)
    lines += ["", "Mean ± sample standard deviation over the seeds. Train time: the sum of step times (no compilation, "
              "evaluation or checkpointing); tokens/s: tokens / train time; MFU: against the device's dense bf16 peak "
              "with the model's own FLOPs per token; KV cache: all layers, 2 bytes per element.", ""]

    finals = [s for s in summaries if s["final_eval"]]
    if finals:
        lines += ["## Final evaluation (eval.val_loss on a larger budget)", "",
                  "| variant | tokens | val loss | ppl | bits per byte |", "|---|---|---|---|---|"]
        for name, runs in groups.items():
            fe = [s["final_eval"] for s in runs if s["final_eval"]]
            if fe:
                lines.append(f"| {name} | {fe[0]['final_eval_tokens']:,} | {fmt([f['final_val_loss'] for f in fe])} | "
                             f"{fmt([f['final_val_ppl'] for f in fe], 2)} | {fmt([f['final_bpb'] for f in fe])} |")
        lines.append("")
    harness = [s for s in summaries if s["harness"]]
    if harness:
        lines += ["## Downstream tasks (eval.harness)", ""]
        tasks = list(dict.fromkeys(t for s in harness for row in s["harness"]["harness"] for t in row["scores"]))
        lines += ["| variant | shots | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 3) + "|"]
        for name, runs in groups.items():
            rows = [row for s in runs if s["harness"] for row in s["harness"]["harness"]]
            for shots in sorted({row["shots"] for row in rows}):
                rs = [row for row in rows if row["shots"] == shots]
                cells = [fmt([row["scores"].get(t, {}).get("value") for row in rs], 2) for t in tasks]
                lines.append(f"| {name} | {shots} | " + " | ".join(cells) + f" | {fmt([row['avg'] for row in rs], 2)} |")
        limits = {s["harness"].get("harness_limit") for s in harness}
        if limits != {None}:
            lines.append(f"\nLimited runs (examples per task: {', '.join(str(x) for x in sorted(limits, key=str))}).")
        lines.append("")

    minutes = max((s["train_time_s"] for s in summaries if not math.isnan(s["train_time_s"])), default=0) > 120
    plots = [("val_loss_tokens.png", "curve", "tokens", "tokens (millions)", 1e-6, "Validation loss at equal tokens"),
             ("val_loss_time.png", "curve", "time", f"training time ({'minutes' if minutes else 'seconds'})",
              1 / 60 if minutes else 1, "Validation loss at equal training time"),
             ("val_loss_flops.png", "curve", "flops", "training FLOPs (PFLOP)", 1e-15,
              "Validation loss at equal training FLOPs"),
             ("train_loss.png", "train_curve", "tokens", "tokens (millions)", 1e-6, "Training loss")]
    lines += ["## Curves", "", "Mean over seeds (the band: min to max); the last 80% of training is shown.", ""]
    for file, key, x, xlabel, scale, title in plots:
        plot(groups, os.path.join(out, file), key, x, xlabel, scale, title)
        lines += [f"![{title}]({file})", ""]

    lines += ["## Runs", "", "| run | variant | seed | iterations | final val loss | train time | device | commit |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        state = f"{s['iters']:,}" + ("" if s["complete"] else f" of {s['max_iters']:,} (partial)")
        val = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "-"
        lines.append(f"| {s['name']} | {s['variant']} | {s['seed']} | {state} | {val} | "
                     f"{duration([s['train_time_s']])} | {s['device']} | `{s['git_commit'][:12]}` |")
    shared, per_group, within = settings_tables(summaries, groups)
    lines += ["", "## Settings", "", "Shared by every run:", "", "```",
              " ".join(f"{k}={v!r}" for k, v in shared.items()), "```", ""]
    if per_group:
        lines += ["By group:", "", "| setting | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(v[g] for g in groups) + " |" for k, v in per_group.items()]
        lines.append("")
    if within:
        lines += [f"**Settings that differ between runs of one group: {', '.join(within)}.**", ""]
    commits = sorted({s["git_commit"] for s in summaries})
    lines += [f"Commits: {', '.join(f'`{c}`' for c in commits)}", "", "<details><summary>Commands (each run's first "
              "start; a resumed run continued with --init_from=resume)</summary>", "", "```"]
    lines += [s["command"] for s in summaries] + ["```", "", "</details>", ""]

    text = "\n".join(lines)
    for name, content in (("report.md", text), ("summary.json", json.dumps(dict(
            group_by=group_by, reference=reference, compared=compared_label, groups=table,
            runs=[{k: v for k, v in s.items() if k not in ("curve", "train_curve", "config", "model_config")}
                  for s in summaries]), indent=1))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or folders of run folders (a sweep's out_root)")
    parser.add_argument("--group_by", default="variant", help="'variant' (default) or a config key, e.g. attn")
    parser.add_argument("--reference", default="mha", help="the group the differences are against")
    parser.add_argument("--out", default=None, help="the report's folder (default: report/ beside the runs)")
    args = parser.parse_args()
    try:
        runs = find_runs(args.runs)
    except ValueError as e:
        raise SystemExit(f"compare: {e}")
    out = args.out
    if out is None:
        parents = {os.path.dirname(os.path.abspath(r["path"])) for r in runs}
        out = os.path.join(os.path.commonpath(sorted(parents)), "report")
    text = write_report(runs, out, args.group_by, args.reference)
    print(text[:text.index("## Curves")].rstrip())
    print(f"\nreport: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    main()
