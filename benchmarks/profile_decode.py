"""
Where a decode step's time goes: torch.profiler over replays of the compiled, CUDA-graph-captured decode step of
a Medium model (random weights, bf16), on a CUDA GPU.

    python -m benchmarks.profile_decode                        # T6, batch 1, 32K context
    python -m benchmarks.profile_decode --attn=mha --B=16 --context=8192
    python -m benchmarks.profile_decode --fused               # T6's batch-1 fused step (engine.fused_decode_step)
    python -m benchmarks.profile_decode --ablate              # the fused step timed whole, without FlashTPA's
                                                           # combine, and without attention (timing only)

Prints the kernels per step, the kernel time per step by group (matrix-vector products, FlashTPA, its combine,
cache writes, other fused kernels) and the top kernels. Kernel times under the profiler run ~10% above an
unprofiled step (benchmarks/bench_generate.py times those); with the fused step's dependent launches, kernels overlap
and their times add up to more than the step. --ablate answers the question without the profiler's overlap: the
fused step (batch 1) timed as benchmarks/bench_generate.py times it, whole, with FlashTPA's combine kernel not launched,
and with attention replaced by an empty output (the matrix-vector chain alone); the results of the ablated steps
are wrong by construction and only their times are used.
"""

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as `python benchmarks/profile_decode.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tpa_kernels.flashtpa
import engine
from engine import KVCache, compiled_decode_step, cuda_graph_step, fused_decode_step
from benchmarks.bench_decode import copy_bandwidth
from benchmarks.bench_generate import build, time_decode

GROUPS = [("matrix-vector (tpa_kernels/gemv.py)", ("_gemv_kernel", "_gemv_factors_kernel")),
          ("FlashTPA", ("_flashtpa_decode_kernel",)),
          ("FlashTPA combine", ("_flashtpa_combine_kernel",)),
          ("cache write (tpa_kernels/cache_write.py)", ("_write_rows_kernel",)),
          ("cuBLAS", ("gemm", "gemv2", "gemvx", "splitk")), ("SDPA", ("flash", "fmha", "attention"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="tpa")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fused", action="store_true", help="profile engine.fused_decode_step (batch-1 T6)")
    parser.add_argument("--ablate", action="store_true", help="time the fused step whole and with parts left out")
    args = parser.parse_args()
    model = build(args.attn, args.context + 64)
    if args.ablate:
        return ablate(model, args.context)
    cache = KVCache(model, args.B, args.context + 40)
    for layer in cache.layers:
        for t in layer.values():
            t.normal_(0, 0.5)
    cache.seek(args.context)
    with torch.no_grad():
        step = cuda_graph_step(cache, fused_decode_step if args.fused else compiled_decode_step())
        tok = torch.zeros(args.B, dtype=torch.long, device="cuda")
        for _ in range(3):
            tok = step(tok).argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tok = step(tok).argmax(-1)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    n = args.steps
    by_group, count = defaultdict(float), defaultdict(int)
    for e in kernels:
        if e.name.startswith("triton_"):  # torch.compile's generated kernels (their names list the fused ops)
            group = "torch.compile fused (norms, RoPE, SwiGLU, ...)"
        else:
            group = next((g for g, keys in GROUPS if any(k in e.name.lower() for k in keys)), "other")
        by_group[group] += e.device_time / n / 1000  # ms per step
        count[group] += 1
    print(f"{torch.cuda.get_device_name()}: {args.attn}{' fused' if args.fused else ''}, B={args.B}, context {args.context}: "
          f"{len(kernels) / n:.0f} kernels per step, {sum(by_group.values()):.3f} ms of kernel time per step")
    print("| group | kernels / step | ms / step |\n|---|---|---|")
    for group, ms in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {count[group] / n:.0f} | {ms:.3f} |")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


class _NotLaunched:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@torch.no_grad()
def ablate(model, context):
    bw = copy_bandwidth()
    weights = model.num_params() * model.lm_head.weight.element_size()
    combine, attention = tpa_kernels.flashtpa._flashtpa_combine_kernel, engine.flashtpa_decode
    empty = lambda aq, bq, ak, bk, av, bv, **kwargs: aq.new_empty(*aq.shape[:3], bv.shape[-1])
    rows = []
    try:
        for name, comb, attn in [("whole step", combine, attention), ("FlashTPA's combine not launched", _NotLaunched(),
                                 attention), ("attention left out (matrix-vector chain)", combine, empty)]:
            tpa_kernels.flashtpa._flashtpa_combine_kernel, engine.flashtpa_decode = comb, attn
            res = time_decode(model, 1, context, "fused graph")
            if res is None:
                raise SystemExit("--ablate times the fused batch-1 step: --attn=tpa or tpa_kvonly")
            ms, cache_bytes = res
            rows.append((name, ms))
    finally:
        tpa_kernels.flashtpa._flashtpa_combine_kernel, engine.flashtpa_decode = combine, attention
    print(f"{torch.cuda.get_device_name()}: fused batch-1 step, context {context}, copy {bw / 1e9:.0f} GB/s; bounds: "
          f"weights {weights / bw * 1e3:.3f} ms, weights + cache {(weights + cache_bytes) / bw * 1e3:.3f} ms")
    print("| step | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.4f} |")


if __name__ == "__main__":
    main()
