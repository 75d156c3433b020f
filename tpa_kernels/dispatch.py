"""The one kernel dispatch: whether the Triton kernels can run here, which implementation an op call gets, the
two switches, and the choices a caller sets for a block of code (overrides).

    TPA_KERNELS=ref   every op runs its PyTorch reference (A/B runs, debugging, a GPU on which a kernel fails)
    TPA_PDL=0         no programmatic dependent launch, the Hopper-only launch feature of the decode kernels:
                      a Hopper GPU then runs what an A100 runs

The kernels are defined only where Triton can run: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1,
which the tests use). Elsewhere every op runs its PyTorch reference, and importing the kernel modules skips
defining the ops, which costs seconds (torch.library.triton_op imports TorchInductor). On a CUDA machine whose
Triton cannot run the kernels (not installed, or too old for the launch-dependency intrinsics), or with
TPA_KERNELS=ref, importing the kernels warns once with the reason, and CUDA tensors run the references.

Each op's impl argument: None (the dispatch below: the kernel for CUDA tensors of a shape it takes), "triton"
(the kernel, wherever Triton runs; the tests use it on CPU) or "ref".
"""

import contextlib
import os
import warnings

import torch


def _triton_status():
    """(usable, why not)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False, "no CUDA device"
    try:
        import triton  # noqa: F401
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401  (PDL intrinsics)
    except ImportError as e:
        return False, f"triton cannot be used: {e} (pip install -U triton)"
    return True, ""


HAS_TRITON, WHY_NOT = _triton_status()
FORCE_REF = os.environ.get("TPA_KERNELS", "auto").lower() == "ref"
PDL_OFF = os.environ.get("TPA_PDL", "1") == "0"
KERNELS = HAS_TRITON and not FORCE_REF  # whether the dispatch picks kernels for CUDA tensors

if torch.cuda.is_available() and not KERNELS:
    warnings.warn("the Triton kernels are off, every op runs its PyTorch reference (slower): "
                  + ("TPA_KERNELS=ref is set" if HAS_TRITON else WHY_NOT), stacklevel=2)


def pick(t, fits=True):
    """impl for an op call on tensor t: "triton" for a CUDA tensor of a shape the kernel takes (fits), else "ref"."""
    return "triton" if KERNELS and t.is_cuda and fits else "ref"


DEFAULTS = dict(flashtpa=None, mla_absorb=True, tpa_attention=None)
_chosen = {}  # what the innermost overrides() blocks set


@contextlib.contextmanager
def overrides(**choices):
    """Kernel choices for the code inside the block, read by the model's decoding (choice(name)); a nested block
    wins for its keys. engine.KVCache sets its options this way around every step it drives.
      flashtpa: None (the dispatch: FlashTPA for CUDA tensors, its reference elsewhere), "ref" (the reference:
        TPA decodes through it, the fused batch-1 step is off), "triton" (the kernel wherever Triton runs: CPU tensors
        in the interpreter, as the tests do);
      mla_absorb: True (MLA decodes in the latent space) or False (it materialises K and V);
      tpa_attention: T6's attention without a cache (training, evaluation, a prefill into an empty cache): None
        (materialise Q, K and V, then SDPA), "recompute" (the same, but the backward builds Q, K, V and runs the
        attention forward again instead of keeping them: torch.utils.checkpoint), "fused" (tpa_kernels/tpa_attention.py,
        which forms the tiles from the factors inside the kernel, on CUDA; its reference elsewhere) or "triton" (that
        kernel wherever Triton runs)."""
    unknown = sorted(set(choices) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown kernel choices {unknown}; known: {sorted(DEFAULTS)}")
    if choices.get("tpa_attention") not in (None, "recompute", "fused", "triton"):
        raise ValueError(f"tpa_attention={choices['tpa_attention']!r}: use None (materialise), 'recompute', 'fused' "
                         f"or 'triton'")
    saved = dict(_chosen)
    _chosen.update(choices)
    try:
        yield
    finally:
        _chosen.clear()
        _chosen.update(saved)


def choice(name):
    """The value of a kernel choice here: the innermost overrides() block's, else its default."""
    return _chosen.get(name, DEFAULTS[name])


