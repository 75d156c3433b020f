"""
Whether every Triton kernel config the dispatch can pick fits the GPUs users have; runs on a CPU, no GPU needed.

    python -m benchmarks.check_targets                     # the table: every kernel config x sm_70 ... sm_90
    python -m benchmarks.check_targets --out=benchmarks/targets.json

The kernels' own dispatch code runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1) for the shapes
the models produce: every size (Small to XL) of T6, TPA-KVonly and MHA, bf16 / fp16 / fp32, a training step (RoPE,
TPA's materialisation, SwiGLU, the cross-entropy) and decoding (cache writes, the one-row products, FlashTPA at
batch 1 and 16, short and long caches, both cache layouts; the fused batch-1 step). Each launch is recorded, not
run, and then compiled for each target with Triton's own compiler (PTX and ptxas, for a GPU that is not here),
which reports the shared memory and registers a launch needs. A config fits a target when its shared memory is at
most the target's per-block limit and its registers x threads fit the register file: otherwise it would fail at
its first launch on that GPU. Programmatic dependent launch is compiled only for sm_90 (the dispatch uses it only
there).
"""

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile

import torch
import triton

if __package__ in (None, ""):  # run as `python benchmarks/check_targets.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# per-block shared memory (opt-in maximum) and registers per SM, from the CUDA programming guide's tables
TARGETS = {70: ("V100", 98304, 65536), 75: ("T4 / RTX 20xx", 65536, 65536), 80: ("A100", 166912, 65536), 86: ("RTX 3090 / A10", 101376, 65536),
           89: ("RTX 4090 / L4 / L40S", 101376, 65536), 90: ("H100 / H200", 232448, 65536)}
OPTION_KEYS = ("num_warps", "num_stages", "launch_pdl")



def record_launches():
    """Phase 1 (Triton's interpreter): drive the ops, record each distinct launch as JSON (nothing runs)."""
    os.environ["TRITON_INTERPRET"] = "1"  # the kernels are defined, and their launches seen, without a GPU
    from triton.runtime.interpreter import InterpretedFunction
    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        desc = dict(module=self.fn.__module__, name=self.fn.__name__, args=[_arg(a) for a in args],
                    kwargs={k: _arg(v) for k, v in kwargs.items()})
        launches.setdefault(json.dumps(desc), desc)
    InterpretedFunction.run = record
    drive()
    return list(launches.values())


def _arg(a):
    """A launch argument as JSON: a tensor by its dtype and 16-byte alignment (what the compiler specialises on)."""
    if isinstance(a, torch.Tensor):
        return {"tensor": str(a.dtype).removeprefix("torch."), "aligned": a.data_ptr() % 16 == 0}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    return a


def _value(a):
    if isinstance(a, dict) and "tensor" in a:
        t = torch.empty(32, dtype=getattr(torch, a["tensor"]))
        return t if a["aligned"] else t[1:]
    if isinstance(a, dict) and "dtype" in a:
        return getattr(torch, a["dtype"])
    return a


def drive():
    """Run the ops through their dispatch for every model shape; launches are recorded."""
    import engine
    import tpa_kernels
    import model as model_module
    from engine import KVCache, fused_decode_step
    from model import GPT, model_config

    def always(t, fits=True):  # the dispatch as on a GPU: CPU tensors take the kernels where they fit
        return "triton" if fits else "ref"
    for mod in (model_module, engine, tpa_kernels.gemv, tpa_kernels.flashtpa, tpa_kernels.materialize, tpa_kernels.rope,
                tpa_kernels.cross_entropy, tpa_kernels.mlp, tpa_kernels.cache_write):
        if hasattr(mod, "pick"):
            mod.pick = always
    torch.manual_seed(0)
    for size in ("small", "medium", "large", "xl"):
        for attn in ("tpa", "tpa_kvonly", "mha"):
            cfg = model_config(size, attn, n_layer=1, block_size=4096)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                m = GPT(cfg).to(dtype)
                m.transformer.h[0].attn.materialize_kernel = True
                idx = torch.randint(0, 50257, (1, 64))
                _, loss = m(idx, targets=idx, return_logits=False)  # a training step: forward and backward
                loss.backward()
                with torch.no_grad():
                    for B, M in ((1, 64), (1, 4000), (16, 4000)):
                        cache = KVCache(m, B, M + 8, use_kernel="triton")
                        cache.seek(M)
                        tok = torch.zeros(B, dtype=torch.long)
                        cache.step(tok)
                        cache.step(torch.zeros(B, 4, dtype=torch.long))  # a short chunk (speculative decoding)
                        if engine.fused_decode_ok(cache):
                            cache.step(tok, fused_decode_step)
                    m.lm_head(torch.zeros(m.config.n_embd, dtype=dtype))  # the one-row product


