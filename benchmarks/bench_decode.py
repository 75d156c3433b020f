"""
Decode-attention benchmark (paper Sec. 6.2, Figure 5): one layer, one decode step, on a CUDA GPU.

    python -m benchmarks.bench_decode                       # the full sweep -> benchmarks/decode.csv, decode.png
    python -m benchmarks.bench_decode --quick               # d_model 2048, B 1/8/16, M 2^12, 2^16, 2^18 (~2 min),
                                                         # -> benchmarks/decode_quick.csv
    python -m benchmarks.bench_decode --check_only          # bf16 correctness of the kernel only

For B in {1, 8, 16}, d_model in {1024, 2048, 3072} (H = 16, 32, 48; D = 64) and M = 2^12 ... 2^19 (where the
cache fits): FlashTPA with ranks (16,1,1) and (6,2,2), F.scaled_dot_product_attention (flash backend) for MHA,
GQA with 4 KV heads and MQA, and absorbed MLA (latent 512 + RoPE 64, as FlashMLA) in PyTorch. Each time is the
median of CUDA-graph replays of one call (`ms`; back-to-back replays keep part of even a 100 MB cache in the L2),
and L2-cold (`ms_l2_cold`: calls on enough input copies in turn that each reads memory the L2 does not hold, as in a
model's decode step); bytes are what each method must read (cache, query), and the bandwidth is compared with a
device-to-device copy measured in the same run and with the floor (`floor_ms_l2_cold`: a pure-read kernel over the
same bytes, L2-cold; `pct_floor_l2_cold` = floor / ms_l2_cold: at a small batch the launch, the first loads' latency
and the ramp keep even a pure read well below the copy bandwidth).
"""

import argparse
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench_cudagraph

if __package__ in (None, ""):  # run as `python benchmarks/bench_decode.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpa_kernels.flashtpa import flashtpa_decode_ref, flashtpa_decode_triton

DT = torch.bfloat16


def copy_bandwidth():
    """Bytes read + written per second of a 2 GiB device-to-device copy (timed with events: a copy captured
    in a CUDA graph runs as a slower copy kernel, 2436 against 3025 GB/s on an H100)."""
    src = torch.empty(2 ** 29, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 4 * 20 / (start.elapsed_time(end) * 1e-3)


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DT)


def check_bf16():
    """The kernel in bf16 against the fp64 reference, on the test suite's shapes (rule: 2x the bf16 reference's error)."""
    cases = [(2, 1, 1, 34, (6, 2, 2), 64, 64), (2, 1, 127, 34, (6, 2, 2), 64, 64), (1, 1, 339, 34, (16, 1, 1), 64, 64),
             (3, 4, 339, 34, (16, 1, 1), 64, 64), (2, 2, 1000, 34, (6, 2, 2), 64, 64), (1, 16, 200, 47, (6, 2, 2), 64, 64),
             (2, 1, 130, 5, (3, 3, 1), 128, 64), (1, 3, 77, 61, (1, 1, 1), 64, 128), (4, 1, 65536, 78, (6, 2, 2), 64, 64),
             (16, 1, 4096, 32, (16, 1, 1), 64, 64), (1, 8, 100000, 48, (16, 1, 1), 64, 64),
             (2, 1, 3000, 8, (8, 8, 8), 64, 64), (1, 2, 2000, 4, (4, 16, 32), 128, 128), (2, 1, 999, 12, (2, 1, 16), 64, 64)]
    rows = []
    for B, N, M, H, (Rq, Rk, Rv), D, E in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        t = [torch.randn(*s, device="cuda", dtype=torch.float64, generator=g) for s in
             ((B, N, H, Rq), (B, N, Rq, D), (B, M, H, Rk), (B, M, Rk, D), (B, M, H, Rv), (B, M, Rv, E))]
        seq = torch.tensor([max(N, M - 37 * i) for i in range(B)], device="cuda")
        ref64 = flashtpa_decode_ref(*t, seqlens=seq)
        low = [x.to(DT) for x in t]
        out = flashtpa_decode_triton(*low, seqlens=seq).double()
        ref_bf16 = flashtpa_decode_ref(*low, seqlens=seq).double()
        err, ref_err = (out - ref64).abs().max().item(), (ref_bf16 - ref64).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err <= 2 * ref_err + 1e-3
        rows.append((B, N, M, H, (Rq, Rk, Rv), D, E, err, ref_err, ok))
        print(f"bf16 check B={B} N={N} M={M} H={H} R={(Rq, Rk, Rv)} D={D} E={E}: kernel err {err:.2e}, "
              f"bf16 reference err {ref_err:.2e} -> {'ok' if ok else 'FAIL'}", flush=True)
    return rows


