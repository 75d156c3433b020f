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
    assert "(paired, 2 seeds)" in table[3]  # tpa's difference to mha
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
             (["--max_iters=3"], "warmup_iters=4 exceeds the budget of 3 iterations")]
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
    text = compare.write_report(compare.find_runs([str(tmp_path)]), str(tmp_path / "report"))
    assert "different lengths or are not finished" in text and "20 of 40 (partial)" in text
    # the difference uses the most tokens every run was evaluated at: iteration 20 (20 x 4 x 32 tokens)
    assert "val loss at 2.6K tokens" in text
    at20 = {n: next(r["val_loss"] for r in records(os.path.join(ref, n), "val_loss") if r["iter"] == 20) for n in RUNS}
    d = np.array([at20["tpa_s1"] - at20["mha_s1"], at20["tpa_s2"] - at20["mha_s2"]])
    assert f"{d.mean():+.4f} ± {d.std(ddof=1):.4f} (paired, 2 seeds)" in text
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert {r["name"]: r["complete"] for r in summary["runs"]} == dict(mha_s1=True, mha_s2=True, tpa_s1=True,
                                                                       tpa_s2=False)
