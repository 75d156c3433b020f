"""
FlashTPA decoding: attention of N new query tokens over a TPA factor cache, never materialising K or V.

    out = flashtpa_decode(aq, bq, ak, bk, av, bv, seqlens=None, softmax_scale=None)

Shapes (logical; any strides):
    aq (B, N, H, Rq), bq (B, N, Rq, D)   query factors, bq already rotated by RoPE
    ak (B, M, H, Rk), bk (B, M, Rk, D)   key factors, bk already rotated
    av (B, M, H, Rv), bv (B, M, Rv, E)   value factors
    seqlens (B,) int                     valid cache length per sequence (default M); the N queries are
                                         the last N positions of each sequence and attend causally
    returns (B, N, H, E) = softmax(q k^T * softmax_scale) v, softmax_scale = D^-0.5 by default, with
        q = (1/Rq) sum_r aq_r (x) bq_r,  k = (1/Rk) sum_r ak_r (x) bk_r,  v = (1/Rv) sum_r av_r (x) bv_r
    exactly as model.TPA defines them (docs/DESIGN.md sec. 1.1).

Cache layout: the one engine.KVCache allocates, (B, M, H, R) for A and (B, M, R, D) for B, each contiguous: per
cache block the kernel then reads whole rows of B_K / B_V (head-shared) and of A. Any other strides work too.

The algorithm (docs/DESIGN.md sec. 3.2; the paper's Algorithm 2 with a flash-decoding split over the cache): a
program owns one sequence, a block of (query, head) rows and a contiguous slice of the cache. It forms its rows'
queries q = (1/Rq) A_Q^T B_Q once, then for each block of BLOCK_M positions computes the logits
sum_r a_K,r (q . b_K,r), folds them into an online softmax (_online_softmax: each block against the running
maximum, never normalised alone, so a block that underflows adds 0, not 0/0), and accumulates
sum_u (p * a_V,u) @ b_V,u. Partial outputs and log-sum-exps stay fp32 and a second kernel combines the splits
with the max-LSE rule. The cache length is a runtime value, never a compile-time constant or autotune key: the
grid grows with M, programs past a sequence's end exit at once, and nothing syncs with the host, so a decode
step can be captured in a CUDA graph.

The cache loop has three forms; _tiles and flashtpa_decode_triton pick one per shape, and each won on the shapes
it is picked for (benchmarks/RESULTS.md, "Figures behind the code's choices"):
- Flattened ranks, Triton's pipeliner (num_stages). Each factor is one 2-D tile with the ranks flattened in the
  cache's (M, R) order (column j = m * R_P + r, ranks padded to a power of two and masked), so one tensor-core
  product covers every key rank and one every value rank. With a_dot the A tiles reach the products' layout
  through a product with the identity (I @ A, exact), which makes the pipeliner move them with cp.async like the
  B tiles: rank-1 K/V stream three blocks of 128 positions deep. fp32, 128-wide features and ranks above 2 take
  this form without the identity products.
- Flattened ranks, hand prefetch: rank-2 K/V (T6's trained ranks) issue the next block's loads before the
  current block's math, into registers. Under programmatic dependent launch the first block is requested
  before the wait on the previous kernel (engine.fused_decode_step's chain).
- One product per rank: ranks 2-4 when a position's (H, R) block of A is 16-byte aligned (H * R a multiple of
  8) and one program holds all (query, head) rows. Whole A rows (BLOCK_M, H * R) are loaded and a selection
  product (one 1 per row: exact) picks each rank's (row, position) values; B is loaded per rank; every load is
  a 16-byte cp.async in the pipeliner's ring. The trained head counts (H = 34, 47) are not aligned, so this
  serves head counts such as 16, 32 and 48.

flashtpa_decode_ref (materialised q/k/v) and flashtpa_decode_einsum (factor space, the paper's Algorithm 1) are the
PyTorch references with the same signature; flashtpa_decode falls back to the first off CUDA.
"""

import math
import warnings
from typing import Optional

import torch

from tpa_kernels.dispatch import HAS_TRITON, pdl_supported, pick

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.runtime.errors import OutOfResources

_SMALL_TILES_WARNED = set()  # devices told once that FlashTPA fell back to its smallest tiles


# -----------------------------------------------------------------------------
# PyTorch references


