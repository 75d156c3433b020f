"""
Compare training runs: each variant at its best grid point (learning rate), with intervals and p-values against
a reference, the LR sensitivity, instabilities, data efficiency, plots, and how to reproduce it all.

    python -m scripts.compare out/sweep_wiki_lr                       # every run folder in it
    python -m scripts.compare out/sweep_lr out/sweep_time --out=reports/wiki   # two budgets, one report
    python -m scripts.compare out/sweep/*_s1337 out/other/tpa_s1337 --group_by=attn --reference=mha

Reads only each run's header.json and metrics.jsonl (train.py writes both), so runs made on other machines
compare too: copy those two files per run. Writes DIR/report.md (default DIR: report/ beside the runs),
DIR/summary.json and the plots.

- Budgets: runs are first split by their budget (train.py's `budget`, which scripts/sweep.py sets: equal
  tokens, FLOPs or training time), and each budget gets its own section; runs without one form one section.
- Groups and grid points: within a budget, runs are grouped by their variant (train.py's `variant`, else the
  folder's name without its _s<seed> suffix) or by any config key; within a group, the settings that differ
  between runs (a learning-rate grid, say) make its grid points, and the seeds of a point are its runs.
- Best point: a group is reported at the point with the lowest mean final validation loss over its seeds (the
  runs used are named). On a learning-rate axis, a best LR at the smallest or largest LR of the grid is flagged
  ("widen the grid"), and the LR-sensitivity plot shows final loss against LR (log axis) with a quadratic in
  log LR fitted per group and its optimum marked.
- Differences to the reference group (both at their best points) are paired by seed where both ran the same
  seeds (the same data order), else a difference of means (Welch); each has a 95% t-interval, a two-sided
  p-value, "not significant" where p >= 0.05, and about how many seeds would give an interval that excludes
  zero if the mean and spread stayed as observed.
- Instability: a run is flagged where a log window's largest gradient norm exceeds SPIKE_GRAD times the median
  of the earlier windows' (the first window, the initialisation's, only as history), or where the mean training
  loss of a window rises more than SPIKE_LOSS above the previous window's; the flags are counted per group and
  grid point.
- Data efficiency: from the reference's mean validation curve (its best point), how many times the tokens (and
  the FLOPs, and the training time) the reference needs to reach each group's final loss, against what the
  group used; "> x" where the reference never reaches it.

Training time is the sum of step times as train.py logs them: compilation, evaluation and checkpoints are not in
it, so runs on the same device compare at equal compute time.
"""

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as `python scripts/compare.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPIKE_GRAD = 4.0  # a window's largest gradient norm above this many times the median of the earlier windows'
SPIKE_LOSS = 0.1  # a window's mean training loss above the previous window's by more than this (nats)
# config keys that follow another or the budget: not grid axes of their own
DERIVED = ("max_iters", "lr_decay_iters", "budget")
# short names of settings in grid-point labels and run names
SHORT = dict(learning_rate="lr", min_lr="min_lr", warmup_iters="warmup", weight_decay="wd", batch_size="bs")

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
    dup = [r for r in runs if names.count(r["name"]) > 1]
    for depth in range(2, 64):  # folders of the same name from different places: name them by as many parents
        if len({r["name"] for r in dup}) == len(dup):  # as tell them apart (sweep_wiki_lr/runs/mha_s1337, ...)
            break
        for r in dup:
            parts = os.path.normpath(os.path.abspath(r["path"])).split(os.sep)
            r["name"] = "/".join(parts[-depth:])
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
        peak_mem_gib=max(mems) if mems else None, device=f"{world} x {h.get('device', '?')}", world_size=world,
        git_commit=h.get("git_commit", "unknown"), command=f"{launcher} {shlex.join(argv)}",
        config=cfg, model_config=h["model_config"], curve=curve, train_curve=train_curve,
        final_eval=final_eval[-1] if final_eval else None, harness=harness[-1] if harness else None,
        budget=cfg.get("budget") or "", spikes=spikes(train), flops_per_token=flops_per_token)


def spikes(train):
    """[(iteration, what)] of the log windows where training jumped (the module docstring's rule)."""
    out, history = [], []  # history: the last-step gradient norms of the windows before, from the second on
    for i, r in enumerate(train):
        g = r.get("grad_norm_max", r.get("grad_norm"))
        rise = r["loss_avg"] - train[i - 1]["loss_avg"] if i >= 2 and "loss_avg" in train[i - 1] else 0.0
        if g is not None and len(history) >= 2 and g > SPIKE_GRAD * statistics.median(history):
            out.append((r["iter"], f"gradient norm {g:.3g}, {g / statistics.median(history):.1f}x the median before"))
        elif rise > SPIKE_LOSS:
            out.append((r["iter"], f"training loss up {rise:.3f} over the previous window"))
        if i >= 1 and r.get("grad_norm") is not None:
            history.append(r["grad_norm"])
    return out


def difference_stats(a, b):
    """Group a minus group b, each {seed: value}: paired over their common seeds when there are any, else Welch's
    difference of means. dict(mean, lo, hi, p, how, seeds_needed); lo, hi and p are None below 2 seeds (a side).
    seeds_needed: the fewest seeds (per group) whose 95% interval would exclude 0 if the mean difference and the
    spread stayed as observed (None: more than 1000, or no spread to judge from)."""
    from scipy import stats
    out = dict(mean=None, lo=None, hi=None, p=None, how="", seeds_needed=None)
    common = sorted(set(a) & set(b))
    if common:
        d = np.array([a[k] - b[k] for k in common], dtype=float)
        m = float(d.mean())
        out.update(mean=m, how=f"paired, {len(d)} seed{'s' if len(d) > 1 else ''}")
        if len(d) < 2:
            return out
        sd = float(d.std(ddof=1))
        se_df = lambda k: (sd / math.sqrt(k), k - 1)  # the standard error and degrees of freedom with k seeds
        se, df = se_df(len(d))
    elif a and b:
        x, y = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
        m = float(x.mean() - y.mean())
        out.update(mean=m, how=f"unpaired, {len(x)} and {len(y)} seeds")
        if len(x) < 2 or len(y) < 2:
            return out
        vx, vy = float(x.var(ddof=1)), float(y.var(ddof=1))

        def se_df(kx, ky=None):  # Welch: the standard error and the Welch-Satterthwaite degrees of freedom
            ky = ky or kx
            se2 = vx / kx + vy / ky
            df = se2 ** 2 / ((vx / kx) ** 2 / (kx - 1) + (vy / ky) ** 2 / (ky - 1)) if se2 > 0 else kx + ky - 2
            return math.sqrt(se2), df
        se, df = se_df(len(x), len(y))
    else:
        return out
    h = float(stats.t.ppf(0.975, df)) * se
    out.update(lo=m - h, hi=m + h, p=float(2 * stats.t.sf(abs(m) / se, df)) if se > 0 else float(m == 0))
    if se > 0 and m != 0:
        out["seeds_needed"] = next((k for k in range(2, 1001)
                                    if stats.t.ppf(0.975, se_df(k)[1]) * se_df(k)[0] < abs(m)), None)
    return out


def fmt_difference(d):
    """'+0.0123 [−0.0100, +0.0346], p = 0.21, not significant; ~9 seeds would resolve it (paired, 3 seeds)'."""
    if d is None or d["mean"] is None:
        return "-"
    text = f"{d['mean']:+.4f}"
    if d["lo"] is None:
        return text + f" ({d['how']}: no interval)"
    text += f" [{d['lo']:+.4f}, {d['hi']:+.4f}], p = {d['p']:.2g}"
    if d["p"] >= 0.05:
        need = d["seeds_needed"]
        text += ", not significant" + (f"; ~{need} seeds would resolve it" if need else "")
    return text + f" ({d['how']})"


def best_point(losses):
    """The key of {point: [final losses over seeds]} with the lowest mean (the first such in order)."""
    return min(losses, key=lambda k: statistics.fmean(losses[k]) if losses[k] else math.inf)


def reach(curve, target, x):
    """The x ('tokens', 'flops' or 'time') at which a validation curve first reaches target (linear between
    evaluations), or None if it never does."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return p[x]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev[x] + f * (p[x] - prev[x])
        prev = p
    return None


def mean_curve(runs):
    """The mean validation curve of runs with the same evaluation points (a grid point's seeds)."""
    points = {}
    for s in runs:
        for p in s["curve"]:
            points.setdefault(p["iter"], []).append(p)
    return [{k: statistics.fmean(p[k] for p in ps) for k in ("tokens", "flops", "time", "val_loss")}
            for it, ps in sorted(points.items()) if len(ps) == len(runs)]


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


def recorded(runs, key, source="config"):
    """The distinct values (as JSON) that the runs recorded for a setting. A run whose header lacks the key was made
    by train.py before the setting existed, when it behaved as the setting's first default: it is left out, so
    that a setting added later does not split old runs from new ones (for settings of the model, where a missing
    key means the variant has no such setting, it counts as null)."""
    if source == "model_config":
        return {json.dumps(s[source].get(key)) for s in runs}
    return {json.dumps(s[source][key]) for s in runs if key in s[source]}


def settings_tables(summaries, groups):
    """(shared settings, {key: {group: value}} for keys that differ between groups, keys that differ within one)."""
    keys = sorted({k for s in summaries for k in s["config"]} - set(RUN_KEYS))
    model_keys = sorted({k for s in summaries for k in s["model_config"]})
    shared, per_group, within = {}, {}, []
    for source, ks in (("config", keys), ("model_config", model_keys)):
        for k in ks:
            values = recorded(summaries, k, source)
            if values == {"null"} and source == "config":  # a model key left to the size table: see model_config
                continue
            if len(values) == 1:
                if source == "config" or k not in shared:
                    shared[k] = json.loads(values.pop())
                continue
            by_group = {g: recorded(runs, k, source) for g, runs in groups.items()}
            if any(len(v) > 1 for v in by_group.values()):
                within.append(k)
            per_group[k] = {g: ", ".join(sorted(v)) for g, v in by_group.items()}
    for k in list(shared):
        if k in per_group:
            del shared[k]
    return shared, per_group, within


def value_name(v):
    """6e-4 -> '6e-4', 0.1 -> '0.1', 50 -> '50', 'xavier' -> 'xavier': short and exact enough to name a run."""
    if isinstance(v, float) and v != 0 and not 1e-2 <= abs(v) < 1e5:
        mantissa, exponent = f"{v:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def budget_title(budget):
    kind, _, value = budget.partition("=")
    try:
        v = float(value)
    except ValueError:
        return budget or "Runs as given (no budget recorded)"
    return {"tokens": f"Equal tokens ({count(int(v))})", "flops": f"Equal training FLOPs ({v:.3g})",
            "seconds": f"Equal training time ({v:,.1f} s)", "iters": f"Equal steps ({int(v):,})"}.get(kind, budget)


def grid_axes(runs):
    """The config keys whose values differ between the runs of a group (its grid); min_lr is left out beside a
    learning_rate axis (it follows the LR), as are the budget's keys."""
    keys = sorted({k for s in runs for k in s["config"]} - set(RUN_KEYS) - set(DERIVED))
    axes = [k for k in keys if len(recorded(runs, k)) > 1]
    if "learning_rate" in axes and "min_lr" in axes:
        axes.remove("min_lr")
    return axes


def point_label(s, axes):
    return ", ".join(f"{SHORT.get(k, k)}={value_name(s['config'].get(k))}" for k in axes) or "-"


def analyse_group(runs):
    """A group's grid points, its best point (the lowest mean final val loss over the seeds of its finished points,
    or of all points if none finished), and whether the best LR sits at an edge of the grid."""
    axes = grid_axes(runs)
    points = {}
    for s in runs:
        points.setdefault(point_label(s, axes), []).append(s)
    finished = {k: [s["final_val_loss"] for s in v] for k, v in points.items()
                if all(s["complete"] and s["final_val_loss"] is not None for s in v)}
    candidates = finished or {k: [s["final_val_loss"] for s in v if s["final_val_loss"] is not None]
                              for k, v in points.items()}
    best = best_point(candidates)
    edge = None
    if "learning_rate" in axes:
        others = [k for k in axes if k != "learning_rate"]
        ref = points[best][0]["config"]
        row = sorted({s["config"]["learning_rate"] for s in runs if all(s["config"].get(k) == ref.get(k) for k in others)})
        if len(row) >= 2 and ref["learning_rate"] in (row[0], row[-1]):
            edge = "smallest" if ref["learning_rate"] == row[0] else "largest"
    return dict(axes=axes, points=points, best=best, runs=points[best], edge=edge)


def lr_rows(groups, info):
    """{(group, the other axes' label): {learning rate: [runs]}} for the groups with a learning_rate axis."""
    rows = {}
    for g, runs in groups.items():
        axes = info[g]["axes"]
        if "learning_rate" not in axes:
            continue
        others = [k for k in axes if k != "learning_rate"]
        for s in runs:
            rows.setdefault((g, point_label(s, others)), {}).setdefault(s["config"]["learning_rate"], []).append(s)
    return rows


def fit_optimum(lrs, losses):
    """The quadratic in log10(LR) through (LR, mean final loss): (coefficients, the LR at its minimum), or None
    below 3 LRs; the optimum is None where the fit has no minimum (concave)."""
    if len(lrs) < 3:
        return None
    c = np.polyfit(np.log10(lrs), losses, 2)
    return c, (10 ** (-c[1] / (2 * c[0])) if c[0] > 0 else None)


def lr_plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (g, other), by_lr in rows.items():
        lrs = sorted(by_lr)
        done = [lr for lr in lrs if all(s["complete"] for s in by_lr[lr])]
        y = [statistics.fmean(s["final_val_loss"] for s in by_lr[lr]) for lr in done]
        if not done:
            continue
        label = g + (f" ({other})" if other != "-" else "")
        line, = ax.plot(done, y, "o", label=label)
        for lr in done:  # every seed, small
            ax.plot([lr] * len(by_lr[lr]), [s["final_val_loss"] for s in by_lr[lr]], ".", color=line.get_color(),
                    alpha=0.4)
        fit = fit_optimum(done, y)
        if fit:
            xs = np.logspace(np.log10(done[0]), np.log10(done[-1]), 50)
            ax.plot(xs, np.polyval(fit[0], np.log10(xs)), "-", color=line.get_color(), lw=1)
            if fit[1] and done[0] <= fit[1] <= done[-1]:
                ax.plot([fit[1]], [np.polyval(fit[0], np.log10(fit[1]))], "*", ms=14, color=line.get_color(),
                        markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def budget_section(summaries, group_by, reference, out, suffix, h):
    """The report's part for the runs of one budget: (markdown lines, its summary). h: the heading prefix."""
    groups = group_runs(summaries, group_by, reference)
    info = {g: analyse_group(runs) for g, runs in groups.items()}
    chosen = {g: info[g]["runs"] for g in groups}  # each group's runs at its best point
    flat = [s for runs in chosen.values() for s in runs]
    common = common_point(flat)
    budget = summaries[0]["budget"]
    equal = all(s["complete"] for s in flat) and (budget != "" or len({s["tokens"] for s in flat}) == 1)
    # the number compared between groups: the final loss when every run finished its (equal) budget, else the loss
    # at the most tokens every run has reached (an evaluation point they share)
    if equal:
        compared, compared_label = (lambda s: s["final_val_loss"]), "final val loss"
    elif common:
        compared, compared_label = (lambda s: val_at(s, common)), f"val loss at {count(common)} tokens"
    else:
        compared, compared_label = (lambda s: None), "no shared evaluation point"
    ref = chosen.get(reference)
    diffs = {g: difference_stats({s["seed"]: compared(s) for s in runs if compared(s) is not None},
                                 {s["seed"]: compared(s) for s in ref if compared(s) is not None})
             for g, runs in chosen.items() if ref and g != reference}
    gridded = any(len(i["points"]) > 1 for i in info.values())

    lines = []
    if not equal:
        lines += [f"The runs have different lengths or are not finished: differences use the **{compared_label}**"
                  + (" (the most tokens at which every run was evaluated)." if common else "."), ""]
    means = {g: mean_std([compared(s) for s in runs])[0] for g, runs in chosen.items()}
    ranked = sorted((m, g) for g, m in means.items() if m is not None)
    leader = ranked[0][1] if ranked else None
    headline = None
    if leader and len(ranked) > 1:
        against = [(reference, diffs.get(leader))] if leader != reference and ref else []
        runner = ranked[1][1]
        if runner != reference or leader == reference:
            a = {s["seed"]: compared(s) for s in chosen[leader] if compared(s) is not None}
            b = {s["seed"]: compared(s) for s in chosen[runner] if compared(s) is not None}
            against.append((runner + " (second)", difference_stats(a, b)))
        headline = (f"**{leader} leads** on {compared_label}" + (" (each group at its best grid point)" if gridded
                                                                 else "") + ": "
                    + "; ".join(f"{leader} − {name}: {fmt_difference(d)}" for name, d in against) + ".")
        lines += [headline, ""]

    head = ["variant", "runs (seeds)"] + (["best point"] if gridded else []) + [
        "params", "attn params / layer", "KV cache / token (bf16)", "tokens", "final val loss", "best val loss",
        "val ppl"]
    if not equal:
        head.append(compared_label)
    if ref:
        head.append(f"Δ vs {reference}")
    head += ["train time", "tokens/s", "MFU", "peak memory", "spiking runs", "device"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for name, runs in chosen.items():
        i = info[name]
        seeds = ", ".join(str(s["seed"]) for s in runs)
        partial = "" if all(s["complete"] for s in runs) else " (partial)"
        tokens = {s["tokens"] for s in runs}
        row = [f"**{name}**" if name == reference else name, f"{len(runs)} ({seeds}){partial}"]
        if gridded:
            edge = f" ⚠ the {i['edge']} LR of its grid: widen the grid" if i["edge"] else ""
            row.append(f"{i['best']} (of {len(i['points'])}){edge}")
        row += [fmt([s["params"] for s in runs], 2, 1e-6, "M"),
                fmt([s["attn_params_per_layer"] for s in runs], 3, 1e-6, "M"),
                fmt([s["kv_bytes_per_token"] / 1024 if s["kv_bytes_per_token"] else None for s in runs], 1, 1, " KiB"),
                count(min(tokens)) + (f"-{count(max(tokens))}" if len(tokens) > 1 else ""),
                fmt([s["final_val_loss"] for s in runs]), fmt([s["best_val_loss"] for s in runs]),
                fmt([math.exp(s["final_val_loss"]) if s["final_val_loss"] is not None else None for s in runs], 2)]
        if not equal:
            row.append(fmt([compared(s) for s in runs]))
        if ref:
            d = diffs.get(name)
            row.append("-" if d is None or d["mean"] is None else f"{d['mean']:+.4f}"
                       + (f" [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d["lo"] is not None else ""))
        n_spiking = sum(bool(s["spikes"]) for s in groups[name])
        row += [duration([s["train_time_s"] for s in runs]), fmt([s["tokens_per_s"] for s in runs], 0),
                fmt([s["mfu"] for s in runs], 1, 100, "%"), fmt([s["peak_mem_gib"] for s in runs], 1, 1, " GiB"),
                f"{n_spiking} of {len(groups[name])}", ", ".join(sorted({s["device"] for s in runs}))]
        lines.append("| " + " | ".join(row) + " |")
        table[name] = dict(best_point=i["best"], edge=i["edge"], runs=[s["name"] for s in runs],
                           seeds=[s["seed"] for s in runs], final_val_loss=mean_std([s["final_val_loss"] for s in runs]),
                           compared=mean_std([compared(s) for s in runs]), diff_vs_reference=diffs.get(name),
                           points={k: dict(runs=[s["name"] for s in v], final_val_loss=mean_std(
                               [s["final_val_loss"] for s in v]), spiking=[s["name"] for s in v if s["spikes"]])
                               for k, v in i["points"].items()})
    lines += ["", "Mean ± sample standard deviation over the seeds" + (" of each group's best grid point (the lowest "
              "mean final val loss)" if gridded else "") + f". Δ vs {reference}: the mean difference with its 95% "
              "t-interval (below). Train time: the sum of step times (no compilation, evaluation or checkpointing); "
              "tokens/s: tokens / train time; MFU: against the device's dense bf16 peak with the model's own FLOPs "
              "per token; KV cache: all layers, 2 bytes per element; spiking runs: over every grid point.", ""]

    if diffs:
        lines += [f"{h}# Differences to {reference}", "", f"| variant | Δ {compared_label} [95% interval], p | runs "
                  f"(variant; {reference}) |", "|---|---|---|"]
        for g, d in diffs.items():
            lines.append(f"| {g} | {fmt_difference(d)} | {', '.join(s['name'] for s in chosen[g])}; "
                         f"{', '.join(s['name'] for s in ref)} |")
        lines += ["", "Paired by seed where both ran the same seeds (the same data order), else Welch's difference of "
                  "means; p: two-sided t-test; \"~N seeds would resolve it\": the fewest seeds whose 95% interval "
                  "would exclude zero if the mean difference and the spread stayed as observed.", ""]

    rows = lr_rows(groups, info)
    fits = {}
    if rows:
        lrs = sorted({lr for by_lr in rows.values() for lr in by_lr})
        lines += [f"{h}# Learning-rate grid", "", "| variant | " + " | ".join(value_name(lr) for lr in lrs)
                  + " | fitted optimum |", "|---" * (len(lrs) + 2) + "|"]
        for (g, other), by_lr in rows.items():
            cells = []
            for lr in lrs:
                rs = by_lr.get(lr, [])
                if not rs:
                    cells.append("")
                    continue
                cell = fmt([s["final_val_loss"] for s in rs]) + f" ({len(rs)})"
                if not all(s["complete"] for s in rs):
                    cell += " partial"
                n_spikes = sum(bool(s["spikes"]) for s in rs)
                if n_spikes:
                    cell += f" ⚠{n_spikes} spiking"
                best_lr = info[g]["runs"][0]["config"]["learning_rate"]
                if lr == best_lr and point_label(rs[0], info[g]["axes"]) == info[g]["best"]:
                    cell = f"**{cell}**"
                cells.append(cell)
            done = [lr for lr in sorted(by_lr) if all(s["complete"] for s in by_lr[lr])]
            fit = fit_optimum(done, [statistics.fmean(s["final_val_loss"] for s in by_lr[lr]) for lr in done])
            opt = "-" if not fit else "no minimum (concave fit)" if fit[1] is None else value_name(float(f"{fit[1]:.2g}")) \
                + ("" if done[0] <= fit[1] <= done[-1] else " (outside the grid)")
            fits[f"{g} {other}"] = None if not fit else fit[1]
            label = g + (f" ({other})" if other != "-" else "")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {opt} |")
        lr_file = f"lr_sensitivity{suffix}.png"
        lr_plot(rows, os.path.join(out, lr_file), "Final validation loss against the peak learning rate")
        lines += ["", "Final val loss, mean ± std over seeds (the number of seeds); bold: the group's best point; ⚠: "
                  "runs flagged as spiking (below). Fitted optimum: the minimum of a quadratic in log LR through the "
                  "means (3 or more finished LRs).", "", f"![learning-rate sensitivity]({lr_file})", ""]

    flagged = [s for s in summaries if s["spikes"]]
    lines += [f"{h}# Instabilities", ""]
    if flagged:
        lines += [f"{len(flagged)} of {len(summaries)} runs spiked: a log window's largest gradient norm above "
                  f"{SPIKE_GRAD:g}x the median of the windows before it, or its mean training loss up more than "
                  f"{SPIKE_LOSS:g} over the previous window.", "", "| run | variant | point | iteration: what |",
                  "|---|---|---|---|"]
        for s in flagged:
            g = next(g for g, runs in groups.items() if s in runs)
            lines.append(f"| {s['name']} | {g} | {point_label(s, info[g]['axes'])} | "
                         + "; ".join(f"{it}: {what}" for it, what in s["spikes"]) + " |")
    else:
        lines.append(f"No run spiked (a log window's largest gradient norm above {SPIKE_GRAD:g}x the median before it, "
                     f"or its mean training loss up more than {SPIKE_LOSS:g}).")
    lines.append("")

    efficiency = {}
    if ref and all(s["complete"] for s in ref):
        ref_curve = mean_curve(ref)
        lines += [f"{h}# Data efficiency against {reference}", "",
                  f"How many times the tokens (FLOPs, training time) {reference} needs to reach each variant's final "
                  f"val loss, against what the variant used: above 1, the variant needs less; \"> x\": {reference} "
                  f"never reaches it in its run. Read from {reference}'s mean validation curve, which is mid-schedule "
                  "before its end (a run planned shorter would get there sooner, so these ratios lean in the "
                  "variant's favour).", "", "| variant | final val loss | tokens | FLOPs | time |", "|---|---|---|---|---|"]
        for g, runs in chosen.items():
            if g == reference or not all(s["complete"] for s in runs):
                continue
            target = statistics.fmean(s["final_val_loss"] for s in runs)
            cells, ratios = [], {}
            for x, used in (("tokens", statistics.fmean(s["tokens"] for s in runs)),
                            ("flops", statistics.fmean(s["flops_per_token"] * s["tokens"] for s in runs)),
                            ("time", statistics.fmean(s["train_time_s"] for s in runs))):
                at = reach(ref_curve, target, x)
                if not used or (isinstance(used, float) and math.isnan(used)):
                    cells.append("-")
                    continue
                ratios[x] = (at / used) if at is not None else None
                cells.append(f"{at / used:.2f}x" if at is not None else f"> {ref_curve[-1][x] / used:.2f}x")
            efficiency[g] = ratios
            lines.append(f"| {g} | {target:.4f} | " + " | ".join(cells) + " |")
        lines.append("")

    finals = [s for s in flat if s["final_eval"]]
    if finals:
        lines += [f"{h}# Final evaluation (eval.val_loss on a larger budget)", "",
                  "| variant | tokens | val loss | ppl | bits per byte |", "|---|---|---|---|---|"]
        for name, runs in chosen.items():
            fe = [s["final_eval"] for s in runs if s["final_eval"]]
            if fe:
                lines.append(f"| {name} | {fe[0]['final_eval_tokens']:,} | {fmt([f['final_val_loss'] for f in fe])} | "
                             f"{fmt([f['final_val_ppl'] for f in fe], 2)} | {fmt([f['final_bpb'] for f in fe])} |")
        lines.append("")
    harness = [s for s in flat if s["harness"]]
    if harness:
        lines += [f"{h}# Downstream tasks (eval.harness)", ""]
        tasks = list(dict.fromkeys(t for s in harness for row in s["harness"]["harness"] for t in row["scores"]))
        lines += ["| variant | shots | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 3) + "|"]
        for name, runs in chosen.items():
            rows_h = [row for s in runs if s["harness"] for row in s["harness"]["harness"]]
            for shots in sorted({row["shots"] for row in rows_h}):
                rs = [row for row in rows_h if row["shots"] == shots]
                cells = [fmt([row["scores"].get(t, {}).get("value") for row in rs], 2) for t in tasks]
                lines.append(f"| {name} | {shots} | " + " | ".join(cells) + f" | {fmt([row['avg'] for row in rs], 2)} |")
        limits = {s["harness"].get("harness_limit") for s in harness}
        if limits != {None}:
            lines.append(f"\nLimited runs (examples per task: {', '.join(str(x) for x in sorted(limits, key=str))}).")
        lines.append("")

    minutes = max((s["train_time_s"] for s in flat if not math.isnan(s["train_time_s"])), default=0) > 120
    plots = [("val_loss_tokens", "curve", "tokens", "tokens (millions)", 1e-6, "Validation loss against tokens"),
             ("val_loss_time", "curve", "time", f"training time ({'minutes' if minutes else 'seconds'})",
              1 / 60 if minutes else 1, "Validation loss against training time"),
             ("val_loss_flops", "curve", "flops", "training FLOPs (PFLOP)", 1e-15,
              "Validation loss against training FLOPs"),
             ("train_loss", "train_curve", "tokens", "tokens (millions)", 1e-6, "Training loss")]
    lines += [f"{h}# Curves", "", "Mean over seeds" + (" at each group's best point" if gridded else "") + " (the band: "
              "min to max); the last 80% of training is shown. These interpolate between evaluations: the tables "
              "above compare finished runs.", ""]
    for file, key, x, xlabel, scale, title in plots:
        plot(chosen, os.path.join(out, file + suffix + ".png"), key, x, xlabel, scale, title)
        lines += [f"![{title}]({file}{suffix}.png)", ""]
    return lines, dict(budget=budget, title=budget_title(budget), compared=compared_label, leader=leader,
                       headline=headline,
                       groups=table, lr_optimum=fits, efficiency=efficiency)


def unfinished_plans(runs, summaries):
    """Grid runs that a sweep's plan.json (beside the run folders) names for a variant shown here, and that are not
    here finished (the report is then a sweep's state so far, and says so); and the variants it plans that have no
    runs here."""
    finished, variants = set(), {}
    for r, s in zip(runs, summaries):
        path = os.path.normpath(os.path.abspath(r["path"]))
        variants.setdefault(os.path.dirname(path), set()).add(s["variant"])
        if s["complete"]:
            finished.add(path)
    missing, absent = [], []
    for root, shown in sorted(variants.items()):
        try:
            plan = json.load(open(os.path.join(root, "plan.json")))
        except (OSError, ValueError):  # no plan (runs not made by scripts/sweep.py), or one that cannot be read
            continue
        missing += [n for v, names in plan.items() if v in shown for n in names
                    if os.path.join(root, n) not in finished]
        absent += [v for v in plan if v not in shown and v not in absent]
    return missing, absent


def write_report(runs, out, group_by="variant", reference="mha"):
    """report.md, summary.json and the plots in out; returns the report's text."""
    summaries = [summarize(r) for r in runs]
    os.makedirs(out, exist_ok=True)
    budgets = {}
    for s in summaries:
        budgets.setdefault(s["budget"], []).append(s)
    lines = [f"# Comparison of {len(summaries)} runs (by {group_by})", "",
             f"Written by `python -m scripts.compare` on {time.strftime('%Y-%m-%d %H:%M')} from each run's header.json "
             f"and metrics.jsonl.", ""]
    missing, absent = unfinished_plans(runs, summaries)
    if missing:
        lines += [f"**Not finished: {len(missing)} of the grid runs the sweep planned for these variants (its "
                  f"plan.json) are not finished here ({', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}): "
                  f"the best points, differences and leaders below are the sweep's state so far.**", ""]
    if absent:
        lines += [f"Planned by the sweep but with no runs here: {', '.join(absent)}.", ""]
    devices = sorted({s["device"] for s in summaries})
    if len(devices) > 1:
        lines += [f"**The runs used different devices ({', '.join(devices)}): time, tokens/s and MFU do not compare "
                  f"between them.**", ""]
    sections = []
    several = len(budgets) > 1
    if several:
        lines += ["Budgets: " + "; ".join(f"{budget_title(b)}, {len(v)} runs" for b, v in budgets.items()), ""]
        leaders_at = len(lines)
    for budget, members in budgets.items():
        suffix = "_" + re.sub(r"[^A-Za-z0-9]+", "-", budget.partition("=")[0] or "as-given") if several else ""
        if several:
            lines += [f"## {budget_title(budget)}", ""]
        section, summary = budget_section(members, group_by, reference, out, suffix, "##" if several else "#")
        lines += section
        sections.append(summary)
    if several:  # who leads at each budget, up front (each section has the details)
        lines[leaders_at:leaders_at] = [f"- {x['title']}: {x['headline'] or 'no comparison'}" for x in sections] + [""]

    lines += ["## Runs", "", "| run | variant | budget | seed | iterations | final val loss | spikes | train time | "
              "device | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        state = f"{s['iters']:,}" + ("" if s["complete"] else f" of {s['max_iters']:,} (partial)")
        val = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "-"
        lines.append(f"| {s['name']} | {s['variant']} | {s['budget'] or '-'} | {s['seed']} | {state} | {val} | "
                     f"{len(s['spikes']) or ''} | {duration([s['train_time_s']])} | {s['device']} | "
                     f"`{s['git_commit'][:12]}` |")
    groups = group_runs(summaries, group_by, reference)
    shared, per_group, within = settings_tables(summaries, groups)
    lines += ["", "## Settings", "", "Shared by every run:", "", "```",
              " ".join(f"{k}={v!r}" for k, v in shared.items()), "```", ""]
    if per_group:
        lines += ["By group:", "", "| setting | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(v[g] for g in groups) + " |" for k, v in per_group.items()]
        lines.append("")
    if within:
        lines += [f"Settings that differ between runs of one group (grid axes, budgets): {', '.join(within)}.", ""]
    commits = sorted({s["git_commit"] for s in summaries})
    lines += [f"Commits: {', '.join(f'`{c}`' for c in commits)}", "", "<details><summary>Commands (each run's first "
              "start; a resumed run continued with --init_from=resume)</summary>", "", "```"]
    lines += [s["command"] for s in summaries] + ["```", "", "</details>", ""]

    text = "\n".join(lines)
    summary = dict(group_by=group_by, reference=reference, compared=sections[0]["compared"],
                   groups=sections[0]["groups"], budgets=sections, planned_not_finished=missing,
                   planned_without_runs=absent,
                   runs=[{k: v for k, v in s.items() if k not in ("curve", "train_curve", "config", "model_config")}
                         for s in summaries])
    for name, content in (("report.md", text), ("summary.json", json.dumps(summary, indent=1))):
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
    print(text[:text.index("## Runs")].rstrip())
    print(f"\nreport: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    main()
