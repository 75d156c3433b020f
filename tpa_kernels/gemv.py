"""
Matrix-vector products for batch-1 decoding: y = x W^T for a single row x, the weight read once at full bandwidth,
with what sits around a decode step's weight matmuls fused in.

    y = linear_one_row(x, w)                         # x (..., K) with one row in all, w (N, K) -> y (..., N)
    y = linear_one_row(x, w, norm=True)              # W rms_norm(x): the model's weightless RMSNorm folded in
                                                     # (F.rms_norm's eps: fp32's for bf16 / fp16 inputs)
    y = linear_one_row(x, w, glu=True)               # w = [W_gate; W_up] (2H, K) -> silu(W_gate x) * (W_up x) (..., H)
    y = linear_one_row(x, w, residual=r)             # r + W x (r (..., N)): the residual add of a block
    y = linear_one_row(x, w, pdl=True)               # programmatic dependent launch (below)
    linear_factors(x, w, dsts, rotate, at_pos, pos, cos, sin, norm=True)
        # batch-1 TPA decoding (engine.fused_decode_step): the factor projection y = W rms_norm(x) (F,) =
        # [piece_0 | piece_1 | ...] split into dsts[i] (1, L_i, *F_i) at position pos (1,) (or 0 where not
        # at_pos[i]), pieces with rotate[i] turned by RoPE (half-split pairs) with row pos of the fp32 cos / sin
        # tables (max_len, half): the cache write and the query factors, no y in memory

linear_one_row_ref / linear_factors_ref are the PyTorch references with the same signatures (F.rms_norm, F.linear,
F.silu, the model's RoPE, index writes). Why a kernel: at batch 1 every weight matmul of a decode step is a
matrix-vector product, which cuBLAS runs far below the copy bandwidth, and the norms, SwiGLU, RoPE, cache writes
and residual adds between them are launch-bound kernels each (benchmarks/RESULTS.md, "Figures behind the code's
choices"). Here each program owns BLOCK_N rows of
W (and the matching rows of W_up), loads them whole (or in BLOCK_K chunks for long rows) with fp32 accumulation; a
weightless RMSNorm of x is a scalar, rsqrt(mean(x^2) + eps), applied to the finished dot products (every program
reads all of x anyway). In linear_factors a program owns rows of one piece, and of a rotated piece both rows of
each RoPE pair (slots 2t, 2t+1 of a vector hold its rows t, t + half), so the rotation happens in registers.

pdl=True (CUDA, compute capability >= 9): the kernel is launched with programmatic dependent launch; it lets the
next kernel launch at once (griddepcontrol.launch_dependents) and loads its first weight chunk before waiting for
the previous kernel (griddepcontrol.wait), so in a chain of such kernels every weight stream starts while the
previous kernel still runs. Only x and the residual are read after the wait: the caller guarantees that the
weights are not written by any kernel of the chain.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from tpa_kernels.cache_write import feature_stride

from tpa_kernels.dispatch import HAS_TRITON, pdl_supported, pick

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


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


# (rows per program, warps) without / with programmatic dependent launch: the fastest over a chain of Medium T6's 97
# decode matrices in a CUDA graph (benchmarks/RESULTS.md, "Figures behind the code's choices")
TILES = {False: (2, 4), True: (4, 4)}


def _check_factors(f_size, dsts, rotate, at_pos, pos, cos):
    sizes = [d[0, 0].numel() for d in dsts]
    if f_size != sum(sizes) or not len(dsts) == len(rotate) == len(at_pos) or pos.numel() != 1:
        raise ValueError(f"linear_factors: the weight's {f_size} outputs must be the {sum(sizes)} features of the "
                         f"{len(dsts)} destinations (rotate, at_pos: one flag each), pos one position")
    for d, rot in zip(dsts, rotate):
        if d.size(0) != 1 or feature_stride(d) is None or (rot and d.size(-1) != 2 * cos.size(-1)):
            raise ValueError(f"linear_factors: destination {tuple(d.shape)} must be (1, L, ...) with its features one "
                             f"evenly strided run (contiguous or position-minor), and a rotated one's last axis twice "
                             f"the RoPE tables' {cos.size(-1)}")
    return sizes


def linear_factors_ref(x, w, dsts, rotate, at_pos, pos, cos, sin, norm=False):
    sizes = _check_factors(w.size(0), dsts, rotate, at_pos, pos, cos)
    f = linear_one_row_ref(x, w, norm).reshape(-1)
    for d, piece, rot, at in zip(dsts, f.split(sizes), rotate, at_pos):
        piece = piece.view(d.shape[2:])
        if rot:
            half = d.size(-1) // 2
            c, s = cos[pos.reshape(())].float(), sin[pos.reshape(())].float()
            x1, x2 = piece[..., :half].float(), piece[..., half:].float()
            piece = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
        p = pos.reshape(1).long() if at else torch.zeros(1, dtype=torch.long, device=d.device)
        row = p.clamp(0, d.size(1) - 1)  # a position outside [0, L) is not written (no host sync to find out)
        ok = ((p >= 0) & (p < d.size(1))).view(1, *[1] * piece.dim())
        d[0, row] = torch.where(ok, piece.to(d.dtype)[None], d[0, row])


if HAS_TRITON:

    @triton.jit
    def _rows_times_x(x_ptr, w_rows, n_ok, K, s_wk, up, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM: tl.constexpr, GLU: tl.constexpr, PDL: tl.constexpr):
        """(W x)[rows] for the row pointers w_rows (BLOCK_N, 1), and with GLU the rows `up` elements further,
        in fp32, scaled by 1 / rms(x) with NORM. With PDL the first weight chunk is requested before the wait."""
        k = tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (k < K)[None, :]
        # the first chunk of weights is requested before the wait: nothing in the chain writes them
        w = tl.load(w_rows + k[None, :] * s_wk, mask=mask, other=0.0)
        if GLU:
            wu = tl.load(w_rows + up + k[None, :] * s_wk, mask=mask, other=0.0)
        if PDL:  # x is the previous kernel's output
            gdc_wait()
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc = w.to(tl.float32) * x[None, :]
        acc_u = acc
        if GLU:
            acc_u = wu.to(tl.float32) * x[None, :]
        ss = x * x
        for k0 in range(BLOCK_K, K, BLOCK_K):  # rows longer than one chunk
            kk = k0 + k
            mask = n_ok[:, None] & (kk < K)[None, :]
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += tl.load(w_rows + kk[None, :] * s_wk, mask=mask, other=0.0).to(tl.float32) * x[None, :]
            if GLU:
                acc_u += tl.load(w_rows + up + kk[None, :] * s_wk, mask=mask, other=0.0).to(tl.float32) * x[None, :]
            ss += x * x
        y = tl.sum(acc, axis=1)
        u = y
        if GLU:
            u = tl.sum(acc_u, axis=1)
        if NORM:  # W (x / rms(x)) = (W x) / rms(x)
            inv = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            y = y * inv
            u = u * inv
        return y, u

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, r_ptr, y_ptr, N, K, s_wn, s_wk, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # the next kernel may launch now and start its own weight loads
            gdc_launch_dependents()
        n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # output rows (gate rows with GLU)
        n_ok = n < N
        w_rows = w_ptr + n[:, None] * s_wn
        y, u = _rows_times_x(x_ptr, w_rows, n_ok, K, s_wk, N * s_wn, eps, BLOCK_N, BLOCK_K, NORM, GLU, PDL)
        if GLU:
            y = y * tl.sigmoid(y) * u
        if RESIDUAL:  # read after the wait (in _rows_times_x)
            y += tl.load(r_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _pick(i, a0, a1, a2, a3, a4, a5):
        a = tl.where(i == 4, a4, a5)
        a = tl.where(i == 3, a3, a)
        a = tl.where(i == 2, a2, a)
        a = tl.where(i == 1, a1, a)
        return tl.where(i == 0, a0, a)

    @triton.jit
    def _gemv_factors_kernel(x_ptr, w_ptr, pos_ptr, cos_ptr, sin_ptr, s_cos, L, K, s_wn, s_wk, eps,
                             d0, o0, n0, m0, f0, p0, d1, o1, n1, m1, f1, p1, d2, o2, n2, m2, f2, p2,
                             d3, o3, n3, m3, f3, p3, d4, o4, n4, m4, f4, p4, d5, o5, n5, m5, f5, p5,
                             ROT: tl.constexpr, AT: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
        # piece i: rows o_i .. o_i + n_i of W -> destination d_i (row pos, stride m_i, if bit i of AT; features f_i
        # apart: 1, or the cache length for a position-minor cache), programs p_i .. p_{i+1} - 1. A rotated piece
        # is processed in RoPE pairs: slot 2t / 2t+1 of a vector holds its rows t / t + HALF, so one program owns
        # both halves of every pair it rotates.
        if PDL:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        seg = (pid >= p1).to(tl.int32) + (pid >= p2) + (pid >= p3) + (pid >= p4) + (pid >= p5)
        dst = _pick(seg, d0, d1, d2, d3, d4, d5)
        off, size = _pick(seg, o0, o1, o2, o3, o4, o5), _pick(seg, n0, n1, n2, n3, n4, n5)
        stride_m, first = _pick(seg, m0, m1, m2, m3, m4, m5), _pick(seg, p0, p1, p2, p3, p4, p5)
        stride_f = _pick(seg, f0, f1, f2, f3, f4, f5)
        rot, at = (ROT >> seg) & 1, (AT >> seg) & 1
        slot = (pid - first) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = slot < size
        rot_row = (slot // (2 * HALF)) * (2 * HALF) + (slot % (2 * HALF)) // 2 + (slot % 2) * HALF
        row = tl.where(rot == 1, rot_row, slot)  # within the piece
        y, _ = _rows_times_x(x_ptr, w_ptr + (off + row).to(tl.int64)[:, None] * s_wn, ok, K, s_wk, 0, eps, BLOCK_N,
                             BLOCK_K, NORM, False, PDL)
        p = tl.load(pos_ptr).to(tl.int64)
        if rot == 1:  # [x1 | x2] -> [x1 c - x2 s | x1 s + x2 c], the model's half-split RoPE
            x1, x2 = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
            s0, s1 = tl.split(tl.reshape(slot, (BLOCK_N // 2, 2)))
            i = (s0 % (2 * HALF)) // 2
            c = tl.load(cos_ptr + p * s_cos + i)
            s = tl.load(sin_ptr + p * s_cos + i)
            y = tl.reshape(tl.join(x1 * c - x2 * s, x1 * s + x2 * c), (BLOCK_N,))
        if (at == 0) | ((p >= 0) & (p < L)):  # a position outside the cache is not written
            tl.store(dst + p * at * stride_m + row.to(tl.int64) * stride_f, y.to(dst.dtype.element_ty), mask=ok)

    def _launch(launcher, x1, w, r1, y, norm, glu, pdl):
        N, K = y.numel(), w.size(1)
        BLOCK_N, warps = TILES[pdl]
        BLOCK_K = min(triton.next_power_of_2(K), 16384 // (BLOCK_N * (2 if glu else 1)))
        launcher[(triton.cdiv(N, BLOCK_N),)](
            x1, w, y if r1 is None else r1, y, N, K, w.stride(0), w.stride(1), _norm_eps(x1.dtype),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NORM=norm, GLU=glu, RESIDUAL=r1 is not None, PDL=pdl, num_warps=warps,
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


def linear_factors(x, w, dsts, rotate, at_pos, pos, cos, sin, norm=False, impl=None, pdl=False):
    """The factor projection of one token written straight into its destinations (see the module docstring).
    impl: None (the Triton kernel for CUDA tensors, at most six pieces and a power-of-two RoPE half width, else
    the reference), "triton" or "ref". pdl as in linear_one_row; pos and the tables are read after the wait."""
    if x.numel() != x.size(-1) or w.dim() != 2 or w.size(1) != x.size(-1):
        raise ValueError(f"linear_factors: x {tuple(x.shape)} must hold one row of w's {w.size(-1)} input features")
    sizes = _check_factors(w.size(0), dsts, rotate, at_pos, pos, cos)
    half = cos.size(-1)
    fits = len(dsts) <= 6 and half & (half - 1) == 0 and half >= 1  # what the kernel handles
    if impl is None:
        impl = pick(x, x.dtype == w.dtype and fits)
    if impl == "ref":
        return linear_factors_ref(x, w, dsts, rotate, at_pos, pos, cos, sin, norm)
    if impl != "triton":
        raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
    if not fits:
        raise ValueError(f"linear_factors(impl='triton'): at most 6 pieces (got {len(dsts)}) and a RoPE half width "
                         f"that is a power of two (got {half})")
    pdl = bool(pdl) and pdl_supported(x.device)
    BLOCK_N, warps = TILES[pdl]
    args, off, prog = [], 0, 0
    for d, n in zip(dsts, sizes):
        args += [d, off, n, d.stride(1), feature_stride(d), prog]
        off, prog = off + n, prog + triton.cdiv(n, BLOCK_N)
    args += [dsts[0], 0, 0, 0, 1, prog] * (6 - len(dsts))  # unused pieces: no program reaches them
    K = w.size(1)
    _gemv_factors_kernel[(prog,)](
        x.reshape(-1).contiguous(), w, pos, cos, sin, cos.stride(0),
        min([d.size(1) for d, a in zip(dsts, at_pos) if a] or [1]), K, w.stride(0), w.stride(1), _norm_eps(x.dtype),
        *args, ROT=sum(1 << i for i, r in enumerate(rotate) if r), AT=sum(1 << i for i, a in enumerate(at_pos) if a),
        HALF=half, BLOCK_N=BLOCK_N, BLOCK_K=min(triton.next_power_of_2(K), 16384 // BLOCK_N), NORM=norm, PDL=pdl,
        num_warps=warps, **({"launch_pdl": True} if pdl else {}))


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
        impl = pick(x, x.dtype == w.dtype)
    if impl == "triton":
        if pdl and pdl_supported(x.device):
            x1, r1, y = _flat(x, w, glu, residual)
            _launch(_gemv_kernel, x1, w, r1, y, norm, glu, True)
            return y.view(*x.shape[:-1], N)
        return _gemv_op(x, w, norm, glu, residual)
    if impl == "ref":
        return linear_one_row_ref(x, w, norm, glu, residual)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
