"""
T6 / TPA and its baselines for Hugging Face transformers: the modeling file that `python -m scripts.convert --to=hf`
writes beside an exported checkpoint, for

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

Self-contained (torch and transformers only): it computes what model.py computes (docs/DESIGN.md sec. 1-3), with
the same parameter names, so weights convert both ways without changes. Every mechanism (mha, mqa, gqa, mla, tpa,
tpa_kvonly) and every option (constant or shared factors, third order, output gate, KV shift) is supported.

The cache holds what this repository's cache holds, through transformers' cache API: per layer one packed
"key" and "value" tensor of (B, 1, tokens, features) with GQA's rotated k and v, MLA's normalised latent and
rotated shared key, or TPA's contextual factors (A_K, rotated B_K, A_V, B_V; per token (R_K + R_V)(H + D) values).
Keys and values are formed from the cached entries at every step (attention in PyTorch, not FlashTPA): the memory
claim holds here, the decoding speed of this repository's kernels does not.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import DynamicCache
except ImportError:  # very old transformers: only legacy tuples, so no cache
    DynamicCache = None

# transformers 5 renamed the output's and the forward's past_key_values to cache
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TPAConfig(PretrainedConfig):
    model_type = "tpa_gpt"
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size=50304, block_size=1024, n_layer=12, n_embd=768, n_head=12, head_dim=64, attn="tpa",
                 rope_base=10000.0, n_kv_head=0, q_rank=6, k_rank=2, v_rank=2, tpa_init="official", tpa_const_a=False,
                 tpa_const_b=False, tpa_shared_b=False, tpa_order=2, tpa_db=16, tpa_dc=4, q_lora_rank=512,
                 kv_lora_rank=256, qk_rope_head_dim=32, v_head_dim=64, attn_gate=False, kv_shift=False, **kwargs):
        self.vocab_size, self.block_size, self.n_layer, self.n_embd = vocab_size, block_size, n_layer, n_embd
        self.n_head, self.head_dim, self.attn, self.rope_base = n_head, head_dim, attn, rope_base
        self.n_kv_head = n_kv_head or (n_head if attn == "mha" else 1 if attn == "mqa" else n_kv_head)
        self.q_rank, self.k_rank, self.v_rank, self.tpa_init = q_rank, k_rank, v_rank, tpa_init
        self.tpa_const_a, self.tpa_const_b, self.tpa_shared_b = tpa_const_a, tpa_const_b, tpa_shared_b
        self.tpa_order, self.tpa_db, self.tpa_dc = tpa_order, tpa_db, tpa_dc
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_rope_head_dim, self.v_head_dim = qk_rope_head_dim, v_head_dim
        self.attn_gate, self.kv_shift = attn_gate, kv_shift
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)


def rotate(x, cos, sin):
    """RoPE, this repository's convention: half-split pairs rotated by +theta, fp32 math. x (B, T, *, dim),
    cos / sin (B|1, T, 1, dim/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def materialize(a, b, scale):
    """scale * A^T B per token: (B, T, H, R) x (B, T, R, D) -> (B, H, T, D)."""
    a, b = a.transpose(1, 2), b.unsqueeze(1)
    x = a[..., 0, None] * b[..., 0, :]
    for r in range(1, a.size(-1)):
        x = x + a[..., r, None] * b[..., r, :]
    return x * scale


def shift_right(t, dim):
    return torch.cat([torch.zeros_like(t.narrow(dim, 0, 1)), t.narrow(dim, 0, t.size(dim) - 1)], dim=dim)


class Attention(nn.Module):
    """What every mechanism shares. A mechanism defines entries(x, rope) -> (query, {name: per-token entry}),
    keys_values(entries, key_rope) -> (k, v) of every cached position, both (B, M, Hkv, *), and its scale."""

    def __init__(self, config, n_head, v_dim, n_kv_head=None):
        super().__init__()
        self.n_head, self.v_dim = n_head, v_dim
        self.c_proj = nn.Linear(n_head * v_dim, config.n_embd, bias=False)
        self.gate = nn.Linear(config.n_embd, n_head, bias=False) if config.attn_gate else None
        self.shift = nn.Parameter(torch.full((2, n_kv_head or n_head), 3.0)) if config.kv_shift else None
        self.scale = None

    def forward(self, x, rope_q, rope_k, mask, layer_idx, cache):
        q, new = self.entries(x, rope_q)
        names = list(new)
        if cache is not None:  # pack the new entries, append them, unpack every position's
            B, T = x.shape[:2]
            flat = [new[n].reshape(B, T, -1) for n in names]
            half = self.key_entries
            k_pack = torch.cat(flat[:half], dim=-1)[:, None]
            v_pack = torch.cat(flat[half:], dim=-1)[:, None] if half < len(flat) else k_pack[..., :0]
            k_pack, v_pack = cache.update(k_pack, v_pack, layer_idx)
            packed = torch.cat([k_pack, v_pack], dim=-1)[:, 0]  # (B, M, features)
            sizes = [math.prod(new[n].shape[2:]) for n in names]
            new = {n: t.view(B, t.size(1), *new[n].shape[2:]) for n, t in zip(names, packed.split(sizes, dim=-1))}
        k, v = self.keys_values(new, rope_k)  # (B, M, Hkv, *)
        if self.shift is not None:  # k_m <- s k_m + (1 - s) k_{m-1}, over every position from the first
            s = torch.sigmoid(self.shift).to(k.dtype)
            k = s[0].view(1, 1, -1, 1) * k + (1 - s[0].view(1, 1, -1, 1)) * shift_right(k, 1)
            v = s[1].view(1, 1, -1, 1) * v + (1 - s[1].view(1, 1, -1, 1)) * shift_right(v, 1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=k.size(1) != q.size(1)).transpose(1, 2)  # (B, T, H, E)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).unsqueeze(-1)
        return self.c_proj(y.flatten(2))


class GQA(Attention):
    key_entries = 1  # cache: k | v

    def __init__(self, config):
        super().__init__(config, config.n_head, config.head_dim, config.n_kv_head)
        self.n_kv_head, self.head_dim = config.n_kv_head, config.head_dim
        self.rope_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)

    def entries(self, x, rope):
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, G * D, G * D], dim=-1)
        cos, sin = rope[self.rope_dim]
        q, k = rotate(q.view(B, T, H, D), cos, sin), rotate(k.view(B, T, G, D), cos, sin)
        return q, {"k": k, "v": v.view(B, T, G, D)}

    def keys_values(self, e, key_rope):
        return e["k"], e["v"]


