"""
TPA materialisation for training: out = scale * A^T B per token, written heads first for SDPA.

    out = tpa_materialize(a, b, scale)     # a (B, T, H, R), b (B, T, R, D) -> (B, H, T, D)

Forward and backward are Triton kernels on CUDA (an autograd-aware custom op, opaque to torch.compile);
tpa_materialize_ref is the PyTorch reference with the same signature, used elsewhere. Why a kernel: the
backward, db[t, r, :] = scale * sum_h a[t, h, r] g[h, t, :] and da[t, h, r] = scale * g[h, t, :] . b[t, r, :],
is a reduction over heads of the heads-first gradient that torch.compile turns into a strided reduction at a
fraction of the memory bandwidth (and a batched matmul with K = R is no better). Here one program owns a block
of BLOCK_T tokens of one sequence and, for each rank, walks the heads: every tile it reads or writes is a
contiguous (BLOCK_T, D) block of one head, and the gradient of B for that rank stays in registers.
"""

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def tpa_materialize_ref(a, b, scale):
    """scale * sum_r a[..., r] (x) b[..., r, :]: (B, T, H, R) x (B, T, R, D) -> (B, H, T, D); broadcasts over B and T.

    A sum of R broadcast products, not a matmul: cuBLAS would run a batched matmul with K = R (2 to 6),
    slowly; torch.compile fuses this with what produced a and b.
    """
    a, b = a.transpose(1, 2), b.unsqueeze(1)  # (B, H, T, R), (B, 1, T, R, D)
    x = a[..., 0, None] * b[..., 0, :]
    for r in range(1, a.size(-1)):
        x = x + a[..., r, None] * b[..., r, :]
    return x * scale


if HAS_TRITON:

    @triton.jit
    def _materialize_fwd(a_ptr, b_ptr, o_ptr, T, H, s_ab, s_at, s_ah, s_ar, s_bb, s_bt, s_br, s_bd,
                         s_ob, s_oh, s_ot, s_od, scale,
                         R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        t_ok = t < T
        td_ok = t_ok[:, None] & (d[None, :] < D)
        for h in range(H):
            x = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for r in tl.static_range(R):  # the B tiles are re-read from L1 for every head
                a_r = tl.load(a_ptr + bi * s_ab + t * s_at + h * s_ah + r * s_ar, mask=t_ok, other=0.0)
                b_r = tl.load(b_ptr + bi * s_bb + t[:, None] * s_bt + r * s_br + d[None, :] * s_bd, mask=td_ok, other=0.0)
                x += a_r.to(tl.float32)[:, None] * b_r.to(tl.float32)
            tl.store(o_ptr + bi * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :] * s_od,
                     (x * scale).to(o_ptr.dtype.element_ty), mask=td_ok)

    @triton.jit
    def _materialize_bwd(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, T, H, s_ab, s_at, s_ah, s_ar, s_bb, s_bt, s_br, s_bd,
                         s_gb, s_gh, s_gt, s_gd, scale,
                         R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # da and db are contiguous, shaped like a and b. Per rank r: walk the heads, reading each head's
        # gradient tile (from L2 after the first rank), da[:, h, r] = g_h . b_r and db_r += a[:, h, r] g_h
        pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        t_ok = t < T
        td_ok = t_ok[:, None] & (d[None, :] < D)
        for r in tl.static_range(R):
            b_r = tl.load(b_ptr + bi * s_bb + t[:, None] * s_bt + r * s_br + d[None, :] * s_bd, mask=td_ok,
                          other=0.0).to(tl.float32)
            db = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for h in range(H):
                g = tl.load(g_ptr + bi * s_gb + h * s_gh + t[:, None] * s_gt + d[None, :] * s_gd, mask=td_ok,
                            other=0.0).to(tl.float32)
                a_r = tl.load(a_ptr + bi * s_ab + t * s_at + h * s_ah + r * s_ar, mask=t_ok, other=0.0).to(tl.float32)
                tl.store(da_ptr + (bi * T + t) * (H * R) + h * R + r, (tl.sum(g * b_r, axis=1) * scale).to(da_ptr.dtype.element_ty),
                         mask=t_ok)
                db += a_r[:, None] * g
            tl.store(db_ptr + ((bi * T + t[:, None]) * R + r) * D + d[None, :], (db * scale).to(db_ptr.dtype.element_ty),
                     mask=td_ok)

    BLOCK_T = 32  # tokens per program

    def tpa_materialize_triton_fwd(a, b, scale):
        B, T, H, R = a.shape
        D = b.shape[-1]
        out = torch.empty(B, H, T, D, device=a.device, dtype=torch.result_type(a, b))
        _materialize_fwd[(triton.cdiv(T, BLOCK_T), B)](
            a, b, out, T, H, *a.stride(), *b.stride(), *out.stride(), scale,
            R=R, D=D, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
        return out

    def tpa_materialize_triton_bwd(a, b, g, scale):
        B, T, H, R = a.shape
        D = b.shape[-1]
        da = torch.empty(B, T, H, R, device=a.device, dtype=a.dtype)
        db = torch.empty(B, T, R, D, device=b.device, dtype=b.dtype)
        _materialize_bwd[(triton.cdiv(T, BLOCK_T), B)](
            a, b, g, da, db, T, H, *a.stride(), *b.stride(), *g.stride(), scale,
            R=R, D=D, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
        return da, db

    @torch.library.custom_op("tpa::materialize", mutates_args=())
    def _materialize_op(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        return tpa_materialize_triton_fwd(a, b, scale)

    @_materialize_op.register_fake
    def _(a, b, scale):
        B, T, H, _ = a.shape
        return a.new_empty(B, H, T, b.shape[-1], dtype=torch.result_type(a, b))

    @torch.library.custom_op("tpa::materialize_backward", mutates_args=())
    def _materialize_bwd_op(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return tpa_materialize_triton_bwd(a, b, g, scale)

    @_materialize_bwd_op.register_fake
    def _(a, b, g, scale):
        return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(b, memory_format=torch.contiguous_format)

    def _setup(ctx, inputs, output):
        a, b, scale = inputs
        ctx.save_for_backward(a, b)
        ctx.scale = scale

    def _backward(ctx, g):
        a, b = ctx.saved_tensors
        da, db = _materialize_bwd_op(a, b, g, ctx.scale)
        return da, db, None

    _materialize_op.register_autograd(_backward, setup_context=_setup)


def tpa_materialize(a, b, scale, impl=None):
    """scale * A^T B per token, (B, T, H, R) x (B, T, R, D) -> (B, H, T, D). impl: None (the Triton op for
    CUDA tensors of matching B and T, else the reference), "triton" or "ref"."""
    if impl is None:
        plain = a.dim() == 4 and a.shape[:2] == b.shape[:2] and a.shape[-1] == b.shape[-2] and a.dtype == b.dtype
        impl = "triton" if HAS_TRITON and a.is_cuda and plain else "ref"
    if impl == "triton":
        return _materialize_op(a, b, float(scale))
    if impl == "ref":
        return tpa_materialize_ref(a, b, scale)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
