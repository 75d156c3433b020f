import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
# the offline GPT-2 tokenizer cache, when the shared data folder is beside the checkout
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

# one thread per pytest-xdist worker (the README runs one worker per core: more threads would only contend)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
if not torch.cuda.is_available():  # run Triton kernels in the interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def child_env(**extra):
    """The environment for scripts the tests run in another process (train.py, sample.py, eval): one thread, and
    without TRITON_INTERPRET, so that a CPU child does not define the Triton ops it never runs (seconds each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env.update(extra)
    return env


def assert_close_to_reference(got, ref64, ref_low, atol=0.0, ulps=0, name="output"):
    """FlashAttention's rule for a kernel against its reference: max|got - ref64| <= 2 max|ref_low - ref64| + atol
    (+ ulps fp32 ulps of max|ref64|, for fp32 math), where ref_low is the reference run in the kernel's precision."""
    err = (got.double().cpu() - ref64).abs().max().item()
    ref_err = (ref_low.double().cpu() - ref64).abs().max().item()
    slack = atol + ulps * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err <= 2 * ref_err + slack, f"{name}: error {err:.3g} > 2 x reference error {ref_err:.3g} + {slack:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """Say which tests were skipped and why, so that a missing Triton (every kernel test) cannot go unnoticed."""
    from collections import Counter
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped tests")
        for reason, n in reasons.most_common():
            hint = " (pip install triton: the kernel tests run in its interpreter)" if "triton" in reason else ""
            terminalreporter.write_line(f"{n} skipped: {reason}{hint}")
