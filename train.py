"""
Pretrain T6 or any baseline of model.py's registry on token shards (data/prepare.py).

    python train.py config/quickstart.py                              # one GPU, or the CPU
    torchrun --standalone --nproc_per_node=8 train.py config/small_tpa.py
    torchrun --standalone --nproc_per_node=8 train.py config/small_tpa.py --attn=mha   # sweep a variant
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/xl_tpa.py                          # multi-node
    python train.py config/small_tpa.py --init_from=resume                          # continue exactly

Departures from nanoGPT and from the official trainer (docs/DESIGN.md sec. 7), on purpose:
- gradient_accumulation_steps is global: each of W ranks runs gradient_accumulation_steps / W
  micro-steps, so the global batch does not depend on the number of GPUs;
- the loss is divided by the number of micro-steps, so gradients (and clipping) see the true mean;
- the data order is exact and resumable (data/loader.py), evaluation uses a fixed validation set on
  all ranks, and a resumed run continues with exactly the losses of an uninterrupted one;
- MFU uses the model's own FLOPs per token (model.flops_per_token) and the GPU's real peak.
"""

import atexit
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, fields, replace

_t_launch = time.time()  # the wall-time summary at the end counts from here, imports included ("_": not a setting)

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from configurator import configure
from data.loader import TrainLoader, ValSet
from data.shards import TokenIdError
from eval.val_loss import evaluate as evaluate_val
from common import (check_dtype, describe_device, destroy_distributed, init_distributed, peak_flops, print0,
                    resolve_device, resolve_dtype)
from model import GPT, GPTConfig, model_config
from tpa_kernels.dispatch import DEFAULTS as _KERNEL_DEFAULTS, SDPA_BACKENDS as _SDPA_BACKENDS  # "_": not settings
from tpa_kernels.dispatch import choice, overrides, select_sdpa_backend

