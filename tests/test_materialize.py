"""The TPA materialisation op (tpa_kernels/materialize.py): Triton forward/backward (interpreter on CPU) against fp64."""

import pytest
import torch

from tpa_kernels.materialize import HAS_TRITON, tpa_materialize
from conftest import assert_close_to_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPCHECK_UTILS = ("test_schema", "test_autograd_registration") + (  # fake-tensor tracing of a triton_op: GPU only
    ("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE == "cuda" else ())
CASES = [(2, 5, 5, 3, 16), (1, 37, 34, 6, 64), (2, 19, 3, 2, 64), (1, 9, 4, 1, 32)]  # B, T, H, R, D


def grads(a, b, g, scale, impl):
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    out = tpa_materialize(a, b, scale, impl=impl)
    da, db = torch.autograd.grad(out, (a, b), g)
    return out, da, db


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}T{c[1]}H{c[2]}R{c[3]}D{c[4]}" for c in CASES])
def test_forward_backward_match_fp64(case, dtype):
    B, T, H, R, D = case
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, T, H + 2, R, generator=g, dtype=torch.float64)[:, :, 1:H + 1]  # a strided view, as in the model
    b = torch.randn(B, T, R, D, generator=g, dtype=torch.float64)
    grad = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).transpose(1, 2)  # heads-first view of (B, T, H, D)
    ref64 = grads(a, b, grad, 1 / R, "ref")
    low = [x.to(dtype).to(DEVICE) for x in (a, b, grad)]
    got = grads(*low, 1 / R, "triton")
    ref_low = grads(*low, 1 / R, "ref")
    assert got[0].shape == (B, H, T, D) and got[1].shape == a.shape and got[2].shape == b.shape
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    for name, x, r, rl in zip(("out", "da", "db"), got, ref64, ref_low):
        assert_close_to_reference(x, r, rl, atol=atol, name=name)


def test_dispatch_and_broadcast():
    # CPU tensors, or broadcast factors (constant A), take the reference; bad impl names are refused
    a, b = torch.randn(1, 1, 4, 2), torch.randn(2, 3, 2, 8)
    out = tpa_materialize(a, b, 0.5)
    assert out.shape == (2, 4, 3, 8)
    torch.testing.assert_close(out, 0.5 * torch.einsum("bthr,btrd->bhtd", a.expand(2, 3, 4, 2), b))
    with pytest.raises(ValueError, match="impl='cuda'"):
        tpa_materialize(a, b, 0.5, impl="cuda")


@needs_triton
def test_custom_op_registration():
    """torch.library.opcheck of tpa::materialize: schema and autograd; on a GPU also fake tensors and tracing."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 9, 3, 2, generator=g).to(DEVICE).requires_grad_(True)
    b = torch.randn(1, 9, 2, 16, generator=g).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(torch.ops.tpa.materialize.default, (a, b, 0.5), test_utils=OPCHECK_UTILS)
