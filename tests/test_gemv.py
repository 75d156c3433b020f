"""The batch-1 matrix-vector op (tpa_kernels/gemv.py): Triton (interpreter on CPU) against fp64, and its dispatch."""

import pytest
import torch

from tpa_kernels.gemv import HAS_TRITON, linear_factors, linear_one_row
from tpa_kernels.rope import apply_rope_ref
from conftest import assert_close_to_reference

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
    assert_close_to_reference(got, ref64, ref_low, ulps=8)  # fp32 accumulation


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
    assert_close_to_reference(got, ref64, ref_low, ulps=16)


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


def factor_case(dtype, H=5, R=(3, 2, 1), D=8, L=11, K=40, seed=0, minor=False):
    """T6's pieces of one token: aq, bq (query buffers), ak, bk, av, bv (cache tensors); bq and bk rotated.
    minor: ak and av position-minor ((1, H, R, L) storage): the kernel writes any evenly strided run."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, H, R[0]), (1, 1, R[0], D), (1, L, H, R[1]), (1, L, R[1], D), (1, L, H, R[2]), (1, L, R[2], D)]
    dsts = [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]
    if minor:
        dsts[2], dsts[4] = (d.movedim(1, -1).contiguous().movedim(-1, 1) for d in (dsts[2], dsts[4]))
    F = sum(torch.Size(s[2:]).numel() for s in shapes)
    x = (torch.randn(1, 1, K, generator=g) * 0.05).to(dtype).to(DEVICE)  # small: the norm's eps shows
    w = (torch.randn(F, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE)
    cos, sin = (torch.randn(2 * L, D // 2, generator=g).to(DEVICE) for _ in range(2))
    return x, w, dsts, [False, True, False, True, False, False], [False, False, True, True, True, True], cos, sin


@pytest.mark.parametrize("minor", [False, True], ids=["contiguous", "position_minor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear_factors(dtype, minor):
    """Projection (RMSNorm folded in), split, RoPE (the model's half-split rotation) and the write at the position:
    kernel and reference against fp64; positions outside the cache are not written; both cache layouts."""
    for p in (0, 7, 10, 11, 15):
        x, w, dsts, rot, at, cos, sin = factor_case(dtype, seed=p, minor=minor)
        pos = torch.tensor([p], device=DEVICE)
        f = torch.nn.functional.rms_norm(x.double(), (x.size(-1),), eps=torch.finfo(torch.float32).eps) @ w.double().T
        want = [d.double().clone() for d in dsts]
        for wd, piece, r, a in zip(want, f.reshape(-1).split([d[0, 0].numel() for d in dsts]), rot, at):
            piece = piece.view(1, 1, *wd.shape[2:])
            if r:
                piece = apply_rope_ref(piece, cos[p].double().view(1, 1, 1, -1), sin[p].double().view(1, 1, 1, -1))
            if not a or p < wd.size(1):
                wd[0, p if a else 0] = piece[0, 0]
        for impl in ("ref",) + (("triton",) if HAS_TRITON else ()):
            got = [d.clone() for d in dsts]
            linear_factors(x, w, got, rot, at, pos, cos, sin, norm=True, impl=impl)
            for wd, g in zip(want, got):
                torch.testing.assert_close(g.double(), wd, **({"rtol": 1e-2, "atol": 2e-3} if dtype != torch.float32
                                                              else {"rtol": 1e-5, "atol": 1e-5}))


def test_linear_factors_errors():
    x, w, dsts, rot, at, cos, sin = factor_case(torch.float32)
    pos = torch.tensor([3]).to(DEVICE)
    with pytest.raises(ValueError, match="must be the"):
        linear_factors(x, w[:-1], dsts, rot, at, pos, cos, sin, impl="ref")
    with pytest.raises(ValueError, match="twice the RoPE"):
        linear_factors(x, w, dsts, rot, at, pos, cos[:, :3], sin[:, :3], impl="ref")
    with pytest.raises(ValueError, match="impl="):
        linear_factors(x, w, dsts, rot, at, pos, cos, sin, impl="cuda")
    if HAS_TRITON:
        extra = torch.zeros(1, 1, 4, device=DEVICE)
        with pytest.raises(ValueError, match="at most 6 pieces"):
            linear_factors(x, torch.cat([w, w[:4]]), dsts + [extra], rot + [False], at + [False], pos, cos, sin,
                           impl="triton")
