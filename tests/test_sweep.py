"""scripts/sweep.py and scripts/compare.py on the CPU: the tiny preset end to end, a killed sweep finished by a
rerun with every run trained once and the losses of an uninterrupted sweep, failures, and the report's inputs."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

from conftest import ROOT, child_env
from data.shards import write_shard
from scripts import compare
from scripts import sweep as sweep_script

ENV = child_env()
RUNS = ["mha_s1", "mha_s2", "tpa_s1", "tpa_s2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20000), ("val", 3000)):
        t = rng.integers(0, 256, n)
        t[1::2] = (t[0::2][: len(t[1::2])] + 1) % 256  # some structure to learn
        write_shard(str(root / f"syn_{split}_000000.bin"), t.astype(np.uint16))
    return str(root)


def sweep_cmd(out_root, data_dir, *extra):
    return [sys.executable, "-m", "scripts.sweep", "config/sweeps/tiny_cpu.py", f"--out_root={out_root}",
            f"--data_dir={data_dir}", "--vocab_size=256", *extra]


def sweep(out_root, data_dir, *extra, check=True):
    """scripts.sweep.main in this process (its runs are processes): (exit code, stdout, error message)."""
    out, code, err = io.StringIO(), 0, ""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:  # the runs it starts get the children's environment
        with contextlib.redirect_stdout(out), mock.patch.dict(os.environ, ENV, clear=True):
            code = sweep_script.main(sweep_cmd(out_root, data_dir, *extra)[3:])
    except SystemExit as e:
        code, err = 1, str(e.code)
    finally:
        os.chdir(cwd)
    if check and code != 0:
        raise AssertionError(f"sweep failed ({code}): {err}\n{out.getvalue()[-4000:]}")
    return code, out.getvalue(), err


def records(run_dir, key):
    out = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        if key in r:
            out.append({k: r[k] for k in ("iter", key, "loss_avg", "grad_norm", "tokens") if k in r})
    return out


def launches(run_dir):
    """The train.py commands the sweep started in this run folder."""
    return [line for line in open(os.path.join(run_dir, "train.log")) if line.startswith("$ ")]


@pytest.fixture(scope="module")
def full_sweep(data_dir, tmp_path_factory):
    """The tiny preset, 2 variants x 2 seeds, uninterrupted."""
    out = str(tmp_path_factory.mktemp("sweep") / "full")
    code, stdout, _ = sweep(out, data_dir)
    return out, stdout


def test_sweep_writes_a_report(full_sweep):
    out, stdout = full_sweep
    assert "sweep: 4 runs (2 variants x 2 seeds)" in stdout and "eta" in stdout
    for name in RUNS:
        assert len(launches(os.path.join(out, name))) == 1
        assert [r["iter"] for r in records(os.path.join(out, name), "val_loss")] == [0, 10, 20, 30, 40]
    report = open(os.path.join(out, "report", "report.md")).read()
    table = report[report.index("| variant |"):report.index("\n\n", report.index("| variant |"))].splitlines()
    assert [row.split(" | ")[0].strip("|* ") for row in table[2:]] == ["mha", "tpa"]
    for row in table[2:]:
        assert "2 (1, 2)" in row and " ± " in row  # two seeds and their spread
    assert table[3].count("[") == 1  # tpa's difference to mha, with its interval
    assert "(paired, 2 seeds) | tpa_s1, tpa_s2; mha_s1, mha_s2 |" in report  # the differences table names the runs
    for png in ("val_loss_tokens", "val_loss_time", "val_loss_flops", "train_loss"):
        path = os.path.join(out, "report", png + ".png")
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10000
    summary = json.load(open(os.path.join(out, "report", "summary.json")))
    mha = [r["final_val_loss"] for r in summary["runs"] if r["variant"] == "mha"]
    assert summary["groups"]["mha"]["final_val_loss"][0] == pytest.approx(np.mean(mha))
    assert summary["groups"]["mha"]["final_val_loss"][1] == pytest.approx(np.std(mha, ddof=1))
    assert "train.py config/quickstart.py" in report and "--seed=2" in report  # the commands are in the report


def test_killed_sweep_finishes_on_rerun_with_the_same_losses(full_sweep, data_dir, tmp_path):
    ref, _ = full_sweep
    out = str(tmp_path / "killed")
    only = "--only=mha_*,tpa_s1"
    p = subprocess.Popen([sys.executable] + sweep_cmd(out, data_dir, only)[1:], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = os.path.join(out, "mha_s2", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 while the second run is between two checkpoints
        if os.path.exists(second) and any(r["iter"] >= 15 for r in records(os.path.dirname(second), "loss")):
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "tpa_s1"))
    sweep(out, data_dir, only)  # waits for the orphaned run to save its checkpoint, then finishes the sweep
    assert len(launches(os.path.join(out, "mha_s1"))) == 1  # finished before the kill: not trained again
    resumed = launches(os.path.join(out, "mha_s2"))
    assert len(resumed) == 2 and "--init_from=resume" in resumed[1]
    assert any(f.startswith("header_resume_") for f in os.listdir(os.path.join(out, "mha_s2")))
    assert len(launches(os.path.join(out, "tpa_s1"))) == 1
    for name in ("mha_s1", "mha_s2", "tpa_s1"):  # every record equals the uninterrupted sweep's, bit for bit
        for key in ("loss", "val_loss"):
            assert records(os.path.join(out, name), key) == records(os.path.join(ref, name), key), (name, key)
    assert os.path.exists(os.path.join(out, "report", "report.md"))
    code, stdout, _ = sweep(out, data_dir, only)  # nothing left to do
    assert stdout.count(" done") >= 3 and len(launches(os.path.join(out, "mha_s2"))) == 2


def test_time_limit_starts_no_run_that_would_not_finish(data_dir, tmp_path, monkeypatch):
    """time_limit: once the longest run so far would not fit in the time left, no further run starts (exit code 75,
    the waiting runs listed); the same command without the limit then trains only those."""
    clock = [0.0]  # each run takes 100 s more than it does, on the sweep's clock
    monkeypatch.setattr(sweep_script, "time", SimpleNamespace(time=lambda: time.time() + clock[0], sleep=time.sleep))
    real = sweep_script.train_and_evaluate

    def slow(*a, **k):
        clock[0] += 100
        return real(*a, **k)
    monkeypatch.setattr(sweep_script, "train_and_evaluate", slow)
    out = str(tmp_path / "sweep")
    args = ["--seeds=[1]", "--max_iters=4"]
    code, stdout, _ = sweep(out, data_dir, *args, "--time_limit=150", check=False)
    assert code == 75, stdout[-3000:]
    assert "the runs from tpa_s1 on wait" in stdout and "| mha_s1 | done |" in stdout
    assert "| tpa_s1 | waits (time_limit) |" in stdout and "run the same command again" in stdout
    assert not os.path.exists(os.path.join(out, "tpa_s1"))
    code, stdout, _ = sweep(out, data_dir, *args, "--time_limit=0")
    assert len(launches(os.path.join(out, "mha_s1"))) == 1 and len(launches(os.path.join(out, "tpa_s1"))) == 1
    prepare = sweep_script.prepare  # a limit already past when training would start (the checks took 100 s): none starts
    monkeypatch.setattr(sweep_script, "prepare", lambda *a: (clock.__setitem__(0, clock[0] + 100), prepare(*a))[1])
    code, stdout, _ = sweep(str(tmp_path / "late"), data_dir, *args, "--time_limit=50", check=False)
    assert code == 75 and "| mha_s1 | waits (time_limit) |" in stdout
    # a time budget: no calibration starts that the longest one so far would not finish (those made are kept),
    # and no run starts with less time left than its budget's seconds of training steps
    monkeypatch.setattr(sweep_script, "prepare", prepare)
    measure = sweep_script.measure_speed
    monkeypatch.setattr(sweep_script, "measure_speed", lambda *a: (clock.__setitem__(0, clock[0] + 100), measure(*a))[1])
    timed, args = str(tmp_path / "timed"), ["--seeds=[1]", "--max_iters=0", "--max_seconds=60", "--calibrate_iters=4"]
    code, stdout, _ = sweep(timed, data_dir, *args, "--time_limit=150", check=False)
    assert code == 75 and "the next calibration (tpa) would not finish" in stdout, stdout[-3000:]
    assert "| mha_s1 | waits (time_limit) |" in stdout and "| tpa_s1 | waits (time_limit) |" in stdout
    assert [c["label"] for c in json.load(open(os.path.join(timed, "calibration.json")))] == ["mha"]
    code, stdout, _ = sweep(timed, data_dir, *args, "--time_limit=130", check=False)  # tpa's calibration: 30 s left
    assert code == 75 and "calibrating mha" not in stdout and "calibrating tpa" in stdout, stdout[-3000:]
    assert "mha_s1 has 1m00s of training steps: the runs from mha_s1 on wait" in stdout
    assert [c["label"] for c in json.load(open(os.path.join(timed, "calibration.json")))] == ["mha", "tpa"]
    assert not os.path.exists(os.path.join(timed, "mha_s1")) and not os.path.exists(os.path.join(timed, "tpa_s1"))


def test_a_run_folder_with_its_final_checkpoint_but_no_log_is_refused(full_sweep, data_dir, tmp_path):
    """A finished run's folder that lost its metrics.jsonl (deleted, or copied in part) is not taken for done, which
    would leave it out of the report without a word: the sweep stops and says what to do."""
    ref, _ = full_sweep
    out = str(tmp_path / "sweep")
    shutil.copytree(os.path.join(ref, "mha_s1"), os.path.join(out, "mha_s1"))
    os.remove(os.path.join(out, "mha_s1", "metrics.jsonl"))
    code, stdout, err = sweep(out, data_dir, "--only=mha_s1", check=False)
    assert code == 1 and "has no final evaluation" in err and "move the folder away" in err, (err, stdout[-2000:])
    assert len(launches(os.path.join(out, "mha_s1"))) == 1  # nothing trained


def test_failed_run_is_reported_and_the_others_go_on(data_dir, tmp_path):
    out = str(tmp_path / "sweep")
    bad = "[{'name': 'good', 'attn': 'mha'}, {'name': 'bad', 'attn': 'tpa', 'block_size': 4096}]"
    code, stdout, _ = sweep(out, data_dir, f"--variants={bad}", "--seeds=[3]", "--max_iters=10", check=False)
    assert code == 1, stdout[-3000:]
    assert "bad_s3 FAILED" in stdout and "fewer than one window of 4097" in stdout
    assert "| good_s3 | done |" in stdout and "| bad_s3 | failed |" in stdout
    assert "good" in open(os.path.join(out, "report", "report.md")).read()  # the report covers what finished


def test_evaluations_after_training(data_dir, tmp_path, monkeypatch):
    """final_eval_tokens runs eval.val_loss and harness_tasks eval.harness on each trained run; their results are
    appended to metrics.jsonl and reported; a rerun does not repeat them."""
    pytest.importorskip("lm_eval")
    from test_eval import write_tasks
    write_tasks(tmp_path / "tasks", n=8)
    monkeypatch.setitem(ENV, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = str(tmp_path / "sweep")
    args = ["--variants=[{'name': 'tpa', 'attn': 'tpa'}]", "--seeds=[1]", "--max_iters=10", "--final_eval_tokens=2048",
            "--vocab_size=50304",  # the tasks' text is GPT-2 tokens
            "--harness_tasks=toy_mc", f"--harness_args=--num_fewshot=0 --device=cpu --include_path={tmp_path / 'tasks'}"]
    code, stdout, err = sweep(out, data_dir, *args)
    records = [json.loads(line) for line in open(os.path.join(out, "tpa_s1", "metrics.jsonl"))]
    final = [r for r in records if "final_val_loss" in r]
    harness = [r for r in records if "harness" in r]
    assert len(final) == 1 and final[0]["iter"] == 10 and final[0]["final_eval_tokens"] == (2048 - 1) // 32 * 32
    assert final[0]["final_bpb"] > 0 and len(harness) == 1 and harness[0]["harness"][0]["scores"]["toy_mc"]["value"] >= 0
    report = open(os.path.join(out, "report", "report.md")).read()
    assert "## Final evaluation" in report and "## Downstream tasks" in report and "toy_mc" in report
    code, stdout, err = sweep(out, data_dir, *args)  # nothing to redo
    assert sum("final_val_loss" in line for line in open(os.path.join(out, "tpa_s1", "metrics.jsonl"))) == 1
    assert len(launches(os.path.join(out, "tpa_s1"))) == 1


def test_sweep_launches_runs_with_torchrun(data_dir, tmp_path):
    """--nproc=2: each run is a 2-process torchrun (gloo on CPU) and logs the losses of the 1-process run with the
    same global batch; the report shows the world size (what a multi-GPU sweep does, checked on the CPU)."""
    out = str(tmp_path / "sweep")
    sweep(out, data_dir, "--only=tpa_s1", "--nproc=2", "--gradient_accumulation_steps=2")
    one = str(tmp_path / "one")
    sweep(one, data_dir, "--only=tpa_s1", "--gradient_accumulation_steps=2")
    run, ref = os.path.join(out, "tpa_s1"), os.path.join(one, "tpa_s1")
    assert "torch.distributed.run" in launches(run)[0] and "--nproc_per_node=2" in launches(run)[0]
    assert json.load(open(os.path.join(run, "header.json")))["world_size"] == 2
    for key in ("loss", "val_loss"):
        got, want = records(run, key), records(ref, key)
        assert [r["iter"] for r in got] == [r["iter"] for r in want]
        assert np.allclose([r[key] for r in got], [r[key] for r in want], rtol=0, atol=2e-6)
    assert "2 x " in open(os.path.join(out, "report", "report.md")).read()


def test_sweep_refuses_bad_settings_before_training(full_sweep, data_dir, tmp_path):
    out = str(tmp_path / "sweep")
    cases = [(["--max_tokens=1000"], "set exactly one budget"),
             (["--seed=3"], "the sweep sets seed for every run; use its 'seeds'"),
             (["--variants=[{'attn': 'mha'}]"], "each variant is a dict with a 'name'"),
             (["--variants=[{'name': 'a', 'attn': 'mha'}, {'name': 'a', 'attn': 'tpa'}]"], "distinct names"),
             (["--variants=[{'name': 'x', 'attn': 'tpaa'}]"], "train.py refuses its settings: config error: "),
             (["--only=nothing*"], "matches no run"),
             (["--max_iters=3"], "warmup_iters=4 exceeds the budget of 3 iterations"),
             (["--max_iters=0", "--time_of=gpt:1000"], "write 'VARIANT:TOKENS' with one of the variants"),
             (["--grid={'learning_rate': 0.001}"], "grid axis 'learning_rate' needs a non-empty list"),
             (["--grid={'seed': [1, 2]}"], "grid axis 'seed' is set by the sweep per run"),
             (["--grid={'learning_rate': [1e-3, 0.001]}"], "repeats a value"),
             (["--grid={'learning_rate': [1e-3]}", "--learning_rate=1e-3"], "is both a grid axis and set"),
             (["--best_seeds=[2, 2]"], "best_seeds=[2, 2] repeats a seed"),
             (["--data_dir=" + os.path.join(data_dir, "missing")], "data error for mha, tpa: no *_train_NNNNNN.bin")]
    for extra, message in cases:
        code, _, err = sweep(out, data_dir, *extra, check=False)
        assert code != 0 and message in err, (extra, err)
    assert "did you mean 'tpa'" in sweep(out, data_dir, cases[4][0][0], check=False)[2]
    assert not os.path.exists(os.path.join(out, "mha_s1"))
    # run folders made with other settings are not resumed with these
    shutil.copytree(full_sweep[0], out, dirs_exist_ok=True)
    code, _, err = sweep(out, data_dir, "--learning_rate=1e-3", check=False)
    assert code != 0 and "made with other settings" in err and "'learning_rate': (0.003, 0.001)" in err, err


def test_compare_refuses_folders_that_are_not_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "empty", "is not a run folder"), (tmp_path / "missing", "does not exist")):
        p = subprocess.run([sys.executable, "-m", "scripts.compare", str(path)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "header.json").write_text("{not json")
    with pytest.raises(ValueError, match="header.json cannot be read"):
        compare.find_runs([str(tmp_path / "junk")])
    (tmp_path / "junk" / "header.json").write_text('{"some": "thing"}')
    with pytest.raises(ValueError, match="was not written by train.py"):
        compare.find_runs([str(tmp_path / "junk")])


def test_compare_runs_of_different_lengths(full_sweep, tmp_path):
    ref, _ = full_sweep
    for name in RUNS:  # copy the runs' two files; cut tpa_s2 at iteration 20, as a run still in progress
        os.makedirs(tmp_path / name)
        shutil.copy(os.path.join(ref, name, "header.json"), tmp_path / name)
        lines = open(os.path.join(ref, name, "metrics.jsonl")).readlines()
        if name == "tpa_s2":
            lines = [line for line in lines if json.loads(line)["iter"] <= 20]
        (tmp_path / name / "metrics.jsonl").write_text("".join(lines))
    # the sweep's plan names a run not started and one still in progress; gqa is not among the variants shown
    json.dump(dict(mha=["mha_s1", "mha_s2", "mha_s3"], tpa=["tpa_s1", "tpa_s2"], gqa=["gqa_s1"]),
              open(tmp_path / "plan.json", "w"))
    text = compare.write_report(compare.find_runs([str(tmp_path)]), str(tmp_path / "report"))
    assert "different lengths or are not finished" in text and "20 of 40 (partial)" in text
    assert "**Not finished: 2 of the grid runs the sweep planned for these variants (its plan.json) are not finished " \
           "here (mha_s3, tpa_s2)" in text and "Planned by the sweep but with no runs here: gqa." in text
    # the difference uses the most tokens every run was evaluated at: iteration 20 (20 x 4 x 32 tokens)
    assert "val loss at 2.6K tokens" in text
    at20 = {n: next(r["val_loss"] for r in records(os.path.join(ref, n), "val_loss") if r["iter"] == 20) for n in RUNS}
    d = np.array([at20["tpa_s1"] - at20["mha_s1"], at20["tpa_s2"] - at20["mha_s2"]])
    half = 12.7062 * d.std(ddof=1) / np.sqrt(2)  # Student's t, 1 degree of freedom, 97.5%
    assert f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in text and "(paired, 2 seeds)" in text
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert {r["name"]: r["complete"] for r in summary["runs"]} == dict(mha_s1=True, mha_s2=True, tpa_s1=True,
                                                                       tpa_s2=False)
    assert summary["planned_not_finished"] == ["mha_s3", "tpa_s2"] and summary["planned_without_runs"] == ["gqa"]


def test_grid_runs_are_named_by_their_settings():
    """variants x grid points x seeds; a variant's own grid replaces the sweep's; min_lr follows a learning_rate
    axis (min_lr_ratio) unless it is set; the names say the settings."""
    sweep = sweep_script.parse_args(["config/sweeps/tiny_cpu.py", "--grid={'learning_rate': [3e-4, 1e-3]}",
                                     "--seeds=[1, 2]", "--min_lr_ratio=0.05", "--variants=["
                                     "{'name': 'mha', 'attn': 'mha'}, {'name': 'tpa', 'attn': 'tpa', 'grid': "
                                     "{'tpa_init': ['official', 'xavier'], 'learning_rate': [6e-4]}},"
                                     "{'name': 'gqa', 'attn': 'gqa', 'min_lr': 1e-5}]"])
    runs = [sweep_script.Run(v, p, s, sweep) for v in sweep["variants"]
            for p in sweep_script.grid_points(v.get("grid", sweep["grid"])) for s in sweep["seeds"]]
    assert [r.name for r in runs] == [
        "mha_lr3e-4_s1", "mha_lr3e-4_s2", "mha_lr1e-3_s1", "mha_lr1e-3_s2",
        "tpa_tpa_init-official_lr6e-4_s1", "tpa_tpa_init-official_lr6e-4_s2",
        "tpa_tpa_init-xavier_lr6e-4_s1", "tpa_tpa_init-xavier_lr6e-4_s2",
        "gqa_lr3e-4_s1", "gqa_lr3e-4_s2", "gqa_lr1e-3_s1", "gqa_lr1e-3_s2"]
    args = lambda name: next(r.args for r in runs if r.name == name)
    assert "--learning_rate=0.001" in args("mha_lr1e-3_s2") and "--min_lr=5e-05" in args("mha_lr1e-3_s2")
    assert "--tpa_init=xavier" in args("tpa_tpa_init-xavier_lr6e-4_s1") and "--min_lr=3e-05" in args(
        "tpa_tpa_init-xavier_lr6e-4_s1")
    last_min_lr = lambda name: [a for a in args(name) if a.startswith("--min_lr=")][-1]  # the last one wins
    assert last_min_lr("gqa_lr1e-3_s1") == "--min_lr=1e-05" and last_min_lr("mha_lr3e-4_s1") == "--min_lr=1.5e-05"
    assert [sweep_script.value_name(v) for v in (6e-4, 2.5e-4, 0.1, 1e-2, 50, 1.5e5, "xavier", True)] == [
        "6e-4", "2.5e-4", "0.1", "0.01", "50", "1.5e5", "xavier", "True"]


def test_statistics_against_hand_computed_cases():
    """Paired: differences 0.1, 0.2, 0.3 (mean 0.2, sd 0.1, 2 degrees of freedom, where Student's t has the closed
    form F(t) = 1/2 + t / (2 sqrt(2 + t^2))): t = 0.2 / (0.1 / sqrt 3) = sqrt 12, p = 1 - sqrt(12 / 14) = 0.07418;
    the interval 0.2 -+ 4.3027 x 0.1 / sqrt 3; with 4 seeds 3.1824 x 0.1 / 2 = 0.159 < 0.2 (3: 0.248): 4 seeds.
    Welch: [0, 2] against [5, 5, 5] (no spread): se = 1, 1 degree of freedom (Cauchy): t = 4, p = 1 - 2 atan(4) / pi."""
    d = compare.difference_stats({1: 1.1, 2: 1.2, 3: 1.3, 9: 7.0}, {1: 1.0, 2: 1.0, 3: 1.0, 8: 0.0})
    assert d["mean"] == pytest.approx(0.2) and d["how"] == "paired, 3 seeds"
    assert d["p"] == pytest.approx(1 - np.sqrt(12 / 14), rel=1e-6)
    assert (d["lo"], d["hi"]) == pytest.approx((0.2 - 4.302653 * 0.1 / np.sqrt(3), 0.2 + 4.302653 * 0.1 / np.sqrt(3)))
    assert d["seeds_needed"] == 4
    text = compare.fmt_difference(d)
    assert "p = 0.074, not significant; ~4 seeds would resolve it (paired, 3 seeds)" in text
    w = compare.difference_stats({1: 0.0, 2: 2.0}, {3: 5.0, 4: 5.0, 5: 5.0})
    assert w["mean"] == pytest.approx(-4.0) and w["how"] == "unpaired, 2 and 3 seeds"
    assert w["p"] == pytest.approx(1 - 2 * np.arctan(4) / np.pi, rel=1e-6)
    assert (w["lo"], w["hi"]) == pytest.approx((-4 - 12.706205, -4 + 12.706205), rel=1e-6)
    one = compare.difference_stats({1: 1.0}, {1: 0.5})
    assert one["mean"] == 0.5 and one["lo"] is None and "no interval" in compare.fmt_difference(one)
    strong = compare.difference_stats({1: 1.0, 2: 1.1, 3: 1.05}, {1: 0.0, 2: 0.1, 3: 0.0})
    assert strong["p"] < 0.05 and "not significant" not in compare.fmt_difference(strong)


def test_spikes_are_flagged():
    """The jump rules: a window's largest gradient norm over 4x the median of the earlier windows' (the first
    window only as history), or a window's mean loss 0.1 above the previous one's."""
    norms = [8.8, 1.2, 1.1, 1.3, 1.2, 5.0, 1.0]
    train = [dict(iter=10 * (i + 1), loss_avg=7 - 0.1 * i, grad_norm=g, grad_norm_max=g) for i, g in enumerate(norms)]
    assert [it for it, _ in compare.spikes(train)] == [60]  # 5.0 > 4 x 1.2; 8.8 at the first window is not judged
    train[6]["grad_norm_max"] = 5.5  # a step inside the window spiked, the last did not (1.0)
    train[3]["loss_avg"] = train[2]["loss_avg"] + 0.15
    found = compare.spikes(train)
    assert [it for it, _ in found] == [40, 60, 70] and "training loss up 0.150" in found[0][1]
    assert compare.spikes([dict(iter=10, loss=5.0)]) == []  # older logs without the fields


def fake_run(root, name, variant, seed, lr, final, budget="tokens=1000", grad=None, complete=True, **extra):
    """A run folder with what train.py writes (header.json, metrics.jsonl): 10 iterations, evaluations at 0, 5
    and 10 (the last one `final`), log windows every 2 iterations."""
    path = os.path.join(root, name)
    os.makedirs(path)
    config = dict(variant=variant, seed=seed, learning_rate=lr, min_lr=lr / 10, max_iters=10, lr_decay_iters=10,
                  budget=budget, gradient_accumulation_steps=1, batch_size=4, block_size=25, warmup_iters=1, **extra)
    json.dump(dict(config=config, model_config=dict(attn=variant), params=1000, tokens_per_iter=100,
                   flops_per_token=6000, device="cpu", world_size=1), open(os.path.join(path, "header.json"), "w"))
    grads = grad or [1.0] * 5
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for it, v in ((0, 9.0), (5, final + 1.0), (10, final)):
            if complete or it < 10:
                f.write(json.dumps(dict(iter=it, val_loss=v)) + "\n")
        for k, g in enumerate(grads):
            f.write(json.dumps(dict(iter=2 * k + 2, loss=6 - k * 0.1, loss_avg=6 - k * 0.1, grad_norm=g,
                                    grad_norm_max=g, dt_ms=10.0)) + "\n")


def test_best_learning_rate_the_edge_flag_and_the_fit(tmp_path):
    """Each variant is reported at its lowest mean final loss over seeds; a best LR at the grid's edge is flagged;
    the quadratic in log LR has its optimum inside the grid; the runs used are named; spikes are counted."""
    losses = {"mha": {1e-4: 5.2, 3e-4: 5.0, 1e-3: 5.1}, "tpa": {1e-4: 5.3, 3e-4: 5.1, 1e-3: 4.9}}
    for variant, by_lr in losses.items():
        for lr, loss in by_lr.items():
            for seed, noise in ((1, 0.0), (2, 0.02)):
                grad = [1.0, 1.0, 1.0, 9.0, 1.0] if (variant, lr, seed) == ("tpa", 1e-3, 2) else None
                fake_run(tmp_path / "runs", f"{variant}_lr{lr:g}_s{seed}", variant, seed, lr, loss + noise, grad=grad)
    text = compare.write_report(compare.find_runs([str(tmp_path / "runs")]), str(tmp_path / "report"))
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert summary["groups"]["mha"]["best_point"] == "lr=3e-4" and summary["groups"]["tpa"]["best_point"] == "lr=1e-3"
    assert summary["groups"]["mha"]["edge"] is None and summary["groups"]["tpa"]["edge"] == "largest"
    assert "lr=1e-3 (of 3) ⚠ the largest LR of its grid: widen the grid" in text
    assert summary["groups"]["tpa"]["runs"] == ["tpa_lr0.001_s1", "tpa_lr0.001_s2"]
    # a parabola through (log 1e-4, 5.21), (log 3e-4, 5.01), (log 1e-3, 5.11): its minimum lies between the points
    x, y = np.log10([1e-4, 3e-4, 1e-3]), [5.21, 5.01, 5.11]
    c = np.polyfit(x, y, 2)
    assert summary["budgets"][0]["lr_optimum"]["mha -"] == pytest.approx(10 ** (-c[1] / (2 * c[0])))
    assert "| tpa | 5.3100 ± 0.0141 (2) | 5.1100 ± 0.0141 (2) | **4.9100 ± 0.0141 (2) ⚠1 spiking** |" in text
    assert "tpa − mha: -0.1000" in text and "tpa_lr0.001_s2 | tpa | lr=1e-3 | 8: gradient norm 9" in text
    assert open(tmp_path / "report" / "lr_sensitivity.png", "rb").read(4) == b"\x89PNG"
    assert "Equal tokens" not in text  # one budget: no budget headings
    # a second budget gets its own section, and a partial run is never a best point
    for seed in (1, 2):
        fake_run(tmp_path / "time", f"mha_s{seed}", "mha", seed, 3e-4, 5.0, budget="seconds=60")
        fake_run(tmp_path / "time", f"tpa_s{seed}", "tpa", seed, 1e-3, 4.95 + seed / 100, budget="seconds=60")
    fake_run(tmp_path / "runs", "mha_lr0.003_s1", "mha", 1, 3e-3, 4.0, complete=False)
    text = compare.write_report(compare.find_runs([str(tmp_path / "runs"), str(tmp_path / "time")]),
                                str(tmp_path / "both"))
    assert "## Equal tokens (1.0K)" in text and "## Equal training time (60.0 s)" in text
    assert os.path.exists(tmp_path / "both" / "val_loss_time_seconds.png")
    summary = json.load(open(tmp_path / "both" / "summary.json"))
    assert [b["groups"]["mha"]["best_point"] for b in summary["budgets"]] == ["lr=3e-4", "-"]
    assert summary["budgets"][1]["leader"] == "tpa"


def test_a_setting_added_to_train_py_later_does_not_split_old_runs_from_new(tmp_path):
    """Runs made before train.py had a setting lack it in their header: they group with newer runs that record
    its default, while a setting that really differs within a group is still a grid axis."""
    fake_run(tmp_path / "runs", "tpa_lr6e-4_s1", "tpa", 1, 6e-4, 4.90)
    fake_run(tmp_path / "runs", "tpa_lr6e-4_s2", "tpa", 2, 6e-4, 4.92, float8=False)
    fake_run(tmp_path / "runs", "tpa_lr1e-3_s1", "tpa", 1, 1e-3, 5.00)
    fake_run(tmp_path / "runs", "mha_lr6e-4_s1", "mha", 1, 6e-4, 5.00, float8=False)
    fake_run(tmp_path / "runs", "mha_lr6e-4_s2", "mha", 2, 6e-4, 5.02, float8=True)
    compare.write_report(compare.find_runs([str(tmp_path / "runs")]), str(tmp_path / "report"))
    groups = json.load(open(tmp_path / "report" / "summary.json"))["groups"]
    assert groups["tpa"]["best_point"] == "lr=6e-4"
    assert groups["tpa"]["runs"] == ["tpa_lr6e-4_s1", "tpa_lr6e-4_s2"]  # one point over both seeds
    assert groups["mha"]["best_point"] == "float8=False"  # recorded, and different: an axis


def test_runs_of_the_same_name_from_several_sweeps_are_told_apart(tmp_path):
    """Each sweep keeps its runs in <sweep>/runs, so a report over two sweeps names a run by as many parent
    folders as tell it apart from its namesake; the report says up front who leads at each budget."""
    for sweep_dir, budget in (("sweep_lr", "tokens=1000"), ("sweep_time", "seconds=5")):
        fake_run(tmp_path / sweep_dir / "runs", "mha_s1", "mha", 1, 1e-3, 5.0, budget=budget)
    fake_run(tmp_path / "sweep_time" / "runs", "tpa_s1", "tpa", 1, 1e-3, 4.9, budget="seconds=5")
    runs = compare.find_runs([str(tmp_path / "sweep_lr" / "runs"), str(tmp_path / "sweep_time" / "runs")])
    assert [r["name"] for r in runs] == ["sweep_lr/runs/mha_s1", "sweep_time/runs/mha_s1", "tpa_s1"]
    fake_run(tmp_path / "sweep_lr" / "runs", "tpa_s1", "tpa", 1, 1e-3, 5.1, budget="tokens=1000")
    text = compare.write_report(compare.find_runs([str(tmp_path / "sweep_lr" / "runs"), str(tmp_path / "sweep_time" / "runs")]),
                                str(tmp_path / "report"))
    # who leads at each budget, up front
    assert "- Equal tokens (1.0K): **mha leads**" in text and "- Equal training time (5.0 s): **tpa leads**" in text


def test_a_run_folder_from_an_older_train_py_still_resumes_and_is_reused():
    """A key only a run's header has (train.py no longer has it, e.g. an imported name it once took for a setting)
    is no difference; one only the new config has is none for a resume, and for reuse_from only at the value runs
    had before train.py had it."""
    then = dict(KERNEL_CHOICES={"flashtpa": None}, learning_rate=1e-3, out_dir="a", max_iters=10)
    assert sweep_script.setting_changes(then, dict(learning_rate=1e-3, out_dir="b", max_iters=10, float8=True)) == {}
    assert sweep_script.setting_changes(then, dict(learning_rate=6e-4, max_iters=10)) == {"learning_rate": (1e-3, 6e-4)}
    now = dict(learning_rate=1e-3, max_iters=10, budget="seconds=5", float8=False)
    assert sweep_script.same_run(dict(then, budget="tokens=5"), now)
    assert not sweep_script.same_run(then, dict(now, float8=True))  # the run before float8 existed ran without it
    assert not sweep_script.same_run(then, dict(now, new_key=1))  # unknown: not the same run
    assert not sweep_script.same_run(then, dict(now, max_iters=11))


def test_tiny_preset_with_a_two_point_lr_grid_end_to_end(data_dir, tmp_path):
    """A learning-rate grid with a further seed at the best point: the grid runs, then the best point's seed, then
    the report's grid table and LR plot; a rerun trains nothing."""
    out = str(tmp_path / "sweep")
    args = ["--grid={'learning_rate': [1e-3, 3e-3]}", "--seeds=[1]", "--best_seeds=[2]", "--max_iters=12",
            "--only=tpa_*"]
    code, stdout, _ = sweep(out, data_dir, *args)
    finals = {lr: records(os.path.join(out, f"tpa_lr{lr}_s1"), "val_loss")[-1]["val_loss"] for lr in ("1e-3", "3e-3")}
    best = min(finals, key=finals.get)
    assert set(os.listdir(out)) == {".sweep.lock", "plan.json", "report", f"tpa_lr{best}_s2", "tpa_lr1e-3_s1",
                                    "tpa_lr3e-3_s1"}
    # the whole grid (not only what --only ran), for a later sweep's best_from
    assert json.load(open(os.path.join(out, "plan.json"))) == {v: [f"{v}_lr1e-3_s1", f"{v}_lr3e-3_s1"]
                                                               for v in ("mha", "tpa")}
    assert f"at each variant's best grid point: 1 runs\n  tpa_lr{best}_s2" in stdout
    header = json.load(open(os.path.join(out, f"tpa_lr{best}_s2", "header.json")))["config"]
    assert header["seed"] == 2 and header["min_lr"] == pytest.approx(header["learning_rate"] * 0.1)
    assert header["budget"] == "iters=12"
    report = open(os.path.join(out, "report", "report.md")).read()
    assert "## Learning-rate grid" in report and "widen the grid" in report and "| tpa | " in report
    assert f"lr={best} (of 2)" in report and os.path.exists(os.path.join(out, "report", "lr_sensitivity.png"))
    code, stdout, _ = sweep(out, data_dir, *args)  # nothing left to do
    assert all(len(launches(os.path.join(out, n))) == 1 for n in os.listdir(out) if n.startswith("tpa_"))
    assert stdout.count("   done") == 3


