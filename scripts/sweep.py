"""
Train attention variants with one recipe over seeds and a grid of settings, then compare them in one report.

    python -m scripts.sweep config/sweeps/tiny_cpu.py                       # CPU, about a minute
    python -m scripts.sweep config/sweeps/wiki_lr.py                        # one GPU: an LR grid per variant
    python -m scripts.sweep config/sweeps/small_fineweb.py --nproc=8        # the paper's Small comparison
    python -m scripts.sweep config/sweeps/wiki_lr.py --only='tpa_*,mha_*' --dry_run=True   # list, run nothing

A sweep file (config/sweeps/*.py) sets keys of the defaults block below; unknown keys are errors. On the
command line, --key=value sets a sweep key, and any other key is a train.py key for every run (--data_dir=...,
--compile=False, ...); lists and dicts are Python literals: --variants="[{'name': 'tpa', 'attn': 'tpa'}]". A
run's settings, later ones winning: the base config files, the sweep's `train`, the variant's keys, its grid
point, the command line's train.py keys; then the sweep sets seed, out_dir, max_iters, lr_decay_iters (=
max_iters: the cosine ends with the budget, unless a setting above names it), variant and budget.

Runs: every variant x every point of the grid x every seed. `grid` makes any train.py key an axis, e.g.
grid = dict(learning_rate=[3e-4, 6e-4, 1e-3]) (a variant's own `grid` replaces the sweep's for it); on a
learning_rate axis min_lr follows the LR (min_lr_ratio). A run is named by its settings: <variant>_s<seed>,
or with a grid <variant>_lr6e-4_s<seed> (lr, min_lr, warmup, wd, bs abbreviate learning_rate, min_lr, warmup_iters,
weight_decay, batch_size; other keys keep their names). `best_seeds` are further seeds run only at each
variant's best grid point (the lowest mean final validation loss over `seeds`) once its grid has finished.

The budget, the same for every run: max_iters, max_tokens, max_flops (each variant trains max_flops / its
training FLOPs per token tokens), or a training time: max_seconds, or time_of="mha:20000000" (the time the mha
variant takes for 20M tokens). A time budget is turned into tokens per variant with its tokens/s: the median of
finished runs with the same speed settings in calibrate_from (e.g. the LR sweep's runs), else measured by a short
calibration run (calibrate_iters steps) on this machine before any run trains; the speeds are kept in
out_root/calibration.json and reused when the sweep resumes, so a run's length never changes. Every run's
cosine ends with its budget, so the report compares finished runs. With reuse_from, a run that another sweep
has already trained with the same settings (the reference variant of a time budget set by its own tokens, say)
is copied from there, its header naming the source, instead of trained again.

Every run is checked with train.py --dry_run=True, and its data folder is read, before any trains. Each run
trains with train.py in out_root/<name>; then optional evaluations (eval.val_loss on final_eval_tokens,
eval.harness tasks), appended to the run's metrics.jsonl; then the report (scripts/compare.py) goes to
out_root/report.

Resumable: a finished run is skipped and an interrupted one continues from its newest checkpoint (train.py
--init_from=resume, exactly), so the same command run again after a crash, a kill or a preemption finishes
the sweep without redoing work. A killed sweep stops its run too (Linux), which then saves a checkpoint.
A run folder whose header.json holds other settings is refused, not mixed in (a changed sweep file).
Runs can be split over machines with --only; the report needs only each run's header.json and metrics.jsonl,
so run folders brought together from several machines compare as one sweep. A failed run is reported and
the others go on; the exit code is 1 if any run failed. With time_limit (a job's time limit, say), no run starts
that the longest run so far would not finish in time (nor a time budget's run with fewer seconds left than its
steps take, nor a calibration that the longest so far would not finish); the exit code is then 75 (try again)
while runs wait.
"""

