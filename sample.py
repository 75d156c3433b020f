"""
Sample text from a checkpoint written by train.py, with the model's KV cache (FlashTPA for TPA on CUDA).

    python sample.py --out_dir=out/quickstart --start="ROMEO:"
    python sample.py --out_dir=out/small_tpa --start=FILE:prompt.txt --num_samples=5 --max_new_tokens=500
    python sample.py --out_dir=out/run/ckpt_0010000.pt --top_k=1          # one checkpoint, greedy

Tokens are printed as they are generated (--stream=False prints whole samples).
"""

import codecs
import sys
import time

import tiktoken
import torch

from checkpoint import load_model
from common import resolve_device, resolve_dtype
from configurator import configure
from engine import generate, generate_stream

# -----------------------------------------------------------------------------
out_dir = "out"  # a run directory (its newest checkpoint) or a ckpt_*.pt file
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200  # past the model's block_size the context slides (engine.generate_stream)
temperature = 0.8  # 0: greedy
top_k = 200  # keep the k most likely tokens (1: greedy; 0: all)
top_p = 1.0  # nucleus sampling: keep the smallest set with this much probability
seed = 1337
device = "auto"  # auto (cuda if present), cuda, cpu, ...
dtype = "auto"  # auto (bf16 where supported, else fp16 on CUDA, fp32 on CPU), bfloat16, float16, float32
compile = False  # torch.compile the decode step (fuses its elementwise kernels; first step compiles)
cuda_graph = True  # on CUDA: capture the decode step in a CUDA graph
use_kernel = True  # TPA on CUDA: FlashTPA for decode attention (False: the PyTorch reference)
fused = True  # T6 on CUDA: the fused batch-1 decode step (engine.fused_decode_step; compile is then not needed)
stream = True  # print tokens as they come
# -----------------------------------------------------------------------------
try:
    config = configure(globals(), sys.argv[1:])
    for key, ok, need in [("num_samples", config["num_samples"] >= 1, ">= 1"),
                          ("max_new_tokens", config["max_new_tokens"] >= 0, ">= 0"),
                          ("temperature", config["temperature"] >= 0, ">= 0"), ("top_k", config["top_k"] >= 0, ">= 0"),
                          ("top_p", 0 < config["top_p"] <= 1, "in (0, 1]")]:
        if not ok:
            raise ValueError(f"{key}={config[key]!r} must be {need}")
    device, device_type = resolve_device(config["device"])
    dtype, ptdtype, _ = resolve_dtype(config["dtype"], device_type)
except ValueError as e:
    sys.exit(f"config error: {e}")
config.update(device=device, dtype=dtype)
globals().update(config)
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True

try:
    model, ckpt = load_model(out_dir, device=device, dtype=ptdtype)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"cannot load a checkpoint: {e}")
enc = tiktoken.get_encoding(ckpt.get("meta", {}).get("tokenizer", "gpt2"))
if enc.n_vocab > model.config.vocab_size:
    sys.exit(f"{ckpt['path']}: the tokenizer has {enc.n_vocab} tokens but the model only {model.config.vocab_size}")
print(f"{ckpt['path']}: {model.config.attn} {model.num_params():,} parameters, iteration {ckpt['iter_num']}, "
      f"KV cache {model.kv_cache_elems_per_token() * ptdtype.itemsize:,} bytes per token", file=sys.stderr)

if start.startswith("FILE:"):
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
ids = enc.encode_ordinary(start) or [enc.eot_token]
if len(ids) + max_new_tokens > model.config.block_size:
    print(f"note: {len(ids)} prompt + {max_new_tokens} new tokens exceed block_size={model.config.block_size}: the "
          f"context slides (the last {3 * model.config.block_size // 4} tokens are kept when it fills)", file=sys.stderr)
x = torch.tensor([ids], dtype=torch.long, device=device)
options = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, use_kernel=use_kernel, compile=compile,
               cuda_graph=cuda_graph and device.startswith("cuda"), fused=None if fused else False, stop_tokens=None)

for k in range(num_samples):
    t0, n = time.time(), 0
    sys.stdout.write(start)
    if stream:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tok in generate_stream(model, x, max_new_tokens, **options):
            sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(tok.item())))
            sys.stdout.flush()
            n += 1
        sys.stdout.write(decoder.decode(b"", final=True))
    else:
        out = generate(model, x, max_new_tokens, **options)[0, len(ids):].tolist()
        sys.stdout.write(enc.decode(out))
        n = len(out)
    print(f"\n---------------  [{n} tokens, {n / (time.time() - t0):.1f} tokens/s]", file=sys.stderr, flush=True)
