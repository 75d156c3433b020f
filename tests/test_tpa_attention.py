"""Causal attention from TPA's factors (tpa_kernels/tpa_attention.py): the Triton forward and backward (interpreter on
CPU) against the materialise-then-SDPA reference in fp64, FlashAttention's tolerance rule (conftest)."""

import pytest
import torch

from tpa_kernels.tpa_attention import HAS_TRITON, tpa_attention
from conftest import assert_close_to_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # B, T, H, (Rq, Rk, Rv), D, E
    (2, 70, 3, (6, 2, 2), 16, 16),  # T6's ranks; T not a multiple of the blocks (64 fp16, 32 fp32)
    (1, 33, 2, (1, 1, 1), 32, 16),  # rank 1, E != D
    (1, 130, 2, (3, 4, 5), 16, 32),  # several blocks each way in both precisions
]


def factors(B, T, H, ranks, D, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for R, width in zip(ranks, (D, D, E)):
        out += [torch.randn(B, T, H + 1, R, generator=g, dtype=torch.float64)[:, :, 1:],  # a strided A, as the model's
                torch.randn(B, T, R, width, generator=g, dtype=torch.float64)]  # split of one projection gives
    return out


def run(fs, grad, impl, scale=None):
    fs = [f.detach().requires_grad_(True) for f in fs]
    out = tpa_attention(*fs, softmax_scale=scale, impl=impl)
    return [out] + list(torch.autograd.grad(out, fs, grad))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}T{c[1]}H{c[2]}R{''.join(map(str, c[3]))}D{c[4]}E{c[5]}"
                                             for c in CASES])
def test_forward_backward_match_fp64(case, dtype):
    B, T, H, ranks, D, E = case
    fs = factors(B, T, H, ranks, D, E)
    grad = torch.randn(B, T, H, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref64 = run(fs, grad, "ref")
    low = [x.to(dtype).to(DEVICE) for x in fs]
    got = run(low, grad.to(dtype).to(DEVICE), "triton")
    ref_low = run(low, grad.to(dtype).to(DEVICE), "ref")
    assert got[0].shape == (B, T, H, E) and all(g.shape == f.shape for g, f in zip(got[1:], fs))
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    for name, x, r, rl in zip(("out", "daq", "dbq", "dak", "dbk", "dav", "dbv"), got, ref64, ref_low):
        assert_close_to_reference(x, r, rl, atol=atol, ulps=64, name=name)


@needs_triton
def test_softmax_scale_tiles_and_one_token():
    """A caller's softmax scale and tiles (query and key blocks of different lengths), and T = 1 (one key: the output
    is v itself); unknown tile names are refused."""
    fs = factors(1, 40, 2, (2, 2, 2), 16, 16, seed=3)
    grad = torch.randn(1, 40, 2, 16, dtype=torch.float64)
    ref = run(fs, grad, "ref", scale=0.3)
    for tiles in (None, dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=16, num_stages=1)):
        fs32 = [f.float().detach().requires_grad_(True) for f in fs]
        out = tpa_attention(*fs32, softmax_scale=0.3, impl="triton", tiles=tiles)
        for x, r in zip([out] + list(torch.autograd.grad(out, fs32, grad.float())), ref):
            torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown tiles"):
        tpa_attention(*[f.float() for f in fs], impl="triton", tiles=dict(BLOCK_K=16))
    one = [f[:, :1].float() for f in factors(1, 1, 2, (2, 2, 2), 16, 16)]
    v = torch.einsum("bthr,btrd->bthd", one[4], one[5]) / 2
    torch.testing.assert_close(tpa_attention(*one, impl="triton"), v, rtol=1e-5, atol=1e-6)


def test_dispatch_and_bad_input():
    """CPU tensors take the reference; wrong shapes and impl names are refused with what was expected."""
    fs = [f.float() for f in factors(1, 5, 2, (2, 1, 1), 8, 8)]
    torch.testing.assert_close(tpa_attention(*fs), tpa_attention(*fs, impl="ref"))
    with pytest.raises(ValueError, match=r"bk has shape \(1, 5, 2, 8\), expected \(1, 5, 1, 8\)"):
        tpa_attention(*fs[:3], fs[3].expand(1, 5, 2, 8), *fs[4:])
    with pytest.raises(ValueError, match="impl='cuda'"):
        tpa_attention(*fs, impl="cuda")


@needs_triton
def test_model_trains_through_it(monkeypatch):
    """overrides(tpa_attention=...): a tiny T6's loss and every parameter's gradient through the kernel equal the
    materialising path's (fp32); an unknown value is refused; variants it does not take (kv_shift) keep theirs."""
    import model as model_module
    from model import GPT, model_config
    from tpa_kernels.dispatch import overrides
    calls = []
    real = model_module.tpa_attention
    monkeypatch.setattr(model_module, "tpa_attention", lambda *a, **k: calls.append(k["impl"]) or real(*a, **k))
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    for extra, fused in ((dict(), True), (dict(kv_shift=True), False)):
        torch.manual_seed(0)
        model = GPT(model_config("tiny", "tpa", vocab_size=256, **extra))
        assert model.transformer.h[0].attn.from_factors_ok == fused
        runs = []
        for how in (None, "triton"):
            model.zero_grad()
            with overrides(tpa_attention=how):
                _, loss = model(idx, targets=idx)
            loss.backward()
            runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert calls == (["triton"] * 2 if fused else [])  # one call per layer, through the kernel
        calls.clear()
        assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
        for n, g in runs[0][1].items():
            torch.testing.assert_close(runs[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="tpa_attention='flash'"):
        with overrides(tpa_attention="flash"):
            pass