class MLA(Attention):
    key_entries = 1  # cache: c_kv | k_pe

    def __init__(self, config):
        super().__init__(config, config.n_head, config.v_head_dim)
        C, H = config.n_embd, config.n_head
        self.head_dim, self.rope_dim = config.head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        qk_dim = config.head_dim + config.qk_rope_head_dim
        if self.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(C, self.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(C, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (config.head_dim + config.v_head_dim), bias=False)
        self.scale = qk_dim ** -0.5

    def entries(self, x, rope):
        B, T, _ = x.shape
        H, D, dR = self.n_head, self.head_dim, self.rope_dim
        cos, sin = rope[dR]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank > 0 else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, D + dR).split([D, dR], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dR], dim=-1)
        k_pe = rotate(k_pe.view(B, T, 1, dR), cos, sin).view(B, T, dR)
        return torch.cat([q_nope, rotate(q_pe, cos, sin)], dim=-1), {"c_kv": self.kv_a_layernorm(c_kv), "k_pe": k_pe}

    def keys_values(self, e, key_rope):
        c_kv, k_pe = e["c_kv"], e["k_pe"]
        B, M, _ = c_kv.shape
        H, D = self.n_head, self.head_dim
        k_nope, v = self.kv_b_proj(c_kv).view(B, M, H, D + self.v_dim).split([D, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_pe[:, :, None].expand(B, M, H, self.rope_dim)], dim=-1), v