# -----------------------------------------------------------------------------
# defaults: the paper's recipe for T6 Small (docs/DESIGN.md sec. 5); config/*.py and --key=value override them
# I/O
out_dir = "out"
eval_interval = 1000  # evaluate every this many iterations (and at max_iters)
checkpoint_interval = 0  # checkpoint every this many iterations (0: at every evaluation); always at max_iters
log_interval = 10  # one log line every this many iterations
eval_tokens = 10 * 2 ** 20  # validation tokens per evaluation: the first ones of the val split, fixed
keep_checkpoints = 2  # keep the newest K checkpoints (0: all)
init_from = "scratch"  # "scratch" or "resume" (the newest checkpoint in out_dir)
dry_run = False  # print the resolved config and the model's size, then exit
# wandb logging (works with WANDB_MODE=offline)
wandb_log = False
wandb_project = "tpa"
wandb_run_name = ""  # default: out_dir's name
variant = ""  # the run's name in comparisons (scripts/compare.py groups seeds by it; scripts/sweep.py sets it)
budget = ""  # what the run's length equals across variants, as a label for comparisons ("tokens=2e+07", "flops=...",
# "seconds=..."; scripts/sweep.py sets it): scripts/compare.py reports each budget apart
# data
data_dir = "data/fineweb-edu-100B"
gradient_accumulation_steps = 16  # global over all ranks: global batch = batch_size x this x block_size
batch_size = 30  # micro-batch per GPU
block_size = 1024
seed = 1337  # model init and data order
# model: a row of model.SIZES and a mechanism; any GPTConfig field (n_head, q_rank, kv_shift, ...)
# can be set too, and None means "the size table's value"
size = "small"
attn = "tpa"
# AdamW (docs/DESIGN.md sec. 5)
learning_rate = 6e-4  # peak
max_iters = 100000  # optimizer steps
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0  # on the global mean gradient; 0 disables
decay_all = True  # paper: decay every parameter; False exempts 1-D parameters and the (tied) embedding
# learning rate: linear warmup from 0, cosine to min_lr at lr_decay_iters, then min_lr
warmup_iters = 2000
lr_decay_iters = 100000
min_lr = 3e-5
# system
device = "auto"  # auto (cuda if present), cuda, cuda:N, cpu, mps
dtype = "auto"  # auto (bf16 where supported, else fp16 on CUDA, fp32 on CPU), bfloat16, float16, float32 (bf16, ...)
compile = True  # torch.compile the model (compile time is reported apart from step time)
tpa_attention = "materialise"  # T6's attention: "materialise" (Q, K, V, then SDPA), "recompute" (the same, with Q,
# K, V built again in the backward instead of kept) or "fused" (from the factors, tpa_kernels/tpa_attention.py); the
# last two keep less memory; speed in benchmarks/RESULTS.md
sdpa_backend = "auto"  # the attention kernel behind SDPA: "auto" (PyTorch's choice: cuDNN on Hopper), "cudnn", "flash"
# (FlashAttention-2), "efficient", or "fa4" (flash-attn-4 through PyTorch's registry; Hopper, Blackwell; pip install
# flash-attn-4==4.0.0b18, see README); one that cannot run here warns and stays on auto; header.json records the one
# in effect
float8 = False  # float8 GEMMs in the blocks' Linear layers (torchao, rowwise scaling); CUDA sm_89+ (Ada, Hopper),
# emulated on the CPU (float8's numerics, not its speed); MFU stays against the bf16 peak
# -----------------------------------------------------------------------------
_MODEL_KEYS = {f.name: f.type for f in fields(GPTConfig) if f.name not in ("block_size", "attn")}
def check_settings(c):
    """Every setting's range, before anything runs: a ValueError names the key and what it must be."""
    at_least = dict(batch_size=1, block_size=1, gradient_accumulation_steps=1, eval_interval=1, log_interval=1,
                    eval_tokens=1, keep_checkpoints=0, max_iters=0, warmup_iters=0, lr_decay_iters=0,
                    checkpoint_interval=0, learning_rate=0.0, min_lr=0.0, weight_decay=0.0, grad_clip=0.0)
    for k, low in at_least.items():
        if not c[k] >= low:  # also catches nan
            raise ValueError(f"{k}={c[k]} must be >= {low}")
    for k in ("beta1", "beta2"):
        if not 0 <= c[k] < 1:
            raise ValueError(f"{k}={c[k]} must be in [0, 1)")
    if not c["adam_eps"] > 0:
        raise ValueError(f"adam_eps={c['adam_eps']} must be > 0")
    if c["sdpa_backend"] not in _SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend={c['sdpa_backend']!r} must be one of {', '.join(_SDPA_BACKENDS)}")
    if c["tpa_attention"] not in ("materialise", "recompute", "fused"):
        raise ValueError(f"tpa_attention={c['tpa_attention']!r} must be 'materialise', 'recompute' or 'fused'")
    check_dtype(c["dtype"])
    resolve_device(c["device"])


try:
    config = configure(globals(), sys.argv[1:], extra=_MODEL_KEYS)
    check_settings(config)
except ValueError as e:
    sys.exit(f"config error: {e}")
globals().update(config)
# kernel choices for the whole run (tpa_kernels/dispatch.py). The stack holds the block open until the process
# ends (an entered overrides() that nothing references is garbage-collected at once, which leaves the block), and
# atexit leaves it before the interpreter tears the modules down (else the block's exit fails on a cleared module)
run_choices = ExitStack()
run_choices.enter_context(overrides(tpa_attention=None if tpa_attention == "materialise" else tpa_attention))
atexit.register(run_choices.close)

def get_lr(it):
    """Linear warmup from 0 over warmup_iters, cosine to min_lr at lr_decay_iters, then min_lr (the recipe:
    docs/DESIGN.md, section 5)."""
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def git_commit():
    if os.environ.get("GIT_COMMIT"):  # the code was copied without its .git (a job snapshot): the sender names it
        return os.environ["GIT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here).decode().strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- distributed setup --------------------------------------------------------------------------------
device, device_type = resolve_device(device)
dist_info = init_distributed(device)
ddp, rank, local_rank, world_size, device = (dist_info.ddp, dist_info.rank, dist_info.local_rank, dist_info.world_size,
                                             dist_info.device)
if ddp:
    flag_group = dist.new_group(backend="gloo")  # CPU collectives for the stop flag, no GPU sync
master = rank == 0
sdpa_in_effect = select_sdpa_backend(sdpa_backend, torch.device(device))
if gradient_accumulation_steps % world_size:
    raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} is global and must be divisible by "
                     f"the number of processes ({world_size}); e.g. --gradient_accumulation_steps="
                     f"{max(world_size, gradient_accumulation_steps // world_size * world_size)}")
