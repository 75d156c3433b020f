"""
Causal attention of one layer (B=16, T=1024, D=64, bf16) on a CUDA GPU, forward and forward + backward (median of
triton's do_bench; milliseconds per call, so launch gaps do not matter): which kernel training should use, and how
far attention is from the GEMMs' efficiency.

    python -m benchmarks.bench_attention                  # every head count the configs use, every backend
    python -m benchmarks.bench_attention --heads=34,12 --out=benchmarks/attention.jsonl

1. Plain attention, q, k, v given (B, H, T, D): each SDPA backend (cuDNN, FlashAttention-2, memory-efficient),
   FlexAttention (compiled), and flash-attn-4 (the CuTe DSL build, `flash_attn.cute`) where it is installed.
2. T6's attention from its factors (ranks 6/2/2): materialising Q, K, V (tpa_kernels/materialize.py) then the
   fastest SDPA backend, against tpa_kernels/tpa_attention.py, which forms the tiles inside the kernel, over a few
   tile shapes; with the memory the forward leaves for the backward (what autograd keeps, and the output).
Rows are appended to --out as JSON lines; a table is printed last.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

if __package__ in (None, ""):  # run as `python benchmarks/bench_attention.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import SIZES
from tpa_kernels import tpa_materialize
from tpa_kernels.tpa_attention import tpa_attention

BACKENDS = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "FlashAttention-2": SDPBackend.FLASH_ATTENTION,
            "memory-efficient": SDPBackend.EFFICIENT_ATTENTION}
TILES = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
         dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)]


def flash_attn_4():
    """(flash-attn-4's attention (q, k, v (B, T, H, D)), None), or (None, why it cannot be imported)."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as e:  # one of its wheels missing (e.g. nvidia-cutlass-dsl-libs-core: no cutlass.cute)
        return None, f"{type(e).__name__}: {e}"
    return flash_attn_func, None


def timed(fn, grads):
    """(forward ms, forward + backward ms). Not in CUDA graphs: capturing a backward whose leaves were made
    outside the capture fails (autograd's AccumulateGrad runs on the wrong stream)."""
    out = fn()
    g = torch.randn_like(out)

    def fwd_bwd():
        fn().backward(g)
    for _ in range(3):
        fwd_bwd()
    return do_bench(fn), do_bench(fwd_bwd, grad_to_none=grads)


def kept_mib(fn, inputs):
    """MiB the forward leaves allocated (its output and what autograd keeps for the backward)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del out
    return kept / 2 ** 20


def main():
    parser = argparse.ArgumentParser()
    heads = sorted({h for s in ("small", "medium", "large", "xl") for h in SIZES[s]["heads"].values()})
    parser.add_argument("--heads", default=",".join(map(str, heads)), help="plain attention's head counts")
    parser.add_argument("--t6_heads", default="34,47", help="T6 head counts for part 2 (Small 34, Medium 47)")
    parser.add_argument("--out", default="benchmarks/attention.jsonl")
    args = parser.parse_args()
    B, T, D = 16, 1024, 64
    dev, bf16 = "cuda", torch.bfloat16
    name = torch.cuda.get_device_name()
    flex = torch.compile(flex_attention)
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
    fa4, why = flash_attn_4()
    print(f"{name}, torch {torch.__version__}, bf16, B={B} T={T} D={D}, causal; flash-attn-4: "
          + ("installed" if fa4 else f"not used ({why})"), flush=True)
    rows = []

    def record(**row):
        rows.append(dict(device=name, B=B, T=T, D=D, **row))
        print(json.dumps(rows[-1]), flush=True)

    for H in [int(h) for h in args.heads.split(",") if h]:
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
        flops = 4 * B * H * T * T * D / 2  # forward; the backward is 2.5x
        kernels = {n: (lambda b=b: sdpa(q, k, v, b)) for n, b in BACKENDS.items()}
        kernels["FlexAttention"] = lambda: flex(q, k, v, block_mask=causal)
        if fa4 is not None:
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
            kernels["flash-attn-4"] = lambda: fa4(qt, kt, vt, causal=True)[0]
        for kname, fn in kernels.items():
            try:
                tf, tb = timed(fn, [q, k, v] if kname != "flash-attn-4" else [qt, kt, vt])
            except (RuntimeError, AssertionError) as e:  # a backend that does not take the shape
                record(part="plain", heads=H, kernel=kname, error=str(e).splitlines()[0][:120])
                continue
            record(part="plain", heads=H, kernel=kname, fwd_ms=tf, fwd_bwd_ms=tb, fwd_tflops=flops / tf / 1e9,
                   fwd_bwd_tflops=3.5 * flops / tb / 1e9)

    for H in [int(h) for h in args.t6_heads.split(",") if h]:  # --t6_heads= : none
        g = torch.Generator(device=dev).manual_seed(0)
        fs = []
        for R in (6, 2, 2):
            fs += [torch.randn(B, T, H, R, device=dev, dtype=bf16, generator=g).requires_grad_(True),
                   torch.randn(B, T, R, D, device=dev, dtype=bf16, generator=g).requires_grad_(True)]
        flops = 4 * B * H * T * T * D / 2

        def materialised():
            q, k, v = (tpa_materialize(a, b, 1.0 / a.size(-1)) for a, b in zip(fs[::2], fs[1::2]))
            return sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION).transpose(1, 2)
        paths = {"materialise + cuDNN": materialised}
        for tiles in TILES:
            paths["fused " + "/".join(str(tiles[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))] = \
                lambda tiles=tiles: tpa_attention(*fs, tiles=tiles)
        ref = materialised().float()
        for pname, fn in paths.items():
            try:
                err = (fn().float() - ref).abs().max().item()
                tf, tb = timed(fn, fs)
                mem = kept_mib(fn, fs)
            except Exception as e:  # noqa: BLE001 (a tile shape that does not compile here: say so, go on)
                record(part="t6", heads=H, path=pname, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            record(part="t6", heads=H, path=pname, fwd_ms=tf, fwd_bwd_ms=tb, fwd_tflops=flops / tf / 1e9,
                   fwd_bwd_tflops=3.5 * flops / tb / 1e9, kept_mib=mem, max_abs_diff_vs_materialised=err)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:  # the file keeps every earlier run's rows
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{name}, bf16, B={B} T={T} D={D}, causal; median of do_bench")
    print("| part | heads | kernel / path | forward | forward + backward | kept for backward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = r.get("kernel") or r.get("path")
        if "error" in r:
            print(f"| {r['part']} | {r['heads']} | {label} | {r['error']} | | |")
        else:
            print(f"| {r['part']} | {r['heads']} | {label} | {1e3 * r['fwd_ms']:.0f} us ({r['fwd_tflops']:.0f} TFLOP/s) | "
                  f"{1e3 * r['fwd_bwd_ms']:.0f} us ({r['fwd_bwd_tflops']:.0f}) | "
                  + (f"{r['kept_mib']:.0f} MiB" if "kept_mib" in r else "") + " |")


def sdpa(q, k, v, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


if __name__ == "__main__":
    main()
