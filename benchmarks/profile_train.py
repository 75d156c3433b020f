"""
Where a training step's time goes: torch.profiler over compiled training steps (bf16 autocast, fused AdamW, one
micro-step of random tokens per step, as benchmarks/bench_train.py's runs), on a CUDA GPU.

    python -m benchmarks.profile_train                                    # Small T6 and Small MHA, micro-batch 16
    python -m benchmarks.profile_train --attns=tpa --size=medium --batch_size=20
    python -m benchmarks.profile_train --attns=tpa,mha --mode=reduce-overhead   # torch.compile's mode

Per mechanism: the step's wall time (CUDA events, no profiler) and MFU, then the kernel time per step by group
(SDPA attention forward and backward, cuBLAS GEMMs, the repo's Triton ops, torch.compile's fused kernels, the
optimizer). With two or more mechanisms, the last table answers "how fast would attention have to be": the MFU
ratio of the first mechanism to the second if their attention kernels ran k times faster and nothing else changed
(step time = wall - attention + attention / k; kernel times under the profiler run a few % above unprofiled ones).
Peak memory: torch.cuda.max_memory_allocated over the timed steps (the model, AdamW's state, activations).
"""

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as `python benchmarks/profile_train.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import peak_flops
from model import GPT, model_config

# first match wins; names are lower-cased. cuDNN's SDPA kernels carry "sdpa"/"fmha"/"flash" in their names, its
# helpers (dO.O, the fp32 dQ conversion) "cudnn"; FlashAttention / memory-efficient kernels "flash" / "fmha".
GROUPS = [("attention forward (SDPA)", lambda n: any(k in n for k in ("sdpa", "fmha", "flash", "cudnn", "attention"))
           and any(k in n for k in ("fprop", "fwd", "forward"))),
          ("attention backward (SDPA)", lambda n: any(k in n for k in ("sdpa", "fmha", "flash", "cudnn", "attention"))),
          ("GEMMs (cuBLAS)", lambda n: any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "splitk"))),
          ("materialisation (tpa_kernels/materialize.py)", lambda n: "_materialize" in n),
          ("RoPE (tpa_kernels/rope.py)", lambda n: "_rope_kernel" in n),
          ("cross-entropy (tpa_kernels/cross_entropy.py)", lambda n: "_ce_" in n),
          ("SwiGLU (tpa_kernels/mlp.py)", lambda n: "_swiglu_" in n),
          ("optimizer (fused AdamW)", lambda n: "adam" in n or "multi_tensor" in n),
          ("torch.compile fused (RMSNorm, SwiGLU, residual, ...)", lambda n: n.startswith("triton_")),
          ("PyTorch elementwise / copies / reductions", lambda n: any(k in n for k in ("elementwise", "copy", "reduce",
                                                                                     "fill", "cat"))),
          ("other", lambda n: True)]
ATTENTION = ("attention forward (SDPA)", "attention backward (SDPA)")


def build(size, attn, batch_size, block_size, mode):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(model_config(size, attn, block_size=block_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    compiled = torch.compile(model, mode=mode)
    x, y = (torch.randint(0, model.config.vocab_size, (batch_size, block_size), device="cuda") for _ in range(2))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x, y, return_logits=False)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def measure(size, attn, batch_size, block_size, mode, steps):
    torch.cuda.reset_peak_memory_stats()
    model, step = build(size, attn, batch_size, block_size, mode)
    for _ in range(3):  # compilation and warm-up
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / steps
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_group, count, top = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        group = next(g for g, match in GROUPS if match(e.name.lower()))
        by_group[group] += e.device_time / steps / 1000  # ms per step
        count[group] += 1
        top[e.name[:90]] += e.device_time / steps / 1000
    tokens, flops = batch_size * block_size, model.flops_per_token(block_size)
    peak = peak_flops(torch.cuda.get_device_name()) or float("nan")  # unknown GPU: MFU nan, ratios still right
    mfu = flops * tokens / (wall / 1000) / peak
    return dict(attn=attn, wall=wall, mfu=mfu, mem_gib=mem, flops=flops, tokens=tokens,
                groups=dict(by_group), count={g: c / steps for g, c in count.items()}, top=dict(top),
                n_head=model.config.n_head, params=model.num_params())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attns", default="tpa,mha")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: its default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=8, help="print this many of the longest kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile_train profiles CUDA kernels: run it on a machine with a CUDA GPU")
    if peak_flops(torch.cuda.get_device_name()) is None:
        print(f"warning: no peak FLOP/s known for {torch.cuda.get_device_name()!r} (model.PEAK_FLOPS): MFU shows nan")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    results = []
    for attn in args.attns.split(","):
        r = measure(args.size, attn, args.batch_size, args.block_size, args.mode, args.steps)
        results.append(r)
        busy = sum(r["groups"].values())
        print(f"\n{dev}: {args.size} {attn} ({r['n_head']} heads, {r['params'] / 1e6:.1f}M parameters), micro-batch "
              f"{args.batch_size} x {args.block_size}, compile mode {args.mode or 'default'}: {r['wall']:.2f} ms per "
              f"step, {r['tokens'] / r['wall'] * 1000:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, peak memory "
              f"{r['mem_gib']:.2f} GiB; kernel time "
              f"{busy:.2f} ms per step (under the profiler)")
        print("| group | kernels / step | ms / step | share of kernel time |\n|---|---|---|---|")
        for group, ms in sorted(r["groups"].items(), key=lambda kv: -kv[1]):
            print(f"| {group} | {r['count'][group]:.0f} | {ms:.3f} | {100 * ms / busy:.1f}% |")
        print("longest kernels (ms / step):")
        for name, ms in sorted(r["top"].items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {ms:7.3f}  {name}")
    if len(results) >= 2:
        a, b = results[0], results[1]
        print(f"\nMFU ratio {a['attn']} / {b['attn']} if both attention kernels ran k x faster (nothing else changed):")
        print("| k | " + " | ".join(f"{r['attn']} ms / MFU" for r in (a, b)) + " | ratio |\n|---|---|---|---|")
        for k in (1, 1.25, 1.5, 2, 3, float("inf")):
            mfus = []
            for r in (a, b):
                att = sum(r["groups"].get(g, 0.0) for g in ATTENTION)
                wall = r["wall"] - att + att / k
                mfus.append((wall, r["mfu"] * r["wall"] / wall, r["flops"] * r["tokens"] / wall))
            print(f"| {k:g} | {mfus[0][0]:.2f} / {100 * mfus[0][1]:.1f}% | {mfus[1][0]:.2f} / {100 * mfus[1][1]:.1f}% "
                  f"| {mfus[0][2] / mfus[1][2]:.3f} |")


if __name__ == "__main__":
    main()