def test_flops_and_time_budgets(data_dir, tmp_path):
    """max_flops: each variant trains max_flops / its FLOPs per token. time_of: a calibration per variant, recorded
    in calibration.json, sets each run's length; the rerun reuses it (no second calibration, nothing retrained)."""
    sw = sweep_script.parse_args(sweep_cmd(str(tmp_path / "flops"), data_dir, "--max_iters=0", "--max_flops=1e9",
                                           "--seeds=[1]")[3:])
    runs = [sweep_script.Run(v, {}, 1, sw) for v in sw["variants"]]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        sweep_script.resolve(runs, sw)  # the dry runs (train.py's FLOPs per token), the data check, the budget
    finally:
        os.chdir(cwd)
    for run in runs:
        want = int(np.ceil(1e9 / (run.info["flops_per_token"] * run.info["tokens_per_iter"])))
        assert run.max_iters == want and run.budget == "flops=1e+09"
    assert runs[0].max_iters != runs[1].max_iters  # T6 spends more FLOPs per token than MHA at this size

    out = str(tmp_path / "time")
    args = ["--max_iters=0", "--time_of=mha:2560", "--calibrate_iters=6", "--seeds=[1]"]
    code, stdout, _ = sweep(out, data_dir, *args)
    calibration = json.load(open(os.path.join(out, "calibration.json")))
    rate = {c["label"]: c["tokens_per_s"] for c in calibration}
    assert sorted(rate) == ["mha", "tpa"] and all(c["steps"] == 6 and c["device"] == "1 x cpu" for c in calibration)
    seconds = 2560 / rate["mha"]
    for v in ("mha", "tpa"):
        config = json.load(open(os.path.join(out, f"{v}_s1", "header.json")))["config"]
        assert config["max_iters"] == sweep_script.iters(seconds * rate[v] / 128) and config["lr_decay_iters"] == config["max_iters"]
        assert config["budget"] == f"seconds={seconds:.6g}"
        assert not [f for f in os.listdir(os.path.join(out, "calibration", v)) if f.endswith(".pt")]  # logs only
    assert json.load(open(os.path.join(out, "mha_s1", "header.json")))["config"]["max_iters"] == 20  # 2560 / 128
    before = open(os.path.join(out, "calibration.json")).read()
    code, stdout, _ = sweep(out, data_dir, *args)
    assert "calibrating" not in stdout and stdout.count("   done") == 2
    assert open(os.path.join(out, "calibration.json")).read() == before
    assert len(launches(os.path.join(out, "calibration", "mha"))) == 1
    assert "Equal training time" not in open(os.path.join(out, "report", "report.md")).read()  # one budget

    # calibrate_from: the speeds come from finished runs of the same settings (here the time sweep's own), with no
    # calibration run; a run of other speed settings (another batch size) matches none and is measured
    out2 = str(tmp_path / "time2")
    code, stdout, _ = sweep(out2, data_dir, *args, f"--calibrate_from={out}", "--dry_run=True")
    assert not os.path.exists(out2)  # a dry run writes nothing
    code, stdout, _ = sweep(out2, data_dir, *args, f"--calibrate_from={out}")
    assert "calibrating" not in stdout and not os.path.exists(os.path.join(out2, "calibration"))
    from scripts.compare import find_runs, summarize
    done = {s["name"]: s for s in map(summarize, find_runs([out]))}
    for c in json.load(open(os.path.join(out2, "calibration.json"))):
        assert c["runs"] == [f"{c['label']}_s1"] and c["device"] == "1 x cpu"
        assert c["tokens_per_s"] == pytest.approx(done[f"{c['label']}_s1"]["tokens_per_s"])
    code, stdout, _ = sweep(str(tmp_path / "time3"), data_dir, *args, f"--calibrate_from={out}", "--batch_size=2",
                            "--only=mha_s1")
    assert "no finished run in" in stdout and "calibrating mha" in stdout

    # a time budget's speeds are its machine's: runs from another kind of machine are planned with (dry run) but
    # not trained with, and a calibration.json from elsewhere refuses to train where its lengths mean other times
    h100 = str(tmp_path / "h100")
    shutil.copytree(out, h100)
    for v in ("mha", "tpa"):
        path = os.path.join(h100, f"{v}_s1", "header.json")
        json.dump(dict(json.load(open(path)), device="NVIDIA H100 80GB HBM3"), open(path, "w"))
    finished = sweep_script.finished_runs(h100, "calibrate_from")
    run = SimpleNamespace(label="mha", info=dict(tokens_per_iter=128))
    speed = next(sweep_script.speed_settings(s["model_config"], s["config"], 1) for s in finished if s["name"] == "mha_s1")
    assert sweep_script.speed_from_runs(run, speed, finished, h100)["device"] == "1 x NVIDIA H100 80GB HBM3"
    assert sweep_script.speed_from_runs(run, speed, finished, h100, "1 x cpu") is None
    out5 = str(tmp_path / "time5")
    os.makedirs(out5)
    json.dump([dict(c, device="1 x NVIDIA H100 80GB HBM3") for c in calibration], open(os.path.join(out5, "calibration.json"), "w"))
    code, stdout, _ = sweep(out5, data_dir, *args, "--dry_run=True")
    assert "note: this time budget's speeds were measured on 1 x NVIDIA H100 80GB HBM3, but this machine is 1 x cpu" in stdout
    code, _, err = sweep(out5, data_dir, *args, check=False)
    assert code == 1 and "run the sweep on that kind of machine" in err
    assert not [f for f in os.listdir(out5) if os.path.isdir(os.path.join(out5, f))]  # nothing trained

    # reuse_from: mha's 20 iterations of the time budget are the 20 iterations a 2560-token budget gives it: copied
    # (not its checkpoints), its header naming the source and this sweep's budget; other settings are trained
    out6, tokens = str(tmp_path / "tokens"), ["--max_iters=0", "--max_tokens=2560", "--seeds=[1]", f"--reuse_from={out}"]
    code, stdout, _ = sweep(out6, data_dir, *tokens, "--only=mha_s1", "--dry_run=True")
    assert f"copy {os.path.join(out, 'mha_s1')}" in stdout and not os.path.exists(out6)
    code, stdout, _ = sweep(out6, data_dir, *tokens, "--only=mha_s1", "--learning_rate=1e-3", "--dry_run=True")
    assert "copy" not in stdout
    code, stdout, _ = sweep(out6, data_dir, *tokens, "--only=mha_s1")
    assert "copied from" in stdout
    header = json.load(open(os.path.join(out6, "mha_s1", "header.json")))
    assert header["config"]["budget"] == "tokens=2560" and header["reused_from"] == dict(
        path=os.path.join(out, "mha_s1"), budget=f"seconds={seconds:.6g}")
    assert open(os.path.join(out6, "mha_s1", "metrics.jsonl")).read() == open(os.path.join(out, "mha_s1", "metrics.jsonl")).read()
    assert not [f for f in os.listdir(os.path.join(out6, "mha_s1")) if f.endswith(".pt")]


