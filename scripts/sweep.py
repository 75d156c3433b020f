"""
Train attention variants with one recipe and several seeds, then compare them in one report.

    python -m scripts.sweep config/sweeps/tiny_cpu.py                       # CPU, about a minute
    python -m scripts.sweep config/sweeps/wiki_1gpu.py                      # one GPU, about 20 minutes
    python -m scripts.sweep config/sweeps/small_fineweb.py --nproc=8        # the paper's Small comparison
    python -m scripts.sweep config/sweeps/wiki_1gpu.py --only='tpa_*,mha_*' --dry_run=True   # list, run nothing

A sweep file (config/sweeps/*.py) sets keys of the defaults block below; unknown keys are errors. On the
command line, --key=value sets a sweep key, and any other key is a train.py key for every run (--data_dir=...,
--compile=False, ...); lists and dicts are Python literals: --variants="[{'name': 'tpa', 'attn': 'tpa'}]". A run's settings, later ones winning: the base config files, the sweep's `train`, the
variant's keys, the command line's train.py keys; then the sweep sets seed, out_dir, max_iters, lr_decay_iters
(= max_iters: the cosine ends with the budget, unless a setting above names it) and variant.

Every run is checked with train.py --dry_run=True before any trains. Each (variant, seed) trains with train.py
in out_root/<variant>_s<seed>; then optional evaluations (eval.val_loss on final_eval_tokens, eval.harness
tasks), appended to the run's metrics.jsonl; then the report (scripts/compare.py) goes to out_root/report.

Resumable: a finished run is skipped and an interrupted one continues from its newest checkpoint (train.py
--init_from=resume, exactly), so the same command run again after a crash, a kill or a preemption finishes
the sweep without redoing work. A killed sweep stops its run too (Linux), which then saves a checkpoint.
A run folder whose header.json holds other settings is refused, not mixed in (a changed sweep file).
Runs can be split over machines with --only; the report needs only each run's header.json and metrics.jsonl,
so run folders brought together from several machines compare as one sweep. A failed run is reported and
the others go on; the exit code is 1 if any run failed.
"""

import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from checkpoint import checkpoint_iter, list_checkpoints
from configurator import configure

# -----------------------------------------------------------------------------
# defaults; a sweep file and --key=value override them
base = ""  # train.py config file(s) every run starts from, comma-separated, e.g. "config/small_tpa.py"
variants = [dict(name="mha", attn="mha"), dict(name="tpa", attn="tpa")]  # each: a name, then train.py keys
seeds = [1337]  # every variant runs once per seed (model init and data order)
max_iters = 0  # the budget in optimizer steps, or
max_tokens = 0  # the budget in tokens (rounded up to whole iterations); set exactly one of the two
train = {}  # train.py keys for every run (data_dir, batch_size, eval_interval, warmup_iters, ...)
out_root = "out/sweep"  # runs in out_root/<variant>_s<seed>, the report in out_root/report
nproc = 1  # processes per run: 1 runs python train.py, N > 1 torchrun --standalone --nproc_per_node=N
only = ""  # run only these runs: comma-separated names or globs ("tpa_s*,mha_s1337"); the report shows all
final_eval_tokens = 0  # after training: eval.val_loss on this many validation tokens (0: none)
harness_tasks = ""  # after training: eval.harness on these tasks ("paper", "hellaswag,piqa", ...; "": none)
harness_args = "--num_fewshot=0"  # further eval.harness arguments, e.g. "--num_fewshot=0,2 --limit=500"
reference = "mha"  # the report's differences are against this variant
report = True  # write out_root/report when the sweep ends (also after failures)
dry_run = False  # print the runs, their state and commands, then exit
# -----------------------------------------------------------------------------
SWEEP_KEYS = list(configure(globals(), []))
RESERVED = ("seed", "out_dir", "max_iters", "init_from", "variant", "dry_run")  # set by the sweep per run
# train.py keys that do not change a run's numbers: a run may resume on another machine with other values
OPERATIONAL = ("out_dir", "init_from", "dry_run", "device", "compile", "log_interval", "keep_checkpoints",
               "checkpoint_interval", "wandb_log", "wandb_project", "wandb_run_name")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class Stop(Exception):
    """The sweep was asked to stop (Ctrl-C, SIGTERM)."""


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


