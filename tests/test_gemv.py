"""The batch-1 matrix-vector op (kernels/gemv.py): Triton (interpreter on CPU) against fp64, and its dispatch."""

import pytest
import torch

from kernels.gemv import HAS_TRITON, linear_one_row

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,K,shape", [(5, 7, (1, 1)), (37, 600, (1,)), (1000, 1024, ()), (9, 2730, (1, 1))])
def test_matches_fp64(N, K, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K + 5, generator=g, dtype=torch.float64)[:, 2:K + 2]  # a strided weight view
    ref64 = x @ w.T
    xl, wl = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    got = linear_one_row(xl, wl, impl="triton")
    ref_low = linear_one_row(xl, wl, impl="ref")
    assert got.shape == (*shape, N) and got.dtype == dtype
    err = (got.double().cpu() - ref64).abs().max().item()
    ref_err = (ref_low.double().cpu() - ref64).abs().max().item()
    tol = 2 * ref_err + 8 * torch.finfo(torch.float32).eps * ref64.abs().max().item()  # fp32 accumulation
    assert err <= tol, f"error {err:.3g} > 2 x reference error {ref_err:.3g} + 8 fp32 ulps"


def test_dispatch_and_errors():
    x, w = torch.randn(1, 1, 6), torch.randn(4, 6)
    torch.testing.assert_close(linear_one_row(x, w), x @ w.T)  # CPU: the reference
    with pytest.raises(ValueError, match="one row"):
        linear_one_row(torch.randn(2, 6), w)
    with pytest.raises(ValueError, match="impl='cuda'"):
        linear_one_row(x, w, impl="cuda")


@needs_triton
def test_op_schema():
    x, w = torch.randn(1, 16).to(DEVICE), torch.randn(8, 16).to(DEVICE)
    torch.library.opcheck(torch.ops.tpa.linear_one_row.default, (x, w), test_utils=("test_schema",))
