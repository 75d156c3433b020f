"""
Decode-cache write: the new tokens' entries of several cache tensors stored in one kernel launch.

    write_rows(dsts, srcs, pos)   # dsts[i] (B, L, *F_i), srcs[i] (B, T, *F_i) any strides, pos (B, T) int:
                                  # dsts[i][b, pos[b, t]] = srcs[i][b, t] for every i, b, t

    write_factors(f, dsts, rotate, at_pos, pos, cos, sin)   # batch-1 decoding (model.GPT.fused_decode_step):
                                  # one token's factor row f (F,) = [piece_0 | piece_1 | ...] split into dsts[i]
                                  # (1, L_i, *F_i) at position pos (or 0 where not at_pos[i]), pieces with
                                  # rotate[i] turned by RoPE (half-split pairs) with the cos/sin tables' row pos

write_rows_ref / write_factors_ref are the PyTorch references with the same signatures. Why a kernel: a
decode step writes every cached tensor of every layer (TPA: A_K, B_K, A_V, B_V), and torch.compile emits one
scatter kernel per tensor; at batch 1 each is a ~1 us launch that moves a few hundred bytes. Here one program
per (token, tensor) copies that token's features, all of a layer's tensors in one launch. Positions outside
[0, L) are not written (the caller checks lengths on the host; the kernel never writes out of bounds).
"""

from typing import List

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

MAX_TENSORS = 6  # one launch writes up to this many tensors (more: several launches)


def _check(dsts, srcs, pos):
    if len(dsts) != len(srcs) or pos.dim() != 2:
        raise ValueError(f"write_rows: {len(dsts)} destinations, {len(srcs)} sources, pos of shape {tuple(pos.shape)} "
                         f"(expected as many sources as destinations and pos (B, T))")
    B, T = pos.shape
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d.dim() < 2 or d.size(0) != B or tuple(s.shape) != (B, T, *d.shape[2:]):
            raise ValueError(f"write_rows: source {i} has shape {tuple(s.shape)}, expected {(B, T, *d.shape[2:])} "
                             f"for a destination of shape {tuple(d.shape)} and pos (B, T) = {(B, T)}")


def write_rows_ref(dsts: List[torch.Tensor], srcs: List[torch.Tensor], pos: torch.Tensor) -> None:
    _check(dsts, srcs, pos)
    rows = torch.arange(pos.size(0), device=pos.device)[:, None].expand_as(pos)
    for d, s in zip(dsts, srcs):
        d[rows, pos] = s.to(d.dtype)


