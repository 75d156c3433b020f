"""Model registry: every variant trains, is causal, has the paper's sizes, and equals its math."""

import math

import pytest
import torch

from model import ATTENTION, GPT, GPTConfig, TPA, GQA, Linear, apply_rope, model_config

V = 256  # a small vocabulary keeps the tiny models fast

TPA_OPTIONS = [dict(tpa_const_a=True), dict(tpa_const_b=True), dict(tpa_shared_b=True), dict(tpa_order=3),
               dict(tpa_init="xavier")]
COMMON_OPTIONS = [{}, dict(attn_gate=True), dict(kv_shift=True), dict(attn_gate=True, kv_shift=True)]
VARIANTS = [(a, o) for a in ATTENTION for o in COMMON_OPTIONS]
VARIANTS += [(a, o) for a in ("tpa", "tpa_kvonly") for o in TPA_OPTIONS]
VARIANTS += [("tpa", dict(tpa_order=3, kv_shift=True, attn_gate=True)), ("mla", dict(q_lora_rank=0))]
IDS = [a + "".join(f"-{k}={v}" for k, v in o.items()) for a, o in VARIANTS]


def tiny(attn, **opts):
    torch.manual_seed(0)
    return GPT(model_config("tiny", attn, vocab_size=V, **opts))


def randomize(model, std=0.2):
    """Zero-init projections hide attention entirely at init: give every weight random values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


@pytest.mark.parametrize("attn,opts", VARIANTS, ids=IDS)
def test_forward_backward(attn, opts):
    model = tiny(attn, **opts)
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 24, V)
    none, loss2 = model(idx, targets, return_logits=False)  # training's call: the same loss, no logits
    assert none is None and loss2.item() == loss.item()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 1.0, loss.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # with random weights every parameter gets a non-zero gradient (nothing is dead code)
    model.zero_grad()
    randomize(model)
    model(idx, targets)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_training_loss_path(impl, monkeypatch):
    """Training's call (return_logits=False, autograd on) goes through tpa_kernels.linear_cross_entropy (the logits
    never kept; "triton": the kernel, in the interpreter on CPU): the same loss and gradients as the logits path."""
    if impl == "triton":
        pytest.importorskip("triton")
    import model as model_module
    from tpa_kernels import linear_cross_entropy
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return linear_cross_entropy(*args, impl=impl, **kwargs)
    monkeypatch.setattr(model_module, "linear_cross_entropy", spy)
    model = randomize(tiny("tpa"))
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    targets[0, :5] = -1  # ignored positions
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        loss = model(idx, targets, return_logits=return_logits)[1]
        (3 * loss).backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 1  # the training call only
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        model(idx, targets, return_logits=False)
    assert len(calls) == 1


@pytest.mark.parametrize("attn,opts", VARIANTS, ids=IDS)
def test_causal(attn, opts):
    model = randomize(tiny(attn, **opts))
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx, all_logits=True)
    for t in (5, 19):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % V
        logits2, _ = model(idx2, all_logits=True)
        torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-5)
        assert (logits2[:, t] - logits[:, t]).abs().max() > 1e-4  # the changed token does matter


@pytest.mark.parametrize("n_in,n_out", [(20, 13), (21, 16), (16, 980), (2730, 24)])
def test_linear_alignment_padding(n_in, n_out):
    """Many rows go through a GEMM with both feature counts padded to a multiple of 8 (cuBLAS's fast kernels need
    aligned rows): the same outputs and gradients as F.linear, the weight's shape unchanged, the output sliced."""
    lin = Linear(n_in, n_out)
    assert lin.weight.shape == (n_out, n_in) and (lin.pad_in, lin.pad_out) == (-n_in % 8, -n_out % 8)
    for rows in (3, 600):  # a few rows (decoding) take the plain product
        x = torch.randn(2, rows // 2 if rows > 3 else rows, n_in, requires_grad=True)
        y = lin(x)
        ref_x = x.detach().clone().requires_grad_()
        ref = torch.nn.functional.linear(ref_x, lin.weight.detach().clone().requires_grad_())
        assert y.shape == ref.shape
        if rows > 3 and lin.pad_out:  # the padded product's rows, sliced
            assert y.stride(-2) == n_out + lin.pad_out
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.weight.grad, g.flatten(0, 1).T @ x.detach().flatten(0, 1), rtol=1e-4, atol=1e-4)
        lin.weight.grad = None