RANKS = {"tpa16": (16, 1, 1), "tpa6": (6, 2, 2)}
KV_HEADS = {"gqa4": 4, "mqa": 1}  # mha: H


def case_bytes(method, B, H, M, D=64):
    """The bytes one decode step of `method` must read (cache and query)."""
    if method in RANKS:
        Rq, Rk, Rv = RANKS[method]
        return (B * H * Rq + B * Rq * D + B * M * (H * (Rk + Rv) + Rk * D + Rv * D)) * 2
    if method == "mla":
        return B * M * (512 + 64) * 2
    return 2 * B * KV_HEADS.get(method, H) * M * D * 2


def build_case(method, B, H, M, D=64):
    """One decode step of `method` on fresh random inputs at batch B, H heads, cache length M (a function)."""
    if method in RANKS:
        Rq, Rk, Rv = RANKS[method]
        t = [rand(*s) for s in ((B, 1, H, Rq), (B, 1, Rq, D), (B, M, H, Rk), (B, M, Rk, D), (B, M, H, Rv), (B, M, Rv, D))]
        return lambda: flashtpa_decode_triton(*t)
    if method == "mla":
        dc, dr = 512, 64
        q, kv = rand(B, H, 1, dc + dr), rand(B, M, dc + dr)  # absorbed query; cache [c_kv, k_pe]
        scale = (128 + dr) ** -0.5

        def fn():  # scores over the latent, softmax, values = the latent itself
            p = torch.softmax(torch.matmul(q.view(B, H, dc + dr), kv.transpose(1, 2)).float() * scale, -1).to(DT)
            return torch.matmul(p, kv[:, :, :dc])
        return fn
    G = KV_HEADS.get(method, H)
    q, k, v = rand(B, H, 1, D), rand(B, G, M, D), rand(B, G, M, D)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=G != H)


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, per_program, BLOCK: tl.constexpr):
    # each program sums its contiguous share of x (16-byte loads): a pure read, the floor for reading n elements
    lo = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(lo, tl.minimum(lo + per_program, n), BLOCK):
        o = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + o, mask=o < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)


