"""Whether the Triton kernels are defined here: Triton is installed and can run (a CUDA device, or its CPU
interpreter, TRITON_INTERPRET=1, which the tests use). Elsewhere every op runs its PyTorch reference, and importing
the kernel modules skips defining the ops, which costs seconds (torch.library.triton_op imports TorchInductor)."""

import os

import torch


def triton_usable():
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


HAS_TRITON = triton_usable()