def _check(aq, bq, ak, bk, av, bv, seqlens):
    B, N, H, Rq = aq.shape
    D, (M, Rk), Rv, E = bq.shape[-1], ak.shape[1::2], av.shape[-1], bv.shape[-1]
    expected = dict(aq=(B, N, H, Rq), bq=(B, N, Rq, D), ak=(B, M, H, Rk), bk=(B, M, Rk, D),
                    av=(B, M, H, Rv), bv=(B, M, Rv, E))
    for name, t in zip(expected, (aq, bq, ak, bk, av, bv)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"flashtpa_decode: {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                             f"(aq (B,N,H,Rq), bq (B,N,Rq,D), ak (B,M,H,Rk), bk (B,M,Rk,D), av (B,M,H,Rv), bv (B,M,Rv,E))")
    if N > M:
        raise ValueError(f"flashtpa_decode: N={N} query tokens but a cache of only M={M} positions")
    if seqlens is not None and tuple(seqlens.shape) != (B,):
        raise ValueError(f"flashtpa_decode: seqlens has shape {tuple(seqlens.shape)}, expected ({B},)")
    return B, N, H, M, Rq, Rk, Rv, D, E


def _mask(B, N, M, seqlens, device):
    """(B, N, M) bool: key m visible to query n, which sits at position seqlens - N + n."""
    L = torch.full((B,), M, device=device) if seqlens is None else seqlens.to(device=device, dtype=torch.long)
    pos = L[:, None] - N + torch.arange(N, device=device)  # (B, N)
    return torch.arange(M, device=device)[None, None, :] <= pos[:, :, None]


def flashtpa_decode_ref(aq, bq, ak, bk, av, bv, seqlens=None, softmax_scale=None):
    """Materialise q, k, v (docs/DESIGN.md sec. 1.1), then masked softmax attention, in the inputs' precision."""
    B, N, H, M, Rq, Rk, Rv, D, E = _check(aq, bq, ak, bk, av, bv, seqlens)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    q = torch.matmul(aq, bq) / Rq  # (B, N, H, D)
    k = torch.matmul(ak, bk) / Rk  # (B, M, H, D)
    v = torch.matmul(av, bv) / Rv  # (B, M, H, E)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    s = s.masked_fill(~_mask(B, N, M, seqlens, s.device)[:, None], float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    return torch.einsum("bhnm,bmhe->bnhe", p, v)


def flashtpa_decode_einsum(aq, bq, ak, bk, av, bv, seqlens=None, softmax_scale=None):
    """Factor space (the paper's Algorithm 1): head-shared feature products, then the head factors."""
    B, N, H, M, Rq, Rk, Rv, D, E = _check(aq, bq, ak, bk, av, bv, seqlens)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    P = torch.einsum("bnrd,bmsd->bnmrs", bq, bk)  # shared by all heads
    s = torch.einsum("bnhr,bmhs,bnmrs->bhnm", aq, ak, P) * (scale / (Rq * Rk))
    s = s.masked_fill(~_mask(B, N, M, seqlens, s.device)[:, None], float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(av.dtype)
    return torch.einsum("bhnm,bmhu,bmue->bnhe", p, av, bv) / Rv


# -----------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """a @ b on tensor cores, fp32 accumulation; full fp32 precision (no TF32) for fp32 inputs."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _online_softmax(s_log2, m_i, l_i, acc):
        """Fold one block of logits (base-2 units, -inf where masked) into the running max m_i, sum l_i and output
        acc: returns the block's weights p, the new max, sum and rescaled acc. The block is weighed against its own
        running max, never normalised alone, so a block far below the max adds exp2(-big) = 0, never 0/0."""
        m_new = tl.maximum(m_i, tl.max(s_log2, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s_log2 - m_safe[:, None])
        return p, m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None]

    @triton.jit
    def _load_cache_block(ak_ptr, bk_ptr, av_ptr, bv_ptr, b, m0, end, h, row_ok, mk, sk, mv, uv, offs_d, offs_e,
                          s_ak_b, s_ak_m, s_ak_h, s_ak_r, s_bk_b, s_bk_m, s_bk_r, s_bk_d,
                          s_av_b, s_av_m, s_av_h, s_av_r, s_bv_b, s_bv_m, s_bv_r, s_bv_e,
                          RK: tl.constexpr, RV: tl.constexpr, D: tl.constexpr, E: tl.constexpr):
        """One block of the cache, ranks flattened into the tile: column/row j = m * R_P + r (the cache's (M, R)
        order), ranks past R (padding to a power of two) and positions past `end` masked to 0."""
        ok_k = (m0 + mk < end) & (sk < RK)
        ok_v = (m0 + mv < end) & (uv < RV)
        ak = tl.load(ak_ptr + b * s_ak_b + (m0 + mk)[None, :] * s_ak_m + h[:, None] * s_ak_h + sk[None, :] * s_ak_r,
                     mask=row_ok[:, None] & ok_k[None, :], other=0.0)  # (ROWS, BLOCK_M * RK_P)
        bk = tl.load(bk_ptr + b * s_bk_b + (m0 + mk)[:, None] * s_bk_m + sk[:, None] * s_bk_r + offs_d[None, :] * s_bk_d,
                     mask=ok_k[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M * RK_P, BLOCK_D)
        av = tl.load(av_ptr + b * s_av_b + (m0 + mv)[None, :] * s_av_m + h[:, None] * s_av_h + uv[None, :] * s_av_r,
                     mask=row_ok[:, None] & ok_v[None, :], other=0.0)  # (ROWS, BLOCK_M * RV_P)
        bv = tl.load(bv_ptr + b * s_bv_b + (m0 + mv)[:, None] * s_bv_m + uv[:, None] * s_bv_r + offs_e[None, :] * s_bv_e,
                     mask=ok_v[:, None] & (offs_e[None, :] < E), other=0.0)  # (BLOCK_M * RV_P, BLOCK_E)
        return ak, bk, av, bv

    @triton.jit
    def _flashtpa_decode_kernel(
        aq_ptr, bq_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, seqlens_ptr, out_ptr, lse_ptr,
        s_aq_b, s_aq_n, s_aq_h, s_aq_r, s_bq_b, s_bq_n, s_bq_r, s_bq_d,
        s_ak_b, s_ak_m, s_ak_h, s_ak_r, s_bk_b, s_bk_m, s_bk_r, s_bk_d,
        s_av_b, s_av_m, s_av_h, s_av_r, s_bv_b, s_bv_m, s_bv_r, s_bv_e,
        s_o_b, s_o_split, s_o_row, s_o_e, s_l_b, s_l_split,
        N, M, blocks_per_split, qk_scale, H: tl.constexpr,
        RQ: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, RK_P: tl.constexpr, RV_P: tl.constexpr,
        D: tl.constexpr, E: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_SEQLENS: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
        A_DOT: tl.constexpr = False, PER_RANK: tl.constexpr = False, HRK_P: tl.constexpr = 16,
        HRV_P: tl.constexpr = 16,
    ):
        if PDL:  # programmatic dependent launch: the combine (and what follows it) may launch now
            gdc_launch_dependents()
        split = tl.program_id(0)
        row_block = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        L = tl.load(seqlens_ptr + b).to(tl.int32) if HAS_SEQLENS else M
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (query, head) pairs: row = n * H + h
        row_ok = rows < N * H
        n = rows // H
        h = rows % H
        pos = L - N + n  # the query's position: it sees keys 0..pos
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_E)
        offs_m0 = tl.arange(0, BLOCK_M)
        jk = tl.arange(0, BLOCK_M * RK_P)  # key-side cache column j = m * RK_P + s
        mk = jk // RK_P
        sk = jk % RK_P
        jv = tl.arange(0, BLOCK_M * RV_P)  # value side: j = m * RV_P + u
        mv = jv // RV_P
        uv = jv % RV_P
        dt = bk_ptr.dtype.element_ty
        start = split * blocks_per_split * BLOCK_M
        end = tl.minimum(start + blocks_per_split * BLOCK_M, L)
        if PREFETCH:  # the first block is in flight while q is formed
            # with PDL, before the previous kernel has finished: only positions before the new tokens' (L - N),
            # which no kernel of this step writes; a block that reaches the new tokens is loaded again after the wait
            end_first = end
            if PDL:
                end_first = tl.minimum(end, L - N)
            ak_n, bk_n, av_n, bv_n = _load_cache_block(
                ak_ptr, bk_ptr, av_ptr, bv_ptr, b, start, end_first, h, row_ok, mk, sk, mv, uv, offs_d, offs_e,
                s_ak_b, s_ak_m, s_ak_h, s_ak_r, s_bk_b, s_bk_m, s_bk_r, s_bk_d,
                s_av_b, s_av_m, s_av_h, s_av_r, s_bv_b, s_bv_m, s_bv_r, s_bv_e, RK, RV, D, E)
        if PDL:  # the queries (and the newest cache rows) are the previous kernels' output
            gdc_wait()
            if PREFETCH:
                if start + BLOCK_M > L - N:
                    ak_n, bk_n, av_n, bv_n = _load_cache_block(
                        ak_ptr, bk_ptr, av_ptr, bv_ptr, b, start, end, h, row_ok, mk, sk, mv, uv, offs_d, offs_e,
                        s_ak_b, s_ak_m, s_ak_h, s_ak_r, s_bk_b, s_bk_m, s_bk_r, s_bk_d,
                        s_av_b, s_av_m, s_av_h, s_av_r, s_bv_b, s_bv_m, s_bv_r, s_bv_e, RK, RV, D, E)

        # -- q = (1/Rq) A_Q^T B_Q for this block's rows; the softmax scale (in log2 units) and 1/Rk folded in
        q = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
        for r in tl.static_range(RQ):
            a = tl.load(aq_ptr + b * s_aq_b + n * s_aq_n + h * s_aq_h + r * s_aq_r, mask=row_ok, other=0.0)
            bq = tl.load(bq_ptr + b * s_bq_b + n[:, None] * s_bq_n + r * s_bq_r + offs_d[None, :] * s_bq_d,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            q += a.to(tl.float32)[:, None] * bq.to(tl.float32)
        q = (q * qk_scale).to(dt)
        if A_DOT:  # identity (ROWS, ROWS): I @ A moves an A tile into the products' layout and feeds the pipeliner
            eye = (tl.arange(0, BLOCK_ROWS)[:, None] == tl.arange(0, BLOCK_ROWS)[None, :]).to(dt)

        m_i = tl.full((BLOCK_ROWS,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_ROWS, BLOCK_E), dtype=tl.float32)
        if PER_RANK:  # the flattened (head, rank) column of an A factor row
            colk = tl.arange(0, HRK_P)
            colv = tl.arange(0, HRV_P)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + offs_m0
            if PER_RANK:  # whole A rows (BLOCK_M, H * R); one product per rank, a selection product picks each
                # rank's (row, position) values
                ok_m = offs_m < end
                tk = tl.load(ak_ptr + b * s_ak_b + offs_m[:, None] * s_ak_m + colk[None, :],
                             mask=ok_m[:, None] & (colk[None, :] < H * RK), other=0.0)  # (BLOCK_M, HRK_P)
                tv = tl.load(av_ptr + b * s_av_b + offs_m[:, None] * s_av_m + colv[None, :],
                             mask=ok_m[:, None] & (colv[None, :] < H * RV), other=0.0)  # (BLOCK_M, HRV_P)
                s_log2 = tl.zeros((BLOCK_ROWS, BLOCK_M), dtype=tl.float32)
                for r in tl.static_range(RK):  # sum_r a_K,r * (q . b_K,r)
                    bk = tl.load(bk_ptr + b * s_bk_b + offs_m[:, None] * s_bk_m + r * s_bk_r + offs_d[None, :] * s_bk_d,
                                 mask=ok_m[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
                    sel = (colk[None, :] == (h * RK + r)[:, None]).to(dt)  # (ROWS, HRK_P): the row's head, rank r
                    s_log2 += _mm(q, tl.trans(bk), IEEE) * _mm(sel, tl.trans(tk), IEEE)
            else:
                if PREFETCH:  # hand software pipelining: the next block's loads are issued before this block's math
                    ak, bk, av, bv = ak_n, bk_n, av_n, bv_n
                    ak_n, bk_n, av_n, bv_n = _load_cache_block(
                        ak_ptr, bk_ptr, av_ptr, bv_ptr, b, m0 + BLOCK_M, end, h, row_ok, mk, sk, mv, uv, offs_d, offs_e,
                        s_ak_b, s_ak_m, s_ak_h, s_ak_r, s_bk_b, s_bk_m, s_bk_r, s_bk_d,
                        s_av_b, s_av_m, s_av_h, s_av_r, s_bv_b, s_bv_m, s_bv_r, s_bv_e, RK, RV, D, E)
                else:  # left to Triton's pipeliner (num_stages)
                    ak, bk, av, bv = _load_cache_block(
                        ak_ptr, bk_ptr, av_ptr, bv_ptr, b, m0, end, h, row_ok, mk, sk, mv, uv, offs_d, offs_e,
                        s_ak_b, s_ak_m, s_ak_h, s_ak_r, s_bk_b, s_bk_m, s_bk_r, s_bk_d,
                        s_av_b, s_av_m, s_av_h, s_av_r, s_bv_b, s_bv_m, s_bv_r, s_bv_e, RK, RV, D, E)
                # -- logits: sum_s a_K,s * (q . b_K,s), all key ranks in one tensor-core product
                qk = _mm(q, tl.trans(bk), IEEE)
                if A_DOT:
                    qk = qk * _mm(eye, ak, IEEE)
                else:
                    qk = qk * ak.to(tl.float32)  # (ROWS, BLOCK_M * RK_P)
                if RK_P == 1:
                    s_log2 = qk
                else:
                    s_log2 = tl.sum(tl.reshape(qk, (BLOCK_ROWS, BLOCK_M, RK_P)), axis=2)  # (ROWS, BLOCK_M)
            visible = (offs_m[None, :] < end) & (offs_m[None, :] <= pos[:, None])
            p, m_new, l_i, acc = _online_softmax(tl.where(visible, s_log2, float("-inf")), m_i, l_i, acc)
            if PER_RANK:  # sum_u (p * a_V,u) @ b_V,u, one product per value rank
                for u in tl.static_range(RV):
                    bv = tl.load(bv_ptr + b * s_bv_b + offs_m[:, None] * s_bv_m + u * s_bv_r + offs_e[None, :] * s_bv_e,
                                 mask=ok_m[:, None] & (offs_e[None, :] < E), other=0.0)  # (BLOCK_M, BLOCK_E)
                    sel = (colv[None, :] == (h * RV + u)[:, None]).to(dt)
                    acc += _mm((p * _mm(sel, tl.trans(tv), IEEE)).to(dt), bv, IEEE)
            else:  # -- values: sum_u (p * a_V,u) @ b_V,u, all value ranks in one product
                if RV_P == 1:
                    pe = p
                else:  # (ROWS, BLOCK_M) -> (ROWS, BLOCK_M * RV_P), each position repeated once per rank
                    pe = tl.reshape(tl.broadcast_to(p[:, :, None], (BLOCK_ROWS, BLOCK_M, RV_P)),
                                    (BLOCK_ROWS, BLOCK_M * RV_P))
                if A_DOT:
                    pv = (pe * _mm(eye, av, IEEE)).to(dt)
                else:
                    pv = (pe * av.to(tl.float32)).to(dt)
                acc += _mm(pv, bv, IEEE)
            m_i = m_new

        # -- normalised partial output and its log-sum-exp (natural log), both fp32
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / (l_safe[:, None] * RV)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = out_ptr + b * s_o_b + split * s_o_split + rows[:, None] * s_o_row + offs_e[None, :] * s_o_e
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < E))
        tl.store(lse_ptr + b * s_l_b + split * s_l_split + rows, lse, mask=row_ok)

    @triton.jit
    def _flashtpa_combine_kernel(part_ptr, lse_ptr, out_ptr, n_splits,
                                 s_p_b, s_p_split, s_p_row, s_l_b, s_l_split, s_o_b, s_o_row,
                                 E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, ONE_PASS: tl.constexpr,
                                 PDL: tl.constexpr):
        if PDL:  # everything read here is the decode kernel's output
            gdc_launch_dependents()
            gdc_wait()
        # one program per (row, chunk of E, sequence); max-LSE rule: weights exp(lse_i - max lse) <= 1, and splits
        # with no visible key have lse = -inf and weight 0
        row = tl.program_id(0)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        b = tl.program_id(2).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        l_ptrs = lse_ptr + b * s_l_b + row
        p_ptrs = part_ptr + b * s_p_b + row * s_p_row + offs_e[None, :]
        e_ok = offs_e[None, :] < E
        if ONE_PASS:  # every split in one load of each: one memory round trip
            ok = offs_s < n_splits
            lse = tl.load(l_ptrs + offs_s * s_l_split, mask=ok, other=float("-inf"))
            part = tl.load(p_ptrs + offs_s[:, None] * s_p_split, mask=ok[:, None] & e_ok, other=0.0)
            m_all = tl.max(lse, axis=0)
            w = tl.exp(lse - tl.where(m_all == float("-inf"), 0.0, m_all))
            num, den = tl.sum(w[:, None] * part, axis=0), tl.sum(w, axis=0)
        else:  # chunks of BLOCK_S splits: the maximum first, then the weighted sum
            m = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
            for s0 in range(0, n_splits, BLOCK_S):
                m = tl.maximum(m, tl.load(l_ptrs + (s0 + offs_s) * s_l_split, mask=s0 + offs_s < n_splits,
                                          other=float("-inf")))
            m_all = tl.max(m, axis=0)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            den_s = tl.zeros((BLOCK_S,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
            for s0 in range(0, n_splits, BLOCK_S):
                ok = s0 + offs_s < n_splits
                w = tl.exp(tl.load(l_ptrs + (s0 + offs_s) * s_l_split, mask=ok, other=float("-inf")) - m_all)
                part = tl.load(p_ptrs + (s0 + offs_s)[:, None] * s_p_split, mask=ok[:, None] & e_ok, other=0.0)
                den_s += w
                acc += w[:, None] * part
            num, den = tl.sum(acc, axis=0), tl.sum(den_s, axis=0)
        out = num / tl.maximum(den, 1e-30)  # den = 0 only if no key is visible
        tl.store(out_ptr + b * s_o_b + row * s_o_row + offs_e, out.to(out_ptr.dtype.element_ty), mask=offs_e < E)


_SM_COUNT = {}


def _num_sms(device):
    if device.type != "cuda":
        return 8
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _tiles(block_rows, Rk, Rv, D, E, dtype, per_rank=False, programs=1, M=None, sms=None):
    """The tile rules, all in one place: (block_m, prefetch, a_dot, num_stages, programs per SM), the fastest found
    with benchmarks/bench_decode.py --tune (the timings behind each choice: benchmarks/RESULTS.md, "Figures behind
    the code's choices"). programs: sequences x row blocks, the grid's other axes; M and sms (the cache length and
    the GPU's SM count), when given, shorten the blocks of a cache too short to fill the GPU.
    per_rank (one product per rank, see the module docstring): 64 positions, 3 stages, 1 program per SM; 64 rows:
    32 positions, 3 stages, 2 per SM.
    A block's factor tiles have block_m * R_P rows: the rows are budgeted (64, or 32 for 4-byte or 128-wide
    features) so that high ranks keep the tiles in shared memory, and tensor-core products need >= 16 rows.
    a_dot: the A tiles reach the products' layout through an identity product (I @ A), so that Triton's pipeliner
    moves all four factors with cp.async through shared memory (it pipelines only loads that feed a product).
    Rank-2 K/V prefetch the next block by hand (registers), which also lets a PDL launch request the first block
    before its wait (engine.fused_decode_step)."""
    if per_rank:
        return (64, False, False, 3, 1) if block_rows <= 32 else (32, False, False, 3, 2)
    rk_p, rv_p = triton.next_power_of_2(Rk), triton.next_power_of_2(Rv)
    r_p = max(rk_p, rv_p)
    wide = dtype == torch.float32 or max(D, E) > 64
    block_m = max(2, 16 // min(rk_p, rv_p), (32 if wide else 64) // r_p)
    if wide:  # wide tiles: no room for a second block in registers
        tiles = block_m, False, False, 1, 2
    elif r_p == 1 and block_rows <= 32:  # rank-1 K/V: 128 positions (48 KB at H=32) per stage, 3 stages; 1 program
        tiles = 128, False, True, 3, 1 if programs == 1 else 2  # per SM for one sequence, 2 for several
    elif r_p == 1:  # 64 rows (H=48): 64 positions, 3 stages, 2 programs per SM
        tiles = 64, False, True, 3, 2
    elif r_p == 2:  # rank-2 K/V: the next block prefetched by hand into registers
        tiles = block_m, True, True, 1, 2
    else:  # higher ranks: Triton's pipeliner, 3 stages
        tiles = block_m, False, False, 3, 2
    if M is not None and tiles[0] > 32 and programs * triton.cdiv(M, tiles[0]) < sms:  # a short cache: more,
        tiles = (32,) + tiles[1:]  # shorter splits
    return tiles


def flashtpa_decode_triton(aq, bq, ak, bk, av, bv, seqlens=None, softmax_scale=None, block_m=None, num_splits=None,
                           num_warps=None, num_stages=None, prefetch=None, programs_per_sm=None, combine_block_s=512,
                           combine_block_e=32, pdl=False, a_dot=None, per_rank=None):
    """The Triton path; the keyword arguments after softmax_scale override the tile rules (for tuning):
    block_m, num_splits, num_warps, num_stages, programs_per_sm set the grid and tiles; prefetch (hand software
    pipelining), a_dot (A tiles through identity products) and per_rank (one product per rank, A from whole rows
    through selection products: needs a contiguous (H, R) block per position and N * H <= 64) pick the loop's
    form (see the module docstring).

    pdl=True (compute capability >= 9): both kernels use programmatic dependent launch. The call may then start
    while the previous kernel of the stream still runs: seqlens and the cache before each sequence's new tokens
    (positions < seqlens - N) are read before waiting for it, so the caller guarantees that no kernel of the same
    chain of dependent launches writes them (engine.fused_decode_step computes seqlens before the chain)."""
    B, N, H, M, Rq, Rk, Rv, D, E = _check(aq, bq, ak, bk, av, bv, seqlens)
    dev = bk.device
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    n_rows = N * H
    BLOCK_ROWS = max(16, min(64, triton.next_power_of_2(n_rows)))
    row_blocks = triton.cdiv(n_rows, BLOCK_ROWS)
    pdl = bool(pdl) and pdl_supported(dev)
    # one product per rank (ranks 2-4) reads whole A rows: a position's (H, R) block contiguous, one row block
    rows_ok = row_blocks == 1 and ak.stride(2) == Rk and ak.stride(3) == 1 and av.stride(2) == Rv and av.stride(3) == 1
    if per_rank is None:
        aligned = H * Rk % 8 == 0 and H * Rv % 8 == 0  # 16-byte rows (H = 47, R = 2: 188 bytes: no cp.async)
        per_rank = (rows_ok and aligned and max(Rk, Rv) in (2, 3, 4) and bk.dtype != torch.float32
                    and max(D, E) <= 64)
    elif per_rank and not rows_ok:
        raise ValueError("flashtpa_decode_triton(per_rank=True) needs A factors with a contiguous (H, R) block per "
                         "position and N * H <= 64")
    bm, pf, ad, stages, per_sm = _tiles(BLOCK_ROWS, Rk, Rv, D, E, bk.dtype, per_rank, B * row_blocks, M, _num_sms(dev))
    BLOCK_M = block_m or bm
    prefetch = False if per_rank else (pf if prefetch is None else prefetch)
    a_dot = ad if a_dot is None else a_dot
    out = torch.empty(B, N, H, E, device=dev, dtype=bv.dtype)
    launch = {"launch_pdl": True} if pdl else {}

    def run(BLOCK_M, stages, prefetch, a_dot, num_splits):
        n_blocks = triton.cdiv(M, BLOCK_M)
        if num_splits is None:  # M sets the grid, never the compiled code; never a partial second wave
            num_splits = max(1, min(n_blocks, int((programs_per_sm or per_sm) * _num_sms(dev)) // (B * row_blocks)))
        blocks_per_split = triton.cdiv(n_blocks, num_splits)
        num_splits = triton.cdiv(n_blocks, blocks_per_split)
        single = num_splits == 1
        part = out.view(B, 1, n_rows, E) if single else \
            torch.empty(B, num_splits, n_rows, E, device=dev, dtype=torch.float32)
        lse = torch.empty(B, num_splits, n_rows, device=dev, dtype=torch.float32)
        seq = seqlens if seqlens is not None else lse  # a dummy pointer when HAS_SEQLENS is False
        _flashtpa_decode_kernel[(num_splits, row_blocks, B)](
            aq, bq, ak, bk, av, bv, seq, part, lse,
            *aq.stride(), *bq.stride(), *ak.stride(), *bk.stride(), *av.stride(), *bv.stride(),
            part.stride(0), part.stride(1), part.stride(2), part.stride(3), lse.stride(0), lse.stride(1),
            N, M, blocks_per_split, scale * math.log2(math.e) / (Rq * Rk), H,
            RQ=Rq, RK=Rk, RV=Rv, RK_P=triton.next_power_of_2(Rk), RV_P=triton.next_power_of_2(Rv), D=D, E=E,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(D),
            BLOCK_E=triton.next_power_of_2(E), HAS_SEQLENS=seqlens is not None, IEEE=bk.dtype == torch.float32,
            PREFETCH=prefetch, PDL=pdl, A_DOT=a_dot, PER_RANK=per_rank,
            HRK_P=max(16, triton.next_power_of_2(H * Rk)), HRV_P=max(16, triton.next_power_of_2(H * Rv)),
            num_warps=num_warps or 4, num_stages=stages, **launch,
        )
        if not single:
            BLOCK_S = min(combine_block_s, triton.next_power_of_2(num_splits))
            BLOCK_E = min(combine_block_e, triton.next_power_of_2(E))
            _flashtpa_combine_kernel[(n_rows, triton.cdiv(E, BLOCK_E), B)](
                part, lse, out, num_splits, part.stride(0), part.stride(1), part.stride(2),
                lse.stride(0), lse.stride(1), out.stride(0), E, E=E, BLOCK_S=BLOCK_S, BLOCK_E=BLOCK_E,
                ONE_PASS=BLOCK_S >= num_splits, PDL=pdl, num_warps=4 if BLOCK_S * BLOCK_E >= 4096 else 2, **launch,
            )

    try:
        run(BLOCK_M, num_stages or stages, prefetch, a_dot, num_splits)
    except OutOfResources as e:  # a GPU with less shared memory than these tiles need (benchmarks/check_targets.py:
        # none of the common ones); the smallest tiles, unpipelined, fit every GPU Triton supports
        if str(dev) not in _SMALL_TILES_WARNED:
            _SMALL_TILES_WARNED.add(str(dev))
            warnings.warn(f"FlashTPA: {e}; this GPU runs the kernel with the smallest tiles (slower)", stacklevel=2)
        run(16, 1, False, False, num_splits)
    return out


if HAS_TRITON:  # an opaque op for torch.compile: a compiled decode step keeps the kernel inside one graph
    @torch.library.custom_op("tpa::flashtpa_decode", mutates_args=())
    def _flashtpa_op(aq: torch.Tensor, bq: torch.Tensor, ak: torch.Tensor, bk: torch.Tensor, av: torch.Tensor,
                     bv: torch.Tensor, seqlens: Optional[torch.Tensor], softmax_scale: Optional[float]) -> torch.Tensor:
        return flashtpa_decode_triton(aq, bq, ak, bk, av, bv, seqlens, softmax_scale)

    @_flashtpa_op.register_fake
    def _(aq, bq, ak, bk, av, bv, seqlens, softmax_scale):
        return aq.new_empty(*aq.shape[:3], bv.shape[-1], dtype=bv.dtype)


def flashtpa_decode(aq, bq, ak, bk, av, bv, seqlens=None, softmax_scale=None, impl=None, pdl=False):
    """FlashTPA decode (see the module docstring). impl: None (Triton on CUDA, else the reference),
    "triton" or "ref". pdl: programmatic dependent launch on CUDA (see flashtpa_decode_triton), outside the
    torch.library op (not for torch.compile)."""
    if impl is None:
        impl = pick(bk)
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("flashtpa_decode(impl='triton') needs the triton package")
        if pdl and bk.is_cuda:
            return flashtpa_decode_triton(aq, bq, ak, bk, av, bv, seqlens, softmax_scale, pdl=True)
        return _flashtpa_op(aq, bq, ak, bk, av, bv, seqlens, softmax_scale)
    if impl == "ref":
        return flashtpa_decode_ref(aq, bq, ak, bk, av, bv, seqlens, softmax_scale)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
