"""
Matrix-vector product for batch-1 decoding: y = x W^T for a single row x, the weight read once at full bandwidth.

    y = linear_one_row(x, w)     # x (..., K) with one row in all, w (N, K) -> y (..., N), x's dtype

linear_one_row_ref is the PyTorch reference with the same signature (F.linear). Why a kernel: at batch 1 every
weight matmul of a decode step is a matrix-vector product; cuBLAS runs them at about a third of the copy
bandwidth on an H100 (Medium T6: ~0.62 ms per step for weights that need 0.24 ms), and they are most of a
batch-1 step. Here each program owns BLOCK_N rows of W, streams them in (BLOCK_N, BLOCK_K) tiles with
fp32 accumulation, and reduces once at the end.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def linear_one_row_ref(x, w):
    return F.linear(x, w)


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, s_wn, s_wk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * s_wn + k[None, :] * s_wk, mask=n_ok[:, None] & (k < K)[None, :],
                        other=0.0)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton_op("tpa::linear_one_row", mutates_args=())
    def _gemv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, K = w.shape
        x1 = x.reshape(K).contiguous()
        y = torch.empty(N, device=x.device, dtype=x.dtype)
        BLOCK_N, BLOCK_K = 8, min(512, triton.next_power_of_2(K))  # measured on an H100 (Medium shapes)
        wrap_triton(_gemv_kernel)[(triton.cdiv(N, BLOCK_N),)](x1, w, y, N, K, w.stride(0), w.stride(1),
                                                              BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
        return y.view(*x.shape[:-1], N)


def linear_one_row(x, w, impl=None):
    """x (..., K) holding one row, w (N, K) -> (..., N). impl: None (the Triton op for CUDA tensors of one dtype,
    else the reference), "triton" or "ref". No autograd: for decoding."""
    if x.numel() != x.size(-1) or w.dim() != 2 or w.size(1) != x.size(-1):
        raise ValueError(f"linear_one_row: x {tuple(x.shape)} must hold one row of w's {w.size(-1)} input features, "
                         f"w {tuple(w.shape)} must be (N, K)")
    if impl is None:
        impl = "triton" if HAS_TRITON and x.is_cuda and x.dtype == w.dtype else "ref"
    if impl == "triton":
        return _gemv_op(x, w)
    if impl == "ref":
        return linear_one_row_ref(x, w)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
