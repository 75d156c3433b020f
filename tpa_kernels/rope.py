"""
Rotary position embedding (RoPE) for training: one Triton kernel for the forward and the backward.

    y = apply_rope(x, cos, sin)     # x (B, T, H, D) any strides; cos, sin (B|1, T, 1, D/2) fp32 -> y (B, T, H, D)

Half-split pairs (feature i rotates with i + D/2), fp32 math, y in x's dtype and contiguous. The backward
is the same kernel rotating the other way (sin -> -sin). apply_rope_ref is the PyTorch reference with the
same signature; apply_rope uses the kernel for CUDA tensors that need a gradient, the reference elsewhere.

Why a kernel: x is usually a strided slice of a fused projection (q and k of c_attn, B_Q and B_K of TPA's
c_fact) and its gradient arrives in SDPA's layout; torch.compile fuses the rotation's backward with the
concatenation of the projection's gradient into one kernel that reads and writes at a fraction of the
memory bandwidth. Here a program reads (BLOCK_T, D/2) half-rows of HB heads with coalesced loads whatever
the strides, so the remaining concatenation is a plain copy.
"""

import torch

from tpa_kernels.dispatch import HAS_TRITON, pick

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


def apply_rope_ref(x, cos, sin):
    """Rotate the last axis of x (B, T, *, dim) with cos/sin (B|1, T, 1, dim/2); half-split pairs, fp32 math."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


if HAS_TRITON:

    @triton.jit
    def _rope_kernel(x_ptr, c_ptr, s_ptr, y_ptr, T, H, s_xb, s_xt, s_xh, s_xd, s_cb, s_ct, s_yb, s_yt, s_yh,
                     SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, HB: tl.constexpr,
                     BLOCK_HALF: tl.constexpr):
        pid_t, pid_h, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        h = pid_h * HB + tl.arange(0, HB)
        i = tl.arange(0, BLOCK_HALF)
        ti_ok = (t < T)[:, None] & (i < HALF)[None, :]
        cs = bi * s_cb + t[:, None] * s_ct + i[None, :]  # cos/sin rows (BLOCK_T, HALF), contiguous last axis
        c = tl.load(c_ptr + cs, mask=ti_ok, other=0.0)[:, None, :]
        s = tl.load(s_ptr + cs, mask=ti_ok, other=0.0)[:, None, :] * SIGN
        mask = ti_ok[:, None, :] & (h < H)[None, :, None]  # (BLOCK_T, HB, BLOCK_HALF)
        xs = x_ptr + bi * s_xb + t[:, None, None] * s_xt + h[None, :, None] * s_xh + i[None, None, :] * s_xd
        x1 = tl.load(xs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xs + HALF * s_xd, mask=mask, other=0.0).to(tl.float32)
        ys = y_ptr + bi * s_yb + t[:, None, None] * s_yt + h[None, :, None] * s_yh + i[None, None, :]
        tl.store(ys, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(ys + HALF, (x1 * s + x2 * c).to(y_ptr.dtype.element_ty), mask=mask)

    def rope_triton(x, cos, sin, sign=1):
        """The kernel: rotation by +angle (sign=1) or -angle (sign=-1, the backward)."""
        B, T, H, D = x.shape
        y = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
        cos, sin = cos.expand(-1, T, 1, D // 2), sin.expand(-1, T, 1, D // 2)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        BLOCK_T, HB = 16, min(8, triton.next_power_of_2(H))
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(H, HB), B)
        s_cb = cos.stride(0) if cos.size(0) > 1 else 0
        wrap_triton(_rope_kernel)[grid](x, cos, sin, y, T, H, *x.stride(), s_cb, cos.stride(1), *y.stride()[:3],
                                        SIGN=sign, HALF=D // 2, BLOCK_T=BLOCK_T, HB=HB,
                                        BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=4)
        return y

    # triton_op: torch.compile sees the kernel launch (no Python op dispatch per call in a compiled step)
    @triton_op("tpa::rope", mutates_args=())
    def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope_triton(x, cos, sin, 1)

    @triton_op("tpa::rope_backward", mutates_args=())
    def _rope_bwd_op(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope_triton(g, cos, sin, -1)

    def _setup(ctx, inputs, output):
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)

    def _backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rope_bwd_op(g, cos, sin), None, None

    _rope_op.register_autograd(_backward, setup_context=_setup)


def apply_rope(x, cos, sin, impl=None):
    """RoPE of x (B, T, H, D) with cos/sin (B|1, T, 1, D/2). impl: None (the Triton op for a CUDA x that needs a
    gradient, else the reference: the kernel's gain is the backward, and without one torch.compile fuses the
    reference into its neighbours, as in a decode step), "triton" or "ref"."""
    if impl is None:
        plain = (x.dim() == 4 and cos.dim() == 4 and cos.size(1) == x.size(1) and cos.size(0) in (1, x.size(0))
                 and x.size(-1) % 2 == 0 and not cos.requires_grad)
        impl = pick(x, x.requires_grad and plain)
    if impl == "triton":
        return _rope_op(x, cos, sin)
    if impl == "ref":
        return apply_rope_ref(x, cos, sin)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
