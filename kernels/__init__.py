"""Kernels with their PyTorch references (same signatures). See kernels/flashtpa.py and kernels/materialize.py."""

from kernels.flashtpa import HAS_TRITON, flashtpa_decode, flashtpa_decode_einsum, flashtpa_decode_ref
from kernels.materialize import tpa_materialize, tpa_materialize_ref

__all__ = ["HAS_TRITON", "flashtpa_decode", "flashtpa_decode_einsum", "flashtpa_decode_ref", "tpa_materialize",
           "tpa_materialize_ref"]