def resources(cubin):
    """(registers per thread, stack frame bytes) from cuobjdump's resource usage of a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = int(out.split("REG:")[1].split()[0])
    stack = int(out.split("STACK:")[1].split()[0]) if "STACK:" in out else 0
    return regs, stack


def _jit_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if k in ("do_not_specialize", "debug", "noinline")}


def compile_for(launch, cc):
    """Phase 2 (no interpreter): compile one recorded launch for compute capability cc."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    jf = getattr(importlib.import_module(launch["module"]), launch["name"])
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    args = [_value(a) for a in launch["args"]]
    kw = {k: _value(v) for k, v in launch["kwargs"].items() if k not in OPTION_KEYS}
    opts = {k: launch["kwargs"][k] for k in OPTION_KEYS if k in launch["kwargs"]}
    if cc < 90:  # the dispatch never launches with PDL below sm_90
        opts.pop("launch_pdl", None)
        kw = {k: (False if k == "PDL" else v) for k, v in kw.items()}
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound, spec, options = binder(*args, **kw, **opts)
    options, signature, constexprs, attrs = jf._pack_args(backend, dict(kw, **opts), bound, spec, options)
    k = triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target, options=options.__dict__)
    regs, stack = resources(k.asm["cubin"])
    return dict(shared=k.metadata.shared, regs=regs, stack=stack, warps=k.metadata.num_warps,
                stages=k.metadata.num_stages)


def fits(r, cc):
    """Whether a compiled kernel (its shared memory, registers per thread and warps) can launch on target cc."""
    _, smem_limit, reg_file = TARGETS[cc]
    return r["shared"] <= smem_limit and r["regs"] <= 255 and r["regs"] * 32 * r["warps"] <= reg_file


def describe(launch):
    """The launch's constants and options, and its tensors' float types (one table row)."""
    jf = getattr(importlib.import_module(launch["module"]), launch["name"])
    names = list(inspect.signature(jf.fn).parameters)
    constexpr = {p.name for p in jf.params if p.is_constexpr}
    given = list(zip(names, launch["args"])) + list(launch["kwargs"].items())
    consts = {n: v for n, v in given if n in constexpr}
    floats = sorted({a["tensor"] for a in launch["args"] if isinstance(a, dict) and "tensor" in a
                     and a["tensor"] in ("bfloat16", "float16", "float32")})
    kw = launch["kwargs"]
    return ", ".join(f"{k}={v}" for k, v in consts.items()) + \
        f" ({'/'.join(floats)}; {kw.get('num_warps', 4)} warps, {kw.get('num_stages', 3)} stages)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="also write the rows as JSON to this file")
    parser.add_argument("--targets", default="70,75,80,86,89,90", help="compute capabilities")
    parser.add_argument("--launches", default="", help=argparse.SUPPRESS)  # phase 2, in a process of its own
    args = parser.parse_args()
    targets = [int(t) for t in args.targets.split(",")]
    if not args.launches:  # phase 1 here, phase 2 in a fresh process: the interpreter patches triton.language
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(record_launches(), f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        try:
            return subprocess.run([sys.executable, "-m", "benchmarks.check_targets", f"--launches={f.name}",
                                   f"--targets={args.targets}", f"--out={args.out}"], env=env).returncode
        finally:
            os.unlink(f.name)
    torch.cuda.is_available = lambda: True  # define the kernels (compiled here for other GPUs, never launched)
    launches = json.load(open(args.launches))
    configs = {}  # one row per kernel config: launches that differ only in sizes the compiler does not see
    for launch in launches:
        configs.setdefault((launch["name"], describe(launch)), launch)
    rows, bad = [], []
    for (name, desc), launch in sorted(configs.items(), key=lambda kv: kv[0]):
        row = dict(kernel=name, config=desc)
        for cc in targets:
            if cc < 80 and "bfloat16" in desc:  # no bf16 before Ampere: those GPUs train and decode in fp16
                row[f"sm_{cc}"] = None
                continue
            try:
                r = compile_for(launch, cc)
            except Exception as e:  # noqa: BLE001  (a config Triton cannot build for this target)
                r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", shared=0, regs=0, warps=0)
            r["fits"] = "error" not in r and fits(r, cc)
            row[f"sm_{cc}"] = r
            if not r["fits"]:
                bad.append(f"{name} {desc} on sm_{cc}: {r}")
        rows.append(row)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} distinct launches, "
          f"{len(rows)} kernel configs")
    print("| kernel | config | " + " | ".join(f"sm_{cc} ({TARGETS[cc][0]}) smem KB / regs" for cc in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    for row in rows:
        cells = ["n/a (fp16 there)" if row[f"sm_{cc}"] is None else
                 f"{row[f'sm_{cc}']['shared'] / 1024:.1f} / {row[f'sm_{cc}']['regs']}"
                 + ("" if row[f"sm_{cc}"]["fits"] else " **does not fit**") for cc in targets]
        print(f"| `{row['kernel']}` | {row['config']} | " + " | ".join(cells) + " |")
    worst = {cc: max(r[f"sm_{cc}"]["shared"] for r in rows if r[f"sm_{cc}"]) for cc in targets}
    print("largest shared memory per target: " + ", ".join(f"sm_{cc} {worst[cc] / 1024:.1f} KB (limit "
                                                            f"{TARGETS[cc][1] / 1024:.0f} KB)" for cc in targets))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, targets={cc: TARGETS[cc] for cc in targets}, rows=rows), f,
                      indent=1)
    print("every config fits every target" if not bad else "DOES NOT FIT:\n  " + "\n  ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
