"""
Checkpoints in and out of this repository: to Hugging Face transformers and back, and from the official code.

    python -m scripts.convert --to=hf out/small_tpa hf/small_tpa          # a run folder or ckpt_*.pt -> a HF folder
    python -m scripts.convert --from=hf hf/small_tpa out/small_tpa_ft     # a HF folder -> a run folder
    python -m scripts.convert --from=official output/out_T6_124m_Opt_adamw_... out/t6_official   # the trainer's folder
    python -m scripts.convert --from=official output/out_T6_124m_.../checkpoint-5000 out/t6_5k   # or ckpt.pt, or weights

--to=hf writes what `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads: config.json,
model.safetensors, the modeling file (scripts/hf_model.py: every mechanism and option, caching what this
repository caches), the GPT-2 tokenizer (made from tiktoken's files: offline where tiktoken's cache has them) and a
model card (README.md) with the run's settings, tokens seen and validation loss. Parameter names are this
repository's, so the weights are copied unchanged, and --from=hf gives back the same tensors.

--from=official reads what the official tensorgi/TPA trainer writes: its save_pretrained output folder (out_dir, or
checkpoint-N/ in it: config.json, pytorch_model.bin or model.safetensors, optimizer.pt with iter_num and
best_val_loss), the weights file in it, or a nanoGPT ckpt.pt (T6, T6-KVonly, MHA, MQA, GQA and MLA, compiled or
not). The architecture is read from the weights' shapes and checked against the settings (config.json or
model_args); it writes this repository's format: the separate projections concatenated into the fused ones,
SwiGLU's two input matrices stacked, and the rows that feed RoPE re-signed, because the official code rotates the
other way (docs/DESIGN.md sec. 2). Anything else (per-head group norm, partial RoPE, decay or linear-attention
variants, biases, other layouts, settings that contradict the weights) is refused with the reason.

The checkpoints written hold the model and its settings (and the iteration), not an optimizer: they serve
sample.py, eval/ and --to=hf; to train on, start a run from them (their weights) rather than resuming.
"""

import argparse
import json
import os
import re
import shutil
import sys

import torch

if __package__ in (None, ""):  # run as `python scripts/convert.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from model import GPT, GPTConfig

ROTATION_NOTE = "the official code rotates RoPE the other way: rows feeding the second half of each rotated block re-signed"


# -----------------------------------------------------------------------------
# RoPE convention: negate the rows of a projection that produce the second half of every rotated block


def flip_rows(w, block, rot_dim, offset=0):
    """w (out, in): rows split in blocks of `block`; in each, the rotated part starts at `offset` and has rot_dim
    rows, whose second half is negated. Its own inverse."""
    w = w.clone()
    v = w.view(-1, block, w.size(-1))
    v[:, offset + rot_dim // 2:offset + rot_dim] *= -1
    return w


# -----------------------------------------------------------------------------
# official checkpoints


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TRAINER_DIR = re.compile(r"out_(.+?)_\d+m_Opt_")  # the official trainer's out_dir: out_{model_type}_{N}m_Opt_...


def _official_state(path):
    """nanoGPT's ckpt.pt: (checkpoint dict, state dict)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file or folder: give the official trainer's output folder (or a "
                         f"checkpoint-N folder in it), its weights file, or a ckpt.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a torch checkpoint ({type(e).__name__}: {e}); a truncated or "
                         f"damaged file?") from e
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise ValueError(f"{path} is not a checkpoint of the official trainer (no 'model' state dict)")
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ck["model"].items()}
    return ck, sd


def _load_weights(path):
    """A state dict from a safetensors or torch file, or from the shards an index.json names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if path.endswith(".index.json"):
        try:
            shards = sorted(set(json.load(open(path))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not a readable weights index ({e})") from None
        state = {}
        for shard in shards:
            state.update(_load_weights(os.path.join(os.path.dirname(path), shard)))
        return state
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); a truncated or damaged file?") from None


def _official_folder(folder):
    """The trainer's save_pretrained output (config.json, the weights, optimizer.pt): (config.json as a dict, state
    dict, its iteration, its best validation loss, the trainer's model_type if the folder's name gives it)."""
    weights = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    cfg_path = os.path.join(folder, "config.json")
    if weights is None or not os.path.isfile(cfg_path):
        raise ValueError(f"{folder} holds no config.json with pytorch_model.bin or model.safetensors: give the "
                         f"official trainer's output folder (or a checkpoint-N folder in it), or its ckpt.pt")
    try:
        cfg = json.load(open(cfg_path))
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    if cfg.get("model_type") != "gpt2":  # every official model file's config class says gpt2
        raise ValueError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not the official models' ('gpt2'); "
                         f"a folder written by --to=hf converts with --from=hf")
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in _load_weights(weights).items()}
    # save_pretrained may keep one name of the tied embedding and output weights
    sd.setdefault("transformer.wte.weight", sd.get("lm_head.weight"))
    iter_num, best_val_loss = None, None
    opt_path = os.path.join(folder, "optimizer.pt")
    if os.path.isfile(opt_path):
        try:
            opt = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{opt_path} cannot be read ({type(e).__name__}: {e}); move it away to convert the "
                             f"weights without the iteration") from None
        iter_num, best_val_loss = opt.get("iter_num"), opt.get("best_val_loss")
    name = os.path.basename(os.path.normpath(folder))
    if iter_num is None and re.fullmatch(r"checkpoint-\d+", name):
        iter_num = int(name.split("-")[1])
    trainer = TRAINER_DIR.search(name) or TRAINER_DIR.search(os.path.basename(os.path.dirname(os.path.normpath(folder))))
    return cfg, sd, int(iter_num or 0), best_val_loss, trainer.group(1) if trainer else None


