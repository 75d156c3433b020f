"""
Cross-entropy over a large vocabulary for training: a Triton forward (log-sum-exp per row) and backward
(softmax minus one-hot, scaled) that read the logits in their own dtype, once per pass.

    loss = cross_entropy_loss(logits, targets, ignore_index=-1)   # logits (N, V) any float dtype, targets (N,)
                                                              # -> mean over the rows whose target != ignore_index
    loss = linear_cross_entropy(x, weight, targets, ignore_index=-1)   # the same loss of logits = x @ weight^T

linear_cross_entropy is what training uses (model.GPT.forward with return_logits=False): its forward writes the
logits' gradient softmax - onehot over the logits as it computes the loss, and keeps only that for the backward,
which applies the upstream gradient to the two small products (dx = diag(g) G W, dW = G^T diag(g) x). The
logits and their gradient are never alive together: one (N, V) tensor less at the peak (Small, micro-batch
16 x 1024: 1.6 GB; the training step's peak 13.3 -> 11.8 GiB on an H200), at the same speed.

cross_entropy_loss_ref and linear_cross_entropy_ref are the PyTorch references with the same signatures
(F.cross_entropy on fp32 logits), used off CUDA. Why a kernel: torch.compile's cross-entropy reads the bf16
logits twice in the forward, fills a zero tensor of the logits' size for the backward and reads it again: about
twice the memory traffic of the two passes here (forward: read the logits; backward: read them, write the
gradient), for Small models a tenth of a training step.
"""

import torch
import torch.nn.functional as F

from tpa_kernels.dispatch import HAS_TRITON, pick

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


def cross_entropy_loss_ref(logits, targets, ignore_index=-1):
    """Mean cross-entropy of logits (N, V) against targets (N,), rows with target == ignore_index left out."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


if HAS_TRITON:

    @triton.jit
    def _row_loss(x_row, t_ptr, loss_ptr, row, V, ignore_index, BLOCK_V: tl.constexpr):
        """One row's cross-entropy, stored at loss_ptr[row] (0 for the ignored target); returns (lse, target, valid).
        Online max / sum of exp over BLOCK_V chunks, fp32."""
        m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane running max and sum
        s = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)  # lanes still at -inf: m_new = -inf -> nan, fixed below
            s = tl.where(m_new == float("-inf"), 0.0, s)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        target = tl.load(t_ptr + row)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < V)
        x_t = tl.load(x_row + tl.where(in_range, target, 0)).to(tl.float32)
        x_t = tl.where(in_range, x_t, float("nan"))  # a target outside the vocabulary: a nan loss, not a crash
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        return lse, target, valid

    @triton.jit
    def _row_grad(x_row, dx_row, lse, target, g, V, BLOCK_V: tl.constexpr):
        # dx = g * (softmax(x) - onehot(target)), chunk by chunk (each chunk read before it is written: dx_row may
        # be x_row)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + v, mask=v < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(v == target, 1.0, 0.0)
            tl.store(dx_row + v, (p * g).to(dx_row.dtype.element_ty), mask=v < V)

    @triton.jit
    def _ce_fwd(x_ptr, t_ptr, loss_ptr, lse_ptr, V, s_xn, ignore_index, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lse, _, _ = _row_loss(x_ptr + row * s_xn, t_ptr, loss_ptr, row, V, ignore_index, BLOCK_V)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_bwd(x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, V, s_xn, s_dn, ignore_index, BLOCK_V: tl.constexpr):
        # rows with the ignored target get 0
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(t_ptr + row)
        g = tl.where(target != ignore_index, tl.load(g_ptr + row), 0.0)
        _row_grad(x_ptr + row * s_xn, dx_ptr + row * s_dn, tl.load(lse_ptr + row), target, g, V, BLOCK_V)

    @triton.jit
    def _ce_fwd_grad(x_ptr, t_ptr, loss_ptr, V, s_xn, ignore_index, BLOCK_V: tl.constexpr):
        # the loss, then softmax(x) - onehot(target) written over the logits themselves (0 for the ignored target)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * s_xn
        lse, target, valid = _row_loss(x_row, t_ptr, loss_ptr, row, V, ignore_index, BLOCK_V)
        _row_grad(x_row, x_row, lse, target, tl.where(valid, 1.0, 0.0), V, BLOCK_V)

    def _block_v(V):
        return min(4096, triton.next_power_of_2(V))

    # triton_op: torch.compile sees the kernel launches (no Python op dispatch per call in a compiled step)
    @triton_op("tpa::cross_entropy_rows", mutates_args=())
    def _ce_rows_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = logits.shape
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=logits.device, dtype=torch.float32)
        if N:
            wrap_triton(_ce_fwd)[(N,)](logits, targets, loss, lse, V, logits.stride(0), ignore_index,
                                       BLOCK_V=_block_v(V), num_warps=8)
        return loss, lse

    @triton_op("tpa::cross_entropy_rows_backward", mutates_args=())
    def _ce_rows_bwd_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                        ignore_index: int) -> torch.Tensor:
        N, V = logits.shape
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        dx = torch.empty(N, V, device=logits.device, dtype=logits.dtype)
        if N:
            wrap_triton(_ce_bwd)[(N,)](logits, targets, lse, g.float().contiguous(), dx, V, logits.stride(0),
                                       dx.stride(0), ignore_index, BLOCK_V=_block_v(V), num_warps=8)
        return dx

    def _setup(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.ignore_index = ignore_index

    def _backward(ctx, g_loss, g_lse):
        logits, targets, lse = ctx.saved_tensors
        return _ce_rows_bwd_op(logits, targets, lse, g_loss, ctx.ignore_index), None, None

    _ce_rows_op.register_autograd(_backward, setup_context=_setup)

    @triton_op("tpa::linear_cross_entropy_rows", mutates_args=())
    def _linear_ce_rows_op(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row losses, softmax - onehot) of the logits x @ w^T; the logits buffer becomes the second."""
        N, V = x.size(0), w.size(0)
        logits = torch.mm(x, w.t())  # (N, V)
        loss = torch.empty(N, device=x.device, dtype=torch.float32)
        if N:
            wrap_triton(_ce_fwd_grad)[(N,)](logits, targets, loss, V, logits.stride(0), ignore_index,
                                            BLOCK_V=_block_v(V), num_warps=8)
        return loss, logits

    def _lce_setup(ctx, inputs, output):
        x, w, targets, ignore_index = inputs
        ctx.save_for_backward(x, w, output[1])
        ctx.mark_non_differentiable(output[1])

    def _lce_backward(ctx, g_loss, g_grad):
        # d loss_i / d logits_i = G_i: dx = diag(g) G w and dw = G^T diag(g) x, the upstream gradient applied to
        # the small operands, never to the (N, V) gradient
        x, w, G = ctx.saved_tensors
        g = g_loss.float()[:, None]  # fp32: 1 / (rows x micro-steps) need not be exact in bf16
        dx = (torch.mm(G, w) * g).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = torch.mm(G.t(), (x * g).to(x.dtype)) if ctx.needs_input_grad[1] else None  # (a frozen head: none)
        return dx, dw, None, None

    _linear_ce_rows_op.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy_ref(x, weight, targets, ignore_index=-1):
    """Mean cross-entropy of the logits x @ weight^T (x (N, C), weight (V, C)) against targets (N,)."""
    return cross_entropy_loss_ref(F.linear(x, weight), targets, ignore_index)


