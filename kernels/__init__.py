"""Kernels with their PyTorch references (same signatures). See kernels/flashtpa.py."""

from kernels.flashtpa import HAS_TRITON, flashtpa_decode, flashtpa_decode_einsum, flashtpa_decode_ref

__all__ = ["HAS_TRITON", "flashtpa_decode", "flashtpa_decode_einsum", "flashtpa_decode_ref"]
