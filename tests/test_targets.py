"""benchmarks/check_targets.py: a recorded kernel launch compiles for GPUs that are not here (ptxas, on the CPU), and
the fit rule holds each target to its shared memory and register file."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env

pytest.importorskip("triton")

from benchmarks import check_targets  # noqa: E402


def test_fit_rule_uses_each_targets_limits():
    r = dict(shared=120 * 1024, regs=128, warps=4)
    assert check_targets.fits(r, 80) and check_targets.fits(r, 90)          # 163 KB / 227 KB
    assert not check_targets.fits(r, 86) and not check_targets.fits(r, 89)  # 99 KB
    assert not check_targets.fits(dict(r, shared=0, regs=255, warps=16), 90)  # 255 x 32 x 16 > 65,536 registers
    assert check_targets.fits(dict(r, shared=0, regs=255, warps=8), 90)


PROBE = r"""
import json, torch
torch.cuda.is_available = lambda: True  # the kernels are defined (compiled here for other GPUs, never launched)
from benchmarks import check_targets
t = {"tensor": "float32", "aligned": True}
launch = dict(module="tpa_kernels.flashtpa", name="_flashtpa_combine_kernel",
              args=[t, t, {"tensor": "bfloat16", "aligned": True}, 8, 256, 64, 4, 8, 4, 64, 64],
              kwargs=dict(E=64, BLOCK_S=8, BLOCK_E=32, ONE_PASS=True, PDL=True, num_warps=2, launch_pdl=True))
print(json.dumps({cc: check_targets.compile_for(launch, cc) for cc in (80, 90)}))
"""


def test_a_recorded_launch_compiles_for_other_gpus():
    """Phase 2 of the script, in a process without the interpreter: FlashTPA's combine kernel (with PDL on sm_90,
    without below) compiled for an A100 and a Hopper GPU, its shared memory and registers read back."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for cc in ("80", "90"):
        r = res[cc]
        assert 0 < r["regs"] <= 255 and r["shared"] < 1024 and r["warps"] == 2 and check_targets.fits(r, int(cc))
