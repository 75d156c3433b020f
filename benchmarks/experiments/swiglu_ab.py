"""
A/B of SwiGLU's gate in the compiled training step (GPU): tpa_kernels.swiglu (the model's) against the plain PyTorch gate
that torch.compile fuses itself, for Small T6 and Small MHA, in one process; the step and the numbers of
benchmarks/profile_train.py. The FX-graph and AOT caches are turned off so that every variant compiles.

    python -m benchmarks.experiments.swiglu_ab        # benchmarks/RESULTS.md, training, "Session 10"
"""

import os
import sys

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

if __package__ in (None, ""):  # run as `python benchmarks/experiments/swiglu_ab.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import model
import benchmarks.profile_train as pt
from tpa_kernels.mlp import swiglu, swiglu_ref

inductor_config.fx_graph_cache = False
functorch_config.enable_autograd_cache = False


def main():
    for dt in (torch.float32, torch.bfloat16):  # the op on this GPU against float64, forward and backward
        gu = torch.randn(4096, 2 * 2730, device="cuda", dtype=dt).requires_grad_()
        h = swiglu(gu)
        dh = torch.randn_like(h)
        h.backward(dh)
        g64 = gu.detach().double().requires_grad_()
        h64 = swiglu_ref(g64)
        h64.backward(dh.double())
        print(f"{dt}: relative error h {((h.double() - h64).norm() / h64.norm()).item():.2e}, "
              f"dgu {((gu.grad.double() - g64.grad).norm() / g64.grad.norm()).item():.2e}")
    rows = []
    for attn, name, gate in [("tpa", "compiled gate", swiglu_ref), ("tpa", "tpa_kernels.swiglu", swiglu),
                             ("mha", "compiled gate", swiglu_ref), ("mha", "tpa_kernels.swiglu", swiglu),
                             ("tpa", "compiled gate (again)", swiglu_ref)]:
        model.swiglu = gate  # MLP.forward looks the name up at call time
        torch._dynamo.reset()
        r = pt.measure("small", attn, 16, 1024, None, 10)
        rows.append(f"| {attn} | {name} | {r['wall']:.2f} | {100 * r['mfu']:.1f}% | {r['mem_gib']:.2f} | "
                    f"{r['groups'].get('SwiGLU (tpa_kernels/mlp.py)', 0):.3f} |")
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, micro-batch 16 x 1024, compiled, bf16")
    print("| attn | gate | ms / step | MFU | peak GiB | SwiGLU op ms |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
