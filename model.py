"""
T6 (Tensor Product Attention) and its baselines in one file.

"Tensor Product Attention Is All You Need" (arXiv 2501.06425). One LLaMA-style trunk, one
registry of attention mechanisms:

    attn = "mha" | "mqa" | "gqa"   GQA, one class driven by n_kv_head (MHA: n_kv_head = n_head,
                                   MQA: n_kv_head = 1)
    attn = "mla"                   DeepSeek-V2 multi-head latent attention
    attn = "tpa"                   T6: contextual factorisation of Q, K and V (paper Sec. 3)
    attn = "tpa_kvonly"            standard query projection, factorised K and V (App. G)

Trunk (docs/DESIGN.md sec. 1.6): pre-norm blocks, weightless RMSNorm (eps = dtype epsilon), SwiGLU MLP with hidden
floor(8d/3), no biases, RoPE (base 10000, fp32 tables built once), tied embeddings, vocab 50304,
zero-initialised output projections of attention and MLP.

TPA options (docs/DESIGN.md sec. 1.3), all flags of the one TPA class: constant (non-contextual) A or B factors,
K/V sharing the B factor, third-order factors (RoPE on the b factor only), and two options for every
mechanism: a per-head sigmoid output gate and KV shifting (a learned per-head mix of the current and
previous token's rotated K and V).

Shape legend: B batch, T tokens, C = n_embd, H heads, D head dim (q/k), E value head dim,
R rank (R_Q, R_K, R_V), M cache length.
"""

import difflib
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tpa_kernels import (apply_rope, cross_entropy_loss, flashtpa_decode, linear_cross_entropy, linear_factors,
                         linear_one_row, pick, swiglu, tpa_attention, tpa_materialize)
from tpa_kernels.dispatch import choice


