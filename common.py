"""
The setup every entry point shares (train.py, sample.py, eval/): device and dtype resolution with validation,
distributed init and teardown, print0, and the GPU peak table MFU is measured against.

    device, device_type = resolve_device("auto")          # ValueError naming the problem for a bad or absent device
    dtype, ptdtype, autocast = resolve_dtype("bf16", device_type)
    dist_info = init_distributed(device)                  # torchrun's environment, or one process
"""

import os
import platform
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def resolve_device(device):
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' -> (device, device_type); a device that
    is not a device, or is absent here, is a ValueError that says what to use instead."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here (no GPU, or a CPU build of torch); "
                         f"use --device=cpu")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available here; use --device=cpu")
    return device, kind


def resolve_dtype(dtype, device_type):
    """'auto' (bf16 where the GPU has it, else fp16 on CUDA; fp32 elsewhere), a torch name or an alias (bf16, fp16,
    fp32) -> (name, torch dtype, the autocast context: none for float32)."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of auto, {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=DTYPES[dtype])
    return dtype, DTYPES[dtype], ctx


def check_dtype(dtype):
    """A ValueError for a dtype name resolve_dtype would refuse (to check settings before anything runs)."""
    if dtype != "auto" and DTYPE_ALIASES.get(dtype, dtype) not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of auto, {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")


@dataclass
class Distributed:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # this process's device (cuda:LOCAL_RANK under torchrun)

    @property
    def master(self):
        return self.rank == 0


def init_distributed(device):
    """Under torchrun (RANK set): this process's GPU and the process group (NCCL on CUDA, gloo otherwise);
    else one process. device: a resolved device."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Distributed(False, 0, 0, 1, device)
    import torch.distributed as dist
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(True, rank, local_rank, world, device)


def destroy_distributed(info):
    if info.ddp:
        import torch.distributed as dist
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on the first process only (RANK 0, or no torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# peak dense tensor FLOP/s per device: (name tokens, bf16/fp16, fp32 matmul: TF32 where the GPU has it);
# matched on whole tokens of the device name, most specific first (an "NVIDIA L40" is not an L4)
PEAK_FLOPS = [(("GH200",), 989e12, 494e12), (("H200",), 989e12, 494e12), (("H100", "NVL"), 835e12, 418e12),
              (("H100", "PCIE"), 756e12, 378e12), (("H100",), 989e12, 494e12), (("H800",), 989e12, 494e12),
              (("B200",), 2250e12, 1125e12), (("A100",), 312e12, 156e12), (("A800",), 312e12, 156e12),
              (("A10",), 125e12, 62.5e12), (("A40",), 150e12, 75e12), (("A6000",), 155e12, 77e12),
              (("L40S",), 362e12, 183e12), (("L40",), 181e12, 90.5e12), (("L4",), 121e12, 60e12),
              (("4090",), 165e12, 83e12), (("3090",), 71e12, 36e12), (("V100",), 125e12, 15.7e12),
              (("T4",), 65e12, 8e12)]


def describe_device(device, device_type):
    """The device's name as run headers record it: the GPU's name, or the CPU's (platform.processor)."""
    return torch.cuda.get_device_name(device) if device_type == "cuda" else platform.processor() or device_type


def peak_flops(device_name, dtype="bfloat16"):
    """Peak FLOP/s of one device by its name (torch.cuda.get_device_name), or None if unknown."""
    tokens = re.split(r"[^A-Z0-9]+", device_name.upper())
    for key, half, fp32 in PEAK_FLOPS:
        if any(tuple(tokens[i:i + len(key)]) == key for i in range(len(tokens))):
            return fp32 if dtype == "float32" else half
    return None
