"""FlashTPA decode: the Triton kernel (interpreter on CPU) and both PyTorch references against fp64.

Tolerance in FlashAttention's style: max|kernel - ref_fp64| <= 2 * max|ref_same_precision - ref_fp64| + atol.
bf16 is checked on the GPU by benchmarks/bench_decode.py (the interpreter emulates bf16 wrongly).
"""

import math

import pytest
import torch

from tpa_kernels import flashtpa_decode, flashtpa_decode_einsum, flashtpa_decode_ref
from tpa_kernels.flashtpa import HAS_TRITON, flashtpa_decode_triton
from conftest import assert_close_to_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def factors(B, N, M, H, Rq, Rk, Rv, D, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return [r(B, N, H, Rq), r(B, N, Rq, D), r(B, M, H, Rk), r(B, M, Rk, D), r(B, M, H, Rv), r(B, M, Rv, E)]


def check(t64, seqlens, dtype, atol, **kw):
    ref64 = flashtpa_decode_ref(*t64, seqlens=seqlens)
    low = [x.to(dtype).to(DEVICE) for x in t64]
    seq = None if seqlens is None else seqlens.to(DEVICE)
    out = flashtpa_decode_triton(*low, seqlens=seq, **kw).double().cpu()
    assert out.shape == ref64.shape and torch.isfinite(out).all()
    assert_close_to_reference(out, ref64, flashtpa_decode_ref(*low, seqlens=seq), atol=atol, name="FlashTPA")
    return out


CASES = [  # B, N, M, H, (Rq, Rk, Rv), D, E, ragged
    (2, 1, 1, 34, (6, 2, 2), 64, 64, False),
    (2, 1, 127, 34, (6, 2, 2), 64, 64, True),
    (1, 1, 339, 34, (16, 1, 1), 64, 64, False),
    (3, 4, 339, 34, (16, 1, 1), 64, 64, True),
    (2, 2, 1000, 34, (6, 2, 2), 64, 64, True),
    (1, 16, 200, 47, (6, 2, 2), 64, 64, True),
    (2, 1, 130, 5, (3, 3, 1), 128, 64, True),
    (1, 3, 77, 61, (1, 1, 1), 64, 128, False),
    (2, 2, 70, 4, (4, 16, 32), 32, 16, True),  # high K/V ranks: 2 positions per block (the tiles' row budget)
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}N{c[1]}M{c[2]}H{c[3]}R{''.join(map(str, c[4]))}D{c[5]}E{c[6]}" for c in CASES])
def test_kernel_matches_reference(case, dtype):
    B, N, M, H, (Rq, Rk, Rv), D, E, ragged = case
    t = factors(B, N, M, H, Rq, Rk, Rv, D, E)
    seqlens = torch.tensor([max(N, M - 37 * i) for i in range(B)]) if ragged else None
    check(t, seqlens, dtype, atol=1e-6 if dtype == torch.float32 else 1e-4)


@needs_triton
@pytest.mark.parametrize("case", [(2, 1, 300, 34, (6, 2, 2), 64, 64, True), (1, 1, 339, 34, (16, 1, 1), 64, 64, False)],
                         ids=["rank2", "rank1"])
def test_a_gpu_with_less_shared_memory_gets_the_smallest_tiles(case, monkeypatch):
    """A launch that needs more shared memory than the GPU has (Triton's OutOfResources at the first launch) runs
    again with the smallest tiles, unpipelined, with one warning; the result is the reference's."""
    import warnings

    import tpa_kernels.flashtpa as F
    from triton.runtime.errors import OutOfResources
    real, blocks = F._flashtpa_decode_kernel, []

    class SmallGPU:  # 16-position blocks without pipelining fit; anything larger does not
        def __getitem__(self, grid):
            def launch(*args, **kw):
                blocks.append((kw["BLOCK_M"], kw["num_stages"]))
                if kw["BLOCK_M"] > 16 or kw["num_stages"] > 1:
                    raise OutOfResources(kw["BLOCK_M"] * 3072, 48 * 1024, "shared memory")
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(F, "_flashtpa_decode_kernel", SmallGPU())
    monkeypatch.setattr(F, "_SMALL_TILES_WARNED", set())
    B, N, M, H, (Rq, Rk, Rv), D, E, ragged = case
    t = factors(B, N, M, H, Rq, Rk, Rv, D, E)
    seqlens = torch.tensor([M - 37 * i for i in range(B)]) if ragged else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(t, seqlens, torch.float16, atol=1e-4)
        check(t, seqlens, torch.float16, atol=1e-4)
    assert blocks[0] != (16, 1) and blocks[1] == (16, 1) and blocks[-1] == (16, 1)
    assert [str(w.message) for w in caught if "smallest tiles" in str(w.message)] == [
        f"FlashTPA: {OutOfResources(blocks[0][0] * 3072, 48 * 1024, 'shared memory')}; this GPU runs the kernel "
        "with the smallest tiles (slower)"]


@needs_triton
def test_any_strides_and_splits():
    B, N, M, H, Rq, Rk, Rv, D = 2, 2, 150, 12, 4, 2, 2, 64
    t = factors(B, N, M, H, Rq, Rk, Rv, D, D, seed=3)
    # rank-major A factors and a cache larger than M, viewed through slices: nothing is contiguous
    ak = torch.randn(B, M + 9, Rk, H, dtype=torch.float64)[:, :M].transpose(2, 3)
    bv = torch.randn(B, M, D, Rv, dtype=torch.float64).transpose(2, 3)
    t[2], t[5] = ak, bv
    assert not ak.is_contiguous() and not bv.is_contiguous()
    for splits in (1, 3, 10):
        check(t, torch.tensor([150, 90]), torch.float32, atol=1e-6, num_splits=splits, block_m=16)
    # splits past the shorter sequence's end; the combine in one pass and in chunks of 32 splits (69 > 32)
    t = factors(2, 1, 1100, 3, 2, 1, 1, 16, 16, seed=4)
    for chunk in (512, 32):
        check(t, torch.tensor([1100, 300]), torch.float32, atol=1e-6, num_splits=69, block_m=16,
              combine_block_s=chunk, combine_block_e=8)


LOOP_FORMS = {"prefetch": dict(prefetch=True, a_dot=False, per_rank=False),
              "pipeliner": dict(prefetch=False, a_dot=False, per_rank=False),
              "prefetch_a_dot": dict(prefetch=True, a_dot=True, per_rank=False),
              "a_dot": dict(prefetch=False, a_dot=True, per_rank=False),
              "per_rank": dict(per_rank=True)}


def position_minor(t):
    """The same factors with A_K and A_V stored (B, H, R, M), viewed (B, M, H, R): stride 1 along positions."""
    t = list(t)
    for i in (2, 4):
        t[i] = t[i].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return t


@needs_triton
@pytest.mark.parametrize("form", LOOP_FORMS)
@pytest.mark.parametrize("ranks", [(16, 1, 1), (6, 2, 2), (3, 3, 1), (2, 1, 5)], ids=lambda r: "R" + "".join(map(str, r)))
def test_loop_forms(ranks, form):
    """Every form of the cache loop (the tile rules pick one per shape): flattened ranks hand-prefetched or
    pipelined, A tiles converted in registers or through the identity product, and one product per rank with A
    from whole rows (selection products), with ranks padded to powers of two, several blocks per split and a
    ragged batch; the flattened forms also with A strided along positions (A stored (B, H, R, M)); fp32 (the
    products in IEEE precision) and fp16."""
    t = factors(2, 2, 150, 6, *ranks, 32, 16, seed=6)
    kw = LOOP_FORMS[form]
    for layout in (t, position_minor(t)):
        if layout is not t and kw.get("per_rank"):
            continue  # whole rows need a contiguous (H, R) block per position
        for dtype, atol in ((torch.float32, 1e-6), (torch.float16, 1e-4)):
            check(layout, torch.tensor([150, 61]), dtype, atol=atol, num_splits=3, block_m=16, **kw)


@needs_triton
def test_tile_rules_pick_per_rank_for_aligned_rows_only():
    """The default rules: one product per rank for aligned A rows (H * R a multiple of 8, one row block); the
    flattened hand-prefetched loop for the trained head counts (H * R = 94) and for A strided along positions;
    each matches the reference."""
    from tpa_kernels import flashtpa
    picked = []
    real = flashtpa._tiles
    flashtpa._tiles = lambda *a, **k: picked.append(a[6]) or real(*a, **k)  # per_rank, as flashtpa_decode_triton chose
    try:
        for H, minor in ((16, False), (47, False), (16, True)):
            t = factors(1, 1, 300, H, 6, 2, 2, 32, 32, seed=7)
            check(position_minor(t) if minor else t, torch.tensor([300]), torch.float16, atol=1e-4)
    finally:
        flashtpa._tiles = real
    assert picked == [True, False, False]


@needs_triton
def test_rank1_tiles_per_batch():
    """Rank-1 K/V with <= 32 rows: 1 program per SM for one sequence, 2 for several (split count follows); a batch
    through those default tiles, ragged lengths, matches the reference."""
    from tpa_kernels.flashtpa import _tiles
    assert _tiles(32, 1, 1, 64, 64, torch.bfloat16, programs=1)[4] == 1
    assert _tiles(32, 1, 1, 64, 64, torch.bfloat16, programs=16)[4] == 2
    assert _tiles(32, 1, 1, 64, 64, torch.bfloat16, programs=1, M=4096, sms=132)[0] == 32  # a short cache
    assert _tiles(32, 1, 1, 64, 64, torch.bfloat16, programs=1, M=2 ** 18, sms=132)[0] == 128
    t = factors(3, 1, 300, 16, 16, 1, 1, 32, 32, seed=3)  # 16 rows per sequence
    check(t, torch.tensor([300, 211, 1]), torch.float16, atol=1e-4)
    check(t, torch.tensor([300, 211, 1]), torch.float32, atol=1e-6)


@needs_triton
def test_per_rank_needs_contiguous_a_rows():
    t = [x.float() for x in factors(1, 1, 40, 6, 2, 2, 2, 16, 16)]
    t[2] = torch.randn(1, 40, 2, 6).transpose(2, 3)  # rank-major A_K: a position's (H, R) block is not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        flashtpa_decode_triton(*[x.to(DEVICE) for x in t], per_rank=True)
    check([x.double() for x in t], None, torch.float32, atol=1e-6)  # the rules fall back to the flattened tiles


def logit_controlled(M, logits, H=4, D=16):
    """Factors whose logits (after the 1/sqrt(D) scale) are exactly `logits` (M,) for every head."""
    aq, bq = torch.ones(1, 1, H, 1, dtype=torch.float64), torch.zeros(1, 1, 1, D, dtype=torch.float64)
    bq[..., 0] = 1.0
    ak, bk = torch.ones(1, M, H, 1, dtype=torch.float64), torch.zeros(1, M, 1, D, dtype=torch.float64)
    bk[0, :, 0, 0] = logits * math.sqrt(D)
    av, bv = torch.ones(1, M, H, 1, dtype=torch.float64), torch.randn(1, M, 1, D, dtype=torch.float64)
    return [aq, bq, ak, bk, av, bv]


@needs_triton
@pytest.mark.parametrize("gap", [50.0, 95.0, 200.0])
def test_official_failure_cases(gap):
    """docs/DESIGN.md sec. 3.2 and 7 (the released kernels' failures): LSE gaps > 90 between splits (min-LSE
    reduce), a whole block underflowing (0/0), ragged M."""
    M = 100  # not a multiple of the 16-wide blocks
    logits = torch.zeros(M, dtype=torch.float64)
    logits[:40] = gap  # split 0 dominates split 1 by `gap`
    out = check(logit_controlled(M, logits), None, torch.float32, atol=1e-6, num_splits=2, block_m=16)
    # and inside one split: a high block, a block `gap` lower (it underflows in fp32), a high block
    logits = torch.zeros(M, dtype=torch.float64)
    logits[:16], logits[32:48] = gap, gap
    check(logit_controlled(M, logits), None, torch.float32, atol=1e-6, num_splits=1, block_m=16)
    assert torch.isfinite(out).all()


def test_references_agree_and_dispatch():
    t = factors(2, 3, 57, 7, 5, 2, 3, 32, 16, seed=1)
    seq = torch.tensor([57, 20])
    a = flashtpa_decode_ref(*t, seqlens=seq)
    torch.testing.assert_close(flashtpa_decode_einsum(*t, seqlens=seq), a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flashtpa_decode(*t, seqlens=seq), a)  # CPU tensors: the reference
    # against plain causal attention on the materialised q, k, v
    aq, bq, ak, bk, av, bv = t
    q, k, v = (aq @ bq) / 5, (ak @ bk) / 2, (av @ bv) / 3
    for b, L in enumerate(seq.tolist()):
        qb, kb, vb = q[b].transpose(0, 1), k[b, :L].transpose(0, 1), v[b, :L].transpose(0, 1)  # (H, *, D)
        mask = torch.arange(L)[None, :] <= (L - 3 + torch.arange(3))[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        torch.testing.assert_close(a[b], sdpa.transpose(0, 1))


def test_shape_errors():
    t = factors(1, 1, 8, 4, 2, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="bk has shape \\(1, 8, 3, 16\\), expected \\(1, 8, 2, 16\\)"):
        flashtpa_decode(t[0], t[1], t[2], torch.zeros(1, 8, 3, 16, dtype=torch.float64), t[4], t[5])
    with pytest.raises(ValueError, match="seqlens has shape"):
        flashtpa_decode(*t, seqlens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="impl='cuda'"):
        flashtpa_decode(*t, impl="cuda")


@needs_triton
def test_custom_op_registration():
    """torch.library.opcheck of tpa::flashtpa_decode (what a torch.compile'd decode step calls)."""
    t = [x.float().to(DEVICE) for x in factors(2, 1, 40, 3, 2, 1, 1, 16, 16, seed=5)]
    torch.library.opcheck(torch.ops.tpa.flashtpa_decode.default, (*t, torch.tensor([40, 17], device=DEVICE), None))
