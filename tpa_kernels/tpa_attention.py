"""
Causal attention straight from TPA's factors, for training: Q, K and V never exist in memory.

    out = tpa_attention(aq, bq, ak, bk, av, bv, softmax_scale=None)

    aq (B, T, H, Rq), bq (B, T, Rq, D)   query factors, bq already rotated by RoPE
    ak (B, T, H, Rk), bk (B, T, Rk, D)   key factors, bk already rotated
    av (B, T, H, Rv), bv (B, T, Rv, E)   value factors
    returns (B, T, H, E) = causal softmax(q k^T * softmax_scale) v (softmax_scale = D^-0.5 by default), with
        q = (1/Rq) sum_r aq_r (x) bq_r,  k = (1/Rk) sum_r ak_r (x) bk_r,  v = (1/Rv) sum_r av_r (x) bv_r
    as model.TPA defines them (docs/DESIGN.md sec. 1.1).

Forward (FlashAttention-2's loop): a program owns one (sequence, head) and BLOCK_M queries. It forms its query
tile from the factors once (Rq multiply-adds per element, fp32), then for each block of BLOCK_N keys forms the
key and value tiles the same way, from A's (token, head) entries and the head-shared B rows (which the H
programs of a token block read through L2), and folds the block into an online softmax. It keeps the output and
the log-sum-exp; autograd keeps the factors: T (H + D)(Rq + Rk + Rv) values per layer instead of Q, K and V's
3 T H D.
Backward: FlashAttention-2's two loops with the tiles formed again from the factors: a program per key block
accumulates dK and dV over the later query blocks, a program per query block accumulates dQ over the earlier key
blocks. They write dQ, dK and dV heads first, and the materialisation's backward (tpa_kernels/materialize.py)
turns each into its factors' gradients.

The price: a tile is formed once per (query block, key block) pair instead of once per token, R multiply-adds
per element on the CUDA cores beside the tensor cores' products. Whether that beats materialising Q, K and V
for the fastest attention backend is measured by benchmarks/bench_attention.py (results in
benchmarks/RESULTS.md); the model uses this path only where that says so (model.TPA.fused_attention).

tpa_attention_ref (materialise, then SDPA) is the PyTorch reference with the same signature.
"""

import math

import torch
import torch.nn.functional as F

from tpa_kernels.dispatch import HAS_TRITON, pick
from tpa_kernels.materialize import tpa_materialize_ref

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    from tpa_kernels.flashtpa import _mm, _online_softmax  # FlashTPA's tensor-core product and softmax step
    from tpa_kernels.materialize import tpa_materialize_triton_bwd


def _check(aq, bq, ak, bk, av, bv):
    B, T, H, Rq = aq.shape
    D, Rk, Rv, E = bq.shape[-1], ak.shape[-1], av.shape[-1], bv.shape[-1]
    expected = dict(aq=(B, T, H, Rq), bq=(B, T, Rq, D), ak=(B, T, H, Rk), bk=(B, T, Rk, D),
                    av=(B, T, H, Rv), bv=(B, T, Rv, E))
    for name, t in zip(expected, (aq, bq, ak, bk, av, bv)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"tpa_attention: {name} has shape {tuple(t.shape)}, expected {expected[name]} (aq "
                             f"(B,T,H,Rq), bq (B,T,Rq,D), ak (B,T,H,Rk), bk (B,T,Rk,D), av (B,T,H,Rv), bv (B,T,Rv,E))")
    return B, T, H, Rq, Rk, Rv, D, E


def tpa_attention_ref(aq, bq, ak, bk, av, bv, softmax_scale=None):
    """Materialise q, k, v heads first, then SDPA (causal), in the inputs' precision."""
    _check(aq, bq, ak, bk, av, bv)
    q, k, v = (tpa_materialize_ref(a, b, 1.0 / a.size(-1)) for a, b in ((aq, bq), (ak, bk), (av, bv)))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale).transpose(1, 2)