# -----------------------------------------------------------------------------
# configuration


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    block_size: int = 1024  # maximum sequence length (size of the RoPE tables)
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    head_dim: int = 64  # D; for MLA the non-RoPE part of the q/k head
    attn: str = "tpa"  # a key of ATTENTION
    rope_base: float = 10000.0
    # GQA family: number of key/value heads (0 = implied: n_head for mha, 1 for mqa)
    n_kv_head: int = 0
    # TPA ranks (docs/DESIGN.md sec. 1.1); q_rank is unused by tpa_kvonly
    q_rank: int = 6
    k_rank: int = 2
    v_rank: int = 2
    # TPA factor init (docs/DESIGN.md sec. 1.5): "official" = the released code's 3-D-view Xavier (used for the
    # paper's runs, so the paper-reproduction configs use it); "xavier" = true 2-D Xavier per matrix
    tpa_init: str = "official"
    # TPA variants (docs/DESIGN.md sec. 1.3)
    tpa_const_a: bool = False  # non-contextual A: learned constant head factors
    tpa_const_b: bool = False  # non-contextual B: learned constant feature factors
    tpa_shared_b: bool = False  # K and V share the (unrotated) B factor; needs k_rank == v_rank
    tpa_order: int = 2  # 3 = third-order TPA: b (tpa_db, rotated) x c (tpa_dc), tpa_db*tpa_dc = head_dim
    tpa_db: int = 16
    tpa_dc: int = 4
    # MLA (DeepSeek-V2); 0 q_lora_rank = uncompressed queries
    q_lora_rank: int = 512
    kv_lora_rank: int = 256
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # options for every mechanism
    attn_gate: bool = False  # y_h <- sigmoid(w_h . x) * y_h before the output projection
    kv_shift: bool = False  # k_t <- a_h k_t + (1 - a_h) k_{t-1} (rotated keys), same for v

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GPTConfig: {msg}")

        if self.attn not in ATTENTION:
            close = difflib.get_close_matches(self.attn, list(ATTENTION), n=3)
            bad(f"unknown attn={self.attn!r}; choose one of {sorted(ATTENTION)}"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
        for k in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "head_dim"):
            if getattr(self, k) < 1:
                bad(f"{k}={getattr(self, k)} must be >= 1")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} is odd, but RoPE rotates pairs of features; use an even head_dim")
        if self.attn in ("mha", "mqa"):
            implied = self.n_head if self.attn == "mha" else 1
            if self.n_kv_head not in (0, implied):
                bad(f"attn={self.attn!r} means n_kv_head={implied}, got n_kv_head={self.n_kv_head}; "
                    f"use attn='gqa' for another number of KV heads")
            self.n_kv_head = implied
        if self.attn == "gqa":
            if self.n_kv_head < 1:
                bad(f"attn='gqa' needs n_kv_head >= 1 (got {self.n_kv_head})")
            if self.n_head % self.n_kv_head:
                bad(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                    f"pick n_kv_head among {[g for g in range(1, self.n_head + 1) if self.n_head % g == 0]}")
        if self.attn == "mla":
            if self.kv_lora_rank < 1 or self.q_lora_rank < 0 or self.v_head_dim < 1:
                bad(f"MLA needs kv_lora_rank >= 1, q_lora_rank >= 0 and v_head_dim >= 1 (got "
                    f"{self.kv_lora_rank}, {self.q_lora_rank}, {self.v_head_dim})")
            if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
                bad(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and >= 2 (RoPE rotates pairs)")
        tpa_opts = [k for k in ("tpa_const_a", "tpa_const_b", "tpa_shared_b") if getattr(self, k)]
        if self.tpa_order != 2:
            tpa_opts.append("tpa_order")
        if self.attn.startswith("tpa"):
            ranks = ("k_rank", "v_rank") + (("q_rank",) if self.attn == "tpa" else ())
            for k in ranks:
                if getattr(self, k) < 1:
                    bad(f"{k}={getattr(self, k)} must be >= 1 for attn={self.attn!r}")
            if self.tpa_init not in ("official", "xavier"):
                bad(f"tpa_init={self.tpa_init!r}; choose 'official' or 'xavier'")
            if self.tpa_order not in (2, 3):
                bad(f"tpa_order={self.tpa_order}; TPA is implemented for order 2 and 3")
            if len(tpa_opts) > 1:
                bad(f"{' and '.join(tpa_opts)} cannot be combined; choose one TPA variant")
            if self.tpa_shared_b and self.k_rank != self.v_rank:
                bad(f"tpa_shared_b needs k_rank == v_rank (got {self.k_rank} and {self.v_rank})")
            if self.tpa_order == 3:
                if self.tpa_db * self.tpa_dc != self.head_dim:
                    bad(f"third-order TPA needs tpa_db * tpa_dc == head_dim, got {self.tpa_db} * "
                        f"{self.tpa_dc} != {self.head_dim}")
                if self.tpa_db < 2 or self.tpa_db % 2:
                    bad(f"tpa_db={self.tpa_db} must be even (RoPE rotates the b factor)")
        elif tpa_opts:
            bad(f"{', '.join(tpa_opts)} only apply to attn='tpa' or 'tpa_kvonly' (attn={self.attn!r})")


# Paper sizes (Table 10; docs/DESIGN.md sec. 4): head counts are chosen per mechanism so that every variant has
# (nearly) the parameters of MHA. MLA uses the 512/256 latents that the released code actually ran
# (docs/DESIGN.md sec. 4); the Table-10 latents are one override away (--q_lora_rank=1024 --kv_lora_rank=512).
# "tiny" is for CPU tests and quick starts. Every key can be overridden.
SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, head_dim=16, block_size=256, q_lora_rank=32, kv_lora_rank=16,
                 qk_rope_head_dim=8, v_head_dim=16, tpa_db=4, tpa_dc=4,
                 heads=dict(mha=4, mqa=4, gqa=4, mla=4, tpa=4, tpa_kvonly=4)),
    "small": dict(n_layer=12, n_embd=768, heads=dict(mha=12, mqa=23, gqa=22, mla=13, tpa_kvonly=22, tpa=34)),
    "medium": dict(n_layer=24, n_embd=1024, heads=dict(mha=16, mqa=31, gqa=30, mla=23, tpa_kvonly=29, tpa=47)),
    "large": dict(n_layer=36, n_embd=1280, heads=dict(mha=20, mqa=39, gqa=38, mla=34, tpa_kvonly=37, tpa=61)),
    "xl": dict(n_layer=48, n_embd=1600, heads=dict(mha=25, mqa=49, gqa=48, mla=49, tpa_kvonly=47, tpa=78)),
}
GQA_KV_HEADS = 2  # App. H.1: the GQA baselines use 2 KV heads


def model_config(size="small", attn="tpa", **overrides):
    """GPTConfig for a row of SIZES and a mechanism; keyword overrides win (None means 'not set')."""
    if size not in SIZES:
        close = difflib.get_close_matches(size, list(SIZES), n=1)
        raise ValueError(f"unknown size={size!r}; choose one of {list(SIZES)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    row = {k: v for k, v in SIZES[size].items() if k != "heads"}
    row["attn"] = attn
    if attn in SIZES[size]["heads"]:
        row["n_head"] = SIZES[size]["heads"][attn]
    if attn == "gqa":
        row["n_kv_head"] = GQA_KV_HEADS
    row.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(GPTConfig)}
    for k in row:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=3)
            raise ValueError(f"unknown model setting {k!r}" + (f"; did you mean {close}?" if close else ""))
    return GPTConfig(**row)


# -----------------------------------------------------------------------------
# building blocks