class TPA(Attention):
    """Contextual factors (docs/DESIGN.md sec. 1.1-1.3); the cache holds the K and V factors."""

    def __init__(self, config):
        H, D, C = config.n_head, config.head_dim, config.n_embd
        super().__init__(config, H, D)
        self.head_dim, self.factor_q = D, config.attn == "tpa"
        self.const_a, self.const_b, self.shared_b = config.tpa_const_a, config.tpa_const_b, config.tpa_shared_b
        self.fdims = (config.tpa_db, config.tpa_dc) if config.tpa_order == 3 else (D,)
        self.rope_dim = self.fdims[0]
        self.ranks = {"q": config.q_rank, "k": config.k_rank, "v": config.v_rank}
        self.factored = "qkv" if self.factor_q else "kv"
        parts = [] if self.factor_q else [("q", H * D)]
        for n in self.factored:
            R = self.ranks[n]
            if not self.const_a:
                parts.append(("a" + n, H * R))
            if not self.const_b and not (self.shared_b and n == "v"):
                parts += [(f + n, R * fd) for f, fd in zip("bc", self.fdims)]
        self.names, self.sizes = [p[0] for p in parts], [p[1] for p in parts]
        self.c_fact = nn.Linear(C, sum(self.sizes), bias=False)
        if self.const_a:
            self.a_const = nn.ParameterDict({n: nn.Parameter(torch.zeros(H, self.ranks[n])) for n in self.factored})
        if self.const_b:
            self.b_const = nn.ParameterDict({n: nn.Parameter(torch.zeros(self.ranks[n], D)) for n in self.factored})
        self.cached = [n for n in self.names if n[1:] == "k"] + [n for n in self.names if n[1:] == "v"]
        self.key_entries = sum(n[1:] == "k" for n in self.names)

    def entries(self, x, rope):
        B, T, _ = x.shape
        p = {}
        for name, t in zip(self.names, self.c_fact(x).split(self.sizes, dim=-1)):
            R = self.ranks.get(name[1:], 1)
            p[name] = t.view(B, T, self.n_head, R) if name[0] == "a" else t.view(B, T, R, -1)
        cos, sin = rope[self.rope_dim]
        for name in ("bq", "bk"):
            if name in p and not (name == "bk" and self.shared_b):
                p[name] = rotate(p[name], cos, sin)
        H, D = self.n_head, self.head_dim
        if self.factor_q:
            q = materialize(*self.assemble(p, "q", (cos, sin)), 1.0 / self.ranks["q"]).transpose(1, 2)
        else:
            q = rotate(p.pop("q").view(B, T, -1, self.rope_dim), cos, sin).view(B, T, H, D)
        return q, {n: p[n] for n in self.cached}

    def assemble(self, p, n, rope):
        R = self.ranks[n]
        a = self.a_const[n].view(1, 1, self.n_head, R) if self.const_a else p["a" + n]
        if self.const_b or (self.shared_b and n != "q"):
            b = self.b_const[n].view(1, 1, R, self.head_dim) if self.const_b else p["bk"]
            if n != "v":
                b = rotate(b, *rope)
        else:
            b = p["b" + n]
        if len(self.fdims) == 2:  # third order: vec(b (x) c), b fastest
            b = (p["c" + n].unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)
        return a, b

    def keys_values(self, e, key_rope):
        rope = key_rope[self.rope_dim]
        M = next(iter(e.values())).size(1)
        kv = []
        for n in "kv":
            a, b = self.assemble(e, n, rope)
            B = max(a.size(0), b.size(0))
            kv.append(materialize(a.expand(B, M, -1, -1), b.expand(B, M, -1, -1), 1.0 / self.ranks[n]).transpose(1, 2))
        return kv


ATTENTION = {"mha": GQA, "mqa": GQA, "gqa": GQA, "mla": MLA, "tpa": TPA, "tpa_kvonly": TPA}


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = ATTENTION[config.attn](config)
        hidden = int(8 * config.n_embd / 3)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=False)
        self.mlp.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x, rope_q, rope_k, mask, layer_idx, cache):
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)), rope_q, rope_k, mask, layer_idx, cache)
        g, u = self.mlp.c_fc(F.rms_norm(x, (x.size(-1),))).chunk(2, dim=-1)
        return x + self.mlp.c_proj(F.silu(g) * u)


class TPAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TPAConfig
    base_model_prefix = "transformer"
    # transformers 5 maps tied parameters (target: source), 4 lists them
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"} \
        if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"]
    _supports_cache_class = True

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd),
                                              h=nn.ModuleList([Block(config) for _ in range(config.n_layer)])))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rope_dims = sorted({block.attn.rope_dim for block in self.transformer.h})
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        pass  # weights come from a checkpoint; this class does not train from scratch differently from model.py

    def rope(self, pos):
        """pos (B, T) -> {dim: (cos, sin)}, each (B, T, 1, dim/2) in fp32."""
        out = {}
        for dim in self.rope_dims:
            inv = 1.0 / (self.config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
            f = pos.to(torch.float32)[..., None] * inv
            out[dim] = (f.cos()[:, :, None], f.sin()[:, :, None])
        return out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None and DynamicCache is not None:
            cache = DynamicCache()
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        M = past + T
        if position_ids is None:
            position_ids = torch.arange(past, M, device=x.device)[None].expand(B, T)
        query_pos = position_ids.expand(B, T)
        # the keys' positions: with a padding mask (left padding in batched generation), the running count of real
        # tokens, as transformers numbers the queries; without one, the queries' own (no cache) or 0..M-1
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.size(1) == M:
            key_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, M)
        else:
            key_pos = query_pos if past == 0 else torch.arange(M, device=x.device)[None].expand(B, M)
            keep = None
        step_q = past + torch.arange(T, device=x.device)
        step_k = torch.arange(M, device=x.device)
        mask = (key_pos[:, None, None, :] <= query_pos[:, None, :, None]) & (step_k <= step_q[:, None])  # (B, 1, T, M)
        if keep is not None:
            mask = mask & keep
        mask = mask | (step_k == step_q[:, None])  # a padding query sees itself: no row without keys (no nan)
        rope_q, rope_k = self.rope(query_pos), self.rope(key_pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope_q, rope_k, mask, i, cache)
        x = F.rms_norm(x, (x.size(-1),))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict else out.to_tuple()
