"""
SwiGLU's gate for training: h = silu(g) * u from the fused up-projection's output gu = [g | u].

    h = swiglu(gu)           # gu (..., 2 * n) -> h (..., n)

Forward and backward are Triton kernels on CUDA (an autograd-aware torch.library.triton_op that torch.compile
launches itself); swiglu_ref is the PyTorch reference with the same signature. Why a kernel: torch.compile writes the
backward's gradient [dg | du] as a concatenation, one element per thread, so every input of the backward (g, u and
dh) is read once for each half; here one program computes both halves of a row block from a single read of each
input. Math in fp32, one rounding per output. Measured: benchmarks/RESULTS.md ("Figures behind the code's
choices").
"""

import torch
import torch.nn.functional as F

from tpa_kernels.dispatch import HAS_TRITON, pick

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


def swiglu_ref(gu):
    """silu(g) * u with g, u = the two halves of the last dimension of gu."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd(gu_ptr, h_ptr, n, s_gu, s_h, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(gu_ptr + row * s_gu + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * s_gu + n + cols, mask=ok, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + row * s_h + cols, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_bwd(gu_ptr, dh_ptr, dgu_ptr, n, s_gu, s_dh, s_dgu, BLOCK: tl.constexpr):
        # dg = dh * u * silu'(g), silu'(g) = sig(g) * (1 + g * (1 - sig(g))); du = dh * silu(g)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(gu_ptr + row * s_gu + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * s_gu + n + cols, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * s_dh + cols, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        du = dh * g * sig
        tl.store(dgu_ptr + row * s_dgu + cols, dg.to(dgu_ptr.dtype.element_ty), mask=ok)
        tl.store(dgu_ptr + row * s_dgu + n + cols, du.to(dgu_ptr.dtype.element_ty), mask=ok)

    def _rows(t, width):
        """t as (rows, width) with unit column stride: a view for the model's (B, T, width) activations (row stride
        free), else a copy."""
        t = t.reshape(-1, width)
        return t if t.stride(-1) == 1 else t.contiguous()

    def _launch(n):
        BLOCK = min(1024, triton.next_power_of_2(n))
        return BLOCK, dict(num_warps=4 if BLOCK >= 512 else 2)

    @triton_op("tpa::swiglu", mutates_args=())
    def _swiglu_op(gu: torch.Tensor) -> torch.Tensor:
        n = gu.shape[-1] // 2
        x = _rows(gu, 2 * n)
        h = torch.empty(x.shape[0], n, device=gu.device, dtype=gu.dtype)
        BLOCK, opts = _launch(n)
        wrap_triton(_swiglu_fwd)[(x.shape[0], triton.cdiv(n, BLOCK))](x, h, n, x.stride(0), h.stride(0),
                                                                      BLOCK=BLOCK, **opts)
        return h.view(*gu.shape[:-1], n)

    @triton_op("tpa::swiglu_backward", mutates_args=())
    def _swiglu_bwd_op(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
        n = gu.shape[-1] // 2
        x, d = _rows(gu, 2 * n), _rows(dh, n)  # dh of sum(h) is an expanded scalar: copied
        dgu = torch.empty(x.shape[0], 2 * n, device=gu.device, dtype=gu.dtype)
        BLOCK, opts = _launch(n)
        wrap_triton(_swiglu_bwd)[(x.shape[0], triton.cdiv(n, BLOCK))](x, d, dgu, n, x.stride(0), d.stride(0),
                                                                      dgu.stride(0), BLOCK=BLOCK, **opts)
        return dgu.view(gu.shape)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        return _swiglu_bwd_op(gu, dh)

    _swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu(gu, impl=None):
    """silu(g) * u, gu = [g | u] along the last dimension. impl: None (the Triton op for CUDA tensors whose last
    dimension is contiguous, else the reference), "triton" or "ref"."""
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension of gu ({gu.shape[-1]}) must be even: [gate | up]")
    if impl is None:
        impl = pick(gu, gu.stride(-1) == 1)
    if impl == "triton":
        if gu.stride(-1) != 1:
            raise ValueError("swiglu(impl='triton') needs a last dimension with stride 1")
        return _swiglu_op(gu)
    if impl == "ref":
        return swiglu_ref(gu)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