import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as `python scripts/sweep.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import checkpoint_iter, list_checkpoints
from configurator import configure
from scripts.compare import SHORT, value_name

# -----------------------------------------------------------------------------
# defaults; a sweep file and --key=value override them
base = ""  # train.py config file(s) every run starts from, comma-separated, e.g. "config/small_tpa.py"
variants = [dict(name="mha", attn="mha"), dict(name="tpa", attn="tpa")]  # each: a name, then train.py keys
seeds = [1337]  # every variant runs once per seed (model init and data order)
grid = {}  # {train.py key: [values]}: every variant runs every combination (a variant's own 'grid' replaces it)
min_lr_ratio = 0.1  # on a learning_rate axis, min_lr = learning_rate x this (unless min_lr is set otherwise)
best_seeds = []  # further seeds, run at each variant's best grid point once its grid (over `seeds`) has finished
best_from = ""  # another sweep's out_root: each variant runs at its best grid point there (replacing its grid), once
# its grid there has finished (that sweep's plan.json lists it);
# a variant with best_of="tpa" takes tpa's point there (e.g. dict(name="tpa_float8", best_of="tpa", float8=True))
# the budget, one of:
max_iters = 0  # optimizer steps
max_tokens = 0  # tokens (rounded up to whole iterations)
max_flops = 0.0  # training FLOPs: each variant trains max_flops / (its FLOPs per token) tokens
max_seconds = 0.0  # training time (the sum of step times): seconds x the variant's calibrated tokens/s
time_of = ""  # "VARIANT:TOKENS": a time budget equal to the time VARIANT takes for TOKENS tokens (its calibration)
calibrate_iters = 30  # steps of each calibration run (time budgets; the first, compiled step is not timed)
calibrate_from = ""  # a folder of finished runs (e.g. best_from's sweep): a variant's tokens/s is the median of its
# runs' there with the same speed settings (model, batch, dtype, kernels), instead of a calibration run
reuse_from = ""  # a folder of finished runs (e.g. best_from's sweep): a run with the same settings there (its budget's
# name aside: 611 steps are 611 steps whether a token or a time budget set them) is copied, not trained again
train = {}  # train.py keys for every run (data_dir, batch_size, eval_interval, warmup_iters, ...)
out_root = "out/sweep"  # runs in out_root/<run name>, the report in out_root/report
nproc = 1  # processes per run: 1 runs python train.py, N > 1 torchrun --standalone --nproc_per_node=N
only = ""  # run only these runs: comma-separated names or globs ("tpa_s*,mha_s1337"); the report shows all
final_eval_tokens = 0  # after training: eval.val_loss on this many validation tokens (0: none)
harness_tasks = ""  # after training: eval.harness on these tasks ("paper", "hellaswag,piqa", ...; "": none)
harness_args = "--num_fewshot=0"  # further eval.harness arguments, e.g. "--num_fewshot=0,2 --limit=500"
reference = "mha"  # the report's differences are against this variant
report = True  # write out_root/report when the sweep ends (also after failures)
time_limit = 0.0  # seconds this command may take (a job's or a machine's time limit), 0 for none: a run is not started
# when the longest run so far in this command (or a time budget's steps) would not finish inside it, nor a
# calibration the longest one so far would not finish; the same command continues later
dry_run = False  # print the runs, their state and commands, then exit
# -----------------------------------------------------------------------------
SWEEP_KEYS = list(configure(globals(), []))
RESERVED = ("seed", "out_dir", "max_iters", "init_from", "variant", "budget", "dry_run")  # set by the sweep per run
# train.py keys that do not change a run's numbers: a run may resume on another machine with other values
OPERATIONAL = ("out_dir", "init_from", "dry_run", "device", "compile", "log_interval", "keep_checkpoints",
               "checkpoint_interval", "wandb_log", "wandb_project", "wandb_run_name")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class Stop(Exception):
    """The sweep was asked to stop (Ctrl-C, SIGTERM)."""


class TimeUp(Exception):
    """time_limit: the next calibration would not finish in the time left."""


def arg(key, value):
    """A --key=value that train.py's configurator reads back as value."""
    return f"--{key}={value}" if isinstance(value, str) else f"--{key}={value!r}"


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    for line in open(path):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: train.py rewrites the log when it resumes
            pass
    return records


def append_metrics(out_dir, record):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _die_with_parent():
    """In the child before exec (Linux): SIGTERM when the sweep dies, so a killed sweep leaves no orphan run."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def python_cmd(nproc, *module_or_script):
    if nproc == 1:
        return [sys.executable, *module_or_script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *module_or_script]


def stream(cmd, log_path, prefix, on_line=None, pass_fds=()):
    """Run cmd with its output appended to log_path, and show each new line of it (prefixed); return its exit code.

    The child writes to the file, not to a pipe, so it never depends on the sweep being alive (a killed sweep's
    run saves its checkpoint and exits), and it runs in its own process group, so a terminal's Ctrl-C reaches
    the sweep only: a Stop (Ctrl-C, SIGTERM) is passed on once as SIGTERM, the child's output is still shown
    while it saves a checkpoint and exits, and a second Stop kills it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    linux = sys.platform.startswith("linux")
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        start = log.tell()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             pass_fds=pass_fds, start_new_session=True, preexec_fn=_die_with_parent if linux else None)
    stopping, partial = False, ""
    with open(log_path, errors="replace") as follow:
        follow.seek(start)
        while True:
            try:
                done = p.poll() is not None
                for line in (partial + follow.read()).splitlines(keepends=True):
                    if not line.endswith("\n") and not done:
                        partial = line  # the rest of the line is still being written
                        break
                    partial = ""
                    print(prefix() + line.rstrip("\n"), flush=True)
                    if on_line:
                        on_line(line)
                if done:
                    break
                time.sleep(0.2)
            except Stop:
                if stopping:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    raise
                stopping = True
                print(f"\nstopping: {prefix().strip()} saves a checkpoint (stop again to kill it now)", flush=True)
                os.killpg(p.pid, signal.SIGTERM)
    if stopping:
        raise Stop
    return p.returncode


BUDGETS = ("max_iters", "max_tokens", "max_flops", "max_seconds", "time_of")


def point_name(point):
    """A grid point's part of a run name: 'lr6e-4', 'tpa_init-xavier_lr1e-3' ('' for no grid)."""
    parts = []
    for k, v in point.items():
        key, value = SHORT.get(k, k), value_name(v)
        parts.append(key + ("-" if not value[:1].isdigit() else "") + value)
    return "_".join(parts)


def grid_points(grid):
    """Every combination of a grid's axes, in the grid's order: [{key: value}]; [{}] for no grid."""
    points = [{}]
    for key, values in grid.items():
        points = [dict(p, **{key: v}) for p in points for v in values]
    return points


class Run:
    def __init__(self, variant, point, seed, sweep):
        self.variant, self.point, self.seed = variant["name"], point, seed
        self.point_name = point_name(point)
        self.label = self.variant + (f"_{self.point_name}" if point else "")  # the run's name without its seed
        self.name = f"{self.label}_s{seed}"
        self.out_dir = os.path.join(sweep["out_root"], self.name)
        keys = {k: v for k, v in variant.items() if k not in ("name", "grid", "best_of")}
        point_args = dict(point)
        if "learning_rate" in point and "min_lr" not in point and "min_lr" not in keys:
            point_args["min_lr"] = float(f"{point['learning_rate'] * sweep['min_lr_ratio']:.6g}")  # follows the peak
        self.explicit = set(sweep["train"]) | set(keys) | set(point_args) | set(sweep["cli_train"])  # keys the user set
        self.args = ([f for f in sweep["base"].split(",") if f] + [arg(k, v) for k, v in sweep["train"].items()]
                     + [arg(k, v) for k, v in keys.items()] + [arg(k, v) for k, v in point_args.items()]
                     + sweep["cli_args"] + [arg("seed", seed), arg("variant", self.variant)])
        self.config = None  # train.py's resolved config (the dry run)
        self.info = None  # the dry run's model config, FLOPs per token and tokens per iteration
        self.max_iters = None
        self.budget = None  # the budget's label, the same for every run of the sweep
        self.budget_s = 0.0  # a time budget's seconds of training steps: the least time the run takes
        self.status = "pending"
        self.source = None  # reuse_from's run with the same settings, if any

    def train_args(self, init_from):
        extra = [arg("max_iters", self.max_iters), arg("budget", self.budget)]
        if "lr_decay_iters" not in self.explicit:
            extra.append(arg("lr_decay_iters", self.max_iters))
        return self.args + extra + [arg("out_dir", self.out_dir), arg("init_from", init_from)]

    def spec(self):
        """The settings that make this run this run: the resolved train.py config without the keys that do not change
        its numbers; compared with the config in the run folder's header.json before the run is resumed."""
        settings = dict(self.config, seed=self.seed, max_iters=self.max_iters, budget=self.budget)
        if "lr_decay_iters" not in self.explicit:
            settings["lr_decay_iters"] = self.max_iters
        return {k: v for k, v in settings.items() if k not in OPERATIONAL}

    def speed(self, sweep):
        """What sets the run's tokens/s: runs that share it share a calibration (speed_settings)."""
        return speed_settings(self.info["model"], self.config, sweep["nproc"])

    def state(self, post_evals):
        """'done', 'evaluate' (trained; an evaluation is missing), 'resume' or 'scratch'."""
        ckpts = list_checkpoints(self.out_dir) if os.path.isdir(self.out_dir) else []
        # the final evaluation in the run's log: what the report reads
        logged = any(r.get("iter") == self.max_iters and "val_loss" in r for r in read_metrics(self.out_dir))
        if ckpts:
            self.start_iter = checkpoint_iter(ckpts[-1])
            trained = self.start_iter >= self.max_iters
        else:  # no checkpoint: trained only if its log ends the run (runs brought from another machine)
            self.start_iter = 0
            trained = logged
        if not trained:
            return "resume" if ckpts else "scratch"
        if not logged:
            raise SystemExit(f"{self.out_dir} holds the run's final checkpoint, {os.path.basename(ckpts[-1])}, but its "
                             f"metrics.jsonl has no final evaluation (deleted, or the folder copied in part): the "
                             f"report would miss the run. Restore its header.json and metrics.jsonl, or move the "
                             f"folder away to train it again")
        return "evaluate" if missing_evaluations(self, post_evals) else "done"


ADDED_LATER = dict(tpa_attention="materialise", sdpa_backend="auto", float8=False)  # train.py keys newer than some
# committed runs, with the value those runs had
SPEED_KEYS = dict(batch_size=None, block_size=None, gradient_accumulation_steps=None, dtype=None, compile=None,
                  device=None, **ADDED_LATER)


def speed_settings(model, config, nproc):
    """The settings that set a run's tokens/s: the model, its batch, dtype, compile, device and kernel choices (a
    setting older headers lack takes the value it had then). Optimizer settings and the initialisation do not."""
    return dict(model={k: v for k, v in model.items() if k != "tpa_init"}, nproc=nproc,
                **{k: config.get(k, default) for k, default in SPEED_KEYS.items()})


def dry_runs(runs):
    """train.py --dry_run=True once per (variant, grid point), a few at a time: {label: (config, info)}."""
    first = {}
    for run in runs:
        first.setdefault(run.label, run)
    pending, results, width = list(first.values()), {}, max(2, min(8, os.cpu_count() or 2))
    while pending:
        batch, pending = pending[:width], pending[width:]
        procs = [(run, subprocess.Popen([sys.executable, "train.py"] + run.args + [arg("out_dir", run.out_dir),
                                                                                  "--dry_run=True"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for run in batch]
        for run, p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                msg = (err.strip() or out.strip()).splitlines()[-1:] or ["no output"]
                raise SystemExit(f"{run.label}: train.py refuses its settings: {msg[0]}\n"
                                 f"  (python train.py {shlex.join(run.args)} --dry_run=True)")
            info = json.loads(out[:out.rindex("}") + 1])
            results[run.label] = (info.pop("config"), info)
    return results


def check_data(runs):
    """Every data folder the runs read holds readable train and val shards: a missing folder stops the sweep before
    any run starts, instead of failing every run."""
    from data.shards import find_shards, read_header
    for data_dir in sorted({run.config["data_dir"] for run in runs}):
        try:
            for split in ("train", "val"):
                for path in find_shards(data_dir, split):
                    read_header(path)
        except (FileNotFoundError, ValueError) as e:
            users = sorted({run.label for run in runs if run.config["data_dir"] == data_dir})
            who = ", ".join(users[:4]) + (f" and {len(users) - 4} more" if len(users) > 4 else "")
            raise SystemExit(f"data error for {who}: {e}")


def resolve(runs, sweep):
    """Check every run's settings (train.py --dry_run=True) and its data; set its config, max_iters and budget
    (a time budget's max_iters stays None until prepare() has the calibration)."""
    results = dry_runs(runs)
    for run in runs:
        run.config, run.info = results[run.label]
        if run.config["gradient_accumulation_steps"] % sweep["nproc"]:
            raise SystemExit(f"{run.label}: gradient_accumulation_steps={run.config['gradient_accumulation_steps']} "
                             f"(global) is not divisible by nproc={sweep['nproc']}")
    check_data(runs)
    set_budget(runs, sweep)


def set_budget(runs, sweep, calibration=None):
    """Each run's max_iters from the sweep's budget (and its calibrated tokens/s for a time budget)."""
    seconds = time_budget(sweep, calibration)
    for run in runs:
        tokens_per_iter = run.info["tokens_per_iter"]
        if sweep["max_iters"]:
            run.max_iters, run.budget = sweep["max_iters"], f"iters={sweep['max_iters']}"
        elif sweep["max_tokens"]:
            run.max_iters, run.budget = iters(sweep["max_tokens"] / tokens_per_iter), f"tokens={sweep['max_tokens']}"
        elif sweep["max_flops"]:
            run.max_iters = iters(sweep["max_flops"] / (run.info["flops_per_token"] * tokens_per_iter))
            run.budget = f"flops={sweep['max_flops']:.6g}"
        elif seconds is not None and calibration and run.label in calibration:
            run.max_iters = iters(seconds * calibration[run.label] / tokens_per_iter)
            run.budget, run.budget_s = f"seconds={seconds:.6g}", seconds
        if run.max_iters is not None and run.config["warmup_iters"] > run.max_iters:
            raise SystemExit(f"{run.label}: warmup_iters={run.config['warmup_iters']} exceeds the budget of "
                             f"{run.max_iters} iterations; set a shorter warmup in the sweep's train")


def iters(x):
    """A budget in iterations, rounded up (not past a float's rounding error: 20.000000000000004 is 20)."""
    return max(1, math.ceil(x - 1e-9 * x))


def time_budget(sweep, calibration):
    """The time budget in seconds: max_seconds, or time_of's tokens at its variant's calibrated tokens/s."""
    if sweep["max_seconds"]:
        return sweep["max_seconds"]
    if sweep["time_of"] and calibration and sweep["time_of_label"] in calibration:
        return sweep["time_of_tokens"] / calibration[sweep["time_of_label"]]
    return None


def check_grid(grid, where, reserved):
    if not isinstance(grid, dict):
        raise ValueError(f"{where}: grid={grid!r} must be a dict {{train.py key: [values]}}")
    for key, values in grid.items():
        if key in reserved or key in ("name", "grid"):
            raise ValueError(f"{where}: grid axis {key!r} is set by the sweep per run")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: grid axis {key!r} needs a non-empty list of values, got {values!r}")
        if not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise ValueError(f"{where}: grid axis {key!r} takes numbers, strings or booleans, got {values!r}")
        names = [value_name(v) for v in values]
        if len(set(names)) != len(names) or not all(NAME.fullmatch(n) for n in names):
            raise ValueError(f"{where}: grid axis {key!r} repeats a value or has one that cannot name a run "
                             f"({values!r})")


def take_best_points(sweep):
    """best_from: each variant's grid becomes its best point in that sweep (scripts/compare.py's choice over the
    finished runs of the variant there), e.g. a time budget run at the learning rates a token budget found."""
    from scripts.compare import analyse_group, find_runs, summarize
    try:
        found = [summarize(r) for r in find_runs([sweep["best_from"]])]
    except ValueError as e:
        raise ValueError(f"best_from: {e}") from None
    plan_path = os.path.join(sweep["best_from"], PLAN)
    plan = json.load(open(plan_path)) if os.path.exists(plan_path) else {}  # sweeps before plan.json: none
    for v in sweep["variants"]:
        source = v.get("best_of", v["name"])
        runs = [s for s in found if s["variant"] == source]
        unfinished = [s["name"] for s in runs if not s["complete"]]
        unfinished += sorted(set(plan.get(source, [])) - {s["name"] for s in runs})  # planned there, not started
        if not runs or unfinished:
            raise ValueError(f"best_from={sweep['best_from']!r}: variant {source!r} has "
                             + (f"unfinished runs there ({', '.join(unfinished)})" if runs else "no runs there")
                             + "; finish that sweep first (it resumes), or leave the variant out")
        group = analyse_group(runs)
        best = group["runs"][0]["config"]
        v["grid"] = {k: [best[k]] for k in group["axes"]}
        print(f"{v['name']}: at {source}'s best point in {sweep['best_from']}: {group['best']} (runs "
              f"{', '.join(s['name'] for s in group['runs'])})", file=sys.stderr)
        if group["edge"]:  # that sweep's grid may be unfinished or too narrow: this sweep cannot tell which
            print(f"  warning: that is the {group['edge']} learning rate {source} has there: finish or widen its grid "
                  f"first, or the best point may lie beyond it", file=sys.stderr)


def parse_args(argv):
    """Split argv into the sweep's own settings (strict) and train.py keys for every run."""
    defaults = {k: globals()[k] for k in SWEEP_KEYS}
    sweep_argv, cli_train = [], {}
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key is None or key in SWEEP_KEYS or a == "--help":
            sweep_argv.append(a)
        elif key in RESERVED:
            hint = {"seed": "seeds", "out_dir": "out_root", "max_iters": "max_iters", "budget": "max_tokens, "
                    "max_flops or max_seconds"}.get(key)
            raise ValueError(f"{a}: the sweep sets {key} for every run" + (f"; use its {hint!r}" if hint else ""))
        elif "=" not in a:
            raise ValueError(f"argument {a!r}: write overrides as --key=value")
        else:
            cli_train[key] = a
    sweep = configure(defaults, sweep_argv)
    sweep["cli_train"] = cli_train
    sweep["cli_args"] = list(cli_train.values())
    if not sweep_argv or sweep_argv[0].startswith("--"):
        print("note: no sweep file given; using the defaults of scripts/sweep.py", file=sys.stderr)
    given = [k for k in BUDGETS if sweep[k]]
    if len(given) != 1 or any(sweep[k] < 0 for k in BUDGETS if k != "time_of"):
        raise ValueError(f"set exactly one budget, > 0: max_iters, max_tokens, max_flops, max_seconds or time_of "
                         f"(got {', '.join(f'{k}={sweep[k]!r}' for k in BUDGETS if sweep[k]) or 'none'})")
    if sweep["time_limit"] < 0:
        raise ValueError(f"time_limit={sweep['time_limit']} must be >= 0 seconds (0: no limit)")
    if sweep["nproc"] < 1:
        raise ValueError(f"nproc={sweep['nproc']} must be >= 1")
    if sweep["final_eval_tokens"] < 0:
        raise ValueError(f"final_eval_tokens={sweep['final_eval_tokens']} must be >= 0")
    if sweep["calibrate_iters"] < 3:
        raise ValueError(f"calibrate_iters={sweep['calibrate_iters']} must be >= 3 (the first step is not timed)")
    if not 0 <= sweep["min_lr_ratio"] <= 1:
        raise ValueError(f"min_lr_ratio={sweep['min_lr_ratio']} must be in [0, 1]")
    for key in ("seeds", "best_seeds"):
        seeds = sweep[key]
        if (not seeds and key == "seeds") or not all(type(s) is int for s in seeds):
            raise ValueError(f"{key}={seeds!r} must be a {'non-empty ' if key == 'seeds' else ''}list of integers")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{key}={seeds!r} repeats a seed")
    names = []
    check_grid(sweep["grid"], "the sweep", RESERVED)
    for v in sweep["variants"]:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not NAME.fullmatch(v["name"]):
            raise ValueError(f"variant {v!r}: each variant is a dict with a 'name' (letters, digits, _ . + -) and "
                             f"train.py keys, e.g. dict(name='tpa_r4', attn='tpa', q_rank=4)")
        bad = [k for k in v if k in RESERVED]
        if bad:
            raise ValueError(f"variant {v['name']!r} sets {bad}: the sweep sets these per run")
        grid = v.get("grid", sweep["grid"])
        check_grid(grid, f"variant {v['name']!r}", RESERVED)
        if "best_of" in v and not (isinstance(v["best_of"], str) and sweep["best_from"]):
            raise ValueError(f"variant {v['name']!r}: best_of={v['best_of']!r} names the variant of best_from's sweep "
                             f"whose best point it runs at; set best_from (that sweep's out_root) and a variant name")
        both = sorted(set(grid) & (set(v) | set(cli_train)))
        if both:
            raise ValueError(f"variant {v['name']!r}: {both} is both a grid axis and set for every run; keep one")
        names.append(v["name"])
    if not names or len(set(names)) != len(names):
        raise ValueError(f"variants need distinct names (got {names})")
    bad = [k for k in sweep["train"] if k in RESERVED]
    if bad:
        raise ValueError(f"train sets {bad}: the sweep sets these per run (seeds, out_root, max_iters / max_tokens)")
    if sweep["best_from"]:
        take_best_points(sweep)
    if sweep["time_of"]:
        variant, _, tokens = sweep["time_of"].partition(":")
        try:
            sweep["time_of_tokens"] = int(float(tokens.replace("_", "")))
        except ValueError:
            sweep["time_of_tokens"] = 0
        if variant not in names or sweep["time_of_tokens"] <= 0:
            raise ValueError(f"time_of={sweep['time_of']!r}: write 'VARIANT:TOKENS' with one of the variants "
                             f"{names}, e.g. '{names[0]}:20000000'")
        v = next(v for v in sweep["variants"] if v["name"] == variant)
        sweep["time_of_label"] = Run(v, grid_points(v.get("grid", sweep["grid"]))[0], 0, sweep).label
    return sweep


def post_evaluations(sweep):
    """{metrics key that marks it done: evaluation} asked for after training."""
    return {k: v for k, v in (("final_val_loss", "val_loss"), ("harness", "harness")) if
            (sweep["final_eval_tokens"] if v == "val_loss" else sweep["harness_tasks"])}


def missing_evaluations(run, post):
    have = {k for r in read_metrics(run.out_dir) if r.get("iter") == run.max_iters for k in r}
    return [kind for key, kind in post.items() if key not in have]


def evaluate(run, kind, sweep, prefix, pass_fds):
    """Run one post-training evaluation of a trained run; append its result to metrics.jsonl. True if done."""
    if not list_checkpoints(run.out_dir):
        print(f"{run.name}: trained, but no checkpoint is here for its {kind} evaluation (a run brought from "
              f"another machine?); skipped")
        return False
    if kind == "val_loss":
        cmd = python_cmd(sweep["nproc"], "-m", "eval.val_loss") + [
            f"--out_dir={run.out_dir}", f"--eval_tokens={sweep['final_eval_tokens']}",
            f"--batch_size={run.config['batch_size']}", f"--device={run.config['device']}",
            f"--dtype={run.config['dtype']}"]
        result = os.path.join(run.out_dir, "val_loss.json")
    else:
        folder = os.path.join(run.out_dir, "harness_sweep")
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # this sweep's own, from an attempt that failed
        cmd = [sys.executable, "-m", "eval.harness", f"--out_dir={run.out_dir}", f"--tasks={sweep['harness_tasks']}",
               f"--output_path={folder}"] + sweep["harness_args"].split()
        result = os.path.join(folder, "harness.json")
    if os.path.isfile(result):
        os.remove(result)  # a stale result must not pass for this one
    code = stream(cmd, os.path.join(run.out_dir, "eval.log"), prefix, pass_fds=pass_fds)
    if code != 0 or not os.path.exists(result):
        print(f"{run.name}: the {kind} evaluation failed (exit code {code}; see {run.out_dir}/eval.log)", flush=True)
        return False
    out = json.load(open(result))
    if kind == "val_loss":
        record = dict(iter=run.max_iters, final_val_loss=out["loss"], final_val_ppl=out["ppl"], final_bpb=out["bpb"],
                      final_eval_tokens=out["tokens"])
    else:
        record = dict(iter=run.max_iters, harness=out["rows"], harness_tasks=out["tasks"], harness_limit=out["limit"])
    append_metrics(run.out_dir, record)
    return True


PLAN = "plan.json"  # in out_root: {variant: the names of its grid's runs}, for a later sweep's best_from


def write_plan(runs, sweep):
    """Record each variant's grid runs in out_root/plan.json (other variants' entries, from a sweep run with
    --variants narrowed, stay), so that best_from can tell a finished grid from one that has not started a point."""
    path = os.path.join(sweep["out_root"], PLAN)
    plan = json.load(open(path)) if os.path.exists(path) else {}
    grids = {}
    for run in runs:
        grids.setdefault(run.variant, []).append(run.name)
    plan.update(grids)
    with open(path + ".tmp", "w") as f:
        json.dump(plan, f, indent=1)
    os.replace(path + ".tmp", path)


def lock(out_root):
    """Hold out_root/.sweep.lock, and pass it to the runs, so that an orphaned run still holds it: wait for a
    previous sweep's run to finish saving, refuse a concurrent sweep."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    os.makedirs(out_root, exist_ok=True)
    fd = os.open(os.path.join(out_root, ".sweep.lock"), os.O_RDWR | os.O_CREAT)
    deadline = time.time() + 120
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.time() > deadline:
                raise SystemExit(f"another sweep (or a run it started) is still working in {out_root}: wait for it "
                                 f"or stop it, then run this command again")
            print(f"waiting for another sweep's run in {out_root} to stop ...", flush=True)
            time.sleep(2)


def train_and_evaluate(run, k, n_todo, sweep, post, progress, pass_fds):
    """Train (or resume) one run, then its evaluations. True if the run is done."""
    start_done = progress["done"]

    def prefix():
        head = f"[{k}/{n_todo} {run.name}"
        if not progress["total"]:
            return head + "] "
        eta = ""
        if progress["done"]:
            rate = progress["done"] / (time.time() - progress["t0"])
            eta = f" eta {fmt_time((progress['total'] - progress['done']) / rate)}"
        return f"{head} | sweep {100 * progress['done'] / progress['total']:.0f}%{eta}] "

    def on_line(line):
        m = re.match(r"iter (\d+)/\d+ \|", line)
        if m:
            progress["done"] = start_done + int(m.group(1)) - run.start_iter

    if run.status in ("resume", "scratch"):
        os.makedirs(run.out_dir, exist_ok=True)
        cmd = python_cmd(sweep["nproc"], "train.py") + run.train_args(init_from=run.status)
        code = stream(cmd, os.path.join(run.out_dir, "train.log"), prefix, on_line, pass_fds)
        progress["done"] = start_done + run.max_iters - run.start_iter
        run.status = run.state(post)
        if code != 0 or run.status in ("resume", "scratch"):
            tail = open(os.path.join(run.out_dir, "train.log")).read().splitlines()[-12:]
            print(f"\n{run.name} FAILED (exit code {code}); the end of {run.out_dir}/train.log:\n  "
                  + "\n  ".join(tail) + "\n", flush=True)
            return False
    return all([evaluate(run, kind, sweep, prefix, pass_fds) for kind in missing_evaluations(run, post)])


def calibrate(runs, sweep, pass_fds, here, measure=True, deadline=None):
    """{label: calibration record (tokens_per_s, device, ...)} of the runs, from out_root/calibration.json; speeds not
    recorded there are taken from calibrate_from's runs on this machine (here) or measured (a calibrate_iters-step
    train.py run in out_root/calibration/<label>), and recorded; a dry run (measure False) measures and records
    nothing, and plans with calibrate_from's runs from any machine (say, on a laptop for a GPU sweep). With a
    deadline (time_limit), no measurement starts that the longest one so far would not finish by then (TimeUp);
    those already made are recorded, and the same command continues."""
    path = os.path.join(sweep["out_root"], "calibration.json")
    records = json.load(open(path)) if os.path.exists(path) else []
    found, finished, longest = {}, None, 0.0
    for run in {run.label: run for run in runs}.values():
        speed = run.speed(sweep)
        record = next((r for r in records if r["speed"] == speed), None)
        if record is None and sweep["calibrate_from"]:
            if finished is None:
                finished = finished_runs(sweep["calibrate_from"], "calibrate_from")
            record = speed_from_runs(run, speed, finished, sweep["calibrate_from"], None if not measure else here)
        if record is None and measure:
            if deadline and time.time() + longest > deadline:
                raise TimeUp(f"the next calibration ({run.label}) would not finish: the longest took "
                             f"{fmt_time(longest)}, and {fmt_time(max(deadline - time.time(), 0))} are left")
            t0 = time.time()
            record = measure_speed(run, speed, sweep, pass_fds)
            longest = max(longest, time.time() - t0)
        if record is not None and record not in records:
            others = sorted({r["device"] for r in records} - {record["device"]})
            if others:  # a time budget compares speeds measured on one kind of machine only
                raise SystemExit(f"{path} holds calibrations measured on {', '.join(others)}, but this one is from "
                                 f"{record['device']}: run this sweep where those were measured, or start it anew "
                                 f"in another out_root")
            records.append(record)
            if measure:  # a dry run writes nothing
                os.makedirs(sweep["out_root"], exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    json.dump(records, f, indent=1)
                os.replace(path + ".tmp", path)
        if record is not None:
            found[run.label] = record
    return found


def this_machine(runs, sweep):
    """This machine as compare names a run's device ("1 x NVIDIA H100 80GB HBM3"): the machine a time budget's
    speeds must come from, since its runs' lengths are their time here."""
    from common import describe_device, resolve_device
    return f"{sweep['nproc']} x {describe_device(*resolve_device(runs[0].config['device']))}"


def finished_runs(folder, key):
    """compare.summarize of every finished run in folder (the sweep key that names it: calibrate_from, reuse_from)."""
    from scripts.compare import find_runs, summarize
    try:
        return [s for s in map(summarize, find_runs([folder])) if s["complete"]]
    except ValueError as e:
        raise SystemExit(f"{key}: {e}") from None


def speed_from_runs(run, speed, finished, folder, machine=None):
    """A calibration from finished runs (of folder) with the same speed settings, on machine where given: the median
    of their tokens/s (tokens over the sum of their step times), or None where none matches."""
    found = [s for s in finished if s["train_time_s"] > 0
             and speed_settings(s["model_config"], s["config"], s["world_size"]) == speed]
    elsewhere = sorted({s["device"] for s in found if machine and s["device"] != machine})
    found = [s for s in found if not machine or s["device"] == machine]
    if not found:
        print(f"calibrate_from: no finished run in {folder} has {run.label}'s speed settings"
              + (f" on this machine ({machine}; some ran on {', '.join(elsewhere)})" if elsewhere else ""), flush=True)
        return None
    devices = sorted({s["device"] for s in found})
    if len(devices) > 1:
        raise SystemExit(f"calibrate_from: {run.label}'s runs there ran on {', '.join(devices)}; a time budget needs "
                         f"speeds from one kind of machine")
    tokens_per_s = statistics.median(s["tokens_per_s"] for s in found)
    print(f"calibrated {run.label} from {len(found)} runs in {folder}: {tokens_per_s:,.0f} tokens/s "
          f"on {devices[0]}", flush=True)
    return dict(label=run.label, tokens_per_s=tokens_per_s, step_ms=run.info["tokens_per_iter"] / tokens_per_s * 1000,
                steps=sum(s["iters"] for s in found), device=devices[0], runs=[s["name"] for s in found],
                git_commit=sorted({s["git_commit"] for s in found}), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                speed=speed)


def measure_speed(run, speed, sweep, pass_fds):
    """One calibration: the run's training step for calibrate_iters steps on this machine (the first step,
    compiled, is not timed); its tokens/s is tokens per iteration / the median step time."""
    k, c = sweep["calibrate_iters"], run.config
    out_dir = os.path.join(sweep["out_root"], "calibration", run.label)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # a measurement that did not finish
    os.makedirs(out_dir)
    cmd = python_cmd(sweep["nproc"], "train.py") + run.args + [
        arg("max_iters", k), arg("lr_decay_iters", k), arg("eval_interval", k), arg("checkpoint_interval", k),
        arg("keep_checkpoints", 1), arg("eval_tokens", c["block_size"] + 1), arg("log_interval", max(1, k // 6)),
        arg("wandb_log", False), arg("budget", "calibration"), arg("out_dir", out_dir), arg("init_from", "scratch")]
    print(f"calibrating {run.label}: {k} steps to measure its tokens/s for the time budget", flush=True)
    code = stream(cmd, os.path.join(out_dir, "train.log"), lambda: f"[calibrate {run.label}] ", pass_fds=pass_fds)
    steps = [r["dt_ms"] for r in read_metrics(out_dir) if "dt_ms" in r]
    if code != 0 or len(steps) < 2:
        raise SystemExit(f"the calibration of {run.label} failed (exit code {code}; see {out_dir}/train.log)")
    for p in list_checkpoints(out_dir):  # only its log is kept
        os.remove(p)
    header = json.load(open(os.path.join(out_dir, "header.json")))
    step_ms = statistics.median(steps)
    return dict(label=run.label, tokens_per_s=run.info["tokens_per_iter"] / step_ms * 1000, step_ms=step_ms,
                steps=k, device=f"{header['world_size']} x {header['device']}", git_commit=header["git_commit"],
                time=header["time"], speed=speed)


def best_point_runs(sweep, runs):
    """The best_seeds runs: (runs, {variant: why not yet}). A variant's best grid point is the one with the lowest
    mean final validation loss over `seeds` (scripts/compare.py's choice), once every grid run has finished or
    failed in this sweep (a diverged run: its point is out of the choice)."""
    from scripts.compare import best_point, find_runs, summarize
    out, waiting = [], {}
    for v in sweep["variants"]:
        grid_runs = [r for r in runs if r.variant == v["name"]]
        finals = {}
        for r in grid_runs:
            s = summarize(find_runs([r.out_dir])[0]) if os.path.isfile(os.path.join(r.out_dir, "header.json")) else None
            if r.status == "failed":
                finals.setdefault(r.label, (r.point, []))[1].append(math.inf)
                continue
            if s is None or not s["complete"]:
                waiting[v["name"]] = f"{r.name} has not finished"
                break
            finals.setdefault(r.label, (r.point, []))[1].append(s["final_val_loss"])
        else:
            if all(math.inf in losses for _, losses in finals.values()):
                waiting[v["name"]] = "every grid point failed"
                continue
            label = best_point({k: losses for k, (_, losses) in finals.items()})
            out += [Run(v, finals[label][0], seed, sweep) for seed in sweep["best_seeds"] if seed not in sweep["seeds"]]
    return out, waiting


def prepare(runs, sweep, post, pass_fds, dry_run, deadline=None):
    """Budgets (calibrating a time budget's speeds unless dry_run, by the deadline), then each run's state; refuse
    run folders made with other settings."""
    calibration, records, here = None, {}, None
    if sweep["max_seconds"] or sweep["time_of"]:
        here = this_machine(runs, sweep)
        records = calibrate(runs, sweep, pass_fds, here, measure=not dry_run, deadline=deadline)
        calibration = {label: r["tokens_per_s"] for label, r in records.items()}
    set_budget(runs, sweep, calibration)
    conflicts = []
    for run in runs:
        header = os.path.join(run.out_dir, "header.json")
        if run.max_iters is None:
            run.status = "calibrate"  # a dry run before the calibration
            continue
        if os.path.exists(header):
            diff = setting_changes(json.load(open(header))["config"], run.spec())
            if diff:
                conflicts.append(f"  {run.out_dir}: {{setting: (then, now)}} {diff}")
        run.status = run.state(post)
    if sweep["reuse_from"]:
        reuse(runs, sweep, dry_run)
    if conflicts:
        sys.exit("these run folders were made with other settings; use another out_root, or delete them:\n"
                 + "\n".join(conflicts))
    # a time budget's run lengths are its speeds' machine's seconds: elsewhere they would not take equal time
    elsewhere = sorted({records[r.label]["device"] for r in runs if r.label in records
                        and r.status in ("scratch", "resume") and records[r.label]["device"] != here})
    if elsewhere:
        why = (f"this time budget's speeds were measured on {', '.join(elsewhere)}, but this machine is {here}, where "
               f"the runs would not take the budget's time")
        if not dry_run:
            sys.exit(f"{why}: run the sweep on that kind of machine, or start it anew in another out_root (its "
                     f"speeds are then measured here)")
        print(f"note: {why}; a real run here would measure this machine's speeds", flush=True)


def setting_changes(then, now):
    """{key: (then, now)} for the settings a run folder's header config (then) and a run's spec (now) differ in. A
    key the header lacks came with a newer train.py, and one train.py no longer has is no setting now: neither is
    a difference here."""
    return {k: (then[k], now[k]) for k in sorted(then) if k in now and k not in OPERATIONAL and then[k] != now[k]}


def same_run(then, now):
    """Whether a finished run's config (then) trained what a run's spec (now) asks for, but for its budget's name.
    Strict where setting_changes is lenient: a key the header lacks must have the value runs had before train.py
    had it (ADDED_LATER)."""
    return not setting_changes(dict(then, budget=now["budget"]), now) and all(
        k in ADDED_LATER and now[k] == ADDED_LATER[k] for k in now if k not in then)


def reuse(runs, sweep, dry_run):
    """reuse_from: each run not started here whose settings (but its budget's name) equal a finished run's there is
    copied from it (not its checkpoints) and done; its header records where it came from."""
    finished = finished_runs(sweep["reuse_from"], "reuse_from")
    for run in runs:
        if run.status != "scratch" or os.path.exists(run.out_dir):
            continue
        source = next((s for s in finished if same_run(s["config"], run.spec())), None)
        if source is None:
            continue
        run.source = source["path"]
        if dry_run:
            continue
        tmp = run.out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run.source, tmp, ignore=shutil.ignore_patterns("*.pt", "*.tmp", ".sweep.lock"))
        path = os.path.join(tmp, "header.json")
        header = json.load(open(path))
        header["config"]["budget"] = run.budget  # this sweep's name for the same budget
        header["reused_from"] = dict(path=run.source, budget=source["config"].get("budget"))
        with open(path, "w") as f:
            json.dump(header, f, indent=1)
        os.replace(tmp, run.out_dir)  # whole or not at all
        run.status = "done"
        print(f"{run.name}: copied from {run.source} (trained there with the same settings)", flush=True)


def describe(runs, sweep):
    for run in runs:
        c = run.config
        state = {"resume": f"resume from iteration {run.start_iter}", "scratch": "train", "evaluate": "evaluate",
                 "done": "done", "calibrate": "train (its length comes from the calibration)"}[run.status]
        if run.source and run.status == "scratch":  # a dry run: reuse_from's run
            state = f"copy {run.source}"
        if run.max_iters is None:
            print(f"  {run.name:32s} {'?':>8} iterations {'?':>10} tokens   {state}")
            continue
        tokens = run.max_iters * c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
        print(f"  {run.name:32s} {run.max_iters:>8,} iterations {tokens / 1e6:>10,.1f}M tokens   {state}")
        if sweep["dry_run"]:
            print("    " + shlex.join(python_cmd(sweep["nproc"], "train.py") + run.train_args("scratch")))


def main(argv):
    started = time.time()  # time_limit counts from here: the dry runs before training take time too
    try:
        sweep = parse_args(argv)
    except ValueError as e:
        sys.exit(f"sweep error: {e}")
    runs = [Run(v, p, s, sweep) for v in sweep["variants"] for p in grid_points(v.get("grid", sweep["grid"]))
            for s in sweep["seeds"]]
    patterns = [p for p in sweep["only"].split(",") if p]
    matches = lambda name: not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)
    selected = [r for r in runs if matches(r.name)]
    later = [f"{r.label}_s{s}" for r in runs for s in sweep["best_seeds"]]  # the best point's runs, once known
    if not selected and not any(matches(n) for n in later):
        sys.exit(f"sweep error: only={sweep['only']!r} matches no run of {[r.name for r in runs]}"
                 + (f" (nor of the best points' seeds {sweep['best_seeds']})" if later else ""))
    helpers = []  # resolved for the budget only: time_of's variant
    if sweep["time_of"] and not any(r.label == sweep["time_of_label"] for r in selected):
        helpers = [next(r for r in runs if r.label == sweep["time_of_label"])]
    resolve(selected + helpers, sweep)
    lock_fd = None if sweep["dry_run"] else lock(sweep["out_root"])
    try:
        return run_sweep(sweep, runs, selected, helpers, matches, lock_fd, started)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def run_sweep(sweep, runs, selected, helpers, matches, lock_fd, started):
    post = post_evaluations(sweep)
    pass_fds = (lock_fd,) if lock_fd is not None else ()

    def on_stop(signum, frame):
        raise Stop
    if not sweep["dry_run"]:
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
    n_points = sum(len(grid_points(v.get("grid", sweep["grid"]))) for v in sweep["variants"])
    grid_note = f", {n_points} grid points" if n_points > len(sweep["variants"]) else ""
    failed, interrupted, best_runs, waiting_time = [], False, [], []
    progress = dict(done=0, t0=time.time(), total=0)
    longest = 0.0  # seconds of the longest run (training and evaluations) so far: what time_limit plans with
    deadline = started + sweep["time_limit"] if sweep["time_limit"] and not sweep["dry_run"] else None

    def train_all(todo):
        nonlocal longest
        progress["total"] += sum(r.max_iters - r.start_iter for r in todo if r.status in ("resume", "scratch"))
        for k, run in enumerate(todo, 1):
            left = sweep["time_limit"] - (time.time() - started)
            # a run takes as long as the longest so far, and a time budget's run at least its steps' seconds
            need = max(longest, run.budget_s * (1 - run.start_iter / run.max_iters) if run.max_iters else 0)
            if sweep["time_limit"] and (waiting_time or need > left):
                if not waiting_time:
                    took = f"the longest run so far took {fmt_time(longest)}" if longest >= need else \
                        f"{run.name} has {fmt_time(need)} of training steps"
                    print(f"time_limit: {fmt_time(max(left, 0))} left, and {took}: the runs from {run.name} on wait "
                          f"for the same command again", flush=True)
                waiting_time.extend(todo[k - 1:])
                for r in todo[k - 1:]:
                    r.status = "waits (time_limit)"
                return
            t0 = time.time()
            if not train_and_evaluate(run, k, len(todo), sweep, post, progress, pass_fds):
                run.status = "failed"
                failed.append(run)
            longest = max(longest, time.time() - t0)
    def prepare_by_deadline(todo, dry_run):
        """prepare(); if a calibration would not finish in the time left, every run of todo waits (False)."""
        try:
            prepare(todo, sweep, post, pass_fds, dry_run, deadline)
            return True
        except TimeUp as e:
            print(f"time_limit: {e}; the calibrations made are kept, and the runs wait for the same command again",
                  flush=True)
            for r in todo:
                r.status = "waits (time_limit)"
            waiting_time.extend(r for r in todo if r not in helpers)
            return False
    try:
        if not prepare_by_deadline(selected + helpers, sweep["dry_run"]):
            selected_todo = []
        else:
            selected_todo = [r for r in selected if r.status != "done"]
        print(f"sweep: {len(runs)} runs ({len(sweep['variants'])} variants{grid_note} x {len(sweep['seeds'])} seeds) "
              f"in {sweep['out_root']}" + (f", {len(selected)} selected by only={sweep['only']!r}" if sweep["only"]
                                           else ""))
        if not waiting_time:
            describe(selected, sweep)
        if sweep["best_seeds"]:
            print(f"  then seeds {sweep['best_seeds']} at each variant's best grid point, once its grid has finished")
        if sweep["dry_run"]:
            return 0
        write_plan(runs, sweep)
        train_all(selected_todo)
        if sweep["best_seeds"] and not waiting_time:
            best_runs, waiting = best_point_runs(sweep, runs)
            best_runs = [r for r in best_runs if matches(r.name)]
            for variant, why in waiting.items():
                print(f"{variant}: its best grid point is not known yet ({why}); its seeds {sweep['best_seeds']} wait")
            if best_runs:
                resolve(best_runs, sweep)
                if prepare_by_deadline(best_runs, False):
                    print(f"at each variant's best grid point: {len(best_runs)} runs")
                    describe(best_runs, sweep)
                    train_all([r for r in best_runs if r.status != "done"])
    except Stop:
        interrupted = True
        print("\nsweep interrupted: run the same command again to continue where it stopped", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    everything = runs + [r for r in best_runs if r.name not in {x.name for x in runs}]
    if sweep["report"] and not interrupted:
        from scripts.compare import find_runs, write_report
        folders = [r.out_dir for r in everything if os.path.exists(os.path.join(r.out_dir, "header.json"))]
        if folders:
            out = os.path.join(sweep["out_root"], "report")
            write_report(find_runs(folders), out, reference=sweep["reference"])
            print(f"report: {out}/report.md")
    print("\n| run | state | final val loss |\n|---|---|---|")
    for run in everything:
        val = [r["val_loss"] for r in read_metrics(run.out_dir) if "val_loss" in r]
        state = run.status if run in selected or run in best_runs else "not selected"
        print(f"| {run.name} | {state} | " + (f"{val[-1]:.4f} |" if val else "- |"))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; fix the cause and run the same "
              f"command again (finished runs are kept)")
    if waiting_time:
        print(f"{len(waiting_time)} run(s) wait for more time (time_limit={sweep['time_limit']:g} s)"
              + (" and the best points' seeds after them" if sweep["best_seeds"] else "")
              + ": run the same command again")
    return 130 if interrupted else 1 if failed else 75 if waiting_time else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