class Run:
    def __init__(self, variant, seed, sweep):
        self.variant, self.seed = variant["name"], seed
        self.name = f"{self.variant}_s{seed}"
        self.out_dir = os.path.join(sweep["out_root"], self.name)
        keys = {k: v for k, v in variant.items() if k != "name"}
        self.explicit = set(sweep["train"]) | set(keys) | set(sweep["cli_train"])  # keys the user set
        self.args = ([f for f in sweep["base"].split(",") if f] + [arg(k, v) for k, v in sweep["train"].items()]
                     + [arg(k, v) for k, v in keys.items()] + sweep["cli_args"]
                     + [arg("seed", seed), arg("variant", self.variant)])
        self.config = None  # train.py's resolved config (the dry run)
        self.max_iters = None
        self.status = "pending"

    def train_args(self, init_from):
        extra = [arg("max_iters", self.max_iters)]
        if "lr_decay_iters" not in self.explicit:
            extra.append(arg("lr_decay_iters", self.max_iters))
        return self.args + extra + [arg("out_dir", self.out_dir), arg("init_from", init_from)]

    def spec(self):
        """The settings that make this run this run: the resolved train.py config without the keys that do not change
        its numbers; compared with the config in the run folder's header.json before the run is resumed."""
        settings = dict(self.config, seed=self.seed, max_iters=self.max_iters)
        if "lr_decay_iters" not in self.explicit:
            settings["lr_decay_iters"] = self.max_iters
        return {k: v for k, v in settings.items() if k not in OPERATIONAL}

    def state(self, post_evals):
        """'done', 'evaluate' (trained; an evaluation is missing), 'resume' or 'scratch'."""
        ckpts = list_checkpoints(self.out_dir) if os.path.isdir(self.out_dir) else []
        records = read_metrics(self.out_dir)
        if ckpts:
            self.start_iter = checkpoint_iter(ckpts[-1])
            trained = self.start_iter >= self.max_iters
        else:  # no checkpoint: trained only if its log ends the run (runs brought from another machine)
            self.start_iter = 0
            trained = any(r.get("iter") == self.max_iters and "val_loss" in r for r in records)
        if not trained:
            return "resume" if ckpts else "scratch"
        return "evaluate" if missing_evaluations(self, post_evals) else "done"


