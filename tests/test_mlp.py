"""SwiGLU's gate op (tpa_kernels/mlp.py): Triton forward/backward (interpreter on CPU) against the PyTorch reference,
and the model's MLP going through it."""

import pytest
import torch

from tpa_kernels.mlp import HAS_TRITON, swiglu, swiglu_ref
from conftest import assert_close_to_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPCHECK_UTILS = ("test_schema", "test_autograd_registration") + (
    ("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE == "cuda" else ())


def grads(gu, dh, impl):
    gu = gu.detach().requires_grad_(True)
    h = swiglu(gu, impl=impl)
    return h, torch.autograd.grad(h, gu, dh)[0]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,n,pad", [((2, 7), 37, 0), ((3, 5), 16, 0), ((9,), 1100, 4), ((2, 3), 2730, 4)])
def test_forward_backward_match_reference(shape, n, pad, dtype):
    """Odd widths (masked columns, a second column block past 1024), a row stride padded past 2n (model.Linear's
    padded output is such a slice) and a strided upstream gradient; errors within 2x the reference's own in the
    same dtype, against float64."""
    g = torch.Generator().manual_seed(0)
    gu = (3 * torch.randn(*shape, 2 * n + pad, generator=g, dtype=torch.float64))[..., :2 * n]
    dh = torch.randn(*shape, n + 3, generator=g, dtype=torch.float64)[..., 1:n + 1]
    ref64 = grads(gu, dh, "ref")
    low = [t.to(dtype).to(DEVICE) for t in (gu, dh)]
    got = grads(*low, "triton")
    ref_low = grads(*low, "ref")
    assert got[0].shape == (*shape, n) and got[0].dtype == dtype and got[1].shape == gu.shape
    for name, y, r, rl in zip(("h", "dgu"), got, ref64, ref_low):
        assert_close_to_reference(y, r, rl, atol=1e-6, name=name)


@needs_triton
def test_backward_halves():
    # d/dg and d/du of sum(h) by hand: u * silu'(g) and silu(g), in their own halves
    g, u = torch.linspace(-6, 6, 40, dtype=torch.float64), torch.linspace(2, -3, 40, dtype=torch.float64)
    gu = torch.cat([g, u]).view(1, 80).float().to(DEVICE).requires_grad_(True)
    swiglu(gu, impl="triton").sum().backward()
    sig = torch.sigmoid(g)
    expect = torch.cat([u * sig * (1 + g * (1 - sig)), g * sig]).view(1, 80).float()
    torch.testing.assert_close(gu.grad.cpu(), expect, rtol=1e-5, atol=1e-6)


def test_dispatch_and_errors():
    gu = torch.randn(2, 3, 10)
    torch.testing.assert_close(swiglu(gu), swiglu_ref(gu))  # CPU tensors take the reference
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.randn(2, 9))
    with pytest.raises(ValueError, match="impl='cuda'"):
        swiglu(gu, impl="cuda")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="stride 1"):
            swiglu(torch.randn(10, 2).t(), impl="triton")


@needs_triton
def test_custom_op_registration():
    """torch.library.opcheck of tpa::swiglu: schema and autograd; on a GPU also fake tensors and compile tracing."""
    gu = torch.randn(2, 5, 24).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(torch.ops.tpa.swiglu.default, (gu,), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_model_mlp_uses_the_op(impl, monkeypatch):
    """Every Block's MLP computes its gate through tpa_kernels.swiglu: with the kernel (interpreter on CPU) the model's
    loss and every parameter gradient equal those of the plain PyTorch gate."""
    if impl == "triton":
        pytest.importorskip("triton")
    import model as model_module
    from model import GPT, GPTConfig
    calls = []

    def spy(gu, impl=None):
        calls.append(1)
        return swiglu(gu, impl=use)
    monkeypatch.setattr(model_module, "swiglu", spy)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=24, vocab_size=64, block_size=16, attn="mha"))
    for block in model.transformer.h:  # the zero-init output projections would hide the gate's gradient
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.2)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    out = []
    for use in ("ref", impl):
        model.zero_grad()
        loss = model(idx, idx, return_logits=False)[1]
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 4  # two layers, two passes
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
