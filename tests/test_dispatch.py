"""The one kernel dispatch (tpa_kernels/dispatch.py): its switches and its warning, checked in fresh processes (the
switches are read when the kernels are imported) with a stand-in CUDA device; the choices a caller sets."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env

PROBE = r"""
import json, sys, types, warnings
import torch
torch.cuda.is_available = lambda: True              # a stand-in CUDA machine: the dispatch's view only
torch.cuda.get_device_capability = lambda device=None: (9, 0)
if sys.argv[1] == "old_triton":                     # a Triton without the launch-dependency intrinsics
    import triton.language.extra as extra
    old = types.ModuleType("triton.language.extra.cuda")
    old.__dict__.update({k: v for k, v in vars(extra.cuda).items() if not k.startswith(("gdc_", "__"))})
    sys.modules["triton.language.extra.cuda"] = extra.cuda = old
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from tpa_kernels import dispatch
cuda_tensor = types.SimpleNamespace(is_cuda=True)
print(json.dumps(dict(kernels=dispatch.KERNELS, defined=dispatch.HAS_TRITON, pick=dispatch.pick(cuda_tensor),
                      pick_misfit=dispatch.pick(cuda_tensor, fits=False), pick_cpu=dispatch.pick(torch.zeros(1)),
                      pdl=dispatch.pdl_supported(torch.device("cuda")),
                      warnings=[str(w.message) for w in caught if "kernels are off" in str(w.message)])))
"""


def probe(case="", **env):
    out = subprocess.run([sys.executable, "-c", PROBE, case], cwd=ROOT, env=child_env(TRITON_INTERPRET="1", **env),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_default_dispatch_picks_kernels_for_cuda_tensors():
    r = probe()
    assert r == dict(kernels=True, defined=True, pick="triton", pick_misfit="ref", pick_cpu="ref", pdl=True,
                     warnings=[])


def test_switches_force_the_references_and_turn_pdl_off():
    r = probe(TPA_KERNELS="ref", TPA_PDL="0")
    assert (r["kernels"], r["defined"], r["pick"], r["pdl"]) == (False, True, "ref", False)  # tests can still call
    assert len(r["warnings"]) == 1 and "TPA_KERNELS=ref is set" in r["warnings"][0]        # impl="triton"


def test_a_triton_without_the_pdl_intrinsics_warns_once_and_runs_the_references():
    r = probe("old_triton")
    assert (r["kernels"], r["defined"], r["pick"]) == (False, False, "ref")
    assert len(r["warnings"]) == 1 and "triton cannot be used" in r["warnings"][0] and "gdc_" in r["warnings"][0]


def test_overrides_set_kernel_choices_for_a_block():
    """The choices a caller sets for a block of code (engine.KVCache sets its options so around each step): nested
    blocks win for their keys, and the defaults come back after; unknown choices are refused."""
    from tpa_kernels.dispatch import choice, overrides
    assert (choice("flashtpa"), choice("mla_absorb")) == (None, True)
    with overrides(flashtpa="ref"):
        with overrides(mla_absorb=False):
            assert (choice("flashtpa"), choice("mla_absorb")) == ("ref", False)
        assert (choice("flashtpa"), choice("mla_absorb")) == ("ref", True)
    assert choice("flashtpa") is None
    with pytest.raises(ValueError, match="unknown kernel choices"):
        with overrides(flash=True):
            pass
