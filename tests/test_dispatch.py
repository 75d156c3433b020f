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


def test_sdpa_backend_that_cannot_run_here_warns_and_stays_on_auto(monkeypatch):
    """train.py's sdpa_backend: a name outside the list is refused; where the kernel cannot run (no CUDA device)
    one warning says why and PyTorch's choice stays, its switches untouched."""
    import torch
    from tpa_kernels.dispatch import select_sdpa_backend
    with pytest.raises(ValueError, match="sdpa_backend='fa3': use one of auto, cudnn, flash, efficient, fa4"):
        select_sdpa_backend("fa3", torch.device("cpu"))
    switches = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled())
    for name in ("cudnn", "flash", "efficient", "fa4"):
        with pytest.warns(UserWarning, match=f"sdpa_backend='{name}' is not used: no CUDA device; SDPA keeps"):
            assert select_sdpa_backend(name, torch.device("cpu")) == "auto"
    assert select_sdpa_backend("auto", torch.device("cpu")) == "auto"
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == switches


def test_fa4_is_refused_with_the_reason_on_a_gpu_that_cannot_take_it(monkeypatch):
    """On a stand-in CUDA device: an Ampere GPU, or flash-attn-4 missing, or a check that fails after activation
    (PyTorch's own kernels are then restored), each warns with its reason and leaves SDPA on auto."""
    import torch
    import torch.nn.attention as attention
    from tpa_kernels import dispatch
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.warns(UserWarning, match=r"compute capability 9.x \(Hopper\) or 10.x"):
        assert dispatch.select_sdpa_backend("fa4", cuda) == "auto"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn fails
    with pytest.warns(UserWarning, match="flash-attn-4 cannot be imported"):
        assert dispatch.select_sdpa_backend("fa4", cuda) == "auto"
    monkeypatch.delitem(sys.modules, "flash_attn")
    for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):  # an installed stand-in
        monkeypatch.setitem(sys.modules, name, __import__("types").ModuleType(name))
    calls = []
    monkeypatch.setattr(attention, "activate_flash_attention_impl", lambda impl: calls.append(("activate", impl)))
    monkeypatch.setattr(attention, "restore_flash_attention_impl", lambda: calls.append(("restore",)))
    # the check's tensors cannot be made on this CUDA-less machine: that failure stands for a broken kernel
    with pytest.warns(UserWarning, match="flash-attn-4 failed a check through PyTorch's registry"):
        assert dispatch.select_sdpa_backend("fa4", cuda) == "auto"
    assert calls == [("activate", "FA4"), ("restore",)]
    monkeypatch.delattr(attention, "restore_flash_attention_impl")
    with pytest.raises(SystemExit, match="cannot restore its own flash kernels"):
        dispatch.select_sdpa_backend("fa4", cuda)
