"""
TPA materialisation for training: out = scale * A^T B per token, written heads first for SDPA.

    out = tpa_materialize(a, b, scale)     # a (B, T, H, R), b (B, T, R, D) -> (B, H, T, D)

Forward and backward are Triton kernels on CUDA (an autograd-aware torch.library.triton_op, launched by torch.compile);
tpa_materialize_ref is the PyTorch reference with the same signature, used elsewhere. Why a kernel: the
backward, db[t, r, :] = scale * sum_h a[t, h, r] g[h, t, :] and da[t, h, r] = scale * g[h, t, :] . b[t, r, :],
is a reduction over heads of the heads-first gradient that torch.compile turns into a strided reduction at a
fraction of the memory bandwidth (and a batched matmul with K = R is no better). Here a backward program owns
a few tokens of one sequence and walks the heads, HB at a time, reading each (token, head) gradient row once,
and the per-token products are batched matmuls on the tensor cores.
"""

import torch

from tpa_kernels.dispatch import HAS_TRITON, pick

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


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

    # Per-token products as batched matmuls on the tensor cores (tl.dot over a leading token axis): for each of
    # BLOCK_T tokens, (HB heads, R) @ (R, D) forward, (HB, D) @ (D, R) and (R, HB) @ (HB, D) backward, with R
    # padded to BLOCK_R >= 16 by masked loads (the zeros cost no memory traffic). A (token, head) row of a
    # heads-first tile is a contiguous D-vector, so every load and store of the big tensor is coalesced.

    @triton.jit
    def _materialize_fwd(a_ptr, b_ptr, o_ptr, T, H, s_ab, s_at, s_ah, s_ar, s_bb, s_bt, s_br, s_bd,
                         s_ob, s_oh, s_ot, s_od, scale,
                         R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, HB: tl.constexpr, IEEE: tl.constexpr):
        pid_t, pid_h, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        h = pid_h * HB + tl.arange(0, HB)
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        t_ok, h_ok = (t < T)[:, None, None], (h < H)[None, :, None]
        a = tl.load(a_ptr + bi * s_ab + t[:, None, None] * s_at + h[None, :, None] * s_ah + r[None, None, :] * s_ar,
                    mask=t_ok & h_ok & (r < R)[None, None, :], other=0.0)  # (BLOCK_T, HB, BLOCK_R)
        b = tl.load(b_ptr + bi * s_bb + t[:, None, None] * s_bt + r[None, :, None] * s_br + d[None, None, :] * s_bd,
                    mask=t_ok & (r < R)[None, :, None] & (d < D)[None, None, :], other=0.0)  # (BLOCK_T, BLOCK_R, BLOCK_D)
        if IEEE:
            x = tl.dot(a, b, input_precision="ieee")
        else:
            x = tl.dot(a, b)  # (BLOCK_T, HB, BLOCK_D)
        tl.store(o_ptr + bi * s_ob + h[None, :, None] * s_oh + t[:, None, None] * s_ot + d[None, None, :] * s_od,
                 (x * scale).to(o_ptr.dtype.element_ty), mask=t_ok & h_ok & (d < D)[None, None, :])

    @triton.jit
    def _materialize_bwd(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, T, H, s_ab, s_at, s_ah, s_ar, s_bb, s_bt, s_br, s_bd,
                         s_gb, s_gh, s_gt, s_gd, scale,
                         R: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, HB: tl.constexpr, IEEE: tl.constexpr):
        # one program: BLOCK_T tokens, all heads (HB at a time, each (token, head) gradient row read once);
        # da and db are contiguous, shaped like a and b
        pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        t_ok = (t < T)[:, None, None]
        b_ok = t_ok & (r < R)[None, :, None] & (d < D)[None, None, :]
        b = tl.load(b_ptr + bi * s_bb + t[:, None, None] * s_bt + r[None, :, None] * s_br + d[None, None, :] * s_bd,
                    mask=b_ok, other=0.0)  # (BLOCK_T, BLOCK_R, BLOCK_D)
        b_t = tl.trans(b, (0, 2, 1))
        db = tl.zeros((BLOCK_T, BLOCK_R, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, HB):
            h = h0 + tl.arange(0, HB)
            h_ok = (h < H)[None, :, None]
            g = tl.load(g_ptr + bi * s_gb + h[None, :, None] * s_gh + t[:, None, None] * s_gt + d[None, None, :] * s_gd,
                        mask=t_ok & h_ok & (d < D)[None, None, :], other=0.0)  # (BLOCK_T, HB, BLOCK_D)
            a_ok = t_ok & h_ok & (r < R)[None, None, :]
            a = tl.load(a_ptr + bi * s_ab + t[:, None, None] * s_at + h[None, :, None] * s_ah + r[None, None, :] * s_ar,
                        mask=a_ok, other=0.0)  # (BLOCK_T, HB, BLOCK_R)
            if IEEE:
                da = tl.dot(g, b_t, input_precision="ieee")  # da[t, h, r] = g[h, t, :] . b[t, r, :]
                db += tl.dot(tl.trans(a, (0, 2, 1)), g, input_precision="ieee")  # db[t, r, :] += sum_h a[t, h, r] g[h, t, :]
            else:
                da = tl.dot(g, b_t)
                db += tl.dot(tl.trans(a, (0, 2, 1)), g)
            tl.store(da_ptr + ((bi * T + t[:, None, None]) * H + h[None, :, None]) * R + r[None, None, :],
                     (da * scale).to(da_ptr.dtype.element_ty), mask=a_ok)
        tl.store(db_ptr + ((bi * T + t[:, None, None]) * R + r[None, :, None]) * D + d[None, None, :],
                 (db * scale).to(db_ptr.dtype.element_ty), mask=b_ok)

    def _tiles(a, b):
        # measured on an H100 (B=16, T=1024, H=34, D=64, R=2 and 6): small token blocks, many programs
        R, D = a.shape[-1], b.shape[-1]
        return dict(R=R, D=D, BLOCK_T=2, BLOCK_R=max(16, triton.next_power_of_2(R)),
                    BLOCK_D=max(16, triton.next_power_of_2(D)), HB=16, IEEE=a.dtype == torch.float32, num_warps=2)

    def tpa_materialize_triton_fwd(a, b, scale):
        B, T, H, R = a.shape
        D = b.shape[-1]
        out = torch.empty(B, H, T, D, device=a.device, dtype=torch.result_type(a, b))
        tiles = _tiles(a, b)
        grid = (triton.cdiv(T, tiles["BLOCK_T"]), triton.cdiv(H, tiles["HB"]), B)
        wrap_triton(_materialize_fwd)[grid](a, b, out, T, H, *a.stride(), *b.stride(), *out.stride(), scale,
                                            **tiles)
        return out

    def tpa_materialize_triton_bwd(a, b, g, scale):
        B, T, H, R = a.shape
        D = b.shape[-1]
        da = torch.empty(B, T, H, R, device=a.device, dtype=a.dtype)
        db = torch.empty(B, T, R, D, device=b.device, dtype=b.dtype)
        tiles = _tiles(a, b)
        wrap_triton(_materialize_bwd)[(triton.cdiv(T, tiles["BLOCK_T"]), B)](
            a, b, g, da, db, T, H, *a.stride(), *b.stride(), *g.stride(), scale, num_stages=3, **tiles)
        return da, db

    # triton_op: torch.compile sees the kernel launches (no Python op dispatch per call in a compiled step)
    @triton_op("tpa::materialize", mutates_args=())
    def _materialize_op(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        return tpa_materialize_triton_fwd(a, b, scale)

    @triton_op("tpa::materialize_backward", mutates_args=())
    def _materialize_bwd_op(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return tpa_materialize_triton_bwd(a, b, g, scale)

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
        impl = pick(a, plain)
    if impl == "triton":
        return _materialize_op(a, b, float(scale))
    if impl == "ref":
        return tpa_materialize_ref(a, b, scale)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
