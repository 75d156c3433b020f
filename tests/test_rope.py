"""The RoPE op (tpa_kernels/rope.py): Triton forward/backward (interpreter on CPU) against the PyTorch reference."""

import pytest
import torch

from tpa_kernels.rope import HAS_TRITON, apply_rope, apply_rope_ref
from model import rope_tables
from conftest import assert_close_to_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPCHECK_UTILS = ("test_schema", "test_autograd_registration") + (
    ("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE == "cuda" else ())


def grads(x, cos, sin, g, impl):
    x = x.detach().requires_grad_(True)
    y = apply_rope(x, cos, sin, impl=impl)
    return y, torch.autograd.grad(y, x, g)[0]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,T,H,D,per_row", [(2, 19, 3, 64, False), (1, 37, 12, 32, False), (3, 5, 1, 8, True),
                                             (2, 33, 17, 12, False)])
def test_forward_backward_match_reference(B, T, H, D, per_row, dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(D, 64, 10000.0)
    if per_row:  # per-sequence positions (decoding a ragged batch): tables (B, T, 1, D/2)
        pos = torch.randint(0, 64, (B, T), generator=g)
        cos, sin = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
    else:
        cos, sin = cos[:T].view(1, T, 1, -1), sin[:T].view(1, T, 1, -1)
    # x: a strided slice of a fused projection; the gradient arrives heads-first, as from SDPA
    x = torch.randn(B, T, H + 3, D, generator=g, dtype=torch.float64)[:, :, 2:H + 2]
    grad = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).transpose(1, 2)
    ref64 = grads(x, cos.double(), sin.double(), grad, "ref")
    low = [t.to(dtype).to(DEVICE) for t in (x, grad)]
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    got = grads(low[0], cos, sin, low[1], "triton")
    ref_low = grads(low[0], cos, sin, low[1], "ref")
    assert got[0].shape == x.shape and got[0].is_contiguous() and got[0].dtype == dtype
    for name, y, r, rl in zip(("y", "dx"), got, ref64, ref_low):
        assert_close_to_reference(y, r, rl, atol=1e-6, name=name)


@needs_triton
def test_backward_is_the_inverse_rotation():
    # the rotation is orthogonal: rotating forward then through the backward kernel gives x back
    cos, sin = rope_tables(16, 8, 10000.0)
    cos, sin = cos.view(1, 8, 1, 8).to(DEVICE), sin.view(1, 8, 1, 8).to(DEVICE)
    x = torch.randn(2, 8, 3, 16, device=DEVICE, requires_grad=True)
    y = apply_rope(x, cos, sin, impl="triton")
    (back,) = torch.autograd.grad(y, x, y)
    torch.testing.assert_close(back, x.detach(), rtol=1e-5, atol=1e-5)


def test_dispatch():
    # CPU tensors and tables broadcast over the tokens take the reference; bad impl names are refused
    cos, sin = rope_tables(8, 5, 10000.0)
    x = torch.randn(1, 1, 2, 8)
    y = apply_rope(x, cos.view(1, 5, 1, 4), sin.view(1, 5, 1, 4))
    assert y.shape == (1, 5, 2, 8)
    torch.testing.assert_close(y, apply_rope_ref(x, cos.view(1, 5, 1, 4), sin.view(1, 5, 1, 4)))
    assert apply_rope(x, cos.view(1, 5, 1, 4), sin.view(1, 5, 1, 4), impl="ref").shape == (1, 5, 2, 8)
    with pytest.raises(ValueError, match="impl='cuda'"):
        apply_rope(x, cos.view(1, 5, 1, 4), sin.view(1, 5, 1, 4), impl="cuda")


@needs_triton
def test_custom_op_registration():
    """torch.library.opcheck of tpa::rope: schema and autograd; on a GPU also fake tensors and compile tracing
    (a triton_op traces its kernel launch, which the CPU interpreter would execute on fake tensors)."""
    cos, sin = rope_tables(16, 9, 10000.0)
    x = torch.randn(1, 9, 3, 16).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(torch.ops.tpa.rope.default, (x, cos.view(1, 9, 1, 8).to(DEVICE), sin.view(1, 9, 1, 8).to(DEVICE)),
                          test_utils=OPCHECK_UTILS)