def test_best_from_runs_each_variant_at_its_best_point_of_another_sweep(tmp_path, capsys):
    for variant, by_lr in {"mha": {3e-4: 5.1, 1e-3: 5.0}, "tpa": {3e-4: 4.9, 1e-3: 5.0}}.items():
        for lr, loss in by_lr.items():
            fake_run(tmp_path / "lr", f"{variant}_lr{lr:g}_s1", variant, 1, lr, loss)
    sw = sweep_script.parse_args(["config/sweeps/tiny_cpu.py", "--max_iters=0", "--time_of=mha:2560",
                                  f"--best_from={tmp_path / 'lr'}", "--seeds=[1, 2]"])
    assert [v["grid"] for v in sw["variants"]] == [{"learning_rate": [1e-3]}, {"learning_rate": [3e-4]}]
    assert sw["time_of_label"] == "mha_lr1e-3"
    fake_run(tmp_path / "lr", "tpa_lr0.003_s1", "tpa", 1, 3e-3, 4.0, complete=False)
    with pytest.raises(ValueError, match=r"variant 'tpa' has unfinished runs there \(tpa_lr0.003_s1\)"):
        sweep_script.parse_args(["config/sweeps/tiny_cpu.py", f"--best_from={tmp_path / 'lr'}"])
    with pytest.raises(ValueError, match="variant 'gqa' has no runs there"):
        sweep_script.parse_args(["config/sweeps/tiny_cpu.py", f"--best_from={tmp_path / 'lr'}",
                                 "--variants=[{'name': 'gqa', 'attn': 'gqa'}]"])
    # a grid point the other sweep planned (its plan.json) but has not started is unfinished too
    json.dump({"mha": ["mha_lr0.0003_s1", "mha_lr0.001_s1", "mha_lr0.003_s1"]}, open(tmp_path / "lr" / "plan.json", "w"))
    with pytest.raises(ValueError, match=r"variant 'mha' has unfinished runs there \(mha_lr0.003_s1\)"):
        sweep_script.parse_args(["config/sweeps/tiny_cpu.py", f"--best_from={tmp_path / 'lr'}",
                                 "--variants=[{'name': 'mha', 'attn': 'mha'}]"])
    os.remove(tmp_path / "lr" / "plan.json")
    # best_of: a new variant (here T6 with float8) at another variant's best point, named for itself
    shutil.rmtree(tmp_path / "lr" / "tpa_lr0.003_s1")
    sw = sweep_script.parse_args(["config/sweeps/tiny_cpu.py", "--max_iters=4", f"--best_from={tmp_path / 'lr'}",
                                  "--variants=[{'name': 'tpa_f8', 'attn': 'tpa', 'float8': True, 'best_of': 'tpa'}]"])
    run = sweep_script.Run(sw["variants"][0], {"learning_rate": 3e-4}, 1, sw)
    assert sw["variants"][0]["grid"] == {"learning_rate": [3e-4]} and run.name == "tpa_f8_lr3e-4_s1"
    assert "--float8=True" in run.args and not any(a.startswith("--best_of") for a in run.args)
    # a best point at the edge of what the other sweep ran is said (its grid may be unfinished or too narrow)
    assert "warning: that is the smallest learning rate tpa has there" in capsys.readouterr().err
    fake_run(tmp_path / "lr", "tpa_lr0.0001_s1", "tpa", 1, 1e-4, 5.2)  # now 3e-4 lies inside tpa's grid
    sweep_script.parse_args(["config/sweeps/tiny_cpu.py", "--max_iters=4", f"--best_from={tmp_path / 'lr'}"])
    err = capsys.readouterr().err
    assert "learning rate mha has there" in err and "learning rate tpa has there" not in err
    with pytest.raises(ValueError, match="best_of='tpa' names the variant of best_from's sweep"):
        sweep_script.parse_args(["config/sweeps/tiny_cpu.py", "--variants=[{'name': 'x', 'best_of': 'tpa'}]"])


def test_best_point_waits_for_the_grid_and_passes_over_a_failed_run(tmp_path):
    sw = sweep_script.parse_args(["config/sweeps/tiny_cpu.py", f"--out_root={tmp_path}", "--seeds=[1]",
                                  "--best_seeds=[2]", "--grid={'learning_rate': [1e-3, 3e-3]}"])
    runs = [sweep_script.Run(v, p, 1, sw) for v in sw["variants"] for p in sweep_script.grid_points(sw["grid"])]
    fake_run(tmp_path, "mha_lr1e-3_s1", "mha", 1, 1e-3, 5.0)
    fake_run(tmp_path, "mha_lr3e-3_s1", "mha", 1, 3e-3, 4.0, complete=False)  # diverged: stopped early
    next(r for r in runs if r.name == "mha_lr3e-3_s1").status = "failed"
    fake_run(tmp_path, "tpa_lr1e-3_s1", "tpa", 1, 1e-3, 4.5)  # tpa_lr3e-3_s1 has not run
    best, waiting = sweep_script.best_point_runs(sw, runs)
    assert [r.name for r in best] == ["mha_lr1e-3_s2"] and waiting == {"tpa": "tpa_lr3e-3_s1 has not finished"}
