"""Kernels with their PyTorch references (same signatures): tpa_kernels/flashtpa.py, materialize.py, rope.py,
cross_entropy.py, mlp.py, gemv.py, cache_write.py, tpa_attention.py."""

from tpa_kernels.cache_write import write_rows, write_rows_ref
from tpa_kernels.cross_entropy import (cross_entropy_loss, cross_entropy_loss_ref, linear_cross_entropy,
                                   linear_cross_entropy_ref)
from tpa_kernels.dispatch import HAS_TRITON, pick
from tpa_kernels.flashtpa import flashtpa_decode, flashtpa_decode_einsum, flashtpa_decode_ref
from tpa_kernels.gemv import linear_factors, linear_factors_ref, linear_one_row, linear_one_row_ref
from tpa_kernels.materialize import tpa_materialize, tpa_materialize_ref
from tpa_kernels.rope import apply_rope, apply_rope_ref
from tpa_kernels.mlp import swiglu, swiglu_ref
from tpa_kernels.tpa_attention import tpa_attention, tpa_attention_ref

__all__ = ["HAS_TRITON", "pick", "apply_rope", "apply_rope_ref", "cross_entropy_loss", "cross_entropy_loss_ref", "flashtpa_decode",
           "flashtpa_decode_einsum", "flashtpa_decode_ref", "linear_cross_entropy", "linear_cross_entropy_ref",
           "linear_factors", "linear_factors_ref", "linear_one_row", "linear_one_row_ref", "tpa_materialize",
           "tpa_materialize_ref", "swiglu", "swiglu_ref", "tpa_attention", "tpa_attention_ref", "write_rows", "write_rows_ref"]
