"""
Validation loss, perplexity and bits per byte of a checkpoint, on the fixed validation set.

    python -m eval.val_loss --out_dir=out/small_tpa
    python -m eval.val_loss --out_dir=out/small_tpa --data_dir=data/fineweb-edu-100B --eval_tokens=104857600
    torchrun --standalone --nproc_per_node=8 -m eval.val_loss --out_dir=out/xl_tpa

The tokens are the first eval_tokens of the val split, in windows of block_size + 1 (data/loader.py ValSet), so
the loss is the one train.py logs for the same checkpoint and budget, for any batch size or number of GPUs: the
mean over every target token, <|endoftext|> included.

Bits per byte measures the text only: the summed loss, in bits, of the targets that are text tokens, over the UTF-8
bytes of those tokens. Special tokens (GPT-2's <|endoftext|> before every document) have no bytes and their loss is
in neither sum, as in nanochat (counting <|endoftext|> as its 13-character name would bias bpb low). This takes a
second pass over the val set. Results are printed and saved as val_loss.json next to the checkpoint.
"""

import json
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python eval/val_loss.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.loader import ValSet


def token_byte_lengths(tokenizer):
    """UTF-8 bytes of the text of every token id of a tiktoken encoding (an array indexed by id); special tokens 0."""
    import tiktoken
    enc = tiktoken.get_encoding(tokenizer)
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    return np.array([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                    dtype=np.int64)


def special_token_ids(tokenizer):
    import tiktoken
    enc = tiktoken.get_encoding(tokenizer)
    return sorted(enc.encode_single_token(t) for t in enc.special_tokens_set)


@torch.no_grad()
def evaluate(model, val_set, batch_size, device="cpu", autocast=nullcontext(), rank=0, world_size=1, progress=False,
             ignore_ids=None):
    """Mean loss (nats per target token) over the whole validation set, summed on every rank and reduced.

    Targets whose id is in ignore_ids are left out (of the loss and of the count). Batches are padded to batch_size
    with ignored targets, so a compiled model sees one shape only. Returns {"loss", "tokens"} (tokens: targets
    counted).
    """
    T = val_set.T
    total = torch.zeros(2, device=device, dtype=torch.float64)  # sum of losses, tokens
    ignore = None if ignore_ids is None else torch.as_tensor(ignore_ids, device=device)
    batches = val_set.batches(batch_size, rank, world_size, device)
    if progress and rank == 0:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-val_set.n_windows // (batch_size * world_size)), desc="val")
    for x, y in batches:
        n = x.size(0)
        if n < batch_size:
            x = torch.cat([x, x.new_zeros(batch_size - n, T)])
            y = torch.cat([y, y.new_full((batch_size - n, T), -1)])
        # contiguous like the padded batch: a compiled model guards on strides, and the windows' views (stride
        # T + 1) would compile the whole model a second time for the last batch
        x, y = x.contiguous(), y.contiguous()
        if ignore is not None:
            y = y.masked_fill(torch.isin(y, ignore), -1)
        with autocast:
            _, loss = model(x, y, return_logits=False)
        count = (y != -1).sum()
        if count:  # a batch of ignored targets only has a nan mean
            total += torch.stack([loss.double() * count, count.double()])
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(total)
    return dict(loss=(total[0] / total[1]).item(), tokens=int(total[1].item()))


def bits_per_byte(model, val_set, batch_size, tokenizer="gpt2", **kw):
    """{"bpb", "text_loss", "text_tokens", "bytes"}: the text targets' summed loss in bits over their UTF-8 bytes."""
    text = evaluate(model, val_set, batch_size, ignore_ids=special_token_ids(tokenizer), **kw)
    targets = val_set.data[1:val_set.n_windows * val_set.T + 1]
    n_bytes = int(token_byte_lengths(tokenizer)[targets].sum())
    return dict(bpb=text["loss"] * text["tokens"] / math.log(2) / n_bytes, text_loss=text["loss"],
                text_tokens=text["tokens"], bytes=n_bytes)


def main():
    from checkpoint import load_model
    from common import destroy_distributed, init_distributed, resolve_device, resolve_dtype
    from configurator import configure
    out_dir = "out"  # the run folder (its newest checkpoint) or a ckpt_*.pt file; --ckpt_dir is the same
    data_dir = ""  # default: the checkpoint's training data
    eval_tokens = 0  # default: the checkpoint's eval_tokens
    batch_size = 8
    device = "auto"
    dtype = "auto"
    compile = False
    try:
        cfg = configure(locals(), sys.argv[1:], aliases={"ckpt_dir": "out_dir"})
        device, device_type = resolve_device(cfg["device"])
        dtype, _, autocast = resolve_dtype(cfg["dtype"], device_type)
    except ValueError as e:
        sys.exit(f"config error: {e}")
    dist_info = init_distributed(device)
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    try:
        model, ckpt = load_model(cfg["out_dir"], device=device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"cannot load a checkpoint: {e}")
    train_cfg = ckpt.get("config", {})
    data_dir = cfg["data_dir"] or train_cfg.get("data_dir")
    tokens = cfg["eval_tokens"] or train_cfg.get("eval_tokens", 10 * 2 ** 20)
    if not data_dir:
        sys.exit("give --data_dir (the checkpoint does not name its data)")
    val_set = ValSet(data_dir, model.config.block_size, tokens)
    if cfg["compile"]:
        model = torch.compile(model)
    out = evaluate(model, val_set, cfg["batch_size"], device, autocast, rank, world_size, progress=True)
    tokenizer = ckpt.get("meta", {}).get("tokenizer", "gpt2")
    out.update(bits_per_byte(model, val_set, cfg["batch_size"], tokenizer, device=device, autocast=autocast,
                             rank=rank, world_size=world_size))
    out.update(ppl=math.exp(out["loss"]) if out["loss"] < 700 else float("inf"), checkpoint=ckpt["path"],
               iter_num=ckpt["iter_num"], data_dir=data_dir, eval_tokens=tokens, dtype=dtype)
    if rank == 0:
        print(f"{ckpt['path']}: val loss {out['loss']:.4f} | ppl {out['ppl']:.2f} | bpb {out['bpb']:.4f} | "
              f"{out['tokens']:,} tokens of {data_dir}")
        path = os.path.join(os.path.dirname(ckpt["path"]), "val_loss.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    destroy_distributed(dist_info)


if __name__ == "__main__":
    main()