def _official_layout(sd, args, path):
    """(attn, GPTConfig fields) of an official state dict, from its names and shapes (model_args to confirm)."""
    if "transformer.wte.weight" not in sd or "transformer.h.0.attn.c_proj.weight" not in sd:
        raise ValueError(f"{path}: no transformer.wte / transformer.h.0.attn.c_proj weights: not a checkpoint of the "
                         f"official trainer's models")
    if any(".subln." in k for k in sd):
        raise ValueError(f"{path}: the model uses the per-head group norm (using_groupnorm), which this repository "
                         f"does not implement")
    vocab, C = sd["transformer.wte.weight"].shape
    L = len({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))})
    a = lambda name: sd.get(f"transformer.h.0.attn.{name}.weight")
    P = a("c_proj").shape[1]  # H * E
    base = dict(vocab_size=vocab, n_layer=L, n_embd=C, block_size=int(args.get("block_size", 1024)))
    if a("c_qkv.W_A_q") is not None:  # T6: H Rq, Rq D, H D: H^2 = (H D)(H Rq) / (Rq D)
        Aq, Bq, Ak, Av = (a(f"c_qkv.W_{n}").shape[0] for n in ("A_q", "B_q", "A_k", "A_v"))
        H = round((P * Aq / Bq) ** 0.5)
        D = P // H
        return "tpa", dict(base, n_head=H, head_dim=D, q_rank=Aq // H, k_rank=Ak // H, v_rank=Av // H)
    if a("c_qkv.c_q") is not None:  # T6-KVonly
        D = int(args.get("head_dim", 64))
        H = P // D
        Ak, Av = a("c_qkv.W_A_k").shape[0], a("c_qkv.W_A_v").shape[0]
        return "tpa_kvonly", dict(base, n_head=H, head_dim=D, k_rank=Ak // H, v_rank=Av // H)
    if a("c_q") is not None and a("c_k") is not None:  # llama-mha (head_dim = n_embd / n_head) / llama-gqa
        if "n_head" in args:
            H = int(args["n_head"])
            D = a("c_q").shape[0] // H
        else:  # every paper configuration has 64
            D = int(args.get("head_dim", 64))
            H = a("c_q").shape[0] // D
        G = a("c_k").shape[0] // D
        attn = "mha" if G == H else "mqa" if G == 1 else "gqa"
        return attn, dict(base, n_head=H, head_dim=D, n_kv_head=G)
    if a("kv_b_proj") is not None and a("q_a_proj") is not None:  # llama-mla
        dc = sd["transformer.h.0.attn.kv_a_layernorm.weight"].shape[0]
        dR = a("kv_a_proj_with_mqa").shape[0] - dc
        qb, kvb = a("q_b_proj").shape[0], a("kv_b_proj").shape[0]  # H (D + dR), H (D + E); P = H E
        H = (qb - kvb + P) // dR
        return "mla", dict(base, n_head=H, head_dim=qb // H - dR, v_head_dim=P // H, q_lora_rank=a("q_a_proj").shape[0],
                           kv_lora_rank=dc, qk_rope_head_dim=dR)
    raise ValueError(f"{path}: the attention weights ({sorted(k.split('attn.')[1] for k in sd if '.h.0.attn.' in k)}) "
                     f"match no official model this converter knows (T6, T6_kvonly, llama-mha, llama-gqa, llama-mla)")


KNOWN_OFFICIAL = {"T6", "T6_ropek", "T6_kvonly", "T6_kvonly_ropek", "llama-mha", "llama-gqa", "llama-mla"}


def from_official(path):
    """Any form the official code writes -> (GPTConfig, our state dict, its iteration, what to keep of its settings).
    A folder (or its weights file) is the trainer's save_pretrained output; a file otherwise nanoGPT's ckpt.pt."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) in WEIGHT_FILES else None
    if folder is not None:
        cfg, sd, iter_num, best_val_loss, kind = _official_folder(folder or ".")
        args, keep = cfg, dict(config_json=cfg, model_type=kind, iter_num=iter_num, best_val_loss=best_val_loss)
    else:
        ck, sd = _official_state(path)
        cfg = ck.get("config") or {}
        kind, args, iter_num = cfg.get("model_type"), ck.get("model_args") or {}, int(ck.get("iter_num", 0))
        keep = dict(cfg, best_val_loss=ck.get("best_val_loss"))
    if kind is not None and kind not in KNOWN_OFFICIAL:
        raise ValueError(f"{path}: model_type {kind!r} is not converted (partial RoPE, decay and linear-attention "
                         f"variants compute other functions); known: {sorted(KNOWN_OFFICIAL)}")
    if args.get("using_groupnorm"):
        raise ValueError(f"{path}: using_groupnorm={args['using_groupnorm']!r} (a per-head RMSNorm of the attention "
                         f"output), which this repository does not implement")
    biases = sorted(k for k in sd if k.endswith(".bias"))
    if biases:
        raise ValueError(f"{path}: bias={args.get('bias')!r}: the weights hold biases ({biases[0]}, ...), which this "
                         f"repository's models do not have")
    attn, fields = _official_layout(sd, args, path)
    config = GPTConfig(attn=attn, **fields)
    check_settings(args, config, attn, path)
    return config, official_to_ours(sd, config, path), iter_num, keep


def check_settings(args, config, attn, path):
    """Every architecture field the official config holds must be what the weights hold: a config.json (or
    model_args) of another model is refused, naming the field."""
    uses = {"vocab_size": config.vocab_size, "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head}
    if attn in ("tpa", "tpa_kvonly"):
        uses.update(head_dim=config.head_dim, rank=config.k_rank)
    if attn == "tpa":
        uses["q_rank"] = config.q_rank
    if attn in ("mqa", "gqa") or (attn == "mha" and "group_size" in args):  # llama-gqa: group_size heads per K/V
        uses["group_size"] = config.n_head // config.n_kv_head
    if attn in ("mqa", "gqa"):
        uses["head_dim"] = config.head_dim
    if attn == "mla":
        uses.update(head_dim=config.head_dim, q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                    qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim)
    for k, have in uses.items():
        if k in args and args[k] is not None and args[k] != have:
            raise ValueError(f"{path}: its settings say {k}={args[k]!r}, but the weights hold {k}={have!r} "
                             f"(settings of another model?)")


def official_to_ours(sd, config, path):
    """The official state dict in this repository's names and layout."""
    attn, D, L = config.attn, config.head_dim, config.n_layer
    out = {"transformer.wte.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["transformer.wte.weight"]}
    try:
        for i in range(L):
            w = lambda name: sd[f"transformer.h.{i}.{name}.weight"]
            pre = f"transformer.h.{i}."
            if attn == "tpa":
                parts = []
                for n, R in (("q", config.q_rank), ("k", config.k_rank), ("v", config.v_rank)):
                    b = w(f"attn.c_qkv.W_B_{n}")
                    parts += [w(f"attn.c_qkv.W_A_{n}"), flip_rows(b, D, D) if n != "v" else b]
                out[pre + "attn.c_fact.weight"] = torch.cat(parts)
            elif attn == "tpa_kvonly":
                out[pre + "attn.c_fact.weight"] = torch.cat([
                    flip_rows(w("attn.c_qkv.c_q"), D, D), w("attn.c_qkv.W_A_k"), flip_rows(w("attn.c_qkv.W_B_k"), D, D),
                    w("attn.c_qkv.W_A_v"), w("attn.c_qkv.W_B_v")])
            elif attn in ("mha", "mqa", "gqa"):
                out[pre + "attn.c_attn.weight"] = torch.cat([flip_rows(w("attn.c_q"), D, D), flip_rows(w("attn.c_k"), D, D),
                                                              w("attn.c_v")])
            else:  # mla: the RoPE part is the last qk_rope_head_dim of each query head and of kv_a_proj's output
                dR, dc = config.qk_rope_head_dim, config.kv_lora_rank
                out[pre + "attn.q_a_proj.weight"] = w("attn.q_a_proj")
                out[pre + "attn.q_a_layernorm.weight"] = w("attn.q_a_layernorm")
                out[pre + "attn.q_b_proj.weight"] = flip_rows(w("attn.q_b_proj"), D + dR, dR, offset=D)
                out[pre + "attn.kv_a_proj_with_mqa.weight"] = flip_rows(w("attn.kv_a_proj_with_mqa"), dc + dR, dR, offset=dc)
                out[pre + "attn.kv_a_layernorm.weight"] = w("attn.kv_a_layernorm")
                out[pre + "attn.kv_b_proj.weight"] = w("attn.kv_b_proj")
            out[pre + "attn.c_proj.weight"] = w("attn.c_proj")
            out[pre + "mlp.c_fc.weight"] = torch.cat([w("mlp.c_fc1"), w("mlp.c_fc2")])
            out[pre + "mlp.c_proj.weight"] = w("mlp.c_proj")
    except KeyError as e:
        raise ValueError(f"{path}: weight {e.args[0]} is missing: an incomplete or different checkpoint") from None
    return out


# -----------------------------------------------------------------------------
# this repository's checkpoints


def write_checkpoint(out_dir, config, state, iter_num, meta, config_extra=None, best_val_loss=None):
    """A checkpoint that load_model / sample.py / eval read (no optimizer state); the model is built to check it."""
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"the weights do not fit {config.attn} with these sizes (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    held = list_checkpoints(out_dir) if os.path.isdir(out_dir) else []
    if held:  # beside them the newest of either would be the one sample.py, eval and resume take
        raise ValueError(f"{out_dir} holds checkpoints already ({os.path.basename(held[-1])}): choose another output "
                         f"folder (nothing is written over or mixed in)")
    os.makedirs(out_dir, exist_ok=True)
    path = checkpoint_path(out_dir, iter_num)
    from dataclasses import asdict
    state = dict(model=model.state_dict(), model_config=asdict(config), config=config_extra or {}, iter_num=iter_num,
                 meta=dict(meta, tokenizer="gpt2"))
    if best_val_loss is not None:
        state["best_val_loss"] = float(best_val_loss)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


# -----------------------------------------------------------------------------
# Hugging Face


HF_KEYS = [f.name for f in GPTConfig.__dataclass_fields__.values()]


def tokenizer_files(out_dir):
    """GPT-2's vocab.json / merges.txt from tiktoken's files (its cache, or a download), then transformers' tokenizer."""
    from tiktoken.load import read_file_cached
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    with open(os.path.join(out_dir, "vocab.json"), "wb") as f:
        f.write(read_file_cached(base + "encoder.json"))
    with open(os.path.join(out_dir, "merges.txt"), "wb") as f:
        f.write(read_file_cached(base + "vocab.bpe"))
    import inspect

    import transformers
    vocab, merges = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    cls = transformers.GPT2Tokenizer
    if "vocab" in inspect.signature(cls.__init__).parameters:  # transformers 5
        tok = cls(vocab=vocab, merges=merges)
    else:
        tok = transformers.GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    tok.save_pretrained(out_dir)


def model_card(ckpt, config):
    run = ckpt.get("config", {})
    val = ckpt.get("val_loss") or ckpt.get("best_val_loss")
    lines = [f"# {config.attn} ({config.n_layer} x {config.n_embd}, {config.n_head} heads) from the TPA / T6 repository", "",
             "A checkpoint trained with the repository of \"Tensor Product Attention Is All You Need\" (arXiv 2501.06425)",
             "and exported with `python -m scripts.convert --to=hf`.", "",
             "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
             "tok = AutoTokenizer.from_pretrained(PATH)",
             "```", "",
             "Evaluate: `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True --tasks hellaswag`.", "",
             "| | |", "|---|---|",
             f"| mechanism | `{config.attn}` |",
             f"| iteration | {ckpt.get('iter_num')} |",
             f"| tokens seen | {ckpt.get('tokens_seen', 'unknown'):,} |" if isinstance(ckpt.get("tokens_seen"), int)
             else "| tokens seen | unknown |",
             f"| validation loss | {val:.4f} |" if isinstance(val, float) else "| validation loss | unknown |",
             f"| data | `{run.get('data_dir', 'unknown')}` |",
             f"| git commit | `{ckpt.get('meta', {}).get('git_commit', 'unknown')}` |", "",
             "The transformers cache holds what the repository's cache holds (TPA's factors, MLA's latent and shared key, "
             "GQA's keys and values), so the memory per token is the same; attention runs in PyTorch here, not through "
             "the repository's FlashTPA kernel.", "", "Model settings:", "", "```json",
             json.dumps({k: getattr(config, k) for k in HF_KEYS}, indent=1), "```", ""]
    return "\n".join(lines)


def to_hf(src, out_dir):
    ckpt = load_checkpoint(src)
    config = GPTConfig(**ckpt["model_config"])
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty: choose another folder (nothing is written over)")
    from scripts import hf_model
    hf_config = hf_model.TPAConfig(**{k: getattr(config, k) for k in HF_KEYS})
    hf_config.auto_map = {"AutoConfig": "modeling_tpa.TPAConfig", "AutoModelForCausalLM": "modeling_tpa.TPAForCausalLM"}
    hf_config.architectures = ["TPAForCausalLM"]
    model = hf_model.TPAForCausalLM(hf_config)
    model.load_state_dict(ckpt["model"], strict=True)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    shutil.copy(hf_model.__file__, os.path.join(out_dir, "modeling_tpa.py"))
    try:
        tokenizer_files(out_dir)
    except Exception as e:  # no tiktoken cache and no network: the model is still usable with tiktoken's GPT-2
        print(f"note: no tokenizer files written ({type(e).__name__}: {e}); GPT-2's tokenizer from the hub works",
              file=sys.stderr)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(ckpt, config))
    with open(os.path.join(out_dir, "tpa_checkpoint.json"), "w") as f:
        json.dump(dict(source=ckpt["path"], iter_num=ckpt["iter_num"], tokens_seen=ckpt.get("tokens_seen"),
                       config=ckpt.get("config", {})), f, indent=1, default=str)
    return out_dir


def from_hf(src, out_dir):
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{src} holds no config.json: give a folder written by --to=hf (or save_pretrained)")
    try:
        cfg = json.load(open(cfg_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    if cfg.get("model_type") != "tpa_gpt":
        raise ValueError(f"{src}: model_type {cfg.get('model_type')!r} is not this repository's (tpa_gpt)")
    config = GPTConfig(**{k: cfg[k] for k in HF_KEYS if k in cfg})
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{src} holds no .safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(os.path.join(src, f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{os.path.join(src, f)} cannot be read ({e}); a truncated or damaged file?") from None
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    state.setdefault("transformer.wte.weight", state.get("lm_head.weight"))
    extra = {}
    info = os.path.join(src, "tpa_checkpoint.json")
    if os.path.isfile(info):
        extra = json.load(open(info))
    return write_checkpoint(out_dir, config, state, int(extra.get("iter_num") or 0),
                            dict(converted_from=os.path.abspath(src)), extra.get("config"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a run folder or ckpt_*.pt (--to=hf), a HF folder (--from=hf), the official trainer's "
                                    "output or checkpoint-N folder, its weights file, or ckpt.pt (--from=official)")
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--to", choices=["hf"], default=None)
    parser.add_argument("--from", dest="source", choices=["hf", "official"], default=None)
    args = parser.parse_args(argv)
    if (args.to is None) == (args.source is None):
        parser.error("give one direction: --to=hf, --from=hf or --from=official")
    try:
        if args.to == "hf":
            print(f"wrote {to_hf(args.src, args.out)}")
        elif args.source == "hf":
            print(f"wrote {from_hf(args.src, args.out)}")
        else:
            config, state, iter_num, official = from_official(args.src)
            path = write_checkpoint(args.out, config, state, iter_num, dict(converted_from=os.path.abspath(args.src),
                                                                            note=ROTATION_NOTE), dict(official=official),
                                    best_val_loss=official.get("best_val_loss"))
            print(f"wrote {path}: {config.attn}, {config.n_layer} x {config.n_embd}, {config.n_head} heads")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"convert: {e}")


if __name__ == "__main__":
    main()
