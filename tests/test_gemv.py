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


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("glu", [False, True], ids=["linear", "glu"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("N,K", [(38, 700), (10, 5000)])  # 5000: rows longer than one chunk
def test_fused_matches_fp64(N, K, residual, glu, norm, dtype):
    """RMSNorm of the input, SwiGLU of stacked gate/up rows and a residual add, against fp64 with the same eps."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, K, generator=g, dtype=torch.float64) * (3 if N > 10 else 0.01)  # small: eps shows
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5
    r = torch.randn(1, 1, N // 2 if glu else N, generator=g, dtype=torch.float64) if residual else None
    x, w, r = (None if t is None else t.to(dtype).double() for t in (x, w, r))  # compute error only, not rounding
    eps = torch.finfo(torch.float32).eps  # F.rms_norm's default for fp32, fp16 and bf16: fp32's epsilon
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) if norm else x
    ref64 = xn @ w.T
    if glu:
        gate, up = ref64.chunk(2, dim=-1)
        ref64 = torch.nn.functional.silu(gate) * up
    if residual:
        ref64 = r + ref64
    low = lambda t: None if t is None else t.to(dtype).to(DEVICE)
    got = linear_one_row(low(x), low(w), norm=norm, glu=glu, residual=low(r), impl="triton")
    ref_low = linear_one_row(low(x), low(w), norm=norm, glu=glu, residual=low(r), impl="ref")
    assert got.shape == ref64.shape and got.dtype == dtype
    err = (got.double().cpu() - ref64).abs().max().item()
    ref_err = (ref_low.double().cpu() - ref64).abs().max().item()
    assert err <= 2 * ref_err + 16 * torch.finfo(torch.float32).eps * ref64.abs().max().item(), (err, ref_err)


def test_dispatch_and_errors():
    x, w = torch.randn(1, 1, 6), torch.randn(4, 6)
    torch.testing.assert_close(linear_one_row(x, w), x @ w.T)  # CPU: the reference
    with pytest.raises(ValueError, match="one row"):
        linear_one_row(torch.randn(2, 6), w)
    with pytest.raises(ValueError, match="impl='cuda'"):
        linear_one_row(x, w, impl="cuda")
    with pytest.raises(ValueError, match="even N"):
        linear_one_row(x, torch.randn(5, 6), glu=True)
    with pytest.raises(ValueError, match="residual"):
        linear_one_row(x, w, residual=torch.randn(3))
    # the reference is the model's own arithmetic: F.rms_norm, then SwiGLU, then the residual
    w2, r = torch.randn(8, 6), torch.randn(1, 1, 4)
    y = linear_one_row(x, w2, norm=True, glu=True, residual=r, pdl=True)  # pdl is ignored off CUDA
    gate, up = (torch.nn.functional.rms_norm(x, (6,)) @ w2.T).chunk(2, dim=-1)
    torch.testing.assert_close(y, r + torch.nn.functional.silu(gate) * up)


@needs_triton
def test_op_schema():
    x, w = torch.randn(1, 16).to(DEVICE), torch.randn(8, 16).to(DEVICE)
    torch.library.opcheck(torch.ops.tpa.linear_one_row.default, (x, w), test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.tpa.linear_one_row.default, (x, w, True, True, torch.randn(1, 4).to(DEVICE)),
                          test_utils=("test_schema",))
