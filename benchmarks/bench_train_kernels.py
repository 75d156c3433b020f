"""
The training kernels on a CUDA GPU, each against its torch.compile'd PyTorch reference, forward and forward +
backward, at Small's shapes (micro-batch 16 x 1024, bf16):
  - TPA materialisation (tpa_kernels/materialize.py), H = 34, D = 64, R = 6 (T6's Q) and 2 (K, V);
  - RoPE (tpa_kernels/rope.py) of MHA's q: a strided slice of the fused projection, H = 12, D = 64;
  - cross-entropy (tpa_kernels/cross_entropy.py) over the 50304-token vocabulary.

    python -m benchmarks.bench_train_kernels [--out=benchmarks/train_kernels.jsonl]

Each case is timed inside a CUDA graph (triton.testing.do_bench_cudagraph), so the times are the GPU's, not
the Python and autograd overhead of launching a few kernels (hidden in a real training step). Memory traffic
is the big tensors' bytes: the (B, H, T, D) output and its gradient, x and y, the logits and their gradient.
"""

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

if __package__ in (None, ""):  # run as `python benchmarks/bench_train_kernels.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpa_kernels import apply_rope, cross_entropy_loss, tpa_materialize
from model import rope_tables


def timed(f, inputs, g):
    """(forward ms, forward + backward ms) of f(*inputs) with upstream gradient g, inside CUDA graphs."""
    def fwd_bwd():
        out = f(*inputs)
        torch.autograd.backward(out, g)
    for _ in range(3):  # warm up (compilation, autotuning) outside the graphs
        f(*inputs)
        fwd_bwd()
    return do_bench_cudagraph(lambda: f(*inputs)), do_bench_cudagraph(fwd_bwd, grad_to_none=list(inputs))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="append the results as JSON lines to this file")
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    B, T = 16, 1024
    cases = []  # (name, fn(impl), inputs, upstream gradient, bytes moved forward, bytes moved backward)
    for R in (6, 2):
        H, D = 34, 64
        a = torch.randn(B, T, H, R, device=dev, dtype=dt, requires_grad=True)
        b = torch.randn(B, T, R, D, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(B, H, T, D, device=dev, dtype=dt)
        n = g.numel() * 2
        cases.append((f"materialize R={R}", lambda impl, R=R: (lambda a, b: tpa_materialize(a, b, 1 / R, impl=impl)),
                      (a, b), g, n, n))
    H, D = 12, 64
    qkv = torch.randn(B, T, 3 * H * D, device=dev, dtype=dt)
    q = qkv[..., :H * D].view(B, T, H, D).detach().requires_grad_(True)  # a leaf that is a strided view
    cos, sin = rope_tables(D, T, 10000.0, dev)
    cos, sin = cos.view(1, T, 1, D // 2), sin.view(1, T, 1, D // 2)
    g = torch.randn(B, H, T, D, device=dev, dtype=dt).transpose(1, 2)  # SDPA's heads-first gradient layout
    n = q.numel() * 2
    cases.append(("rope (MHA q)", lambda impl: (lambda q: apply_rope(q, cos, sin, impl=impl)), (q,), g, 2 * n, 2 * n))
    V = 50304
    logits = (3 * torch.randn(B * T, V, device=dev, dtype=dt)).requires_grad_(True)
    targets = torch.randint(0, V, (B * T,), device=dev)
    n = logits.numel() * 2
    cases.append(("cross-entropy", lambda impl: (lambda x: cross_entropy_loss(x, targets, impl=impl)), (logits,),
                  torch.ones((), device=dev), n, 3 * n))

    print(f"{torch.cuda.get_device_name()}, bf16, B={B} T={T}")
    print("| op | impl | forward | forward + backward | forward GB/s | backward GB/s |")
    print("|---|---|---|---|---|---|")
    results = []
    for name, make, inputs, g, n_fwd, n_bwd in cases:
        for impl in ("triton", "ref"):
            f = make(impl) if impl == "triton" else torch.compile(make(impl))
            fwd, both = timed(f, inputs, g)
            r = dict(op=name, impl=impl, device=torch.cuda.get_device_name(), fwd_ms=fwd, fwd_bwd_ms=both,
                     fwd_gbps=n_fwd / fwd / 1e6, bwd_gbps=n_bwd / max(both - fwd, 1e-6) / 1e6)
            results.append(r)
            print(f"| {name} | {impl} | {1e3 * fwd:.0f} us | {1e3 * both:.0f} us | {r['fwd_gbps']:.0f} | {r['bwd_gbps']:.0f} |",
                  flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