micro_steps = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
dtype, ptdtype, autocast = resolve_dtype(dtype, device_type)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


# -- model ----------------------------------------------------------------------------------------------
model_overrides = {k: config[k] for k in _MODEL_KEYS}
resume_ckpt = None
if init_from == "resume":
    if not list_checkpoints(out_dir):
        raise SystemExit(f"init_from='resume' but {out_dir!r} holds no checkpoint; start with init_from='scratch'")
    for path in reversed(list_checkpoints(out_dir)):  # the newest readable one
        try:
            resume_ckpt = load_checkpoint(path)
            break
        except ValueError as e:
            print0(f"warning: {e}; trying the one before it")
    if resume_ckpt is None:
        raise SystemExit(f"no checkpoint in {out_dir!r} can be read (see the warnings); start with init_from='scratch'")
    mconf = GPTConfig(**resume_ckpt["model_config"])
    asked = asdict(model_config(size, attn, block_size=block_size, **model_overrides))
    if asked != asdict(mconf):
        diff = {k: (v, asked[k]) for k, v in asdict(mconf).items() if asked[k] != v}
        raise SystemExit(f"the checkpoint's model differs from this config ({{key: (checkpoint, config)}}: {diff}); "
                         f"resume with the config the run started with")
elif init_from == "scratch":
    held = [] if dry_run else list_checkpoints(out_dir)
    if held:  # a second run there would mix with the first: resume would pick the newest checkpoint of either,
        # sample.py the other run's model, and pruning could delete this run's
        raise SystemExit(f"{out_dir!r} already holds a run ({os.path.basename(held[-1])}): "
                         f"continue it with --init_from=resume, train into another --out_dir, or delete the folder "
                         f"to start again")
    try:
        mconf = model_config(size, attn, block_size=block_size, **model_overrides)
    except ValueError as e:
        sys.exit(f"config error: {e}")
else:
    raise SystemExit(f"init_from={init_from!r}: use 'scratch' or 'resume'")

if dry_run:
    with torch.device("meta"):
        model = GPT(mconf)
    print(json.dumps(dict(config=config, model=asdict(mconf), params=model.num_params(), tokens_per_iter=tokens_per_iter,
                          flops_per_token=model.flops_per_token(block_size)), indent=1))
    print(f"parameters: {model.num_params():,} | KV cache per token: {model.kv_cache_elems_per_token():,} elements | "
          f"training FLOPs per token: {model.flops_per_token(block_size):,} | tokens per iteration: {tokens_per_iter:,}")
    sys.exit(0)


def to_float8(model):
    """Swap the blocks' Linear layers for torchao's Float8Linear with rowwise scaling (float8 operands with one
    scale per row, in the forward and both backward GEMMs); the weights stay in float32 and the checkpoints keep
    their keys. The output layer (tied to the embedding, read by the fused cross-entropy) stays in the autocast
    dtype. Returns the names converted, padded and kept."""
    if device_type not in ("cuda", "cpu"):
        raise SystemExit(f"float8=True runs on CUDA (sm_89+) or, emulated, on the CPU; not on {device_type}")
    if device_type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise SystemExit(f"float8=True needs float8 tensor cores (sm_89+: Ada, Hopper, Blackwell); this GPU is "
                         f"sm_{major}{minor}: run with float8=False")
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    except ImportError:
        raise SystemExit("float8=True needs torchao: pip install torchao") from None

    class PaddedFloat8Linear(Float8Linear):
        """Float8Linear for sizes that are not multiples of 16, which float8 GEMMs need in both dimensions of the
        weight (Medium's SwiGLU is 1024 -> 5460 and 2730 -> 1024; T6's factor projections are odd widths): the
        weight and the input are padded with zeros per call, as model.Linear pads for cuBLAS, and the output sliced
        back. Zeros change no sum and no row's scale."""

        def forward(self, x):
            if torch.is_autocast_enabled(x.device.type):  # as Float8Linear.forward does
                x = x.to(torch.get_autocast_dtype(x.device.type))
            pad_in, pad_out = -self.in_features % 16, -self.out_features % 16
            w = torch.nn.functional.pad(self.weight, (0, pad_in, 0, pad_out))
            y = matmul_with_hp_or_float8_args.apply(torch.nn.functional.pad(x, (0, pad_in)), w.t(),
                                                    self.linear_mm_config, self.config)
            return y[..., :self.out_features]

    config = replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=device_type == "cpu")
    layers = dict(converted=[], padded=[], kept=["lm_head"])
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name in layers["kept"]:
            continue
        aligned = mod.in_features % 16 == 0 and mod.out_features % 16 == 0
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, (Float8Linear if aligned else PaddedFloat8Linear).from_float(
            mod, config=config))
        layers["converted"].append(name)
        if not aligned:
            layers["padded"].append(f"{name} ({mod.in_features} -> {mod.out_features})")
    print0(f"float8: {len(layers['converted'])} Linear layers, {len(layers['padded'])} of them padded to multiples of "
           f"16" + (", emulated on the CPU" if device_type == "cpu" else "") + f"; the output layer stays {dtype}")
    return layers


