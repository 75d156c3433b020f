"""
Causal attention of one Small layer (B=16, T=1024, D=64, bf16) on a CUDA GPU, forward and forward + backward, for
T6's 34 heads and MHA's 12, with each SDPA backend and with FlexAttention (compiled): which kernel training should
use, and how far attention is from the GEMMs' efficiency. Timed inside CUDA graphs.

    python -m benchmarks.bench_attention
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench_cudagraph

BACKENDS = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "FlashAttention-2": SDPBackend.FLASH_ATTENTION,
            "memory-efficient": SDPBackend.EFFICIENT_ATTENTION, "FlexAttention": None}


def main():
    B, T, D = 16, 1024, 64
    flex = torch.compile(flex_attention)
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
    print(f"{torch.cuda.get_device_name()}, bf16, B={B} T={T} D={D}, causal")
    print("| heads | kernel | forward | forward + backward |")
    print("|---|---|---|---|")
    for H in (34, 12):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        flops = 4 * B * H * T * T * D / 2  # forward; the backward is 2.5x

        for name, backend in BACKENDS.items():
            def fwd(backend=backend):
                if backend is None:
                    return flex(q, k, v, block_mask=causal)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def fwd_bwd():
                fwd().backward(g)
            try:
                for _ in range(3):
                    fwd_bwd()
                tf, tb = do_bench_cudagraph(fwd), do_bench_cudagraph(fwd_bwd, grad_to_none=[q, k, v])
            except RuntimeError as e:  # a backend that does not support the shape
                print(f"| {H} | {name} | {str(e).splitlines()[0][:80]} | |")
                continue
            print(f"| {H} | {name} | {1e3 * tf:.0f} us ({flops / tf / 1e9:.0f} TFLOP/s) | "
                  f"{1e3 * tb:.0f} us ({3.5 * flops / tb / 1e9:.0f} TFLOP/s) |", flush=True)


if __name__ == "__main__":
    main()
