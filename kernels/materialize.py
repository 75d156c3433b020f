"""
TPA materialisation for training: out = scale * A^T B per token, written heads first for SDPA.

    out = tpa_materialize(a, b, scale)     # a (B, T, H, R), b (B, T, R, D) -> (B, H, T, D)

Forward and backward are Triton kernels on CUDA (an autograd-aware custom op, opaque to torch.compile);
tpa_materialize_ref is the PyTorch reference with the same signature, used elsewhere. Why a kernel: the
backward, db[t, r, :] = scale * sum_h a[t, h, r] g[h, t, :] and da[t, h, r] = scale * g[h, t, :] . b[t, r, :],
is a reduction over heads of the heads-first gradient that torch.compile turns into a strided reduction at a
fraction of the memory bandwidth (and a batched matmul with K = R is no better). Here one program owns a block
of BLOCK_T tokens of one sequence and walks the heads, HB at a time, with each head's (BLOCK_T, D) gradient tile
read once, contiguously, and the per-token products done as block-diagonal matmuls on the tensor cores.
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

    # Tensor cores for per-token products with K = R: a block of BLOCK_T tokens and HB heads is one matmul
    # against a block-diagonal factor, W[(t, r), (h, t')] = a[t, h, r] if t = t' else 0 (loaded with a mask, so
    # the zeros cost no memory traffic). Rows (h, t) of a heads-first tile are contiguous (BLOCK_T, D) blocks.

    @triton.jit
    def _block(b_ptr, bi, t0, T, s_bb, s_bt, s_br, s_bd, R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HB: tl.constexpr):
        """A program's tiles: the B block (BLOCK_T * BLOCK_R, BLOCK_D) with rows k = (t, r), and the rows
        i = (h, t) of a head block with the block-diagonal mask diag[(h, t), (t', r)] = (t = t')."""
        k = tl.arange(0, BLOCK_T * BLOCK_R)
        kt, kr = t0 + k // BLOCK_R, k % BLOCK_R
        d = tl.arange(0, BLOCK_D)
        kd_ok = ((kt < T) & (kr < R))[:, None] & (d[None, :] < D)
        bmat = tl.load(b_ptr + bi * s_bb + kt[:, None] * s_bt + kr[:, None] * s_br + d[None, :] * s_bd,
                       mask=kd_ok, other=0.0)
        i = tl.arange(0, HB * BLOCK_T)
        ih, it = i // BLOCK_T, t0 + i % BLOCK_T
        diag = (it[:, None] == kt[None, :]) & (kr[None, :] < R) & (it[:, None] < T)  # (HB * BLOCK_T, BLOCK_T * BLOCK_R)
        return kt, kr, d, kd_ok, bmat, ih, it, diag

    @triton.jit
    def _materialize_fwd(a_ptr, b_ptr, o_ptr, T, H, s_ab, s_at, s_ah, s_ar, s_bb, s_bt, s_br, s_bd,
                         s_ob, s_oh, s_ot, s_od, scale,
                         R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, HB: tl.constexpr, IEEE: tl.constexpr):
        pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
        kt, kr, d, kd_ok, bmat, ih, it, diag = _block(b_ptr, bi, pid_t * BLOCK_T, T, s_bb, s_bt, s_br, s_bd,
                                                      R, D, BLOCK_T, BLOCK_R, BLOCK_D, HB)
        for h0 in range(0, H, HB):
            h = h0 + ih
            w = tl.load(a_ptr + bi * s_ab + it[:, None] * s_at + h[:, None] * s_ah + kr[None, :] * s_ar,
                        mask=diag & (h[:, None] < H), other=0.0)  # (HB * BLOCK_T, BLOCK_T * BLOCK_R)
            if IEEE:
                x = tl.dot(w, bmat, input_precision="ieee")
            else:
                x = tl.dot(w, bmat)
            tl.store(o_ptr + bi * s_ob + h[:, None] * s_oh + it[:, None] * s_ot + d[None, :] * s_od,
                     (x * scale).to(o_ptr.dtype.element_ty), mask=((h < H) & (it < T))[:, None] & (d[None, :] < D))

    @triton.jit
    def _materialize_bwd(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, T, H, s_ab, s_at, s_ah, s_ar, s_bb, s_bt, s_br, s_bd,
                         s_gb, s_gh, s_gt, s_gd, scale,
                         R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, HB: tl.constexpr, IEEE: tl.constexpr):
        # da and db are contiguous, shaped like a and b
        pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
        kt, kr, d, kd_ok, bmat, ih, it, diag = _block(b_ptr, bi, pid_t * BLOCK_T, T, s_bb, s_bt, s_br, s_bd,
                                                      R, D, BLOCK_T, BLOCK_R, BLOCK_D, HB)
        db = tl.zeros((BLOCK_T * BLOCK_R, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, HB):
            h = h0 + ih
            g = tl.load(g_ptr + bi * s_gb + h[:, None] * s_gh + it[:, None] * s_gt + d[None, :] * s_gd,
                        mask=((h < H) & (it < T))[:, None] & (d[None, :] < D), other=0.0)  # (HB * BLOCK_T, BLOCK_D)
            w_mask = diag & (h[:, None] < H)
            w = tl.load(a_ptr + bi * s_ab + it[:, None] * s_at + h[:, None] * s_ah + kr[None, :] * s_ar,
                        mask=w_mask, other=0.0)
            if IEEE:
                db += tl.dot(tl.trans(w), g, input_precision="ieee")
                s = tl.dot(g, tl.trans(bmat), input_precision="ieee")  # [(h, t), (t', r)] = g_h,t . b_t',r
            else:
                db += tl.dot(tl.trans(w), g)
                s = tl.dot(g, tl.trans(bmat))
            tl.store(da_ptr + (bi * T + it[:, None]) * (H * R) + h[:, None] * R + kr[None, :],
                     (s * scale).to(da_ptr.dtype.element_ty), mask=w_mask)
        tl.store(db_ptr + ((bi * T + kt[:, None]) * R + kr[:, None]) * D + d[None, :], (db * scale).to(db_ptr.dtype.element_ty),
                 mask=kd_ok)

    def _tiles(a, b):
        R, D = a.shape[-1], b.shape[-1]
        BLOCK_T = 8  # the block-diagonal matmuls do BLOCK_T times the useful work: cheap on tensor cores
        BLOCK_R = max(triton.next_power_of_2(R), 16 // BLOCK_T)  # tl.dot needs K >= 16
        return dict(R=R, D=D, BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_D=max(16, triton.next_power_of_2(D)), HB=4,
                    IEEE=a.dtype == torch.float32, num_warps=4)

    def tpa_materialize_triton_fwd(a, b, scale):
        B, T, H, R = a.shape
        D = b.shape[-1]
        out = torch.empty(B, H, T, D, device=a.device, dtype=torch.result_type(a, b))
        tiles = _tiles(a, b)
        _materialize_fwd[(triton.cdiv(T, tiles["BLOCK_T"]), B)](
            a, b, out, T, H, *a.stride(), *b.stride(), *out.stride(), scale, **tiles)
        return out

    def tpa_materialize_triton_bwd(a, b, g, scale):
        B, T, H, R = a.shape
        D = b.shape[-1]
        da = torch.empty(B, T, H, R, device=a.device, dtype=a.dtype)
        db = torch.empty(B, T, R, D, device=b.device, dtype=b.dtype)
        tiles = _tiles(a, b)
        _materialize_bwd[(triton.cdiv(T, tiles["BLOCK_T"]), B)](
            a, b, g, da, db, T, H, *a.stride(), *b.stride(), *g.stride(), scale, **tiles)
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
