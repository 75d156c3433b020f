"""Kernels with their PyTorch references (same signatures): kernels/flashtpa.py, materialize.py, rope.py."""

from kernels.flashtpa import HAS_TRITON, flashtpa_decode, flashtpa_decode_einsum, flashtpa_decode_ref
from kernels.materialize import tpa_materialize, tpa_materialize_ref
from kernels.rope import rope, rope_ref

__all__ = ["HAS_TRITON", "flashtpa_decode", "flashtpa_decode_einsum", "flashtpa_decode_ref", "rope", "rope_ref",
           "tpa_materialize", "tpa_materialize_ref"]