def linear_cross_entropy(x, weight, targets, ignore_index=-1, impl=None):
    """cross_entropy_loss(x @ weight^T, targets) without keeping the logits for the backward: one kernel computes
    each row's loss and writes the gradient softmax - onehot over the logits (one (N, V) tensor less at the peak;
    the same speed, measured: it reads each row twice, the second time mostly from the L2), and the backward
    scales the two small products by the upstream gradient. Under autocast x and weight are cast to
    its dtype. impl: None (the Triton op on CUDA, else the reference), "triton" or "ref"."""
    if impl is None:
        impl = pick(x, x.dim() == 2)
    if impl == "triton":
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
        if x.dtype != weight.dtype:
            raise ValueError(f"linear_cross_entropy: x is {x.dtype} and weight {weight.dtype} (expected one dtype, "
                             "or autocast)")
        rows, _ = _linear_ce_rows_op(x, weight, targets, int(ignore_index))
        return rows.sum() / (targets != ignore_index).sum()
    if impl == "ref":
        return linear_cross_entropy_ref(x, weight, targets, ignore_index)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")


def cross_entropy_loss(logits, targets, ignore_index=-1, impl=None):
    """Mean cross-entropy of logits (N, V) against targets (N,) over the rows whose target != ignore_index
    (nan if there is none, as F.cross_entropy). impl: None (the Triton op on CUDA, else the reference),
    "triton" or "ref"."""
    if impl is None:
        impl = pick(logits, logits.dim() == 2)
    if impl == "triton":
        rows, _ = _ce_rows_op(logits, targets, int(ignore_index))
        return rows.sum() / (targets != ignore_index).sum()
    if impl == "ref":
        return cross_entropy_loss_ref(logits, targets, ignore_index)
    raise ValueError(f"impl={impl!r}: use None, 'triton' or 'ref'")
