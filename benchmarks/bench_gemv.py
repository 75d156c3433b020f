"""
Batch-1 decoding's weight matmuls on a CUDA GPU: tpa_kernels/gemv.py's matrix-vector op against F.linear (cuBLAS),
for every distinct weight shape of a model (default: Medium T6), bf16, inside CUDA graphs. Bandwidth is the
weight's bytes over the time, with the device-to-device copy bandwidth measured in the same run.

    python -m benchmarks.bench_gemv [--size=medium --attn=tpa]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

if __package__ in (None, ""):  # run as `python benchmarks/bench_gemv.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpa_kernels import linear_one_row
from model import GPT, model_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--attn", default="tpa")
    args = parser.parse_args()
    with torch.device("meta"):
        model = GPT(model_config(args.size, args.attn))
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes.setdefault(tuple(m.weight.shape), []).append(name)
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / do_bench_cudagraph(lambda: dst.copy_(src)) / 1e6
    print(f"{torch.cuda.get_device_name()}, bf16, {args.size} {args.attn}; copy bandwidth {copy_bw:.0f} GB/s")
    print("| weight (N, K) | layers | cuBLAS (F.linear) | Triton GEMV | max abs diff |")
    print("|---|---|---|---|---|")
    total = {"cublas": 0.0, "triton": 0.0}
    for (N, K), names in sorted(shapes.items()):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        x = torch.randn(1, 1, K, device="cuda", dtype=torch.bfloat16)
        diff = (linear_one_row(x, w).float() - F.linear(x.float(), w.float())).abs().max().item()
        t_ref = do_bench_cudagraph(lambda: F.linear(x, w))
        t_k = do_bench_cudagraph(lambda: linear_one_row(x, w))
        gb = N * K * 2 / 1e6
        total["cublas"] += t_ref * len(names)
        total["triton"] += t_k * len(names)
        print(f"| ({N}, {K}) | {len(names)} | {1e3 * t_ref:.1f} us ({gb / t_ref:.0f} GB/s) | "
              f"{1e3 * t_k:.1f} us ({gb / t_k:.0f} GB/s) | {diff:.2e} |", flush=True)
    print(f"all weight matmuls of one decode step: cuBLAS {total['cublas']:.3f} ms, Triton {total['triton']:.3f} ms")


if __name__ == "__main__":
    main()
