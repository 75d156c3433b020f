"""
Matrix-vector products for batch-1 decoding: y = x W^T for a single row x, the weight read once at full bandwidth,
with what sits around a decode step's weight matmuls fused in.

    y = linear_one_row(x, w)                         # x (..., K) with one row in all, w (N, K) -> y (..., N)
    y = linear_one_row(x, w, norm=True)              # W rms_norm(x): the model's weightless RMSNorm folded in
                                                     # (F.rms_norm's eps: fp32's for bf16 / fp16 inputs)
    y = linear_one_row(x, w, glu=True)               # w = [W_gate; W_up] (2H, K) -> silu(W_gate x) * (W_up x) (..., H)
    y = linear_one_row(x, w, residual=r)             # r + W x (r (..., N)): the residual add of a block
    y = linear_one_row(x, w, pdl=True)               # programmatic dependent launch (below)

linear_one_row_ref is the PyTorch reference with the same signature (F.rms_norm, F.linear, F.silu). Why a kernel: at
batch 1 every weight matmul of a decode step is a matrix-vector product, cuBLAS runs them at about a third of the
copy bandwidth on an H100, and the norms, SwiGLU and residual adds between them are ~1.5 us kernels each. Here
each program owns BLOCK_N rows of W (and the matching rows of W_up), loads them whole (or in BLOCK_K chunks for
long rows) with fp32 accumulation; a weightless RMSNorm of x is a scalar, rsqrt(mean(x^2) + eps), applied to the
finished dot products (every program reads all of x anyway).

pdl=True (CUDA, compute capability >= 9): the kernel is launched with programmatic dependent launch; it lets the
next kernel launch at once (griddepcontrol.launch_dependents) and loads its first weight chunk before waiting for
the previous kernel (griddepcontrol.wait), so in a chain of such kernels every weight stream starts while the
previous kernel still runs. Only x and the residual are read after the wait: the caller guarantees that the
weights are not written by any kernel of the chain.
"""

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _norm_eps(dtype):
    # F.rms_norm's default: the machine epsilon of the type it computes in (fp32 for bf16 / fp16 inputs)
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def linear_one_row_ref(x, w, norm=False, glu=False, residual=None):
    if norm:
        x = F.rms_norm(x, (x.size(-1),))
    y = F.linear(x, w)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, r_ptr, y_ptr, N, K, s_wn, s_wk, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # the next kernel may launch now and start its own weight loads
            gdc_launch_dependents()
        n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # output rows (gate rows with GLU)
        n_ok = n < N
        k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + n[:, None] * s_wn
        mask = n_ok[:, None] & (k < K)[None, :]
        # the first chunk of weights is requested before the wait: nothing in the chain writes them
        w = tl.load(w_rows + k[None, :] * s_wk, mask=mask, other=0.0)
        if GLU:
            wu = tl.load(w_rows + N * s_wn + k[None, :] * s_wk, mask=mask, other=0.0)
        if PDL:  # x (and the residual) are the previous kernel's output
            gdc_wait()
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc = w.to(tl.float32) * x[None, :]
        if GLU:
            acc_u = wu.to(tl.float32) * x[None, :]
        ss = x * x
        for k0 in range(BLOCK_K, K, BLOCK_K):  # rows longer than one chunk
            kk = k0 + k
            mask = n_ok[:, None] & (kk < K)[None, :]
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += tl.load(w_rows + kk[None, :] * s_wk, mask=mask, other=0.0).to(tl.float32) * x[None, :]
            if GLU:
                acc_u += tl.load(w_rows + N * s_wn + kk[None, :] * s_wk, mask=mask, other=0.0).to(tl.float32) * x[None, :]
            ss += x * x
        y = tl.sum(acc, axis=1)
        if NORM:  # W (x / rms(x)) = (W x) / rms(x)
            inv = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            y = y * inv
        if GLU:
            u = tl.sum(acc_u, axis=1)
            if NORM:
                u = u * inv
            y = y * tl.sigmoid(y) * u
        if RESIDUAL:
            y += tl.load(r_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    def _launch(launcher, x1, w, r1, y, norm, glu, pdl):
        N, K = y.numel(), w.size(1)
        BLOCK_N = 4 if pdl else 2  # measured on an H100: a chain of Medium T6's 97 matrices (.carry-style script)
        BLOCK_K = min(triton.next_power_of_2(K), 16384 // (BLOCK_N * (2 if glu else 1)))
        launcher[(triton.cdiv(N, BLOCK_N),)](
            x1, w, y if r1 is None else r1, y, N, K, w.stride(0), w.stride(1), _norm_eps(x1.dtype),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NORM=norm, GLU=glu, RESIDUAL=r1 is not None, PDL=pdl, num_warps=4,
            **({"launch_pdl": True} if pdl else {}))

    def _flat(x, w, glu, residual):
        N = w.size(0) // 2 if glu else w.size(0)
        r1 = None if residual is None else residual.reshape(N).contiguous()
        return x.reshape(-1).contiguous(), r1, torch.empty(N, device=x.device, dtype=x.dtype)

    @triton_op("tpa::linear_one_row", mutates_args=())
    def _gemv_op(x: torch.Tensor, w: torch.Tensor, norm: bool = False, glu: bool = False,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        x1, r1, y = _flat(x, w, glu, residual)
        _launch(wrap_triton(_gemv_kernel), x1, w, r1, y, norm, glu, False)
        return y.view(*x.shape[:-1], y.numel())


def _pdl_ok(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def linear_one_row(x, w, norm=False, glu=False, residual=None, impl=None, pdl=False):
    """x (..., K) holding one row, w (N, K) -> (..., N), or (..., N/2) with glu (see the module docstring).
    impl: None (the Triton kernel for CUDA tensors of one dtype, else the reference), "triton" or "ref".
    pdl: launch with programmatic dependent launch where the GPU has it (ignored elsewhere); without it the call
    is a torch.library op that torch.compile keeps in its graph. No autograd: for decoding."""
    N = w.size(0) // 2 if glu and w.dim() == 2 else w.size(0)
    if x.numel() != x.size(-1) or w.dim() != 2 or w.size(1) != x.size(-1):
        raise ValueError(f"linear_one_row: x {tuple(x.shape)} must hold one row of w's {w.size(-1)} input features, "
                         f"w {tuple(w.shape)} must be (N, K)")
    if glu and w.size(0) % 2:
        raise ValueError(f"linear_one_row(glu=True): w {tuple(w.shape)} must stack gate and up rows (an even N)")
    if residual is not None and residual.numel() != N:
        raise ValueError(f"linear_one_row: residual {tuple(residual.shape)} must hold the {N} outputs")
    if impl is None:
        impl = "triton" if HAS_TRITON and x.is_cuda and x.dtype == w.dtype else "ref"
    if impl == "triton":
        if pdl and _pdl_ok(x.device):
            x1, r1, y = _flat(x, w, glu, residual)
            _launch(_gemv_kernel, x1, w, r1, y, norm, glu, True)
            return y.view(*x.shape[:-1], N)
        return _gemv_op(x, w, norm, glu, residual)
    if impl == "ref":
        return linear_one_row_ref(x, w, norm, glu, residual)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