def rms_norm(x):
    # weightless RMSNorm; F.rms_norm's default eps: the machine epsilon of the type it computes in (fp32 for bf16)
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(dim, max_len, base, device=None):
    """cos, sin of shape (max_len, dim/2) in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


class Linear(nn.Linear):
    """nn.Linear without bias. A single row on CUDA without autograd or autocast (batch-1 decoding) takes the
    Triton matrix-vector kernel (tpa_kernels/gemv.py): cuBLAS runs those at about a third of the bandwidth.

    Several rows are multiplied with the feature counts padded by zeros to a multiple of `align`, and the output
    sliced back (its rows are then strided): cuBLAS's Hopper GEMMs (TMA / wgmma) need 16-byte aligned rows, and an
    odd width (T6 Small's fused factor projection: 980 outputs; Medium's SwiGLU hidden size: 2730) falls back to
    slower sm80 kernels (benchmarks/RESULTS.md, "Figures behind the code's choices"). The weight keeps
    its shape; the zeros are made per call (under autocast in the same kernel as the weight's cast to bf16), for
    inputs of 512 rows or more."""

    def __init__(self, in_features, out_features, align=8):
        super().__init__(in_features, out_features, bias=False)
        self.pad_in, self.pad_out = -in_features % align, -out_features % align

    def forward(self, x):
        if (x.is_cuda and x.numel() == x.size(-1) and x.dtype == self.weight.dtype and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda")):
            return linear_one_row(x, self.weight)
        if (self.pad_in or self.pad_out) and x.numel() >= 512 * x.size(-1):  # a few rows (decoding): the GEMM
            # reads the weight once and is memory-bound, and a padded copy of the weight would triple that
            w = F.pad(self.weight, (0, self.pad_in, 0, self.pad_out))
            y = F.linear(F.pad(x, (0, self.pad_in)) if self.pad_in else x, w)
            return y[..., :self.out_features] if self.pad_out else y
        return F.linear(x, self.weight)


class MLP(nn.Module):
    """SwiGLU: silu(x W1) * (x W2) W3, hidden floor(8d/3); W1 and W2 fused in one matmul."""

    def __init__(self, config):
        super().__init__()
        self.hidden = int(8 * config.n_embd / 3)
        self.c_fc = Linear(config.n_embd, 2 * self.hidden)
        self.c_proj = Linear(self.hidden, config.n_embd)

    def forward(self, x):
        return self.c_proj(swiglu(self.c_fc(x)))  # silu(gate) * up; a Triton op on CUDA (tpa_kernels/mlp.py)


class Attention(nn.Module):
    """What every mechanism shares: output projection, optional output gate and KV shift, SDPA call.

    Interface of every mechanism:
      forward(x, rope, cache=None) -> (B, T, C); x is the normalised input (B, T, C), rope maps a rotary
        dimension to (cos, sin) of the positions of x, each (B|1, T, 1, dim/2); cache is None for a plain
        causal pass, or a LayerCache: the new tokens' entries are written to it, then the queries attend
        to everything cached (or, for a prefill into an empty cache, to the new tokens only).
      cache_spec() -> {name: per-token shape} of what the decode cache holds for this layer.
      supports_fused: whether fused_decode(x, layer, pos, seqlens, rope, impl) runs this layer's attention for
        one token at batch 1 as a chain of fused kernels (engine.fused_decode_step); only T6's plain forms do.
      kv_cache_elems_per_token() -> elements cached per token in this layer.
      attn_flops_per_token(T) -> forward FLOPs per token that are not weight matmuls, averaged over a
        causal sequence of length T.
    """

    supports_fused = False

    def __init__(self, config, n_head, v_dim, n_kv_head=None):
        super().__init__()
        self.n_head, self.v_dim = n_head, v_dim
        self.c_proj = Linear(n_head * v_dim, config.n_embd)
        self.gate = Linear(config.n_embd, n_head) if config.attn_gate else None
        # KV shift mixing logits for K and V, per KV head; sigmoid(3) = 0.95: starts near the unshifted model
        self.shift = nn.Parameter(torch.full((2, n_kv_head or n_head), 3.0)) if config.kv_shift else None

    def kv_shift(self, k, v, heads_first=False):
        """k, v: (B, T, H, *) (or (B, H, T, *)), rotated. Mix each token with the previous one (zeros before
        the first)."""
        a = torch.sigmoid(self.shift).to(k.dtype)  # (2, H)
        shape, dim = ((1, -1, 1, 1), 2) if heads_first else ((1, 1, -1, 1), 1)
        ak, av = a[0].view(shape), a[1].view(shape)
        return ak * k + (1 - ak) * shift_right(k, dim), av * v + (1 - av) * shift_right(v, dim)

    def attend(self, q, k, v, scale=None, mask=None, causal=True, heads_first=False):
        """SDPA. q (B, T, H, D), k (B, M, Hkv, D), v (B, M, Hkv, E), or (B, H, T, D) ... with heads_first
        -> (B, T, H, E). causal: the T queries and the M = T keys are the same tokens; otherwise mask
        (B, T, M) bool, or None for every key."""
        if not heads_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                           is_causal=causal, scale=scale, enable_gqa=k.size(1) != q.size(1))
        return y.transpose(1, 2)

    def output(self, y, x):
        """y (B, T, H, E) -> (B, T, C), with the output gate computed from the attention input x."""
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).unsqueeze(-1)
        return self.c_proj(y.flatten(2))

    def kv_cache_elems_per_token(self):
        return sum(math.prod(shape) for shape in self.cache_spec().values())

    def attn_core_flops(self, T, d_qk, d_v):
        # QK^T and PV, 2 FLOPs per multiply-add, each query attends to (T+1)/2 keys on average
        return self.n_head * (d_qk + d_v) * (T + 1)


def shift_right(t, dim=1):
    """The previous token's entry at every position along dim (the token axis), zeros at the first."""
    return torch.cat([torch.zeros_like(t.narrow(dim, 0, 1)), t.narrow(dim, 0, t.size(dim) - 1)], dim=dim)


class GQA(Attention):
    """Grouped-query attention; MHA is n_kv_head = n_head, MQA is n_kv_head = 1. Caches rotated K and V.

        n_kv_head = n_head (MHA)    n_kv_head = 2 (GQA)     n_kv_head = 1 (MQA)
        q: |1|2|3|4|                |1|2|3|4|               |1|2|3|4|
        k: |1|2|3|4|                | 1 | 2 |               |   1   |
    """

    def __init__(self, config):
        super().__init__(config, config.n_head, config.head_dim, config.n_kv_head)
        self.n_kv_head, self.head_dim = config.n_kv_head, config.head_dim
        self.rope_dim = config.head_dim
        self.c_attn = Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim)

    def cache_spec(self):
        return {"k": (self.n_kv_head, self.head_dim), "v": (self.n_kv_head, self.head_dim)}

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, G * D, G * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        cos, sin = rope[self.rope_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            cache.write(k=k, v=v)
            if not cache.fresh:
                k, v, mask, causal = cache.read("k"), cache.read("v"), cache.mask, False
        if self.shift is not None:
            k, v = self.kv_shift(k, v)
        return self.output(self.attend(q, k, v, mask=mask, causal=causal), x)

    def attn_flops_per_token(self, T):
        return self.attn_core_flops(T, self.head_dim, self.head_dim)


class MLA(Attention):
    """Multi-head latent attention (DeepSeek-V2), with the official baseline's names and dims.

    q = W_qb RMSNorm(W_qa x) (or W_q x if q_lora_rank = 0), split per head into q_nope (D) and q_pe (dR);
    [c_kv, k_pe] = W_kva x; k_nope, v = W_kvb RMSNorm(c_kv) per head; k_pe is one RoPE key shared by all
    heads. Softmax scale 1/sqrt(D + dR). The cache holds RMSNorm(c_kv) and the rotated k_pe; decoding
    absorbs W_kvb into the query and the output (DeepSeek-V2/V3), so K and V are never formed.
    """

    def __init__(self, config):
        super().__init__(config, config.n_head, config.v_head_dim)
        C, H = config.n_embd, config.n_head
        self.head_dim, self.rope_dim = config.head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        qk_dim = config.head_dim + config.qk_rope_head_dim
        if self.q_lora_rank > 0:
            self.q_a_proj = Linear(C, self.q_lora_rank)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = Linear(self.q_lora_rank, H * qk_dim)
        else:
            self.q_proj = Linear(C, H * qk_dim)
        self.kv_a_proj_with_mqa = Linear(C, self.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (config.head_dim + config.v_head_dim))
        self.scale = qk_dim ** -0.5

    def cache_spec(self):
        return {"c_kv": (self.kv_lora_rank,), "k_pe": (self.rope_dim,)}

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        H, D, dR = self.n_head, self.head_dim, self.rope_dim
        cos, sin = rope[dR]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank > 0 else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, D + dR).split([D, dR], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dR], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, dc)
        k_pe = apply_rope(k_pe.view(B, T, 1, dR), cos, sin).view(B, T, dR)  # one key shared by the heads
        mask, causal = None, True
        if cache is not None:
            cache.write(c_kv=c_kv, k_pe=k_pe)
            if not cache.fresh:
                c_kv, k_pe, mask, causal = cache.read("c_kv"), cache.read("k_pe"), cache.mask, False
                if choice("mla_absorb") and self.shift is None:
                    return self.output(self.absorbed(q_nope, q_pe, c_kv, k_pe, mask), x)
        M = c_kv.size(1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, M, H, D + self.v_dim).split([D, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, M, H, dR)], dim=-1)  # (B, M, H, D + dR)
        if self.shift is not None:
            k, v = self.kv_shift(k, v)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return self.output(self.attend(q, k, v, scale=self.scale, mask=mask, causal=causal), x)

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention in the latent space: q_nope W_uk . c_kv + q_pe . k_pe, then (p c_kv) W_uv.

        Two batched matmuls over the cached latents (every head reads the same (dc + dR)-dim keys), as in
        DeepSeek-V3's inference code; SDPA would fall back to its math path for a 576-dim head and a mask.
        """
        B, T, H, D = *q_nope.shape[:3], self.head_dim
        W = self.kv_b_proj.weight.view(H, D + self.v_dim, self.kv_lora_rank)  # rows: k_nope then v, per head
        q = torch.cat([torch.einsum("bthd,hdc->bthc", q_nope, W[:, :D]), q_pe], dim=-1)  # (B, T, H, dc + dR)
        k = torch.cat([c_kv, k_pe], dim=-1)  # (B, M, dc + dR)
        s = torch.matmul(q.reshape(B, T * H, -1), k.transpose(1, 2)).float() * self.scale  # (B, T*H, M)
        if mask is not None:
            s = s.view(B, T, H, -1).masked_fill(~mask[:, :, None], float("-inf")).view(B, T * H, -1)
        o = torch.matmul(torch.softmax(s, dim=-1).to(c_kv.dtype), c_kv).view(B, T, H, -1)  # (B, T, H, dc)
        return torch.einsum("bthc,hec->bthe", o, W[:, D:])  # (B, T, H, E)

    def attn_flops_per_token(self, T):
        return self.attn_core_flops(T, self.head_dim + self.rope_dim, self.v_dim)


class Factor(NamedTuple):
    """One slice of TPA's fused factor projection (c_fact): its kind, "a" (head factor), "b" or "c" (feature
    factors; c in third order only) or "q" (TPA-KVonly's standard query); what it builds, "q", "k" or "v"; and its
    shape per token: (H, R) for a, (R, dim) for b and c, (H, D) for the standard query."""
    kind: str
    target: str
    shape: tuple

    @property
    def name(self):
        """The key of this factor in the pieces and the decode cache: "ak", "bq", ..., "q"."""
        return self.kind if self.kind == "q" else self.kind + self.target


class TPA(Attention):
    """Tensor product attention (docs/DESIGN.md sec. 1.1-1.3); attn='tpa_kvonly' keeps a standard query projection.

    Per token, X in {Q, K, V}: X = (1/R_X) A_X^T B_X with head factors A_X (R_X, H) and feature factors
    B_X (R_X, D), both linear maps of x. All factor projections of a layer are one fused matmul. RoPE
    rotates the B factors of Q and K (Theorem 3.1), so the cache holds rotated B_K. Layouts follow the
    cache and the FlashTPA kernel: A (B, T, H, R) head-major, B (B, T, R, D).

    Variants: tpa_const_a / tpa_const_b replace A / B by learned constants (cache (R_K+R_V) D or
    (R_K+R_V) H per token); tpa_shared_b uses K's unrotated B factor for V; tpa_order=3 writes
    B = b (x) c with b in R^db (rotated by a db-dimensional RoPE) and c in R^dc (App. C, Theorem C.1).
    The cache holds the contextual factors ("pieces": ak, bk, [ck,] av, bv, [cv]); decoding reassembles
    A and B and calls FlashTPA (tpa_kernels/flashtpa.py) on CUDA, its PyTorch reference elsewhere.
    """

    def __init__(self, config):
        H, D, C = config.n_head, config.head_dim, config.n_embd
        super().__init__(config, H, D)
        self.head_dim = D
        self.factor_q = config.attn == "tpa"
        self.const_a, self.const_b, self.shared_b = config.tpa_const_a, config.tpa_const_b, config.tpa_shared_b
        self.fdims = (config.tpa_db, config.tpa_dc) if config.tpa_order == 3 else (D,)
        self.rope_dim = self.fdims[0]
        self.ranks = {"q": config.q_rank, "k": config.k_rank, "v": config.v_rank}
        self.factored = "qkv" if self.factor_q else "kv"
        self.materialize_kernel = True  # False: always the PyTorch reference of the materialisation
        # the fused batch-1 step serves the plain forms (no gate, KV shift, constant or shared factors, third order)
        self.supports_fused = not (config.attn_gate or config.kv_shift or self.const_a or self.const_b or
                                   self.shared_b) and config.tpa_order == 2
        # attention straight from the factors (tpa_kernels/tpa_attention.py) takes T6's plain form
        self.from_factors_ok = self.factor_q and not (config.kv_shift or self.const_a or self.const_b or
                                                      self.shared_b) and config.tpa_order == 2
        if not self.factor_q:  # a standard query is rank-H TPA with A = H * I (decoding); moves with the model
            self.register_buffer("eye_h", (H * torch.eye(H)).view(1, 1, H, H), persistent=False)
        # the fused projection: one (Factor, init bound) per output slice
        official = config.tpa_init == "official"
        xavier = lambda n_out: math.sqrt(6 / (C + n_out))
        parts = [] if self.factor_q else [(Factor("q", "q", (H, D)), xavier(H * D))]  # official c_q: 2-D Xavier
        for n in self.factored:
            R = self.ranks[n]
            if not self.const_a:  # official: xavier_uniform_ on a (C, H, R) view of the weight
                parts.append((Factor("a", n, (H, R)), math.sqrt(6 / (R * (H + C))) if official else xavier(H * R)))
            if not self.const_b and not (self.shared_b and n == "v"):
                for kind, fd in zip("bc", self.fdims):  # official: the (C, R, f) view
                    parts.append((Factor(kind, n, (R, fd)), math.sqrt(6 / (fd * (R + C))) if official else
                                  xavier(R * fd)))
        self.factors = [f for f, _ in parts]
        self.names = [f.name for f in self.factors]
        self.sizes = [math.prod(f.shape) for f in self.factors]
        self.c_fact = Linear(C, sum(self.sizes))
        with torch.no_grad():
            for w, (_, bound) in zip(self.c_fact.weight.split(self.sizes, dim=0), parts):
                w.uniform_(-bound, bound)
        # constant factors, unit variance (the paper's Section 4 writes MHA/MQA/GQA as constant-A TPA)
        if self.const_a:
            self.a_const = nn.ParameterDict({n: nn.Parameter(torch.empty(H, self.ranks[n]).uniform_(-3 ** 0.5, 3 ** 0.5))
                                             for n in self.factored})
        if self.const_b:
            self.b_const = nn.ParameterDict({n: nn.Parameter(torch.empty(self.ranks[n], D).uniform_(-3 ** 0.5, 3 ** 0.5))
                                             for n in self.factored})

    def cache_spec(self):
        return {f.name: f.shape for f in self.factors if f.target in ("k", "v")}

    def pieces(self, x, rope):
        """x (B, T, C) -> (q (B, T, H, D) for tpa_kvonly else None, {name: contextual factor}).

        Factors: a* (B, T, H, R), b* (B, T, R, db or D), c* (B, T, R, dc); b of q and k rotated, except K's
        shared b (it also serves V, so it is rotated when assembled).
        """
        B, T, _ = x.shape
        p = {}
        for f, t in zip(self.factors, self.c_fact(x).split(self.sizes, dim=-1)):
            p[f.name] = t.view(B, T, *f.shape)
        cos, sin = rope[self.rope_dim]
        for name in ("bq", "bk"):
            if name in p and not (name == "bk" and self.shared_b):
                p[name] = apply_rope(p[name], cos, sin)
        q = None
        if not self.factor_q:  # rotated as (H * D / rope_dim) blocks: the same rotation as B_K (third order too)
            q = apply_rope(p.pop("q").view(B, T, -1, self.rope_dim), cos, sin).view(B, T, self.n_head, self.head_dim)
        return q, p

    def assemble(self, p, n, rope):
        """Factors of n in {q, k, v}: A (B|1, T|1, H, R), B (B|1, T|1, R, D); rope: positions of p."""
        R = self.ranks[n]
        a = self.a_const[n].view(1, 1, self.n_head, R) if self.const_a else p["a" + n]
        if self.const_b or (self.shared_b and n != "q"):
            b = self.b_const[n].view(1, 1, R, self.head_dim) if self.const_b else p["bk"]
            if n != "v":
                b = apply_rope(b, *rope)
        else:
            b = p["b" + n]
        if len(self.fdims) == 2:  # third order: vec(b (x) c), b fastest: index = i_c * db + i_b
            b = (p["c" + n].unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)
        return a, b

    def materialize(self, a, b, n):
        """(1/R) A^T B per token: (B, T, H, R) x (B, T, R, D) -> (B, H, T, D), heads first for SDPA (so that
        SDPA's heads-first gradients are not transposed again). On CUDA a Triton op (tpa_kernels/materialize.py)."""
        return tpa_materialize(a, b, 1.0 / self.ranks[n], impl=None if self.materialize_kernel else "ref")

    def forward(self, x, rope, cache=None):
        q, p = self.pieces(x, rope)
        rope_x = rope[self.rope_dim]
        if cache is not None:
            cache.write(**{name: p[name] for name in self.cache_spec()})
            if not cache.fresh:
                kv = {name: cache.read(name) for name in self.cache_spec()}
                return self.output(self.decode(q, p, kv, rope_x, cache), x)
        how = choice("tpa_attention")
        if how in ("fused", "triton") and self.from_factors_ok:  # Q, K, V never written: the kernel forms their tiles
            factors = [t for n in "qkv" for t in self.assemble(p, n, rope_x)]
            return self.output(tpa_attention(*factors, impl="triton" if how == "triton" else None), x)
        if how == "recompute" and torch.is_grad_enabled():
            # keep only the factors for the backward, which builds Q, K, V and runs the attention forward again
            y = torch.utils.checkpoint.checkpoint(self.attend_pieces, q, p, rope_x, use_reentrant=False)
        else:
            y = self.attend_pieces(q, p, rope_x)
        return self.output(y, x)

    def attend_pieces(self, q, p, rope_x):
        """Q, K, V built from the projection's pieces (q: a standard query, or None for a factored one), then
        attention -> (B, T, H, E)."""
        (B, T), H, D = next(iter(p.values())).shape[:2], self.n_head, self.head_dim
        q = self.materialize(*self.assemble(p, "q", rope_x), "q") if q is None else q.transpose(1, 2)
        k, v = (self.materialize(*self.assemble(p, n, rope_x), n).expand(B, H, T, D) for n in "kv")
        if self.shift is not None:
            k, v = self.kv_shift(k, v, heads_first=True)
        return self.attend(q.expand(B, H, T, D), k, v, heads_first=True)

    def decode(self, q, p, kv, rope_x, cache):
        """The new tokens' queries against the whole cache, in factor space (FlashTPA) -> (B, T, H, D)."""
        B, T, M, H = cache.B, cache.T, cache.kv_len, self.n_head
        factors = []
        for n in "kv":
            a, b = self.assemble(kv, n, cache.key_rope[self.rope_dim] if self.const_b or self.shared_b else None)
            a, b = a.expand(B, M, -1, -1), b.expand(B, M, -1, -1)
            if self.shift is not None:  # k'_m = s k_m + (1 - s) k_{m-1}: rank 2R, scaled by 2 to keep 1/R
                s = torch.sigmoid(self.shift[0 if n == "k" else 1]).to(a.dtype).view(1, 1, -1, 1)
                a = torch.cat([2 * s * a, 2 * (1 - s) * shift_right(a)], dim=-1)
                b = torch.cat([b, shift_right(b)], dim=-2)
            factors += [a, b]
        if self.factor_q:
            aq, bq = self.assemble(p, "q", rope_x)
            aq, bq = aq.expand(B, T, -1, -1), bq.expand(B, T, -1, -1)
        else:  # a standard query is rank-H TPA with A = H * I
            aq, bq = self.eye_h.to(q.dtype).expand(B, T, H, H), q
        impl = choice("flashtpa") or pick(bq, T <= 16)  # a caller's choice, else the dispatch (long chunks: reference)
        return flashtpa_decode(aq, bq, *factors, seqlens=cache.seqlens + T, impl=impl)

    def fused_decode(self, x, layer, pos, seqlens, rope, impl):
        """One token's attention at batch 1 as three fused kernels: RMSNorm + the factor projection + RoPE + the
        cache write (linear_factors), FlashTPA with its combine, the output projection + residual; each with
        programmatic dependent launch where the GPU has it. x (C,) the residual stream -> (C,); layer: this layer's
        cache tensors {name: (1, L, ...)}; pos (1,) the token's position, seqlens = pos + 1; rope: (cos, sin)."""
        H, D = self.n_head, self.head_dim
        if self.factor_q:
            q = {"aq": x.new_empty(1, 1, H, self.ranks["q"]), "bq": x.new_empty(1, 1, self.ranks["q"], D)}
        else:
            q = {"q": x.new_empty(1, 1, H, D)}
            q["aq"], q["bq"] = self.eye_h, q["q"]
        # every factor in one kernel: K's and V's into the cache at pos, the query's into q; B_Q, B_K rotated
        rotated = [f.kind == "q" or (f.kind == "b" and f.target != "v") for f in self.factors]
        cached = [f.target in ("k", "v") for f in self.factors]
        linear_factors(x, self.c_fact.weight, [layer.get(n, q.get(n)) for n in self.names], rotated, cached, pos,
                       *rope, norm=True, impl=impl, pdl=True)
        y = flashtpa_decode(q["aq"], q["bq"], layer["ak"], layer["bk"], layer["av"], layer["bv"], seqlens=seqlens,
                            impl=impl, pdl=True)  # (1, 1, H, D)
        return linear_one_row(y.view(-1), self.c_proj.weight, residual=x, impl=impl, pdl=True)

    def attn_flops_per_token(self, T):
        H = self.n_head
        mat = 2 * H * self.head_dim * sum(self.ranks[n] for n in self.factored)  # A^T B products
        if len(self.fdims) == 2:
            mat += sum(self.ranks[n] for n in self.factored) * self.head_dim  # b (x) c
        return mat + self.attn_core_flops(T, self.head_dim, self.head_dim)


ATTENTION = {"mha": GQA, "mqa": GQA, "gqa": GQA, "mla": MLA, "tpa": TPA, "tpa_kvonly": TPA}


# -----------------------------------------------------------------------------
# the model


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = ATTENTION[config.attn](config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache=None):
        x = x + self.attn(rms_norm(x), rope, cache)
        return x + self.mlp(rms_norm(x))

    def fused_decode(self, x, layer, pos, seqlens, rope, impl):
        """One token through the block at batch 1 (attn.supports_fused): the attention's fused kernels, then RMSNorm
        + SwiGLU's input projection, and its output projection + residual. x (C,) -> (C,)."""
        x = self.attn.fused_decode(x, layer, pos, seqlens, rope, impl)
        h = linear_one_row(x, self.mlp.c_fc.weight, norm=True, glu=True, impl=impl, pdl=True)
        return linear_one_row(h, self.mlp.c_proj.weight, residual=x, impl=impl, pdl=True)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # tied embeddings; the shared tensor keeps nn.Linear's U(+-1/sqrt(C)) init, as in the official code
        self.transformer.wte.weight = self.lm_head.weight
        for block in self.transformer.h:  # zero-init output projections (docs/DESIGN.md sec. 1.5)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.rope_dims = sorted({block.attn.rope_dim for block in self.transformer.h})
        self._build_rope()

    def _build_rope(self):
        device = self.lm_head.weight.device
        for dim in self.rope_dims:
            cos, sin = rope_tables(dim, self.config.block_size, self.config.rope_base, device)
            self.register_buffer(f"rope_cos_{dim}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{dim}", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the RoPE tables: rebuild them in fp32 after any cast
        super()._apply(fn, recurse)
        if getattr(self, f"rope_cos_{self.rope_dims[0]}").dtype != torch.float32:
            self._build_rope()
        return self

    def rope_buffers(self, dim):
        """The fp32 RoPE tables (cos, sin) of a rotary dimension, each (block_size, dim/2)."""
        return getattr(self, f"rope_cos_{dim}"), getattr(self, f"rope_sin_{dim}")

    def rope(self, pos):
        """pos: T (positions 0..T-1, a slice of the tables) or a (T,) / (B, T) int tensor of positions
        -> {dim: (cos, sin)}, each (B|1, T, 1, dim/2) fp32."""
        out = {}
        for dim in self.rope_dims:
            cos, sin = self.rope_buffers(dim)
            if isinstance(pos, int):  # a contiguous slice: no gather in the fused RoPE kernels
                cos, sin = cos[:pos], sin[:pos]
            else:
                cos, sin = cos[pos], sin[pos]
            out[dim] = (cos.view(-1, cos.size(-2), 1, cos.size(-1)), sin.view(-1, sin.size(-2), 1, sin.size(-1)))
        return out

    def forward(self, idx, targets=None, all_logits=False, pos=None, cache=None, return_logits=True):
        """idx (B, T) tokens -> (logits, loss).

        With targets (B, T) (-1 = ignore): logits for every position and the mean cross-entropy;
        return_logits=False returns (None, loss), which is faster to differentiate (training and evaluation
        use it): a logits output of a compiled model makes its backward add a zero gradient of the logits' size;
        with autograd on it also never keeps the logits (tpa_kernels.linear_cross_entropy: 1.6 GB less for Small's
        16 x 1024 micro-batch).
        Without: logits of the last position only (B, 1, V), or of every position with all_logits=True.
        pos (T,) or (B, T) overrides the positions 0..T-1. With a KVCache the tokens sit at positions
        cache.seqlens + 0..T-1; they are written to the cache, which then holds T more tokens per row.
        """
        B, T = idx.shape
        if cache is not None:  # an engine.KVCache: the new tokens sit at positions seqlens + 0..T-1
            pos = cache.begin(T)
        elif pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
            pos = T
        rope = self.rope(pos)
        x = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.advance()
        x = rms_norm(x)
        if targets is not None:
            if not return_logits and torch.is_grad_enabled():  # training: the logits become their gradient as
                # the loss reads them, and are never kept (tpa_kernels/cross_entropy.py)
                return None, linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
            logits = self.lm_head(x)
            loss = cross_entropy_loss(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return (logits if return_logits else None), loss
        logits = self.lm_head(x if all_logits else x[:, -1:, :])
        return logits, None

    # -- accounting -------------------------------------------------------------

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def attn_params_per_layer(self):
        return sum(p.numel() for p in self.transformer.h[0].attn.parameters())

    def kv_cache_elems_per_token(self):
        """Elements cached per token over all layers."""
        return sum(block.attn.kv_cache_elems_per_token() for block in self.transformer.h)

    def estimate_mfu(self, tokens_per_s, peak, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over peak FLOP/s (of all devices)."""
        return self.flops_per_token(T) * tokens_per_s / peak

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward) per token at sequence length T (default block_size).

        6 x the weights used in matmuls (every nn.Linear, lm_head included; the embedding lookup is not a
        matmul) plus 3 x each layer's forward attention FLOPs (QK^T and PV over the causal half of the
        T x T matrix, which flash kernels skip, and TPA's factor products).
        """
        T = T or self.config.block_size
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = sum(block.attn.attn_flops_per_token(T) for block in self.transformer.h)
        return 6 * matmul + 3 * attn