if HAS_TRITON:

    @triton.jit
    def _copy_token(src_ptr, dst_ptr, b, t, p, F, s_sb, s_st, s_db, s_dm, BLOCK_F: tl.constexpr):
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            x = tl.load(src_ptr + b * s_sb + t * s_st + f, mask=f < F)
            tl.store(dst_ptr + b * s_db + p * s_dm + f, x.to(dst_ptr.dtype.element_ty), mask=f < F)

    @triton.jit
    def _write_rows_kernel(pos_ptr, T, L, s_pb, s_pt,
                           s0, d0, F0, s0b, s0t, d0b, d0m, s1, d1, F1, s1b, s1t, d1b, d1m,
                           s2, d2, F2, s2b, s2t, d2b, d2m, s3, d3, F3, s3b, s3t, d3b, d3m,
                           s4, d4, F4, s4b, s4t, d4b, d4m, s5, d5, F5, s5b, s5t, d5b, d5m,
                           BLOCK_F: tl.constexpr):
        # program (token, tensor): token = b * T + t; the tensor index picks one of the six argument groups
        tok = tl.program_id(0)
        i = tl.program_id(1)
        b = (tok // T).to(tl.int64)
        t = tok % T
        p = tl.load(pos_ptr + b * s_pb + t * s_pt).to(tl.int64)
        if (p >= 0) & (p < L):
            if i == 0:
                _copy_token(s0, d0, b, t, p, F0, s0b, s0t, d0b, d0m, BLOCK_F)
            elif i == 1:
                _copy_token(s1, d1, b, t, p, F1, s1b, s1t, d1b, d1m, BLOCK_F)
            elif i == 2:
                _copy_token(s2, d2, b, t, p, F2, s2b, s2t, d2b, d2m, BLOCK_F)
            elif i == 3:
                _copy_token(s3, d3, b, t, p, F3, s3b, s3t, d3b, d3m, BLOCK_F)
            elif i == 4:
                _copy_token(s4, d4, b, t, p, F4, s4b, s4t, d4b, d4m, BLOCK_F)
            else:
                _copy_token(s5, d5, b, t, p, F5, s5b, s5t, d5b, d5m, BLOCK_F)

    # an opaque custom op (not a triton_op): torch.compile calls it as one node; inductor's functional rewrite of a
    # traced Triton kernel that mutates a list of tensors failed to compile (torch 2.11)
    @torch.library.custom_op("tpa::write_rows", mutates_args={"dsts"})
    def _write_rows_op(dsts: List[torch.Tensor], srcs: List[torch.Tensor], pos: torch.Tensor) -> None:
        B, T = pos.shape
        L = dsts[0].size(1)
        for g in range(0, len(dsts), MAX_TENSORS):
            args, widest = [], 1
            for d, s in zip(dsts[g:g + MAX_TENSORS], srcs[g:g + MAX_TENSORS]):
                F = d[0, 0].numel()
                # features flattened: (B, T, F) and (B, L, F) views, a copy only if a source's features are strided
                s3 = s.reshape(B, T, F)
                if F > 1 and s3.stride(2) != 1:
                    s3 = s3.contiguous()
                d3 = d.view(B, L, F)  # cache tensors are allocated contiguous
                args += [s3, d3, F, s3.stride(0), s3.stride(1), d3.stride(0), d3.stride(1)]
                widest = max(widest, F)
            n = len(args) // 7
            args += args[:7] * (MAX_TENSORS - n)  # unused groups: never read (grid has n tensors)
            _write_rows_kernel[(B * T, n)](
                pos, T, L, pos.stride(0), pos.stride(1), *args,
                BLOCK_F=min(1024, triton.next_power_of_2(widest)), num_warps=4)

    @_write_rows_op.register_fake
    def _(dsts, srcs, pos):
        return None


def _check_factors(f, dsts, rotate, at_pos, pos, cos, sin):
    sizes = [d[0, 0].numel() for d in dsts]
    if f.dim() != 1 or f.numel() != sum(sizes) or not len(dsts) == len(rotate) == len(at_pos) or pos.numel() != 1:
        raise ValueError(f"write_factors: f {tuple(f.shape)} must be one row holding the {sum(sizes)} features of "
                         f"{len(dsts)} destinations (rotate, at_pos: one flag each), pos one position")
    for d, rot in zip(dsts, rotate):
        if d.size(0) != 1 or not d.is_contiguous() or (rot and d.size(-1) != 2 * cos.size(-1)):
            raise ValueError(f"write_factors: destination {tuple(d.shape)} must be contiguous (1, L, ...), and a rotated "
                             f"one's last axis twice the RoPE tables' {cos.size(-1)}")
    return sizes


def write_factors_ref(f, dsts, rotate, at_pos, pos, cos, sin):
    for d, piece, rot, at in zip(dsts, f.split(_check_factors(f, dsts, rotate, at_pos, pos, cos, sin)), rotate, at_pos):
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
    def _piece(f_ptr, dst_ptr, c_ptr, s_ptr, n, ROT: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
        if ROT:  # n // (2 HALF) vectors: [x1 | x2] -> [x1 c - x2 s | x1 s + x2 c]
            r = tl.arange(0, BLOCK // HALF)[:, None] * (2 * HALF)
            i = tl.arange(0, HALF)[None, :]
            ok = r + i < n
            x1 = tl.load(f_ptr + r + i, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(f_ptr + r + HALF + i, mask=ok, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + i)
            s = tl.load(s_ptr + i)
            tl.store(dst_ptr + r + i, (x1 * c - x2 * s).to(dst_ptr.dtype.element_ty), mask=ok)
            tl.store(dst_ptr + r + HALF + i, (x1 * s + x2 * c).to(dst_ptr.dtype.element_ty), mask=ok)
        else:
            j = tl.arange(0, BLOCK)
            tl.store(dst_ptr + j, tl.load(f_ptr + j, mask=j < n).to(dst_ptr.dtype.element_ty), mask=j < n)

    @triton.jit
    def _write_factors_kernel(f_ptr, pos_ptr, cos_ptr, sin_ptr, s_cos, L,
                              d0, o0, n0, m0, d1, o1, n1, m1, d2, o2, n2, m2, d3, o3, n3, m3, d4, o4, n4, m4,
                              d5, o5, n5, m5, ROT: tl.constexpr, AT: tl.constexpr, BLOCK: tl.constexpr,
                              HALF: tl.constexpr, PDL: tl.constexpr):
        # program i: piece i (f[o_i : o_i + n_i]) -> destination d_i, at row pos (stride m_i) if bit i of AT is set;
        # a position outside [0, L) is not written
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        i = tl.program_id(0)
        p = tl.load(pos_ptr).to(tl.int64)
        c_ptr, s_ptr = cos_ptr + p * s_cos, sin_ptr + p * s_cos
        at = (AT >> i) & 1
        if (at == 0) | ((p >= 0) & (p < L)):
            row = p * at
            if i == 0:
                _piece(f_ptr + o0, d0 + row * m0, c_ptr, s_ptr, n0, (ROT >> 0) & 1, BLOCK, HALF)
            elif i == 1:
                _piece(f_ptr + o1, d1 + row * m1, c_ptr, s_ptr, n1, (ROT >> 1) & 1, BLOCK, HALF)
            elif i == 2:
                _piece(f_ptr + o2, d2 + row * m2, c_ptr, s_ptr, n2, (ROT >> 2) & 1, BLOCK, HALF)
            elif i == 3:
                _piece(f_ptr + o3, d3 + row * m3, c_ptr, s_ptr, n3, (ROT >> 3) & 1, BLOCK, HALF)
            elif i == 4:
                _piece(f_ptr + o4, d4 + row * m4, c_ptr, s_ptr, n4, (ROT >> 4) & 1, BLOCK, HALF)
            else:
                _piece(f_ptr + o5, d5 + row * m5, c_ptr, s_ptr, n5, (ROT >> 5) & 1, BLOCK, HALF)


def write_factors(f, dsts, rotate, at_pos, pos, cos, sin, impl=None, pdl=False):
    """One token's factor row split into cache tensors (and query buffers), RoPE where rotate (see the module
    docstring); cos, sin (max_len, half) fp32 tables, pos (1,) int. impl: None (the Triton kernel for CUDA
    tensors and at most six pieces, else the reference), "triton" or "ref". pdl: programmatic dependent launch
    (compute capability >= 9): everything is read after waiting for the previous kernel."""
    sizes = _check_factors(f, dsts, rotate, at_pos, pos, cos, sin)
    half = cos.size(-1)
    fits = len(dsts) <= MAX_TENSORS and half & (half - 1) == 0  # what the kernel handles
    if impl is None:
        impl = "triton" if HAS_TRITON and f.is_cuda and fits else "ref"
    if impl == "ref":
        return write_factors_ref(f, dsts, rotate, at_pos, pos, cos, sin)
    if impl != "triton":
        raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
    if not fits:
        raise ValueError(f"write_factors(impl='triton'): at most {MAX_TENSORS} pieces (got {len(dsts)}) and a RoPE "
                         f"half width that is a power of two (got {half})")
    args, off = [], 0
    for d, n in zip(dsts, sizes):
        args += [d, off, n, d.stride(1)]
        off += n
    n_pieces = len(dsts)
    args += args[:4] * (MAX_TENSORS - n_pieces)  # unused groups: never read (the grid has one program per piece)
    BLOCK = max(triton.next_power_of_2(max(sizes)), triton.next_power_of_2(half))
    pdl = bool(pdl) and f.is_cuda and torch.cuda.get_device_capability(f.device)[0] >= 9
    _write_factors_kernel[(n_pieces,)](
        f, pos, cos, sin, cos.stride(0), min([d.size(1) for d, a in zip(dsts, at_pos) if a] or [1]), *args,
        ROT=sum(1 << i for i, r in enumerate(rotate) if r), AT=sum(1 << i for i, a in enumerate(at_pos) if a),
        BLOCK=BLOCK, HALF=half, PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))


def write_rows(dsts, srcs, pos, impl=None):
    """dsts[i][b, pos[b, t]] = srcs[i][b, t] (see the module docstring). impl: None (the Triton op when every
    tensor is on CUDA and all destinations share B and L, else the reference), "triton" or "ref"."""
    dsts, srcs = list(dsts), list(srcs)
    fits = all(d.is_contiguous() and d.shape[:2] == dsts[0].shape[:2] for d in dsts)  # what the kernel assumes
    if impl is None:
        impl = "triton" if HAS_TRITON and pos.is_cuda and fits else "ref"
    if impl == "triton":
        _check(dsts, srcs, pos)
        if not fits:
            raise ValueError("write_rows(impl='triton'): destinations must be contiguous and share (B, L)")
        return _write_rows_op(dsts, srcs, pos)
    if impl == "ref":
        return write_rows_ref(dsts, srcs, pos)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
