"""The decode-cache write (tpa_kernels/cache_write.py): the Triton op (interpreter on CPU) against the index_put
reference, bit for bit; its dispatch and errors; and the op's registration for torch.compile."""

import pytest
import torch

from tpa_kernels.cache_write import HAS_TRITON, feature_stride, write_rows

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter rounds to bf16 wrongly: bf16 caches only on the GPU
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())
OPCHECK_UTILS = ("test_schema", "test_autograd_registration") + (  # fake-tensor tracing of a triton_op: GPU only
    ("test_faketensor", "test_aot_dispatch_dynamic") if torch.cuda.is_available() else ())


def case(B, T, L, feats, n_extra=0, seed=0, minor=False):
    """Destinations (B, L, *f) and sources (B, T, *f) of several dtypes and layouts, distinct positions per row;
    minor: every other destination position-minor ((B, *f, L) storage): the kernel writes any evenly strided run."""
    g = torch.Generator().manual_seed(seed)
    dsts, srcs = [], []
    for i, f in enumerate(feats):
        dt = DTYPES[i % len(DTYPES)]
        if minor and i % 2 == 0:
            dsts.append(torch.randn(B, *f, L, generator=g).to(dt).to(DEVICE).movedim(-1, 1))
        else:
            dsts.append(torch.randn(B, L, *f, generator=g).to(dt).to(DEVICE))
        src = torch.randn(B, T, *f, generator=g, dtype=torch.float32)
        if i % 2 == 1:  # a strided slice of a wider projection, as the model's split() gives
            wide = torch.randn(B, T, 3 + int(torch.tensor(f).prod()), generator=g)
            src = wide[..., 3:].view(B, T, *f)
        srcs.append(src.to(DEVICE))
    pos = torch.stack([torch.randperm(L, generator=g)[:T] for _ in range(B)]).to(DEVICE)
    return dsts, srcs, pos


@needs_triton
@pytest.mark.parametrize("B,T,L,feats", [
    (1, 1, 9, [(47, 2), (2, 64), (47, 2), (2, 64)]),  # a batch-1 TPA decode step (Medium T6 factors)
    (3, 5, 17, [(4, 16), (16,), (1, 1)]),  # a prefill of 5 tokens into 3 rows
    (2, 2, 6, [(3,), (2, 8), (5,), (1, 4), (7,), (2, 2), (3, 3), (1,)]),  # 8 tensors: two launches
    (2, 1, 4, [(2000,)]),  # features wider than one block
])
@pytest.mark.parametrize("minor", [False, True], ids=["contiguous", "position_minor"])
def test_matches_index_put(B, T, L, feats, minor):
    dsts, srcs, pos = case(B, T, L, feats, minor=minor)
    ref = [d.clone() for d in dsts]
    write_rows(ref, srcs, pos, impl="ref")
    write_rows(dsts, srcs, pos, impl="triton")
    for got, want in zip(dsts, ref):
        assert torch.equal(got, want)


@needs_triton
def test_out_of_range_positions_are_not_written():
    dsts, srcs, pos = case(2, 2, 5, [(3,), (2, 4)])
    before = [d.clone() for d in dsts]
    pos[0, 1], pos[1, 0] = 5, -1  # past the end, before the start
    write_rows(dsts, srcs, pos, impl="triton")
    for d, b, s in zip(dsts, before, srcs):
        b[0, pos[0, 0]], b[1, pos[1, 1]] = s[0, 0].to(b.dtype), s[1, 1].to(b.dtype)  # only the valid entries
        assert torch.equal(d, b)


def test_reference_and_errors():
    d, s = torch.zeros(2, 4, 3), torch.arange(6.0).view(2, 1, 3)
    write_rows([d], [s], torch.tensor([[2], [0]]))  # CPU tensors: the reference
    assert torch.equal(d[0, 2], s[0, 0]) and torch.equal(d[1, 0], s[1, 0]) and d.abs().sum() == s.sum()
    with pytest.raises(ValueError, match="source 0 has shape \\(2, 1, 4\\), expected \\(2, 1, 3\\)"):
        write_rows([d], [torch.zeros(2, 1, 4)], torch.tensor([[2], [0]]))
    with pytest.raises(ValueError, match="impl='cuda'"):
        write_rows([d], [s], torch.tensor([[2], [0]]), impl="cuda")
    assert feature_stride(torch.zeros(2, 4, 3, 5)) == 1 and feature_stride(torch.zeros(2, 3, 5, 4).movedim(-1, 1)) == 4
    uneven = torch.zeros(2, 4, 5, 3).transpose(2, 3)  # features (3, 5) with strides (1, 3): no single stride
    assert feature_stride(uneven) is None
    if HAS_TRITON:
        with pytest.raises(ValueError, match="evenly strided"):
            write_rows([uneven], [torch.ones(2, 1, 3, 5)], torch.tensor([[2], [0]]), impl="triton")


@needs_triton
def test_op_registration():
    dsts, srcs, pos = case(2, 1, 6, [(3, 2), (4,)])
    torch.library.opcheck(torch.ops.tpa.write_rows.default, (dsts, srcs, pos), test_utils=OPCHECK_UTILS)
