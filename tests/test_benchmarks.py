"""benchmarks/bench_train.py on the CPU: settings that take turns, rounds, rows written as they come, timeouts."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, child_env
from data.shards import write_shard


def bench(tmp_path, *args):
    cmd = [sys.executable, "-m", "benchmarks.bench_train", f"--data_dir={tmp_path / 'data'}", "--runs=quickstart:2",
           "--iters=2", f"--out_root={tmp_path / 'runs'}", f"--out={tmp_path / 'rows.jsonl'}", "--device=cpu",
           "--compile=False", "--dtype=float32", "--eval_tokens=256", *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


def synthetic_data(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "data")
    for split, n in (("train", 20000), ("val", 4000)):
        write_shard(str(tmp_path / "data" / f"syn_{split}_000000.bin"), rng.integers(0, 256, n).astype(np.uint16))


def test_bench_train_settings_take_turns_over_rounds(tmp_path):
    synthetic_data(tmp_path)
    p = bench(tmp_path, "--settings=plain: ; recompute: GIT_COMMIT=abc123 --tpa_attention=recompute "
                        "--sdpa_backend=fa4", "--rounds=2")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    # the settings take turns, round after round; a setting's args and environment reach train.py
    assert [(r["label"], r["round"]) for r in rows] == [("plain", 1), ("recompute", 1), ("plain", 2), ("recompute", 2)]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)
    assert [r["kernel_choices"]["tpa_attention"] == "recompute" for r in rows] == [False, True] * 2
    assert rows[1]["env"] == {"GIT_COMMIT": "abc123"} and rows[0]["env"] == {}
    # what train.py warned about goes with the row and under the table (here: fa4 needs a CUDA device)
    assert [r["sdpa_backend"] for r in rows[:2]] == ["auto", "auto"] and rows[0]["warnings"] == []
    assert any("sdpa_backend='fa4' is not used: no CUDA device" in w for w in rows[1]["warnings"])
    assert "warning in quickstart:2 recompute: " in p.stdout
    headers = {s: json.load(open(tmp_path / "runs" / f"quickstart_mb2_x1_{s}" / "header.json"))
               for s in ("plain", "recompute")}
    assert headers["recompute"]["git_commit"] == "abc123" != headers["plain"]["git_commit"]
    # the table: each setting's median over the rounds and its ratio to the first setting
    table = {line.split("|")[3].strip(): line for line in p.stdout.splitlines() if line.startswith("| quickstart")}
    assert set(table) == {"plain", "recompute"} and table["plain"].split("|")[5].strip() == "1.000"
    # a run past --timeout is stopped and reported; the rows before it stay in --out
    p = bench(tmp_path, "--settings=slow: --tpa_attention=recompute", "--timeout=0.5")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    assert len(rows) == 5 and rows[-1]["error"] == ["timed out after 0.5 s"] and "error: ['timed out" in p.stdout
    # settings that cannot be read are refused before anything runs
    p = bench(tmp_path, "--settings=fa4 --sdpa_backend=fa4")
    assert p.returncode != 0 and "must be LABEL: ARGS" in p.stderr and "Traceback" not in p.stderr
    p = bench(tmp_path, "--settings=a: sdpa_backend=fa4")
    assert p.returncode != 0 and "write train.py keys as --key=value" in p.stderr


def test_bench_train_stopped_stops_its_run(tmp_path):
    """SIGTERM to bench_train (a job's time limit, `timeout`) also ends the train.py it started in a session of its
    own, which would otherwise go on holding the GPU."""
    synthetic_data(tmp_path)
    out_root = tmp_path / "stopme"
    cmd = [sys.executable, "-m", "benchmarks.bench_train", f"--data_dir={tmp_path / 'data'}", "--runs=quickstart:2",
           "--iters=100000", f"--out_root={out_root}", "--device=cpu", "--compile=False", "--dtype=float32",
           "--eval_tokens=256"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def trainers():  # the train.py processes writing under this test's folder
        found = subprocess.run(["pgrep", "-f", f"train.py.*{out_root}"], capture_output=True, text=True)
        return found.stdout.split()

    try:
        deadline = time.time() + 120
        while not (out_root / "quickstart_mb2_x1" / "metrics.jsonl").exists():  # train.py is training
            assert time.time() < deadline and p.poll() is None, "train.py did not start"
            time.sleep(0.2)
        assert trainers()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while trainers() and time.time() < deadline:
            time.sleep(0.2)
        assert not trainers()
    finally:
        p.kill()
        for pid in trainers():
            os.kill(int(pid), signal.SIGKILL)
