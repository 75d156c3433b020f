"""
Decode-cache write: the new tokens' entries of several cache tensors stored in one kernel launch.

    write_rows(dsts, srcs, pos)   # dsts[i] (B, L, *F_i), srcs[i] (B, T, *F_i) any strides, pos (B, T) int:
                                  # dsts[i][b, pos[b, t]] = srcs[i][b, t] for every i, b, t

write_rows_ref is the PyTorch reference with the same signature (one index_put per tensor). Why a kernel: a
decode step writes every cached tensor of every layer (TPA: A_K, B_K, A_V, B_V), and torch.compile emits one
scatter kernel per tensor; at batch 1 each is a ~1 us launch that moves a few hundred bytes. Here one program
per (token, tensor) copies that token's features, all of a layer's tensors in one launch. Positions outside
[0, L) are not written (the caller checks lengths on the host; the kernel never writes out of bounds).
"""

from typing import List

import torch

from tpa_kernels.dispatch import HAS_TRITON, pick

if HAS_TRITON:
    import triton
    import triton.language as tl

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


def feature_stride(d):
    """The one stride of d's features (dims 2... flattened) where they form an evenly strided run, else None:
    1 for a contiguous cache, L for a position-minor one ((B, *F, L) storage viewed as (B, L, *F))."""
    dims = [(n, st) for n, st in zip(d.shape[2:], d.stride()[2:]) if n > 1]
    if not dims:
        return 1
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def write_rows_ref(dsts: List[torch.Tensor], srcs: List[torch.Tensor], pos: torch.Tensor) -> None:
    _check(dsts, srcs, pos)
    rows = torch.arange(pos.size(0), device=pos.device)[:, None].expand_as(pos)
    for d, s in zip(dsts, srcs):
        d[rows, pos] = s.to(d.dtype)


if HAS_TRITON:

    @triton.jit
    def _copy_token(src_ptr, dst_ptr, b, t, p, F, s_sb, s_st, s_db, s_dm, s_df, BLOCK_F: tl.constexpr):
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            x = tl.load(src_ptr + b * s_sb + t * s_st + f, mask=f < F)
            tl.store(dst_ptr + b * s_db + p * s_dm + f * s_df, x.to(dst_ptr.dtype.element_ty), mask=f < F)

    @triton.jit
    def _write_rows_kernel(pos_ptr, T, L, s_pb, s_pt,
                           s0, d0, F0, s0b, s0t, d0b, d0m, d0f, s1, d1, F1, s1b, s1t, d1b, d1m, d1f,
                           s2, d2, F2, s2b, s2t, d2b, d2m, d2f, s3, d3, F3, s3b, s3t, d3b, d3m, d3f,
                           s4, d4, F4, s4b, s4t, d4b, d4m, d4f, s5, d5, F5, s5b, s5t, d5b, d5m, d5f,
                           BLOCK_F: tl.constexpr):
        # program (token, tensor): token = b * T + t; the tensor index picks one of the six argument groups
        tok = tl.program_id(0)
        i = tl.program_id(1)
        b = (tok // T).to(tl.int64)
        t = tok % T
        p = tl.load(pos_ptr + b * s_pb + t * s_pt).to(tl.int64)
        if (p >= 0) & (p < L):
            if i == 0:
                _copy_token(s0, d0, b, t, p, F0, s0b, s0t, d0b, d0m, d0f, BLOCK_F)
            elif i == 1:
                _copy_token(s1, d1, b, t, p, F1, s1b, s1t, d1b, d1m, d1f, BLOCK_F)
            elif i == 2:
                _copy_token(s2, d2, b, t, p, F2, s2b, s2t, d2b, d2m, d2f, BLOCK_F)
            elif i == 3:
                _copy_token(s3, d3, b, t, p, F3, s3b, s3t, d3b, d3m, d3f, BLOCK_F)
            elif i == 4:
                _copy_token(s4, d4, b, t, p, F4, s4b, s4t, d4b, d4m, d4f, BLOCK_F)
            else:
                _copy_token(s5, d5, b, t, p, F5, s5b, s5t, d5b, d5m, d5f, BLOCK_F)

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
                args += [s3, d, F, s3.stride(0), s3.stride(1), d.stride(0), d.stride(1), feature_stride(d)]
                widest = max(widest, F)
            n = len(args) // 8
            args += args[:8] * (MAX_TENSORS - n)  # unused groups: never read (grid has n tensors)
            _write_rows_kernel[(B * T, n)](
                pos, T, L, pos.stride(0), pos.stride(1), *args,
                BLOCK_F=min(1024, triton.next_power_of_2(widest)), num_warps=4)

    @_write_rows_op.register_fake
    def _(dsts, srcs, pos):
        return None


def write_rows(dsts, srcs, pos, impl=None):
    """dsts[i][b, pos[b, t]] = srcs[i][b, t] (see the module docstring). impl: None (the Triton op when every
    tensor is on CUDA and all destinations share B and L, else the reference), "triton" or "ref"."""
    dsts, srcs = list(dsts), list(srcs)
    fits = all(feature_stride(d) is not None and d.shape[:2] == dsts[0].shape[:2] for d in dsts)  # what it handles
    if impl is None:
        impl = pick(pos, fits)
    if impl == "triton":
        _check(dsts, srcs, pos)
        if not fits:
            raise ValueError("write_rows(impl='triton'): each destination's features (dims 2...) must be one "
                             "evenly strided run (e.g. contiguous, or position-minor) and all share (B, L)")
        return _write_rows_op(dsts, srcs, pos)
    if impl == "ref":
        return write_rows_ref(dsts, srcs, pos)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
