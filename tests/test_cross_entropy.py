"""The cross-entropy op (tpa_kernels/cross_entropy.py): Triton forward/backward (interpreter on CPU) against fp64."""

import pytest
import torch

from tpa_kernels.cross_entropy import HAS_TRITON, cross_entropy_loss, linear_cross_entropy
from conftest import assert_close_to_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPCHECK_UTILS = ("test_schema", "test_autograd_registration") + (  # fake-tensor tracing of a triton_op: GPU only
    ("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE == "cuda" else ())


def loss_and_grad(logits, targets, impl):
    logits = logits.detach().requires_grad_(True)
    loss = cross_entropy_loss(logits, targets, ignore_index=-1, impl=impl)
    (2.5 * loss).backward()  # a non-unit upstream gradient, as under gradient accumulation
    return loss, logits.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V", [(5, 37), (3, 5000), (7, 4096), (1, 9000)])
def test_forward_backward_match_fp64(N, V, dtype):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(N, V + 3, generator=g, dtype=torch.float64)[:, 1:V + 1]  # a strided view
    targets = torch.randint(0, V, (N,), generator=g)
    targets[N // 2] = -1 if N > 1 else targets[0]  # an ignored row
    targets[-1] = V - 1  # the last column
    ref64 = loss_and_grad(logits, targets, "ref")
    low, t = logits.to(dtype).to(DEVICE), targets.to(DEVICE)
    got, ref_low = loss_and_grad(low, t, "triton"), loss_and_grad(low, t, "ref")
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, x, r, rl in zip(("loss", "grad"), got, ref64, ref_low):
        assert_close_to_reference(x, r, rl, ulps=8, name=name)  # fp32 math: a few ulps
    if N > 1:
        assert got[1][N // 2].abs().max() == 0  # the ignored row gets no gradient


@needs_triton
def test_extreme_logits_and_bad_targets():
    # large logits (overflow without the max shift), -inf logits (masked vocabulary), all rows ignored, and a
    # target outside the vocabulary (a nan loss, not an out-of-bounds read)
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [float("-inf"), 2.0, 1.0]], device=DEVICE)
    t = torch.tensor([0, 2], device=DEVICE)
    torch.testing.assert_close(cross_entropy_loss(logits, t, impl="triton"), cross_entropy_loss(logits, t, impl="ref"))
    assert cross_entropy_loss(logits, torch.tensor([-1, -1], device=DEVICE), impl="triton").isnan()
    assert cross_entropy_loss(logits, torch.tensor([0, 7], device=DEVICE), impl="triton").isnan()


def test_dispatch():
    logits, t = torch.randn(4, 10), torch.tensor([1, -1, 3, 9])
    torch.testing.assert_close(cross_entropy_loss(logits, t), torch.nn.functional.cross_entropy(logits, t, ignore_index=-1))
    with pytest.raises(ValueError, match="impl='cuda'"):
        cross_entropy_loss(logits, t, impl="cuda")


@needs_triton
def test_custom_op_registration():
    """torch.library.opcheck of tpa::cross_entropy_rows: schema and autograd; on a GPU also fake tensors, tracing."""
    logits = torch.randn(6, 50).to(DEVICE).requires_grad_(True)
    t = torch.tensor([1, -1, 3, 49, 0, 7]).to(DEVICE)
    torch.library.opcheck(torch.ops.tpa.cross_entropy_rows.default, (logits, t, -1), test_utils=OPCHECK_UTILS)


def linear_loss_and_grads(x, w, targets, impl):
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    loss = linear_cross_entropy(x, w, targets, ignore_index=-1, impl=impl)
    (2.5 * loss).backward()  # a non-unit upstream gradient, as under gradient accumulation
    return loss, x.grad, w.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,C,V", [(5, 16, 37), (6, 32, 5000), (1, 8, 4100)])
def test_linear_cross_entropy_matches_fp64(N, C, V, dtype):
    """The fused linear + cross-entropy (the gradient written over the logits in the forward) against fp64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C + 2, generator=g, dtype=torch.float64)[:, 1:C + 1]  # a strided view
    w = torch.randn(V, C, generator=g, dtype=torch.float64) / C ** 0.5 * 3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[N // 2] = -1 if N > 1 else targets[0]  # an ignored row
    targets[-1] = V - 1
    ref64 = linear_loss_and_grads(x, w, targets, "ref")
    x_low, w_low, t = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), targets.to(DEVICE)
    got, ref_low = linear_loss_and_grads(x_low, w_low, t, "triton"), linear_loss_and_grads(x_low, w_low, t, "ref")
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    for name, a, r, rl in zip(("loss", "dx", "dw"), got, ref64, ref_low):
        assert_close_to_reference(a, r, rl, ulps=8, name=name)
    if N > 1:
        assert got[1][N // 2].abs().max() == 0  # the ignored row's input gets no gradient


@needs_triton
def test_linear_cross_entropy_autocast_and_errors():
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    t = torch.tensor([1, -1, 3, 29], device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float16):  # cast to its dtype
        loss = linear_cross_entropy(x, w, t, impl="triton")
    torch.testing.assert_close(loss, linear_cross_entropy(x, w, t, impl="ref"), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="x is torch.float16 and weight torch.float32"):
        linear_cross_entropy(x.half(), w, t, impl="triton")
    with pytest.raises(ValueError, match="impl='cuda'"):
        linear_cross_entropy(x, w, t, impl="cuda")


@needs_triton
def test_linear_custom_op_registration():
    x, w = torch.randn(6, 8).to(DEVICE).requires_grad_(True), torch.randn(50, 8).to(DEVICE).requires_grad_(True)
    t = torch.tensor([1, -1, 3, 49, 0, 7]).to(DEVICE)
    torch.library.opcheck(torch.ops.tpa.linear_cross_entropy_rows.default, (x, w, t, -1), test_utils=OPCHECK_UTILS)


@needs_triton
def test_linear_cross_entropy_frozen_weight():
    """Only the gradients asked for are computed: a frozen output layer gets none, the input the right one."""
    x, w = torch.randn(5, 8, device=DEVICE, requires_grad=True), torch.randn(40, 8, device=DEVICE)
    t = torch.tensor([1, -1, 3, 39, 0], device=DEVICE)
    linear_cross_entropy(x, w, t, impl="triton").backward()
    assert w.grad is None
    x_ref = x.detach().clone().requires_grad_(True)
    linear_cross_entropy(x_ref, w, t, impl="ref").backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
