"""KV-cache generation for every mechanism: equals recomputation, caches what the paper says, samples."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, child_env
from data.shards import write_shard
from tpa_kernels import HAS_TRITON
from engine import KVCache, decode_step, fused_decode_ok, fused_decode_step, generate, sample_logits
from model import GPT, model_config
from test_model import IDS, V, VARIANTS, randomize, tiny


@pytest.fixture(autouse=True)
def _interpreter_gemv_tiles(monkeypatch):
    """The Triton interpreter runs a grid's programs one after another: on CPU the model-level tests here run the
    matrix-vector kernels with 16 rows per program (8x fewer programs than the GPU's 2 or 4, the same kernel code);
    tests/test_gemv.py checks those kernels with the GPU's tiles."""
    if not torch.cuda.is_available():
        import tpa_kernels.gemv
        monkeypatch.setattr(tpa_kernels.gemv, "TILES", {False: (16, 4), True: (16, 4)})


def full_vs_cached_logits(model, seq, prefill, **cache_opts):
    """Relative error of cached logits (prefill, then one token at a time) against one full forward."""
    full = model(seq, all_logits=True)[0]
    cache = KVCache(model, seq.size(0), seq.size(1), **cache_opts)
    got = [cache.prefill(seq[:, :prefill])] + [cache.step(seq[:, t])[:, None] for t in range(prefill, seq.size(1))]
    got = torch.cat(got, dim=1)
    return ((got - full).norm() / full.norm()).item()


@pytest.mark.parametrize("attn,opts", VARIANTS, ids=IDS)
def test_cache_equals_recompute(attn, opts):
    model = randomize(tiny(attn, **opts), std=0.1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (3, 9), generator=g)
    # greedy generation, a ragged batch (right-padded prompts of 9, 2 and 5 tokens)
    lens = [9, 2, 5]
    cached = generate(model, idx, 7, top_k=1, prompt_lens=lens)
    recomputed = generate(model, idx, 7, top_k=1, prompt_lens=lens, use_cache=False)
    for i, (a, b, n) in enumerate(zip(cached, recomputed, lens)):
        assert torch.equal(a, b) and len(a) == n + 7 and torch.equal(a[:n], idx[i, :n])
    # and a plain batch, nanoGPT's return shape
    out = generate(model, idx[:, :4], 5, top_k=1)
    assert out.shape == (3, 9) and torch.equal(out, generate(model, idx[:, :4], 5, top_k=1, use_cache=False))
    # cached logits equal the full forward's, for several prompt lengths
    seq = torch.randint(0, V, (2, 14), generator=g)
    for prefill in (1, 4, 9):
        err = full_vs_cached_logits(model, seq, prefill)
        assert err <= 1e-5, (prefill, err)


def test_cache_api_owns_its_bookkeeping():
    """prefill / step / reset / seek: a reset cache decodes again exactly; misuse is refused with a message."""
    model = randomize(tiny("tpa"), std=0.1)
    seq = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
    cache = KVCache(model, 2, 10)
    runs = []
    for _ in range(2):
        runs.append(torch.cat([cache.prefill(seq[:, :3])[:, -1:], cache.step(seq[:, 3:6])[:, None]]
                              + [cache.step(seq[:, t])[:, None] for t in range(6, 10)], dim=1))
        assert cache.seqlens.tolist() == [10, 10] and cache.length == 10
        with pytest.raises(ValueError, match="exceed the cache's max_len=10"):
            cache.step(seq[:, 0])
        with pytest.raises(ValueError, match="prefill needs an empty cache"):
            cache.prefill(seq[:, :2])
        cache.reset()
    assert torch.equal(runs[0], runs[1])
    full = model(seq, all_logits=True)[0][:, [2, 5, 6, 7, 8, 9]]
    assert ((runs[0] - full).norm() / full.norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="3 rows of tokens for a cache of batch size 2"):
        cache.prefill(seq[:1].expand(3, 10))
    # seek: decoding from a cache filled elsewhere (the benchmarks' random caches) reads what is there
    cache.prefill(seq[:, :6])
    other = KVCache(model, 2, 10)
    for a, b in zip(other.layers, cache.layers):
        for name in a:
            a[name].copy_(b[name])
    other.seek(6)
    torch.testing.assert_close(other.step(seq[:, 6]), cache.step(seq[:, 6]), rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["tpa", "mla"])
def test_compiled_decode_step(attn):
    """generate(compile=True): the torch.compile'd decode step gives the eager tokens (ragged batch too)."""
    model = randomize(tiny(attn), std=0.1)
    idx = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(2))
    for lens in (None, [6, 2, 4]):
        eager = generate(model, idx, 6, top_k=1, prompt_lens=lens)
        compiled = generate(model, idx, 6, top_k=1, prompt_lens=lens, compile=True)
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_mla_absorbed_equals_naive():
    for opts in ({}, dict(q_lora_rank=0), dict(attn_gate=True)):
        model = randomize(tiny("mla", **opts), std=0.1)
        seq = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
        assert full_vs_cached_logits(model, seq, 4, mla_absorb=True) <= 1e-5
        assert full_vs_cached_logits(model, seq, 4, mla_absorb=False) <= 1e-5
        # and directly: absorbed decode == naive decode, step by step
        caches = []
        for absorb in (True, False):
            cache = KVCache(model, 2, 12, mla_absorb=absorb)
            cache.prefill(seq[:, :4])
            caches.append(torch.stack([cache.step(seq[:, t]) for t in range(4, 12)], dim=1))
        torch.testing.assert_close(caches[0], caches[1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("attn,opts", [("tpa", {}), ("tpa_kvonly", {}), ("tpa", dict(kv_shift=True)),
                                       ("tpa", dict(tpa_order=3)), ("tpa", dict(tpa_const_a=True))])
def test_flashtpa_in_the_decode_path(attn, opts):
    """The model's decode through the Triton kernel (the interpreter on CPU) equals the reference path."""
    model = randomize(tiny(attn, **opts), std=0.1)
    seq = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    assert full_vs_cached_logits(model, seq, 3, use_kernel="triton") <= 1e-5
    idx = seq[:, :5]
    assert torch.equal(generate(model, idx, 5, top_k=1, use_kernel="triton", prompt_lens=[5, 2])[1],
                       generate(model, idx, 5, top_k=1, use_kernel=False, prompt_lens=[5, 2])[1])


@pytest.mark.parametrize("attn", ["tpa", "tpa_kvonly"])
@pytest.mark.parametrize("use_kernel", [True, "triton"], ids=["references", "kernels"])
def test_fused_decode_step(use_kernel, attn):
    """Batch-1 T6: the fused decode step (RMSNorm, SwiGLU and residual adds inside the matrix-vector kernels, RoPE
    inside the cache write) gives decode_step's logits and cache contents, step by step."""
    if use_kernel == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    model = randomize(tiny(attn), std=0.1)
    seq = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    runs = []
    for fused in (False, True):
        cache = KVCache(model, 1, 12, use_kernel=use_kernel)
        cache.prefill(seq[:, :4])
        step = fused_decode_step if fused else decode_step
        runs.append((torch.stack([cache.step(seq[:, t], step) for t in range(4, 12)]), cache))
    (ref, ref_cache), (got, got_cache) = runs
    assert got.shape == ref.shape == (8, 1, V)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_cache.seqlens, ref_cache.seqlens) and got_cache.seqlens.item() == 12
    for a, b in zip(got_cache.layers, ref_cache.layers):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # generate(fused=True) gives the same greedy tokens; what the fused step does not serve falls back or says so
    idx = seq[:, :5]
    assert torch.equal(generate(model, idx, 6, top_k=1, fused=True, use_kernel=use_kernel),
                       generate(model, idx, 6, top_k=1, fused=False, use_kernel=use_kernel))
    assert not fused_decode_ok(KVCache(model, 2, 8)) and not fused_decode_ok(KVCache(model, 1, 8, use_kernel=False))
    assert not fused_decode_ok(KVCache(tiny("tpa", kv_shift=True), 1, 8))
    with pytest.raises(ValueError, match="batch-1 T6 / TPA-KVonly"):
        fused_decode_step(seq[:, :1].expand(2, 1), KVCache(model, 2, 8))
    if use_kernel == "triton":  # fp16 (the interpreter mis-handles bf16): the same arithmetic up to rounding (the
        # norm's eps is fp32's, as in F.rms_norm: fp16's would change these logits by ~8%)
        half = [run_half(model.half(), seq, fused) for fused in (False, True)]
        assert ((half[1] - half[0]).norm() / half[0].norm()).item() < 5e-3


def run_half(model, seq, fused):
    cache = KVCache(model, 1, 12, use_kernel="triton")
    cache.prefill(seq[:, :4])
    return torch.stack([cache.step(seq[:, t], fused_decode_step if fused else decode_step).float() for t in range(4, 12)])


@pytest.mark.parametrize("attn,opts", VARIANTS, ids=IDS)
def test_cache_memory_equals_formula(attn, opts):
    model = tiny(attn, **opts)
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(model, 3, 50, dtype=dtype)
        per_token_layer = model.transformer.h[0].attn.kv_cache_elems_per_token()
        assert cache.nbytes() == per_token_layer * model.config.n_layer * 3 * 50 * dtype.itemsize
        assert cache.nbytes() == model.kv_cache_elems_per_token() * 3 * 50 * dtype.itemsize


def test_paper_cache_contents():
    """TPA caches A_K, rotated B_K, A_V, B_V; MLA the latent and the rotated shared key; GQA K and V."""
    with torch.device("meta"):
        small = {a: GPT(model_config("small", a)) for a in ("tpa", "mla", "gqa")}
    assert small["tpa"].transformer.h[0].attn.cache_spec() == {"ak": (34, 2), "bk": (2, 64), "av": (34, 2), "bv": (2, 64)}
    assert small["mla"].transformer.h[0].attn.cache_spec() == {"c_kv": (256,), "k_pe": (32,)}
    assert small["gqa"].transformer.h[0].attn.cache_spec() == {"k": (2, 64), "v": (2, 64)}


def test_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_logits(logits, top_k=1).tolist() == [1, 0]
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # only the two most likely
    draws = torch.stack([sample_logits(logits, top_p=0.5, generator=g) for _ in range(100)])
    assert set(draws[:, 0].tolist()) == {1} and set(draws[:, 1].tolist()) == {0}  # the nucleus


def test_generate_limits_and_stops():
    model = randomize(tiny("tpa"), std=0.1)
    idx = torch.randint(0, V, (2, 10))
    with pytest.raises(ValueError, match="must fit the model's block_size=256"):
        generate(model, idx, 250, prompt_lens=[10, 8])  # ragged prompts do not slide
    greedy = generate(model, idx, 6, top_k=1)
    stop = int(greedy[0, 12])  # the third generated token of row 0
    first = 10 + greedy[0, 10:].tolist().index(stop)
    out = generate(model, idx, 6, top_k=1, stop_tokens={stop})
    assert out[0].tolist() == greedy[0, :first + 1].tolist()  # up to and including the first stop token
    assert len(out[1]) == 16 or stop in out[1][10:].tolist()


def sliding_reference(model, idx, n, block_size):
    """Greedy tokens by full forwards, the context sliding as generate_stream documents (jumps to 3/4 block)."""
    keep = 3 * block_size // 4
    ctx, out = (idx if idx.size(1) < block_size else idx[:, -keep:]), []
    for _ in range(n):
        if ctx.size(1) == block_size:
            ctx = ctx[:, -keep:]
        tok = model(ctx)[0][:, -1].argmax(-1)
        out.append(tok)
        ctx = torch.cat([ctx, tok[:, None]], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("attn", ["tpa", "mha", "mla"])
def test_generation_slides_past_block_size(attn):
    model = randomize(tiny(attn, block_size=16), std=0.1)
    g = torch.Generator().manual_seed(0)
    for T in (5, 16, 23):  # a short prompt, one of block_size, one longer than block_size
        idx = torch.randint(0, V, (2, T), generator=g)
        cached = generate(model, idx, 40, top_k=1)
        assert cached.shape == (2, T + 40) and torch.equal(cached[:, :T], idx)
        assert torch.equal(cached, generate(model, idx, 40, top_k=1, use_cache=False))  # cached == recomputed
        assert torch.equal(cached[:, T:], sliding_reference(model, idx, 40, 16))
    # stop tokens still end generation after a slide
    idx = torch.randint(0, V, (1, 5), generator=g)
    greedy = generate(model, idx, 40, top_k=1)
    stop = int(greedy[0, 30])  # generated after the first slide (the cache fills at 16 tokens)
    first = 5 + greedy[0, 5:].tolist().index(stop)
    assert generate(model, idx, 40, top_k=1, stop_tokens={stop})[0].tolist() == greedy[0, :first + 1].tolist()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint from a 2-iteration training run with GPT-2's vocabulary."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_shard(str(root / f"d_{split}_000000.bin"), rng.integers(0, 50257, 4000).astype(np.uint16))
    args = dict(size="tiny", attn="tpa", block_size=64, batch_size=2, gradient_accumulation_steps=1, max_iters=2,
                eval_interval=2, eval_tokens=256, compile=False, device="cpu", data_dir=str(root), out_dir=str(root / "out"))
    subprocess.run([sys.executable, "train.py"] + [f"--{k}={v}" for k, v in args.items()], cwd=ROOT, check=True,
                   capture_output=True, env=child_env())
    return str(root / "out")


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=child_env())


def test_sample_py_end_to_end(tiny_run, tmp_path):
    p = run_sample(f"--out_dir={tiny_run}", "--start=Hello world", "--num_samples=2", "--max_new_tokens=12", "--seed=3")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Hello world") == 2 and p.stderr.count("[12 tokens") == 2
    greedy = [run_sample(f"--out_dir={tiny_run}", "--top_k=1", "--num_samples=1", f"--stream={s}",
                         "--max_new_tokens=8") for s in (True, False)]
    assert greedy[0].returncode == 0 and greedy[0].stdout == greedy[1].stdout  # streaming prints the same text
    (tmp_path / "prompt.txt").write_text("Once upon a time")
    p = run_sample(f"--out_dir={tiny_run}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=1",
                   "--max_new_tokens=4")
    assert p.returncode == 0 and p.stdout.startswith("Once upon a time")


def test_sample_py_errors(tiny_run, tmp_path):
    p = run_sample(f"--out_dir={tmp_path}")
    assert p.returncode != 0 and "holds no ckpt_NNNNNNN.pt checkpoint" in p.stderr
    p = run_sample(f"--out_dir={tiny_run}", "--max_new_tokens=100", "--num_samples=1")  # past block_size=64
    assert p.returncode == 0 and "[100 tokens" in p.stderr and "the context slides" in p.stderr, p.stderr
    p = run_sample(f"--out_dir={tiny_run}", "--temprature=0.5")
    assert p.returncode != 0 and "did you mean 'temperature'" in p.stderr
    for bad, message in (("--top_p=0", "top_p=0.0 must be in (0, 1]"), ("--temperature=-1", "temperature=-1.0 must be"),
                         ("--dtype=bf17", "dtype='bf17'; choose one of auto, bfloat16"),
                         ("--num_samples=0", "num_samples=0 must be >= 1")):
        p = run_sample(f"--out_dir={tiny_run}", bad)
        assert p.returncode != 0 and f"config error: {message}" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run_sample(f"--out_dir={tiny_run}", "--dtype=fp32", "--num_samples=1", "--max_new_tokens=2")
    assert p.returncode == 0, p.stderr