def resolve(runs, sweep):
    """Check every run's settings with train.py --dry_run=True (once per variant, in parallel); set max_iters."""
    checks = {}
    for run in runs:
        if run.variant not in checks:
            cmd = [sys.executable, "train.py"] + run.args + [arg("out_dir", run.out_dir), "--dry_run=True"]
            checks[run.variant] = (run, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    by_variant = {}
    for variant, (run, p) in checks.items():
        out, err = p.communicate()
        if p.returncode != 0:
            msg = (err.strip() or out.strip()).splitlines()[-1:] or ["no output"]
            raise SystemExit(f"variant {variant!r}: train.py refuses its settings: {msg[0]}\n"
                             f"  (python train.py {shlex.join(run.args)} --dry_run=True)")
        by_variant[variant] = json.loads(out[:out.rindex("}") + 1])["config"]
    for run in runs:
        run.config = cfg = by_variant[run.variant]
        tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
        run.max_iters = sweep["max_iters"] or math.ceil(sweep["max_tokens"] / tokens_per_iter)
        if cfg["gradient_accumulation_steps"] % sweep["nproc"]:
            raise SystemExit(f"variant {run.variant!r}: gradient_accumulation_steps="
                             f"{cfg['gradient_accumulation_steps']} (global) is not divisible by nproc={sweep['nproc']}")
        if cfg["warmup_iters"] > run.max_iters:
            raise SystemExit(f"variant {run.variant!r}: warmup_iters={cfg['warmup_iters']} exceeds the budget of "
                             f"{run.max_iters} iterations; set a shorter warmup in the sweep's train")


def parse_args(argv):
    """Split argv into the sweep's own settings (strict) and train.py keys for every run."""
    defaults = {k: globals()[k] for k in SWEEP_KEYS}
    sweep_argv, cli_train = [], {}
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key is None or key in SWEEP_KEYS or a == "--help":
            sweep_argv.append(a)
        elif key in RESERVED:
            hint = {"seed": "seeds", "out_dir": "out_root", "max_iters": "max_iters"}.get(key)
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
    if (sweep["max_iters"] > 0) == (sweep["max_tokens"] > 0) or min(sweep["max_iters"], sweep["max_tokens"]) < 0:
        raise ValueError(f"set exactly one budget, max_iters or max_tokens, > 0 (got max_iters={sweep['max_iters']}, "
                         f"max_tokens={sweep['max_tokens']})")
    if sweep["nproc"] < 1:
        raise ValueError(f"nproc={sweep['nproc']} must be >= 1")
    if sweep["final_eval_tokens"] < 0:
        raise ValueError(f"final_eval_tokens={sweep['final_eval_tokens']} must be >= 0")
    if not sweep["seeds"] or not all(type(s) is int for s in sweep["seeds"]):
        raise ValueError(f"seeds={sweep['seeds']!r} must be a non-empty list of integers")
    if len(set(sweep["seeds"])) != len(sweep["seeds"]):
        raise ValueError(f"seeds={sweep['seeds']!r} repeats a seed")
    names = []
    for v in sweep["variants"]:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not NAME.fullmatch(v["name"]):
            raise ValueError(f"variant {v!r}: each variant is a dict with a 'name' (letters, digits, _ . + -) and "
                             f"train.py keys, e.g. dict(name='tpa_r4', attn='tpa', q_rank=4)")
        bad = [k for k in v if k in RESERVED]
        if bad:
            raise ValueError(f"variant {v['name']!r} sets {bad}: the sweep sets these per run")
        names.append(v["name"])
    if not names or len(set(names)) != len(names):
        raise ValueError(f"variants need distinct names (got {names})")
    bad = [k for k in sweep["train"] if k in RESERVED]
    if bad:
        raise ValueError(f"train sets {bad}: the sweep sets these per run (seeds, out_root, max_iters / max_tokens)")
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


def main(argv):
    try:
        sweep = parse_args(argv)
    except ValueError as e:
        sys.exit(f"sweep error: {e}")
    runs = [Run(v, s, sweep) for v in sweep["variants"] for s in sweep["seeds"]]
    patterns = [p for p in sweep["only"].split(",") if p]
    selected = [r for r in runs if not patterns or any(fnmatch.fnmatch(r.name, p) for p in patterns)]
    if not selected:
        sys.exit(f"sweep error: only={sweep['only']!r} matches no run of {[r.name for r in runs]}")
    resolve(selected, sweep)
    lock_fd = None if sweep["dry_run"] else lock(sweep["out_root"])
    try:
        return run_sweep(sweep, runs, selected, patterns, lock_fd)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def run_sweep(sweep, runs, selected, patterns, lock_fd):
    post = post_evaluations(sweep)
    pass_fds = (lock_fd,) if lock_fd is not None else ()
    conflicts = []
    for run in selected:
        header = os.path.join(run.out_dir, "header.json")
        if os.path.exists(header):
            then = {k: v for k, v in json.load(open(header))["config"].items() if k not in OPERATIONAL}
            now = run.spec()
            diff = {k: (then.get(k), now.get(k)) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
            if diff:
                conflicts.append(f"  {run.out_dir}: {{setting: (then, now)}} {diff}")
        run.status = run.state(post)
    if conflicts:
        sys.exit("these run folders were made with other settings; use another out_root, or delete them:\n"
                 + "\n".join(conflicts))

    print(f"sweep: {len(runs)} runs ({len(sweep['variants'])} variants x {len(sweep['seeds'])} seeds) in "
          f"{sweep['out_root']}" + (f", {len(selected)} selected by only={sweep['only']!r}" if patterns else ""))
    for run in selected:
        c = run.config
        tokens = run.max_iters * c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
        state = {"resume": f"resume from iteration {run.start_iter}", "scratch": "train",
                 "evaluate": "evaluate", "done": "done"}[run.status]
        print(f"  {run.name:24s} {run.max_iters:>8,} iterations {tokens / 1e6:>10,.1f}M tokens   {state}")
        if sweep["dry_run"]:
            print("    " + shlex.join(python_cmd(sweep["nproc"], "train.py") + run.train_args("scratch")))
    if sweep["dry_run"]:
        return 0

    def on_stop(signum, frame):
        raise Stop
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    todo = [r for r in selected if r.status != "done"]
    progress = dict(done=0, t0=time.time(),
                    total=sum(r.max_iters - r.start_iter for r in todo if r.status in ("resume", "scratch")))
    failed, interrupted = [], False
    try:
        for k, run in enumerate(todo, 1):
            if not train_and_evaluate(run, k, len(todo), sweep, post, progress, pass_fds):
                run.status = "failed"
                failed.append(run)
    except Stop:
        interrupted = True
        print("\nsweep interrupted: run the same command again to continue where it stopped", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if sweep["report"] and not interrupted:
        from scripts.compare import find_runs, write_report
        folders = [r.out_dir for r in runs if os.path.exists(os.path.join(r.out_dir, "header.json"))]
        if folders:
            out = os.path.join(sweep["out_root"], "report")
            write_report(find_runs(folders), out, reference=sweep["reference"])
            print(f"report: {out}/report.md")
    print("\n| run | state | final val loss |\n|---|---|---|")
    for run in runs:
        val = [r["val_loss"] for r in read_metrics(run.out_dir) if "val_loss" in r]
        state = run.status if run in selected else "not selected"
        print(f"| {run.name} | {state} | " + (f"{val[-1]:.4f} |" if val else "- |"))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; fix the cause and run the same "
              f"command again (finished runs are kept)")
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