torch.manual_seed(seed)
model = GPT(mconf).to(device)
float8_layers = to_float8(model) if float8 else None  # before the optimizer and torch.compile see the modules
raw_model = model

if decay_all:
    param_groups = [dict(params=list(model.parameters()), weight_decay=weight_decay)]
else:
    emb = model.transformer.wte.weight
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not emb]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is emb]
    param_groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
optimizer = torch.optim.AdamW(param_groups, lr=learning_rate, betas=(beta1, beta2), eps=adam_eps,
                              fused=device_type == "cuda")
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")

data_meta_path = os.path.join(data_dir, "meta.json")
data_meta = json.load(open(data_meta_path)) if os.path.exists(data_meta_path) else {}
if data_meta.get("vocab_size", 0) > mconf.vocab_size:
    raise SystemExit(f"{data_dir} holds {data_meta.get('tokenizer', 'its tokenizer')}'s {data_meta['vocab_size']} token "
                     f"ids but the model's vocabulary has {mconf.vocab_size}; raise vocab_size (GPT-2: 50304)")
try:  # each shard's token ids are checked against the vocabulary when it is first read
    train_loader = TrainLoader(data_dir, batch_size, block_size, rank, world_size, seed, device, mconf.vocab_size)
    val_set = ValSet(data_dir, block_size, eval_tokens, mconf.vocab_size)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"data error: {e}")


def next_batch():
    try:
        return train_loader.next_batch()
    except TokenIdError as e:  # a shard opened for the first time
        raise SystemExit(f"data error: {e}") from None

def reduce_stats(step_stats):
    """(steps, 2) CPU tensor of [loss, grad norm] averaged over ranks, from the per-step device tensors."""
    if not step_stats:
        return torch.zeros(0, 2)
    stats = torch.stack(step_stats)
    if ddp:
        dist.all_reduce(stats, op=dist.ReduceOp.AVG)
    return stats.cpu()


class StepStats:
    """The steps since the last log line: their [loss, grad norm] as device tensors (no sync per step), the ones a
    resumed checkpoint carried (already reduced over ranks), and the time of the timed ones. Its state_dict is what
    a checkpoint keeps, so that a resumed run writes the log line an uninterrupted run would have written."""

    def __init__(self, carried=()):
        self.carried = list(carried)
        self.steps, self.timed, self.t_start = [], 0, time.time()

    def add(self, loss, grad_norm, timed=True):
        self.steps.append(torch.stack([loss.float(), grad_norm.float()]))
        self.timed += timed

    def restart_clock(self):
        """Time spent from here on counts (compilation, evaluation and saving do not)."""
        self.t_start = time.time()

    def step_time(self):
        """Seconds per timed step since the clock started, or None."""
        return (time.time() - self.t_start) / self.timed if self.timed else None

    def reduced(self):
        """(steps, 2) CPU tensor, the same on every rank: the carried steps, then this window's."""
        return torch.cat([torch.tensor(self.carried, dtype=torch.float32).view(-1, 2), reduce_stats(self.steps)])

    def clear(self):
        self.carried, self.steps, self.timed = [], [], 0
        self.restart_clock()

    def state_dict(self):
        return dict(pending_stats=self.reduced().tolist())