if HAS_TRITON:

    @triton.jit
    def _form(a_ptr, b_ptr, t, t_ok, s_at, s_ar, s_bt, s_br, s_bd, d, R: tl.constexpr, D: tl.constexpr):
        """sum_r a[t, r] * b[t, r, :] for a block of tokens t: (len(t), len(d)) fp32; a_ptr points at this
        (sequence, head)'s A entries, b_ptr at this sequence's B rows; tokens past the end and features past D
        are 0."""
        b_ok = t_ok[:, None] & (d < D)[None, :]
        a = tl.load(a_ptr + t * s_at, mask=t_ok, other=0.0).to(tl.float32)
        x = a[:, None] * tl.load(b_ptr + t[:, None] * s_bt + d[None, :] * s_bd, mask=b_ok, other=0.0).to(tl.float32)
        for r in tl.static_range(1, R):
            a = tl.load(a_ptr + t * s_at + r * s_ar, mask=t_ok, other=0.0).to(tl.float32)
            x += a[:, None] * tl.load(b_ptr + t[:, None] * s_bt + r * s_br + d[None, :] * s_bd, mask=b_ok,
                                      other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _tpa_attention_fwd(
        aq_ptr, bq_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, o_ptr, lse_ptr, T, H,
        s_aq_b, s_aq_t, s_aq_h, s_aq_r, s_bq_b, s_bq_t, s_bq_r, s_bq_d,
        s_ak_b, s_ak_t, s_ak_h, s_ak_r, s_bk_b, s_bk_t, s_bk_r, s_bk_d,
        s_av_b, s_av_t, s_av_h, s_av_r, s_bv_b, s_bv_t, s_bv_r, s_bv_e,
        s_o_b, s_o_t, s_o_h, s_o_e, qk_scale,
        RQ: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        dt = bk_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        d = tl.arange(0, BLOCK_D)
        e = tl.arange(0, BLOCK_E)
        # q with the softmax scale (in log2 units), 1/Rq and 1/Rk folded in
        q = _form(aq_ptr + b * s_aq_b + h * s_aq_h, bq_ptr + b * s_bq_b, offs_m, m_ok, s_aq_t, s_aq_r,
                  s_bq_t, s_bq_r, s_bq_d, d, RQ, D)
        q = (q * qk_scale).to(dt)
        a_k, b_k = ak_ptr + b * s_ak_b + h * s_ak_h, bk_ptr + b * s_bk_b
        a_v, b_v = av_ptr + b * s_av_b + h * s_av_h, bv_ptr + b * s_bv_b
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)  # causal: keys up to the block's last query
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < T
            k = _form(a_k, b_k, offs_n, n_ok, s_ak_t, s_ak_r, s_bk_t, s_bk_r, s_bk_d, d, RK, D).to(dt)
            v = _form(a_v, b_v, offs_n, n_ok, s_av_t, s_av_r, s_bv_t, s_bv_r, s_bv_e, e, RV, E).to(dt)
            s = _mm(q, tl.trans(k), IEEE)  # (BLOCK_M, BLOCK_N)
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
            acc += _mm(p.to(dt), v, IEEE)
        l_safe = tl.where(m_ok, l_i, 1.0)
        out = acc / (l_safe[:, None] * RV)  # v's 1/Rv
        tl.store(o_ptr + b * s_o_b + offs_m[:, None] * s_o_t + h * s_o_h + e[None, :] * s_o_e,
                 out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (e < E)[None, :])
        tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log2(l_safe), mask=m_ok)  # base 2, (B * H, T)

    @triton.jit
    def _tpa_attention_bwd_dkdv(
        aq_ptr, bq_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, T, H,
        s_aq_b, s_aq_t, s_aq_h, s_aq_r, s_bq_b, s_bq_t, s_bq_r, s_bq_d,
        s_ak_b, s_ak_t, s_ak_h, s_ak_r, s_bk_b, s_bk_t, s_bk_r, s_bk_d,
        s_av_b, s_av_t, s_av_h, s_av_r, s_bv_b, s_bv_t, s_bv_r, s_bv_e,
        s_do_b, s_do_t, s_do_h, s_do_e, qk_scale, dk_scale, dp_scale,
        RQ: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # one program: BLOCK_N keys of one (sequence, head), over the query blocks that see them; dk and dv are
        # written heads first, contiguous (B, H, T, D) and (B, H, T, E)
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        dt = bk_ptr.dtype.element_ty
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        d = tl.arange(0, BLOCK_D)
        e = tl.arange(0, BLOCK_E)
        k = _form(ak_ptr + b * s_ak_b + h * s_ak_h, bk_ptr + b * s_bk_b, offs_n, n_ok, s_ak_t, s_ak_r,
                  s_bk_t, s_bk_r, s_bk_d, d, RK, D).to(dt)
        v = _form(av_ptr + b * s_av_b + h * s_av_h, bv_ptr + b * s_bv_b, offs_n, n_ok, s_av_t, s_av_r,
                  s_bv_t, s_bv_r, s_bv_e, e, RV, E).to(dt)
        a_q, b_q = aq_ptr + b * s_aq_b + h * s_aq_h, bq_ptr + b * s_bq_b
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        for m0 in range((pid_n * BLOCK_N) // BLOCK_M * BLOCK_M, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            q = _form(a_q, b_q, offs_m, m_ok, s_aq_t, s_aq_r, s_bq_t, s_bq_r, s_bq_d, d, RQ, D)
            q = (q * qk_scale).to(dt)  # rounded as the forward rounded it
            do = tl.load(do_ptr + b * s_do_b + offs_m[:, None] * s_do_t + h * s_do_h + e[None, :] * s_do_e,
                         mask=m_ok[:, None] & (e < E)[None, :], other=0.0)  # (BLOCK_M, BLOCK_E)
            lse = tl.load(lse_ptr + bh * T + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + bh * T + offs_m, mask=m_ok, other=0.0)
            s = _mm(q, tl.trans(k), IEEE)  # (BLOCK_M, BLOCK_N)
            visible = (offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None]
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            dv += _mm(tl.trans(p.to(dt)), do, IEEE)
            dp = _mm(do, tl.trans(v), IEEE) * dp_scale  # dO @ (v / Rv)^T
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds.to(dt)), q, IEEE)
        out_ok = n_ok[:, None]
        tl.store(dk_ptr + (bh * T + offs_n[:, None]) * D + d[None, :], (dk * dk_scale).to(dk_ptr.dtype.element_ty),
                 mask=out_ok & (d < D)[None, :])
        tl.store(dv_ptr + (bh * T + offs_n[:, None]) * E + e[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=out_ok & (e < E)[None, :])

    @triton.jit
    def _tpa_attention_bwd_dq(
        aq_ptr, bq_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T, H,
        s_aq_b, s_aq_t, s_aq_h, s_aq_r, s_bq_b, s_bq_t, s_bq_r, s_bq_d,
        s_ak_b, s_ak_t, s_ak_h, s_ak_r, s_bk_b, s_bk_t, s_bk_r, s_bk_d,
        s_av_b, s_av_t, s_av_h, s_av_r, s_bv_b, s_bv_t, s_bv_r, s_bv_e,
        s_do_b, s_do_t, s_do_h, s_do_e, qk_scale, dq_scale, dp_scale,
        RQ: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # one program: BLOCK_M queries of one (sequence, head), over the key blocks they see; dq is written heads
        # first, contiguous (B, H, T, D)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        dt = bk_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        d = tl.arange(0, BLOCK_D)
        e = tl.arange(0, BLOCK_E)
        q = _form(aq_ptr + b * s_aq_b + h * s_aq_h, bq_ptr + b * s_bq_b, offs_m, m_ok, s_aq_t, s_aq_r,
                  s_bq_t, s_bq_r, s_bq_d, d, RQ, D)
        q = (q * qk_scale).to(dt)
        do = tl.load(do_ptr + b * s_do_b + offs_m[:, None] * s_do_t + h * s_do_h + e[None, :] * s_do_e,
                     mask=m_ok[:, None] & (e < E)[None, :], other=0.0)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=m_ok, other=0.0)
        a_k, b_k = ak_ptr + b * s_ak_b + h * s_ak_h, bk_ptr + b * s_bk_b
        a_v, b_v = av_ptr + b * s_av_b + h * s_av_h, bv_ptr + b * s_bv_b
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < T
            k = _form(a_k, b_k, offs_n, n_ok, s_ak_t, s_ak_r, s_bk_t, s_bk_r, s_bk_d, d, RK, D).to(dt)
            v = _form(a_v, b_v, offs_n, n_ok, s_av_t, s_av_r, s_bv_t, s_bv_r, s_bv_e, e, RV, E).to(dt)
            s = _mm(q, tl.trans(k), IEEE)
            visible = (offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None]
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            dp = _mm(do, tl.trans(v), IEEE) * dp_scale
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(dt), k, IEEE)
        tl.store(dq_ptr + (bh * T + offs_m[:, None]) * D + d[None, :], (dq * dq_scale).to(dq_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (d < D)[None, :])

    def _tiles(D, E, dtype, tiles=None):
        """Block sizes, warps and pipeline stages: 64 x 64 tiles, 4 warps, 2 stages (fp32 or 128-wide features:
        32 x 32, for the registers); tiles: a caller's choice of BLOCK_M, BLOCK_N, num_warps, num_stages (tuning)."""
        wide = dtype == torch.float32 or max(D, E) > 64
        block = 32 if wide else 64
        out = dict(BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=2)
        out.update({k: v for k, v in (tiles or {}).items() if v})
        return dict(out, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_E=max(16, triton.next_power_of_2(E)),
                    IEEE=dtype == torch.float32)

    def _strides(*ts):
        return [s for t in ts for s in t.stride()]

    def _scales(softmax_scale, Rq, Rk, Rv, D):
        scale = D ** -0.5 if softmax_scale is None else softmax_scale
        # the kernels' logits are (sum aq bq) . (sum ak bk) * qk_scale = the true logits in log2 units
        return scale, scale * math.log2(math.e) / (Rq * Rk)

    def tpa_attention_triton_fwd(aq, bq, ak, bk, av, bv, softmax_scale=None, tiles=None):
        B, T, H, Rq, Rk, Rv, D, E = _check(aq, bq, ak, bk, av, bv)
        _, qk_scale = _scales(softmax_scale, Rq, Rk, Rv, D)
        out = torch.empty(B, T, H, E, device=bv.device, dtype=bv.dtype)
        lse = torch.empty(B * H, T, device=bv.device, dtype=torch.float32)
        tiles = _tiles(D, E, bk.dtype, tiles)
        wrap_triton(_tpa_attention_fwd)[(triton.cdiv(T, tiles["BLOCK_M"]), B * H)](
            aq, bq, ak, bk, av, bv, out, lse, T, H, *_strides(aq, bq, ak, bk, av, bv, out), qk_scale,
            RQ=Rq, RK=Rk, RV=Rv, D=D, E=E, **tiles)
        return out, lse

    def tpa_attention_triton_bwd(aq, bq, ak, bk, av, bv, out, lse, do, softmax_scale=None, tiles=None):
        """The factors' gradients: dQ, dK, dV heads first from the two loops, then each through the
        materialisation's backward."""
        B, T, H, Rq, Rk, Rv, D, E = _check(aq, bq, ak, bk, av, bv)
        scale, qk_scale = _scales(softmax_scale, Rq, Rk, Rv, D)
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2).reshape(B * H, T).contiguous()  # rowsum(dO * O)
        dq = torch.empty(B, H, T, D, device=bq.device, dtype=bq.dtype)
        dk = torch.empty(B, H, T, D, device=bk.device, dtype=bk.dtype)
        dv = torch.empty(B, H, T, E, device=bv.device, dtype=bv.dtype)
        tiles = _tiles(D, E, bk.dtype, tiles)
        strides = _strides(aq, bq, ak, bk, av, bv, do)
        # dk: the kernel's sum of ds^T q_s, q_s = q * Rq * qk_scale  ->  ds^T q * scale = that * Rk * ln 2
        wrap_triton(_tpa_attention_bwd_dkdv)[(triton.cdiv(T, tiles["BLOCK_N"]), B * H)](
            aq, bq, ak, bk, av, bv, do, lse, delta, dk, dv, T, H, *strides, qk_scale, Rk * math.log(2), 1.0 / Rv,
            RQ=Rq, RK=Rk, RV=Rv, D=D, E=E, **tiles)
        wrap_triton(_tpa_attention_bwd_dq)[(triton.cdiv(T, tiles["BLOCK_M"]), B * H)](
            aq, bq, ak, bk, av, bv, do, lse, delta, dq, T, H, *strides, qk_scale, scale / Rk, 1.0 / Rv,
            RQ=Rq, RK=Rk, RV=Rv, D=D, E=E, **tiles)
        grads = []
        for a, b, g in ((aq, bq, dq), (ak, bk, dk), (av, bv, dv)):
            grads += tpa_materialize_triton_bwd(a, b, g, 1.0 / a.size(-1))
        return tuple(grads)

    # tile choices travel as ints (0: the default) so that an op call can carry them
    TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

    @triton_op("tpa::attention", mutates_args=())
    def _attention_op(aq: torch.Tensor, bq: torch.Tensor, ak: torch.Tensor, bk: torch.Tensor, av: torch.Tensor,
                      bv: torch.Tensor, softmax_scale: float, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return tpa_attention_triton_fwd(aq, bq, ak, bk, av, bv, softmax_scale, dict(zip(TILE_KEYS, tiles)))

    @triton_op("tpa::attention_backward", mutates_args=())
    def _attention_bwd_op(aq: torch.Tensor, bq: torch.Tensor, ak: torch.Tensor, bk: torch.Tensor, av: torch.Tensor,
                          bv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                          softmax_scale: float, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
        return tpa_attention_triton_bwd(aq, bq, ak, bk, av, bv, out, lse, do, softmax_scale,
                                        dict(zip(TILE_KEYS, tiles)))

    def _setup(ctx, inputs, output):
        *factors, softmax_scale, tiles = inputs
        ctx.save_for_backward(*factors, *output)
        ctx.softmax_scale, ctx.tiles = softmax_scale, tiles

    def _backward(ctx, do, _dlse):
        *factors, out, lse = ctx.saved_tensors
        return (*_attention_bwd_op(*factors, out, lse, do.contiguous(), ctx.softmax_scale, ctx.tiles), None, None)

    _attention_op.register_autograd(_backward, setup_context=_setup)


def tpa_attention(aq, bq, ak, bk, av, bv, softmax_scale=None, impl=None, tiles=None):
    """Causal attention from the factors (see the module docstring) -> (B, T, H, E). impl: None (the Triton op for
    CUDA tensors of one dtype, else the reference), "triton" or "ref". tiles: the kernels' BLOCK_M, BLOCK_N,
    num_warps, num_stages, any of them (tuning; benchmarks/bench_attention.py)."""
    if impl is None:
        impl = pick(bk, len({t.dtype for t in (aq, bq, ak, bk, av, bv)}) == 1)
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("tpa_attention(impl='triton') needs the triton package")
        unknown = set(tiles or {}) - set(TILE_KEYS)
        if unknown:
            raise ValueError(f"tpa_attention: unknown tiles {sorted(unknown)}; known: {list(TILE_KEYS)}")
        scale = float(bq.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
        return _attention_op(aq, bq, ak, bk, av, bv, scale, [int((tiles or {}).get(k, 0)) for k in TILE_KEYS])[0]
    if impl == "ref":
        return tpa_attention_ref(aq, bq, ak, bk, av, bv, softmax_scale)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