def pdl_supported(device):
    """Programmatic dependent launch (griddepcontrol): a CUDA GPU of compute capability >= 9, unless TPA_PDL=0."""
    return device.type == "cuda" and not PDL_OFF and torch.cuda.get_device_capability(device)[0] >= 9


SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "fa4")


def select_sdpa_backend(name, device):
    """Which kernel F.scaled_dot_product_attention runs in this process (train.py's sdpa_backend); returns the one in
    effect. "auto": PyTorch's choice (cuDNN on Hopper: benchmarks/RESULTS.md measured it the fastest of the three);
    "cudnn", "flash" (FlashAttention-2) or "efficient": that kernel only, with the math kernel kept for calls it
    does not take (a mask); "fa4": flash-attn-4's kernels in FlashAttention-2's place, through PyTorch's registry
    (torch.nn.attention.activate_flash_attention_impl), then as "flash". A choice that cannot run here (no CUDA
    device; for fa4 a GPU other than Hopper or Blackwell, flash-attn-4 not installed, a PyTorch without the
    registry) warns once and returns "auto". fa4 must also pass a small causal forward and backward against the
    math kernel; if it fails after activation and PyTorch cannot restore its own kernels, the run stops."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend={name!r}: use one of {', '.join(SDPA_BACKENDS)}")
    if name == "auto":
        return name
    why = "no CUDA device" if device.type != "cuda" else _activate_fa4(device) if name == "fa4" else None
    if why:
        warnings.warn(f"sdpa_backend={name!r} is not used: {why}; SDPA keeps PyTorch's choice", stacklevel=2)
        return "auto"
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_flash_sdp(name in ("flash", "fa4"))
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    return name


def _activate_fa4(device):
    """Activate flash-attn-4 in SDPA's flash slot and check it: None, or why it cannot be used."""
    import torch.nn.attention as attention
    import torch.nn.functional as F
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "flash-attn-4 runs on compute capability 9.x (Hopper) or 10.x (Blackwell)"
    if not hasattr(attention, "activate_flash_attention_impl"):
        return f"torch {torch.__version__} has no flash-attention registry (activate_flash_attention_impl)"
    try:
        import flash_attn.cute.interface  # noqa: F401
    except ImportError as e:
        return f"flash-attn-4 cannot be imported ({e}); pip install flash-attn-4"
    try:
        attention.activate_flash_attention_impl("FA4")
        qkv = [torch.randn(2, 3, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3)]
        grads = []  # the registered kernel in bf16, the math kernel in fp32: output and gradients
        for backend, dtype in ((attention.SDPBackend.FLASH_ATTENTION, torch.bfloat16),
                               (attention.SDPBackend.MATH, torch.float32)):
            x = [t.to(dtype).requires_grad_() for t in qkv]
            with attention.sdpa_kernel(backend):
                y = F.scaled_dot_product_attention(*x, is_causal=True)
            grads.append([y.float()] + [g.float() for g in torch.autograd.grad(y.float().square().sum(), x)])
        for name, got, want in zip(("output", "dq", "dk", "dv"), *grads):
            err = ((got - want).norm() / want.norm()).item()
            if not err < 2e-2:  # bf16 rounding gives ~2e-3 (the math kernel in bf16); a wrong call is off by O(1)
                raise RuntimeError(f"its {name} differs from the math kernel's by {err:.3g} (relative)")
    except Exception as e:  # a version mismatch between PyTorch's glue and flash-attn-4 shows up here
        why = (f"flash-attn-4 failed a check through PyTorch's registry ({type(e).__name__}: {e}; PyTorch's glue "
               f"expects flash_attn.cute's _flash_attn_fwd to return (out, lse), as flash-attn-4 <= 4.0.0b18 does)")
        if not hasattr(attention, "restore_flash_attention_impl"):
            raise SystemExit(why + "; this PyTorch cannot restore its own flash kernels: run with sdpa_backend='auto'")
        attention.restore_flash_attention_impl()
        return why
    return None