iter_num, tokens_seen, best_val_loss, wandb_id = 0, 0, float("inf"), None
stats = StepStats()
if resume_ckpt is not None:
    model.load_state_dict(resume_ckpt["model"])
    optimizer.load_state_dict(resume_ckpt["optimizer"])
    scaler.load_state_dict(resume_ckpt["scaler"])
    train_loader.load_state_dict(resume_ckpt["loader"])
    iter_num, tokens_seen = resume_ckpt["iter_num"], resume_ckpt["tokens_seen"]
    best_val_loss, wandb_id = resume_ckpt["best_val_loss"], resume_ckpt["meta"].get("wandb_id")
    stats = StepStats(resume_ckpt.get("pending_stats", []))
    rng = resume_ckpt["rng"][rank] if len(resume_ckpt["rng"]) == world_size else resume_ckpt["rng"][0]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if device_type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    print0(f"resumed from {resume_ckpt['path']} at iteration {iter_num} ({tokens_seen:,} tokens)")
    del resume_ckpt

if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

# -- logging -----------------------------------------------------------------------------------------------
flops_per_token = raw_model.flops_per_token(block_size)
device_name = describe_device(device, device_type)
peak = peak_flops(device_name, dtype) if device_type == "cuda" else None
metrics_path = os.path.join(out_dir, "metrics.jsonl")
tokenizer = data_meta.get("tokenizer", "gpt2")
meta = dict(git_commit=git_commit(), torch=torch.__version__, python=platform.python_version(),
            device=device_name, world_size=world_size, dtype=dtype, wandb_id=wandb_id, tokenizer=tokenizer)
if master:
    os.makedirs(out_dir, exist_ok=True)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        meta["nvidia_smi"] = subprocess.check_output(["nvidia-smi"], stderr=subprocess.DEVNULL).decode()
    except (OSError, subprocess.CalledProcessError):
        pass
    header = dict(meta, argv=sys.argv, config=config, model_config=asdict(mconf), params=raw_model.num_params(),
                  attn_params_per_layer=raw_model.attn_params_per_layer(), flops_per_token=flops_per_token,
                  kv_cache_elems_per_token=raw_model.kv_cache_elems_per_token(), tokens_per_iter=tokens_per_iter,
                  peak_flops_per_device=peak, kernel_choices={k: choice(k) for k in _KERNEL_DEFAULTS},
                  sdpa_backend=sdpa_in_effect, float8_layers=float8_layers, start_iter=iter_num,
                  time=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(os.path.join(out_dir, "header.json" if iter_num == 0 else f"header_resume_{iter_num:07d}.json"), "w") as f:
        json.dump(header, f, indent=1)
    # a resumed run rewrites the log from its checkpoint on, so the metrics match one uninterrupted run
    kept = []
    if iter_num > 0 and os.path.exists(metrics_path):
        kept = [line for line in open(metrics_path) if json.loads(line)["iter"] <= iter_num]
    with open(metrics_path, "w") as f:
        f.writelines(kept)
    print0(f"{raw_model.num_params():,} parameters | {attn} {size} | {world_size} x {device_name} | {dtype} | "
           f"global batch {gradient_accumulation_steps} x {batch_size} x {block_size} = {tokens_per_iter:,} tokens | "
           f"{micro_steps} micro-steps per rank | MFU peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}")
    if peak is None and device_type == "cuda":
        print0(f"warning: no peak FLOP/s known for {device_name!r}; MFU is not reported (add it to PEAK_FLOPS)")
if wandb_log and master:
    import wandb
    run = wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                     config=dict(config, model=asdict(mconf)), id=wandb_id, resume="allow")
    meta["wandb_id"] = run.id


def log(record):
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_log:
            wandb.log(record, step=record["iter"])


def evaluate():
    """Mean loss over the fixed validation set, computed on all ranks and reduced (eval/val_loss.py).

    Through the module inside DDP: DDP's forward broadcasts buffers, a collective that would hang when ranks run
    different numbers of batches (a small eval_tokens leaves some ranks none)."""
    t0 = time.time()
    net = model.module if ddp else model
    net.eval()
    loss = evaluate_val(net, val_set, batch_size, device, autocast, rank, world_size)["loss"]
    net.train()
    wall["evaluation"] += time.time() - t0
    return loss


