"""
Self-describing checkpoints, shared by train.py, sample.py and eval/.

A run directory holds ckpt_NNNNNNN.pt files (N = iteration). Each is one torch.save'd dict:

    model         state dict of the plain GPT (no DDP "module." or compile "_orig_mod." prefixes)
    model_config  GPTConfig as a dict, enough to rebuild the model
    config        the resolved training config
    optimizer, scaler, iter_num, tokens_seen, best_val_loss, loader (TrainLoader.state_dict()),
    rng           per-rank python / numpy / torch / cuda generator states
    meta          git commit, versions, wandb run id

Writes go to a temporary file that is fsync'd and renamed, so a crash during a save leaves the
previous checkpoint intact; the newest keep_last are kept.
"""

import glob
import os
import re

import torch

from model import GPT, GPTConfig

_PATTERN = re.compile(r"ckpt_(\d{7})\.pt$")


def checkpoint_path(out_dir, iter_num):
    return os.path.join(out_dir, f"ckpt_{iter_num:07d}.pt")


def checkpoint_iter(path):
    """The iteration in a checkpoint's file name."""
    return int(_PATTERN.search(path).group(1))


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if _PATTERN.search(p)]
    return sorted(paths, key=checkpoint_iter)


def save_checkpoint(state, out_dir, keep_last=2):
    path = checkpoint_path(out_dir, state["iter_num"])
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no partial file to fill the disk
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(old)
    return path


def find_checkpoint(path):
    """A checkpoint file, or the newest one in a run directory; clear errors otherwise."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: give a run directory (out_dir of train.py) or a ckpt_*.pt file")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path!r} holds no ckpt_NNNNNNN.pt checkpoint; train one with "
                                f"python train.py config/quickstart.py --out_dir={path}")
    return found[-1]


def load_checkpoint(path, map_location="cpu"):
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in ("model", "model_config", "iter_num") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint written by train.py (missing {missing})")
    ckpt["path"] = path
    return ckpt


def load_model(path, device="cpu", dtype=None):
    """(model in eval mode, checkpoint dict) from a run directory or a checkpoint file."""
    ckpt = load_checkpoint(path)
    try:
        config = GPTConfig(**ckpt["model_config"])
    except TypeError as e:
        raise ValueError(f"{ckpt['path']}: its model settings do not match this version of model.py ({e})") from e
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, ckpt