def read_floor_fn(nbytes, programs_per_sm):
    """A pure-read kernel over nbytes (fresh memory): what any kernel needs to read that many bytes once."""
    x = torch.empty(max(1, nbytes // 2), dtype=DT, device="cuda")
    BLOCK = 2048
    programs = programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    per = triton.cdiv(triton.cdiv(x.numel(), programs), BLOCK) * BLOCK
    out = torch.empty(programs * BLOCK, device="cuda")
    return lambda: _read_kernel[(programs,)](x, out, x.numel(), per, BLOCK=BLOCK, num_warps=8)


def _graph_ms(fns, min_calls=20):
    """Median ms per call of a CUDA graph that calls fns in turn (repeated up to min_calls calls)."""
    calls = list(fns) * max(1, -(-min_calls // len(fns)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in calls:
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[3] / len(calls)


def bench_case(method, B, H, M, D=64):
    """(ms warm, ms L2-cold, floor ms L2-cold, bytes) of one decode step of `method`; None if it does not fit.
    Warm: replays of one call on the same inputs (part of even a 100 MB cache stays in the L2). L2-cold: calls on
    n_sets input copies in turn (n_sets x bytes >= 3x the L2), so each call reads memory that the previous calls
    evicted, clean, as in a model's decode step where other layers' weights and caches pass through the L2. Floor: a
    pure-read kernel over the same bytes, timed the same way (the best of 2, 4, 8 programs per SM)."""
    need = case_bytes(method, B, H, M, D)
    free = torch.cuda.mem_get_info()[0]
    if need > 0.8 * free:
        return None
    fn = build_case(method, B, H, M, D)
    fn()
    warm = do_bench_cudagraph(fn, rep=100)
    n_sets = min(max(2, -(-3 * torch.cuda.get_device_properties(0).L2_cache_size // need)), int(0.8 * free // need))
    if n_sets < 2:  # a cache of 40% of the memory: the L2 holds none of it, warm is cold
        del fn  # (its inputs' memory is the floor's)
        return warm, warm, min(_graph_ms([read_floor_fn(need, p)]) for p in (2, 4, 8)), need
    fns = [fn] + [build_case(method, B, H, M, D) for _ in range(n_sets - 1)]
    del fn
    cold = _graph_ms(fns)
    del fns
    floor = min(_graph_ms([read_floor_fn(need, p) for _ in range(n_sets)]) for p in (2, 4, 8))
    return warm, cold, floor, need


def tune():
    """Time the kernel's tile options on a few shapes (to set tpa_kernels.flashtpa._tiles)."""
    shapes = [(1, 2 ** 18, 32, (16, 1, 1)), (16, 2 ** 16, 32, (16, 1, 1)), (16, 2 ** 16, 48, (16, 1, 1)),
              (1, 32768, 47, (6, 2, 2)), (16, 32768, 47, (6, 2, 2)), (1, 2 ** 18, 32, (6, 2, 2)), (1, 4096, 32, (16, 1, 1))]
    if os.environ.get("TUNE_SHAPES"):  # e.g. TUNE_SHAPES=0,1 for the first two
        shapes = [shapes[int(i)] for i in os.environ["TUNE_SHAPES"].split(",")]
    for B, M, H, (Rq, Rk, Rv) in shapes:
        configs = [dict(block_m=bm, prefetch=pf, a_dot=ad, num_warps=w, num_stages=st, programs_per_sm=ps)
                   for bm in ((32, 64, 128) if Rk == Rv == 1 else (16, 32, 64)) for pf in (True, False)
                   for ad in (True, False) for w in (4, 8) for st in ((1,) if pf else (2, 3, 4)) for ps in (1, 2, 3)]
        if max(Rk, Rv) > 1:  # whole A rows through selection products
            configs += [dict(per_rank=True, block_m=bm, num_warps=w, num_stages=st, programs_per_sm=ps)
                        for bm in (16, 32, 64) for w in (4, 8) for st in (2, 3, 4) for ps in (1, 2, 3)]
        t = [rand(*s) for s in ((B, 1, H, Rq), (B, 1, Rq, 64), (B, M, H, Rk), (B, M, Rk, 64), (B, M, H, Rv), (B, M, Rv, 64))]
        nbytes = sum(x.numel() * 2 for x in t)
        results = []
        for kw in configs:
            try:
                results.append((do_bench_cudagraph(lambda: flashtpa_decode_triton(*t, **kw), rep=10), kw))
            except OutOfResources:  # shared memory or registers
                continue
        results.sort(key=lambda r: r[0])
        best = [(do_bench_cudagraph(lambda: flashtpa_decode_triton(*t, **kw), rep=50), kw) for _, kw in results[:3]]
        default = do_bench_cudagraph(lambda: flashtpa_decode_triton(*t), rep=50)
        print(f"B={B} M={M} H={H} R={(Rq, Rk, Rv)}: default {default:.4f} ms ({nbytes / default / 1e6:.0f} GB/s); best:",
              "; ".join(f"{ms:.4f} ms ({nbytes / ms / 1e6:.0f} GB/s) {kw}" for ms, kw in sorted(best, key=lambda r: r[0])),
              flush=True)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    Bs, ds = sorted({r["B"] for r in rows}), sorted({r["d_model"] for r in rows})
    fig, axes = plt.subplots(len(Bs), len(ds), figsize=(5 * len(ds), 3.6 * len(Bs)), squeeze=False)
    for i, B in enumerate(Bs):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = [(r["M"], r["ms_l2_cold"]) for r in rows
                       if r["B"] == B and r["d_model"] == d and r["method"] == method]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=method)
            pts = [(r["M"], r["floor_ms_l2_cold"]) for r in rows
                   if r["B"] == B and r["d_model"] == d and r["method"] == "tpa16"]
            if pts:  # what a pure read of FlashTPA (16,1,1)'s bytes takes
                ax.plot(*zip(*pts), ls=":", color="gray", label="pure read, tpa16 bytes")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"B={B}, d_model={d} (H={d // 64})")
            ax.set_xlabel("cache length M")
            ax.set_ylabel("ms per decode step (L2-cold)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--check_only", action="store_true")
    parser.add_argument("--tune", action="store_true", help="time the kernel's tile options on a few shapes")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/decode.csv, with --quick "
                        "benchmarks/decode_quick.csv: a quick run never replaces the full sweep's file)")
    parser.add_argument("--Bs", default="1,8,16", help="batch sizes of the full sweep")
    parser.add_argument("--d_models", default="1024,2048,3072", help="model widths of the full sweep (H = d_model / 64)")
    args = parser.parse_args()
    args.out = args.out or ("benchmarks/decode_quick.csv" if args.quick else "benchmarks/decode.csv")
    name = torch.cuda.get_device_name()
    if args.tune:
        return tune()
    checks = check_bf16()
    if args.check_only:
        return
    bw = copy_bandwidth()
    print(f"{name}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    Bs, ds, Ms = ([int(b) for b in args.Bs.split(",")], [int(d) for d in args.d_models.split(",")],
                  [2 ** k for k in range(12, 20)]) if not args.quick else \
        ([1, 8, 16], [2048], [2 ** 12, 2 ** 16, 2 ** 18])
    methods = ["tpa16", "tpa6", "mqa", "gqa4", "mha", "mla"]
    rows = []
    for B in Bs:
        for d in ds:
            H = d // 64
            for M in Ms:
                for method in methods:
                    res = bench_case(method, B, H, M)
                    torch.cuda.empty_cache()
                    if res is None:
                        continue
                    ms, ms_cold, floor, nbytes = res
                    rows.append(dict(device=name, B=B, d_model=d, H=H, M=M, method=method, ms=ms, bytes=nbytes,
                                     GBps=nbytes / (ms * 1e-3) / 1e9, pct_copy_bw=100 * nbytes / (ms * 1e-3) / bw,
                                     ms_l2_cold=ms_cold, pct_copy_bw_l2_cold=100 * nbytes / (ms_cold * 1e-3) / bw,
                                     floor_ms_l2_cold=floor, pct_floor_l2_cold=100 * floor / ms_cold))
                print(" | ".join(f"{r['method']} {r['ms']:.4f} ms ({r['pct_copy_bw']:.0f}%; cold {r['ms_l2_cold']:.4f}, "
                                 f"{r['pct_floor_l2_cold']:.0f}% of floor)"
                                 for r in rows if (r["B"], r["d_model"], r["M"]) == (B, d, M)),
                      f"<- B={B} d={d} M=2^{int(math.log2(M))}", flush=True)
            write_csv(rows, args.out)  # after every panel: a sweep cut short keeps what it measured
    plot(rows, args.out.replace(".csv", ".png"))
    # the headline cases
    print(f"\n{name}, bf16, copy bandwidth {bw / 1e9:.0f} GB/s; bf16 kernel checks: "
          f"{sum(c[-1] for c in checks)}/{len(checks)} ok")
    print("| B | d_model | M | FlashTPA (16,1,1) | FlashTPA (6,2,2) | SDPA MQA | SDPA GQA-4 | SDPA MHA | MLA absorbed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, d, M in [(1, 2048, 2 ** 18), (8, 2048, 2 ** 18), (1, 2048, 4096), (16, 2048, 2 ** 16), (1, 1024, 2 ** 19),
                    (16, 3072, 2 ** 17)]:
        cells = []
        for method in methods:
            r = [r for r in rows if (r["B"], r["d_model"], r["M"], r["method"]) == (B, d, M, method)]
            cells.append(f"{r[0]['ms']:.4f} ms ({r[0]['pct_copy_bw']:.0f}%; L2-cold {r[0]['ms_l2_cold']:.4f} ms, "
                         f"{r[0]['pct_copy_bw_l2_cold']:.0f}%, floor {r[0]['floor_ms_l2_cold']:.4f})" if r else "-")
        print(f"| {B} | {d} | 2^{int(math.log2(M))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