def stop_non_finite(what, it):
    """Stop the run (every rank: they all see the same reduced numbers or weights) without saving."""
    kept = list_checkpoints(out_dir)
    last = f"the last good checkpoint, {os.path.basename(kept[-1])}, is kept" if kept else "no checkpoint was saved yet"
    raise SystemExit(f"{what} at iteration {it}: stopping without saving; {last} (in {out_dir}). Lower the learning "
                     f"rate (or check the data), then resume (--init_from=resume) or start again")


def check_finite(stats, last_iter):
    """Stop on a non-finite loss, or a non-finite gradient norm unless fp16's GradScaler skips such steps."""
    bad_loss = ~torch.isfinite(stats[:, 0])
    bad = bad_loss if scaler.is_enabled() else bad_loss | ~torch.isfinite(stats[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        what = f"non-finite loss ({stats[i, 0].item()})" if bad_loss[i] else f"non-finite gradient norm ({stats[i, 1].item()})"
        stop_non_finite(what, last_iter - len(stats) + 1 + i)


def checkpoint(val_loss=None):
    t0 = time.time()
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state() if device_type == "cuda" else None)
    rngs = [None] * world_size
    if ddp:
        dist.all_gather_object(rngs, rng, group=flag_group)
    else:
        rngs = [rng]
    loader_state = train_loader.state_dict()  # one batch is prefetched: it is the next one to consume
    pending = stats.state_dict()  # steps not logged yet: a resumed run logs them as this one would
    check_finite(torch.tensor(pending["pending_stats"]).view(-1, 2), iter_num)
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # a step with finite numbers can overflow
        stop_non_finite("non-finite weights", iter_num)
    error = None
    if master:
        state = dict(model=raw_model.state_dict(), model_config=asdict(mconf), config=config,
                     optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                     tokens_seen=tokens_seen, best_val_loss=best_val_loss, val_loss=val_loss,
                     loader=dict(loader_state, step=loader_state["step"] - 1), rng=rngs, meta=meta, **pending)
        try:
            path = save_checkpoint(state, out_dir, keep_checkpoints)
            print0(f"saved {path}")
        except OSError as e:  # a full disk, a quota: the previous checkpoint is still whole
            error = e
    failed = torch.tensor([error is not None], dtype=torch.int32)
    if ddp:
        dist.all_reduce(failed, group=flag_group)
    if failed.item():
        kept = list_checkpoints(out_dir)
        raise SystemExit(f"could not save a checkpoint at iteration {iter_num}" + (f" ({error})" if error else "")
                         + (f"; the previous one, {os.path.basename(kept[-1])}, is kept" if kept else "")
                         + ". Free space in out_dir, then resume with --init_from=resume")
    wall["checkpoints"] += time.time() - t0


# preemption: SIGTERM / SIGINT save a checkpoint at the end of the current step; a second one a second or more
# later (a second Ctrl-C) stops at once, without a checkpoint (torchrun passes a Ctrl-C on within milliseconds)
stop_signal = []


def on_stop_signal(signum, frame):
    if stop_signal and time.time() - stop_signal[0] >= 1.0:
        print(f"second stop signal: exiting now without a checkpoint (rank {rank})", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    stop_signal.append(time.time())


for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, on_stop_signal)


def stop_requested():
    flag = torch.tensor([len(stop_signal)], dtype=torch.int32)
    if ddp:
        dist.all_reduce(flag, group=flag_group)
    return flag.item() > 0


def perplexity(loss):
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float above ~709.8


# -- training loop -------------------------------------------------------------------------------------
def flush_stats():
    """Reduce the steps since the last line, stop on a non-finite one, log a line. Syncs the device."""
    window = stats.reduced()  # with a resumed checkpoint's carried steps: the record equals an uninterrupted run's
    check_finite(window, iter_num)
    # the window's largest loss and gradient norm too: a spike between two log lines is not missed (compare.py)
    record = dict(iter=iter_num, loss=window[-1, 0].item(), loss_avg=window[:, 0].mean().item(),
                  loss_max=window[:, 0].max().item(), lr=lr, grad_norm=window[-1, 1].item(),
                  grad_norm_max=window[:, 1].max().item(), tokens=tokens_seen)
    line = (f"iter {iter_num}/{max_iters} | loss {record['loss']:.4f} | lr {lr:.2e} | "
            f"grad {record['grad_norm']:.3f}")
    dt = stats.step_time()
    if dt is not None:  # the first step (compilation) is not timed
        record.update(dt_ms=1000 * dt, tokens_per_s=tokens_per_iter / dt)
        line += f" | {1000 * dt:.1f} ms | {tokens_per_iter / dt:,.0f} tok/s"
        if peak:
            record["mfu"] = raw_model.estimate_mfu(tokens_per_iter / dt, peak * world_size, block_size)
            line += f" | MFU {100 * record['mfu']:.1f}%"
        line += f" | eta {(max_iters - iter_num) * dt / 3600:.2f}h"
    if device_type == "cuda":
        record["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        line += f" | mem {record['mem_gib']:.1f} GiB"
    log(record)
    print0(line)
    stats.clear()


wall = {"startup": time.time() - _t_launch, "first step": 0.0, "evaluation": 0.0, "checkpoints": 0.0}  # seconds
if iter_num == 0:
    val_loss = evaluate()
    print0(f"iter 0: val loss {val_loss:.4f} | val ppl {perplexity(val_loss):.2f}")
    log(dict(iter=0, val_loss=val_loss, val_ppl=perplexity(val_loss), tokens=0))
if iter_num >= max_iters:
    print0(f"nothing to do: the run is at iteration {iter_num} and max_iters={max_iters}")
x, y = next_batch()
stats.restart_clock()
first_step = True
while iter_num < max_iters:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    t0 = time.time()
    for micro_step in range(micro_steps):
        sync = not ddp or micro_step == micro_steps - 1  # all-reduce gradients on the last micro-step only
        with (nullcontext() if sync else model.no_sync()):
            with autocast:
                loss = model(x, y, return_logits=False)[1] / micro_steps  # the mean over micro-steps, not the sum
            x, y = next_batch()  # prefetch while the device works
            scaler.scale(loss).backward()
        step_loss += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.zeros((), device=device)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    tokens_seen += tokens_per_iter
    stats.add(step_loss, grad_norm, timed=not first_step)
    if first_step:  # compilation and warm-up happen here: reported apart from the step time
        if device_type == "cuda":
            torch.cuda.synchronize()
        wall["first step"] = time.time() - t0
        print0(f"first step (compilation and warm-up) took {wall['first step']:.1f}s")
        first_step = False
        stats.restart_clock()

    last = iter_num == max_iters
    evaluate_now = iter_num % eval_interval == 0 or last
    save_now = iter_num % (checkpoint_interval or eval_interval) == 0 or last
    if iter_num % log_interval == 0 or evaluate_now:
        flush_stats()
    val_loss = None
    if evaluate_now:
        val_loss = evaluate()
        best_val_loss = min(best_val_loss, val_loss)
        print0(f"iter {iter_num}: val loss {val_loss:.4f} | val ppl {perplexity(val_loss):.2f}")
        log(dict(iter=iter_num, val_loss=val_loss, val_ppl=perplexity(val_loss), tokens=tokens_seen))
    if save_now:
        checkpoint(val_loss)
    if evaluate_now or save_now:
        stats.restart_clock()  # evaluation and saving are not step time
    if stop_requested():
        if not save_now:
            # no log record here: the steps since the last line go into the checkpoint, and the resumed run
            # writes the line an uninterrupted run would have written
            print0(f"stop signal: saving a checkpoint at iteration {iter_num}")
            checkpoint()
        break

# where this process's time went: the steps are what tokens/s counts; the rest is what a sweep pays per run
total = time.time() - _t_launch
print0(f"wall time {total:.1f}s: startup {wall['startup']:.1f}s (imports, data, model), first step "
       f"{wall['first step']:.1f}s (compilation), other steps {total - sum(wall.values()):.1f}s, "
       f"evaluation {wall['evaluation']:.1f}s, checkpoints {wall['checkpoints']:.1f}s")

destroy_distributed(dist_info)
