"""
TPA materialisation (kernels/materialize.py) on a CUDA GPU: the Triton op against the torch.compile'd PyTorch
reference, forward and forward + backward, for Small T6's shapes (micro-batch 16 x 1024, H = 34, D = 64).

    python -m scripts.bench_materialize
"""

import torch
from triton.testing import do_bench

from kernels.materialize import tpa_materialize


def main():
    B, T, H, D = 16, 1024, 34, 64
    print(f"{torch.cuda.get_device_name()}, bf16, B={B} T={T} H={H} D={D}")
    print("| R | impl | forward | forward + backward |")
    print("|---|---|---|---|")
    for R in (6, 2):
        a = torch.randn(B, T, H, R, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(B, T, R, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        for impl in ("triton", "ref"):
            f = lambda a, b, impl=impl: tpa_materialize(a, b, 1 / R, impl=impl)
            if impl == "ref":
                f = torch.compile(f)

            def fwd_bwd():
                f(a, b).backward(g)
            fwd, both = do_bench(lambda: f(a, b)), do_bench(fwd_bwd)
            print(f"| {R} | {impl} | {fwd * 1e3:.0f} us | {both * 1e3:.0f} us |", flush=True)


if __name__ == "__main__":
    main()