def test_logits_shapes_and_block_size():
    model = tiny("tpa")
    idx = torch.randint(0, V, (3, 10))
    assert model(idx)[0].shape == (3, 1, V)
    assert model(idx, all_logits=True)[0].shape == (3, 10, V)
    full = model(idx, all_logits=True)[0]
    torch.testing.assert_close(model(idx)[0][:, 0], full[:, -1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_rope_tables_stay_fp32():
    model = tiny("mla").to(torch.bfloat16)
    for dim in model.rope_dims:
        cos = getattr(model, f"rope_cos_{dim}")
        assert cos.dtype == torch.float32
        torch.testing.assert_close(cos, torch.outer(torch.arange(256.0), 10000 ** (-torch.arange(0, dim, 2) / dim)).cos())
    assert model.transformer.h[0].attn.c_proj.weight.dtype == torch.bfloat16


# -- sizes (docs/DESIGN.md sec. 3.1, sec. 4) ---------------------------------------------------------------------------

PARAMS_M = {  # the official modules' totals, millions
    "small": dict(mha=123.57, mqa=123.57, gqa=123.57, mla=123.09, tpa_kvonly=124.38, tpa=124.34),
    "medium": dict(mha=353.45, mqa=353.45, gqa=353.45, mla=353.86, tpa_kvonly=353.16, tpa=353.99),
    "large": dict(mha=772.13, mqa=772.13, gqa=772.13, mla=773.63, tpa_kvonly=773.05, tpa=773.70),
    "xl": dict(mha=1554.89, mqa=1554.89, gqa=1554.89, mla=1558.37, tpa_kvonly=1559.50, tpa=1555.81),
}
ATTN_M = {  # the official modules' attention parameters per layer, millions
    "small": dict(mha=2.359, mla=2.319, tpa_kvonly=2.427, tpa=2.424),
    "medium": dict(mha=4.194, mla=4.211, tpa_kvonly=4.182, tpa=4.217),
    "large": dict(mha=6.554, mla=6.595, tpa_kvonly=6.579, tpa=6.597),
    "xl": dict(mha=10.24, mla=10.31, tpa_kvonly=10.34, tpa=10.26),
}
KV_ELEMS = {  # per token per layer (docs/DESIGN.md sec. 3.1)
    "small": dict(mha=1536, mqa=128, gqa=256, mla=288, tpa_kvonly=344, tpa=392),
    "medium": dict(mha=2048, mqa=128, gqa=256, mla=288, tpa_kvonly=372, tpa=444),
    "large": dict(mha=2560, mqa=128, gqa=256, mla=288, tpa_kvonly=404, tpa=500),
    "xl": dict(mha=3200, mqa=128, gqa=256, mla=288, tpa_kvonly=444, tpa=568),
}


@pytest.mark.parametrize("size", list(PARAMS_M))
def test_paper_sizes(size):
    for attn, millions in PARAMS_M[size].items():
        with torch.device("meta"):
            model = GPT(model_config(size, attn))
        assert round(model.num_params() / 1e6, 2) == millions, (size, attn, model.num_params())
        attn_params = model.attn_params_per_layer()
        ref = ATTN_M[size].get(attn, ATTN_M[size]["mha"])
        assert abs(attn_params / 1e6 - ref) < 0.006, (size, attn, attn_params)
        # the matching rule: MQA/GQA have exactly MHA's parameters, MLA within 1%, TPA within 3%
        tol = {"mha": 0, "mqa": 0, "gqa": 0, "mla": 0.01}.get(attn, 0.03)
        assert abs(model.num_params() / (PARAMS_M[size]["mha"] * 1e6) - 1) <= tol + 5e-5, (size, attn)
        if attn in ("mqa", "gqa"):
            assert attn_params == 4 * model.config.n_embd ** 2
        assert model.transformer.h[0].attn.kv_cache_elems_per_token() == KV_ELEMS[size][attn]
        assert model.kv_cache_elems_per_token() == KV_ELEMS[size][attn] * model.config.n_layer


def test_medium_tpa_kv_bytes():
    # medium TPA caches 20.8 KiB per token in bf16, XL 53.2 KiB
    for size, kib in (("medium", 20.8), ("xl", 53.2)):
        with torch.device("meta"):
            model = GPT(model_config(size, "tpa"))
        assert round(2 * model.kv_cache_elems_per_token() / 1024, 1) == kib


def test_variant_cache_formulas():
    H, D, Rk, Rv = 4, 16, 2, 3
    cfg = dict(v_rank=Rv)
    assert tiny("tpa", **cfg).transformer.h[0].attn.kv_cache_elems_per_token() == (Rk + Rv) * (H + D)
    assert tiny("tpa", tpa_const_a=True, **cfg).transformer.h[0].attn.kv_cache_elems_per_token() == (Rk + Rv) * D
    assert tiny("tpa", tpa_const_b=True, **cfg).transformer.h[0].attn.kv_cache_elems_per_token() == (Rk + Rv) * H
    assert tiny("tpa", tpa_shared_b=True).transformer.h[0].attn.kv_cache_elems_per_token() == 4 * H + 2 * D
    assert tiny("tpa", tpa_order=3, **cfg).transformer.h[0].attn.kv_cache_elems_per_token() == (Rk + Rv) * (H + 4 + 4)


def test_flops_per_token_by_hand():
    with torch.device("meta"):
        model = GPT(model_config("small", "mha"))
    d, L, T = 768, 12, 1024
    matmul = L * (4 * d * d + 3 * d * 2048) + 50304 * d
    attn = L * 12 * (64 + 64) * (T + 1)  # forward QK^T + PV over the causal half
    assert model.flops_per_token(T) == 6 * matmul + 3 * attn
    with torch.device("meta"):
        tpa = GPT(model_config("small", "tpa"))
    H, R = 34, 6 + 2 + 2
    matmul = L * (d * R * (H + 64) + H * 64 * d + 3 * d * 2048) + 50304 * d
    attn = L * (2 * H * 64 * R + H * 128 * (T + 1))
    assert tpa.flops_per_token(T) == 6 * matmul + 3 * attn


# -- TPA math ----------------------------------------------------------------------------------------


def identity_rope(model, T):
    return {dim: (torch.ones(1, T, 1, dim // 2), torch.zeros(1, T, 1, dim // 2)) for dim in model.rope_dims}


def tpa_qkv(attn, x, rope):
    """Materialised q, k, v (B, T, H, D) of a TPA layer."""
    q, p = attn.pieces(x, rope)
    r = rope[attn.rope_dim]
    shape = (x.size(0), x.size(1), attn.n_head, attn.head_dim)
    if q is None:
        q = attn.materialize(*attn.assemble(p, "q", r), "q").transpose(1, 2)
    k, v = (attn.materialize(*attn.assemble(p, n, r), n).transpose(1, 2).expand(shape) for n in "kv")
    return q.expand(shape), k, v


@pytest.mark.parametrize("opts", [{}, dict(tpa_order=3), dict(attn="tpa_kvonly"), dict(tpa_const_b=True),
                                  dict(tpa_shared_b=True), dict(attn="tpa_kvonly", tpa_order=3)])
def test_tpa_rope_on_b_equals_rope_on_qk(opts):
    opts = dict(opts)
    model = randomize(tiny(opts.pop("attn", "tpa"), **opts))
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 12, 64)
    pos = torch.arange(12)
    q_rot, k_rot, v_rot = tpa_qkv(attn, x, model.rope(pos))
    q_raw, k_raw, v_raw = tpa_qkv(attn, x, identity_rope(model, 12))
    cos, sin = model.rope(pos)[attn.rope_dim]
    # third order: the db-dim RoPE on each of the dc blocks of d_h = I_dc (x) R_t (Theorem C.1)
    rot = lambda t: apply_rope(t.reshape(2, 12, -1, attn.rope_dim), cos, sin).reshape(t.shape)
    torch.testing.assert_close(q_rot, rot(q_raw))
    torch.testing.assert_close(k_rot, rot(k_raw))
    torch.testing.assert_close(v_rot, v_raw)
    # and relative positions: shifting every position by 7 leaves q.k unchanged
    q7, k7, _ = tpa_qkv(attn, x, model.rope(pos + 7))
    torch.testing.assert_close(torch.einsum("bthd,bshd->bhts", q7, k7),
                               torch.einsum("bthd,bshd->bhts", q_rot, k_rot), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_gqa_family_is_constant_a_tpa(n_kv_head):
    """docs/DESIGN.md sec. 1.4 (paper Section 4): MHA / GQA / MQA are TPA with constant one-hot / group-mask /
    all-ones A factors."""
    H, G = 4, n_kv_head
    attn = {4: "mha", 2: "gqa", 1: "mqa"}[G]
    gqa_model = randomize(tiny(attn, n_kv_head=G if attn == "gqa" else 0))
    tpa_model = tiny("tpa", tpa_const_a=True, q_rank=H, k_rank=G, v_rank=G)
    gqa, tpa = gqa_model.transformer.h[0].attn, tpa_model.transformer.h[0].attn
    assert isinstance(gqa, GQA) and isinstance(tpa, TPA)
    with torch.no_grad():
        tpa.c_fact.weight.copy_(gqa.c_attn.weight)  # [W_q; W_k; W_v] = [B_q; B_k; B_v] projections
        tpa.c_proj.weight.copy_(gqa.c_proj.weight)
        tpa.a_const["q"].copy_(H * torch.eye(H))  # a_i = h e_i
        group = torch.arange(H) // (H // G)  # query head h reads KV head h // (H/G)
        for n in "kv":
            tpa.a_const[n].copy_(G * torch.nn.functional.one_hot(group, G).float())  # a_j = G mask_j
    x = torch.randn(2, 10, 64)
    rope = gqa_model.rope(torch.arange(10))
    torch.testing.assert_close(tpa(x, rope), gqa(x, rope), rtol=1e-5, atol=1e-5)


def test_tpa_materialized_qkv_by_hand():
    """The fused projection and the head-major A layout give Q = (1/R) sum_r a_r (x) b_r (docs/DESIGN.md sec. 1.1)."""
    model = randomize(tiny("tpa"))
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 3, 64)
    W = dict(zip(attn.names, attn.c_fact.weight.split(attn.sizes, dim=0)))
    H, D, R = 4, 16, 6
    a = (x @ W["aq"].T).view(1, 3, H, R)  # output index h * R + r
    b = (x @ W["bq"].T).view(1, 3, R, D)  # output index r * D + j
    q = sum(a[..., r, None] * b[..., r, None, :] for r in range(R)) / R
    torch.testing.assert_close(tpa_qkv(attn, x, identity_rope(model, 3))[0], q)


def test_tpa_init_bounds():
    """docs/DESIGN.md sec. 1.5: the official 3-D-view Xavier bounds on T6-small; true 2-D Xavier as the option."""
    for init, bounds in (("official", dict(aq=0.0353, ak=0.0612, bq=0.0110)),
                         ("xavier", dict(aq=math.sqrt(6 / (768 + 204)), ak=math.sqrt(6 / (768 + 68)),
                                         bq=math.sqrt(6 / (768 + 384))))):
        torch.manual_seed(0)
        attn = TPA(model_config("small", "tpa", tpa_init=init))
        W = dict(zip(attn.names, attn.c_fact.weight.split(attn.sizes, dim=0)))
        for name, bound in bounds.items():
            w = W[name]
            assert w.abs().max() <= bound + 1e-4 and w.abs().max() > 0.98 * bound, (init, name, w.abs().max())


def test_mla_settings_reach_the_model():
    """The official repo dropped the MLA dims from its configs (docs/DESIGN.md sec. 4); here every one is used."""
    model = GPT(model_config("tiny", "mla", vocab_size=V, q_lora_rank=24, kv_lora_rank=12,
                             qk_rope_head_dim=6, v_head_dim=10, head_dim=8))
    a = model.transformer.h[0].attn
    assert a.q_a_proj.weight.shape == (24, 64)
    assert a.q_b_proj.weight.shape == (4 * (8 + 6), 24)
    assert a.kv_a_proj_with_mqa.weight.shape == (12 + 6, 64)
    assert a.kv_b_proj.weight.shape == (4 * (8 + 10), 12)
    assert a.c_proj.weight.shape == (64, 4 * 10)
    assert a.kv_cache_elems_per_token() == 12 + 6
    assert a.scale == (8 + 6) ** -0.5
    assert model(torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 5)))[1].isfinite()


# -- configuration errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(attn="tpa_kv_only"), "did you mean 'tpa_kvonly'"),
    (dict(attn="gqa", n_head=6, n_kv_head=4), "n_head=6 is not divisible by n_kv_head=4"),
    (dict(attn="mha", n_kv_head=2), "use attn='gqa'"),
    (dict(head_dim=15), "head_dim=15 is odd"),
    (dict(q_rank=0), "q_rank=0 must be >= 1"),
    (dict(attn="tpa_kvonly", k_rank=0), "k_rank=0 must be >= 1"),
    (dict(tpa_order=3, tpa_db=4, tpa_dc=3, head_dim=16), "tpa_db \\* tpa_dc == head_dim"),
    (dict(tpa_order=3, tpa_db=3, tpa_dc=4, head_dim=12), "tpa_db=3 must be even"),
    (dict(tpa_const_a=True, tpa_const_b=True), "cannot be combined"),
    (dict(tpa_shared_b=True, k_rank=2, v_rank=3), "k_rank == v_rank"),
    (dict(attn="mha", tpa_const_a=True), "only apply to attn='tpa'"),
    (dict(tpa_init="kaiming"), "choose 'official' or 'xavier'"),
    (dict(attn="mla", qk_rope_head_dim=5), "qk_rope_head_dim=5 must be even"),
    (dict(n_layer=0), "n_layer=0 must be >= 1"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_model_config_errors():
    with pytest.raises(ValueError, match="did you mean 'small'"):
        model_config("smal", "tpa")
    with pytest.raises(ValueError, match="did you mean"):
        model_config("tiny", "tpa", n_heads=4)
    assert model_config("small", "gqa").n_kv_head == 2
    assert model_config("small", "mqa").n_kv_head == 1
    assert model_config("small", "mha").n_kv_head == 12
    assert model_config("small", "mha", n_head=None).n_head == 12  # None means "from the table"


@pytest.mark.parametrize("opts", [{}, dict(kv_shift=True, attn_gate=True), dict(tpa_order=3)],
                         ids=["t6", "kv_shift-gate", "order3"])
@pytest.mark.parametrize("attn", ["tpa", "tpa_kvonly"])
def test_tpa_recompute_keeps_less_and_changes_nothing(attn, opts, monkeypatch):
    """overrides(tpa_attention="recompute"): the backward builds Q, K, V and runs attention again (each layer's
    attend_pieces runs twice) instead of keeping them, so the tensors autograd keeps shrink by at least Q, K and V
    per layer; loss and every gradient are the materialising path's. Without autograd nothing is recomputed."""
    from tpa_kernels.dispatch import overrides
    calls = []
    real = TPA.attend_pieces
    monkeypatch.setattr(TPA, "attend_pieces", lambda self, *a: calls.append(1) or real(self, *a))
    model = randomize(tiny(attn, **opts))
    B, T, cfg = 2, 24, model.config
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    runs = {}
    for how in (None, "recompute"):
        kept = {}

        def pack(t):
            kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t
        model.zero_grad()
        calls.clear()
        with overrides(tpa_attention=how), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx, idx)[1]
        loss.backward()
        runs[how] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept.values())
        assert len(calls) == cfg.n_layer * (2 if how else 1)
    qkv_bytes = 3 * B * T * cfg.n_head * cfg.head_dim * 4 * cfg.n_layer
    assert runs["recompute"][2] <= runs[None][2] - qkv_bytes, (runs["recompute"][2], runs[None][2], qkv_bytes)
    assert runs["recompute"][0] == pytest.approx(runs[None][0], rel=1e-6)
    for n, g in runs[None][1].items():
        torch.testing.assert_close(runs["recompute"][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
    calls.clear()
    with overrides(tpa_attention="recompute"), torch.no_grad():
        model(idx, idx)
    assert len(calls) == cfg.n_layer
