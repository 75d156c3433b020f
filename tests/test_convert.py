"""scripts/convert.py: export to transformers (logits, greedy generation, what the cache holds), the round trip back,
import of the official code's checkpoints (built here from our weights in its layout), and bad input."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from conftest import ROOT, child_env
from engine import generate
from model import GPT, GPTConfig, model_config
from test_model import randomize

transformers = pytest.importorskip("transformers")
from scripts import convert  # noqa: E402

CASES = [("mha", {}), ("mqa", {}), ("gqa", {}), ("mla", {}), ("tpa_kvonly", {}), ("tpa", {}),
         ("tpa", dict(tpa_const_a=True)), ("tpa", dict(tpa_const_b=True)), ("tpa", dict(tpa_shared_b=True)),
         ("tpa", dict(tpa_order=3)), ("gqa", dict(attn_gate=True, kv_shift=True)), ("tpa", dict(kv_shift=True)),
         ("mla", dict(kv_shift=True, q_lora_rank=0))]
IDS = [a + "".join(f"-{k}" for k in o) for a, o in CASES]


def tiny_model(attn, **opts):
    torch.manual_seed(0)
    return randomize(GPT(model_config("tiny", attn, block_size=64, **opts)), std=0.1).eval()


def write_run(model, path, iter_num=5):
    os.makedirs(path, exist_ok=True)
    save_checkpoint(dict(model=model.state_dict(), model_config=asdict(model.config), iter_num=iter_num, tokens_seen=1234,
                         val_loss=3.25, config=dict(data_dir="data/x"), meta=dict(git_commit="abc")), path)
    return path


@pytest.mark.parametrize("attn,opts", CASES, ids=IDS)
def test_hf_export_equals_the_model(attn, opts, tmp_path):
    model = tiny_model(attn, **opts)
    convert.to_hf(write_run(model, str(tmp_path / "run")), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 23), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, all_logits=True)[0], rtol=1e-5, atol=1e-5)
        # greedy generation with transformers' cache equals ours, token for token
        ours = generate(model, x[:1, :6], 15, top_k=1)
        theirs = hf.generate(x[:1, :6], max_new_tokens=15, do_sample=False, use_cache=True)
        assert torch.equal(ours, theirs)
        # the cache holds what ours holds: per token, the mechanism's entries (factors, latent), not K and V
        out = hf(x[:1, :7], use_cache=True)
        cache = getattr(out, convert_cache_field(out))
        per_token = sum(cache.layers[i].keys.shape[-1] + cache.layers[i].values.shape[-1]
                        for i in range(model.config.n_layer)) if hasattr(cache, "layers") else None
        if per_token is not None:
            assert per_token == model.kv_cache_elems_per_token()
            assert cache.get_seq_length() == 7


def test_command_line_export_loads_from_the_repository_root(tmp_path):
    """As a user runs it: `python -m scripts.convert --to=hf` from the repository root, then transformers'
    `from_pretrained(..., trust_remote_code=True)` in a process started there (the root first on sys.path, where a
    folder of ours named like a transformers dependency would hide it)."""
    model = tiny_model("tpa")
    run, out = write_run(model, str(tmp_path / "run")), str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "scripts.convert", "--to=hf", run, out], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=child_env())
    assert p.returncode == 0, p.stderr[-3000:]
    x = [[1, 2, 3, 4, 5]]
    load = ("import sys, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], "
            "trust_remote_code=True).eval(); print(m(torch.tensor(%s)).logits[0, -1, :4].tolist())" % x)
    p = subprocess.run([sys.executable, "-c", load, out], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=child_env())
    assert p.returncode == 0, p.stderr[-3000:]
    with torch.no_grad():
        want = model(torch.tensor(x), all_logits=True)[0][0, -1, :4]
    torch.testing.assert_close(torch.tensor(json.loads(p.stdout.strip().splitlines()[-1])), want, rtol=1e-5, atol=1e-5)


def convert_cache_field(out):
    return "cache" if "cache" in out.__dataclass_fields__ else "past_key_values"


def test_hf_batched_generation_with_left_padding(tmp_path):
    model = tiny_model("tpa")
    convert.to_hf(write_run(model, str(tmp_path / "run")), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    a, b = [5, 9, 13, 2, 8, 1], [7, 3, 11]
    x = torch.tensor([a, [0] * 3 + b])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    with torch.no_grad():
        batch = hf.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for row, prompt in zip(batch, (a, b)):
            alone = generate(model, torch.tensor([prompt]), 8, top_k=1)[0]
            assert row[-8:].tolist() == alone[-8:].tolist()


def test_round_trip_is_bit_identical_and_the_card(tmp_path):
    model = tiny_model("mla")
    run = write_run(model, str(tmp_path / "run"), iter_num=42)
    convert.to_hf(run, str(tmp_path / "hf"))
    card = open(tmp_path / "hf" / "README.md").read()
    assert "| iteration | 42 |" in card and "| tokens seen | 1,234 |" in card and "| validation loss | 3.2500 |" in card
    assert "trust_remote_code=True" in card and "lm_eval --model hf" in card
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    import tiktoken
    assert tok("Hello world, naïve café")["input_ids"] == tiktoken.get_encoding("gpt2").encode("Hello world, naïve café")
    path = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = load_checkpoint(path)
    assert back["iter_num"] == 42 and back["model_config"] == asdict(model.config)
    sd = model.state_dict()
    assert back["model"].keys() == sd.keys() and all(torch.equal(back["model"][k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="is not empty"):  # nothing is written over
        convert.to_hf(run, str(tmp_path / "hf"))
    other = write_run(model, str(tmp_path / "other"), iter_num=7)  # nor mixed in: the newest would be taken
    with pytest.raises(ValueError, match=r"holds checkpoints already \(ckpt_0000007.pt\)"):
        convert.from_hf(str(tmp_path / "hf"), other)
    assert [os.path.basename(p) for p in list_checkpoints(other)] == ["ckpt_0000007.pt"]


def official_layout(model):
    """This test's own conversion of our weights to the official code's layout: separate projections, SwiGLU's two
    matrices, RoPE rows re-signed (it rotates the other way: negating the second half of every rotated block)."""
    c, sd = model.config, model.state_dict()
    H, D = c.n_head, c.head_dim

    def flip(w, block, rot, offset=0):
        w = w.clone().view(-1, block, w.size(1))
        w[:, offset + rot // 2:offset + rot] = -w[:, offset + rot // 2:offset + rot]
        return w.view(-1, w.size(-1))
    out = {"transformer.wte.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.n_layer):
        p, attn = f"transformer.h.{i}.", model.transformer.h[i].attn
        if c.attn.startswith("tpa"):
            parts = dict(zip(attn.names, sd[p + "attn.c_fact.weight"].split(attn.sizes)))
            if c.attn == "tpa_kvonly":
                out[p + "attn.c_qkv.c_q.weight"] = flip(parts["q"], D, D)
            for n in attn.factored:
                out[p + f"attn.c_qkv.W_A_{n}.weight"] = parts["a" + n]
                out[p + f"attn.c_qkv.W_B_{n}.weight"] = flip(parts["b" + n], D, D) if n != "v" else parts["b" + n]
        elif c.attn == "mla":
            dR, dc = c.qk_rope_head_dim, c.kv_lora_rank
            for n in ("q_a_proj", "q_a_layernorm", "kv_a_layernorm", "kv_b_proj"):
                out[p + f"attn.{n}.weight"] = sd[p + f"attn.{n}.weight"]
            out[p + "attn.q_b_proj.weight"] = flip(sd[p + "attn.q_b_proj.weight"], D + dR, dR, D)
            out[p + "attn.kv_a_proj_with_mqa.weight"] = flip(sd[p + "attn.kv_a_proj_with_mqa.weight"], dc + dR, dR, dc)
        else:
            q, k, v = sd[p + "attn.c_attn.weight"].split([H * D, c.n_kv_head * D, c.n_kv_head * D])
            out.update({p + "attn.c_q.weight": flip(q, D, D), p + "attn.c_k.weight": flip(k, D, D), p + "attn.c_v.weight": v})
        out[p + "attn.c_proj.weight"] = sd[p + "attn.c_proj.weight"]
        g, u = sd[p + "mlp.c_fc.weight"].chunk(2)
        out.update({p + "mlp.c_fc1.weight": g, p + "mlp.c_fc2.weight": u, p + "mlp.c_proj.weight": sd[p + "mlp.c_proj.weight"]})
    kind = {"tpa": "T6", "tpa_kvonly": "T6_kvonly", "mha": "llama-mha", "mqa": "llama-gqa", "gqa": "llama-gqa",
            "mla": "llama-mla"}[c.attn]
    args = dict(n_layer=c.n_layer, n_head=H, n_embd=c.n_embd, head_dim=D, block_size=c.block_size, vocab_size=c.vocab_size)
    # as the official trainer saves a compiled model: every name prefixed with _orig_mod.
    return dict(model={"_orig_mod." + k: v for k, v in out.items()}, model_args=args, iter_num=300,
                config=dict(model_type=kind, learning_rate=6e-4), optimizer={})


@pytest.mark.parametrize("attn", ["tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla"])
def test_official_checkpoints_convert_back_exactly(attn, tmp_path):
    opts = dict(n_head=6, head_dim=16) if attn == "mha" else {}  # llama-mha: head_dim = n_embd / n_head
    opts = dict(opts, n_embd=96) if attn == "mha" else opts
    model = tiny_model(attn, **opts)
    torch.save(official_layout(model), tmp_path / "ckpt.pt")
    convert.main(["--from=official", str(tmp_path / "ckpt.pt"), str(tmp_path / "ours")])
    back = load_checkpoint(str(tmp_path / "ours"))
    assert back["iter_num"] == 300 and back["config"]["official"]["model_type"]
    c = model.config
    for k in ("attn", "n_layer", "n_embd", "n_head", "head_dim", "n_kv_head", "vocab_size"):
        assert back["model_config"][k] == getattr(c, k), k
    if attn == "tpa":
        assert (back["model_config"]["q_rank"], back["model_config"]["k_rank"]) == (c.q_rank, c.k_rank)
    if attn == "mla":
        assert all(back["model_config"][k] == getattr(c, k) for k in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                                                                      "v_head_dim"))
    sd = model.state_dict()
    assert all(torch.equal(back["model"][k], sd[k]) for k in sd)  # bit-identical, the rotation undone
    # and the converted model computes what ours computed
    ours = GPT(model.config)
    ours.load_state_dict(back["model"])
    x = torch.randint(0, c.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(ours(x, all_logits=True)[0], model(x, all_logits=True)[0])


OFFICIAL_KIND = {"tpa": "T6", "tpa_kvonly": "T6_kvonly", "mha": "llama-mha", "mqa": "llama-gqa", "gqa": "llama-gqa",
                 "mla": "llama-mla"}


class OfficialConfig(transformers.PretrainedConfig):
    """What every official model file's config class is (not its code): a PretrainedConfig with model_type "gpt2"
    that keeps whatever the trainer passes, its model_args."""
    model_type = "gpt2"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class OfficialWeights(transformers.PreTrainedModel):
    """A PreTrainedModel holding an official state dict under its own names (the embedding tied to the output, as
    in the official GPT), so that its save_pretrained is the official models' save path."""
    config_class = OfficialConfig
    base_model_prefix = "gpt2"

    def __init__(self, config, state):
        super().__init__(config)
        for name, t in state.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(t.clone()))
        self.lm_head.weight = self.transformer.wte.weight

    def save_pretrained(self, directory):  # what the official GPT.save_pretrained does
        self.config.save_pretrained(directory)
        super().save_pretrained(directory, safe_serialization=False)


def write_official_run(model, folder, iter_num=300, best_val_loss=3.25, weights="bin"):
    """The official trainer's output: raw_model.save_pretrained(out_dir), then optimizer.pt beside it. Its model_args
    as train_adam.py builds them (with its defaults where the model file ignores them: rank and q_rank for every
    model, head_dim 64 for llama-mha, group_size for llama-gqa only). transformers 5 refuses this save (the tied
    embedding is not declared in _tied_weights_keys); there the test writes what that path writes instead: the
    config's save_pretrained (config.json) and the state dict as pytorch_model.bin. weights="safetensors": a newer
    save, model.safetensors with one name of the tied pair."""
    c = model.config
    ck = official_layout(model)
    state = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=False,
                head_dim=c.head_dim if c.attn != "mha" else 64, rank=c.k_rank if c.attn.startswith("tpa") else 2,
                q_rank=c.q_rank if c.attn == "tpa" else 12, using_groupnorm=False, vocab_size=c.vocab_size, dropout=0.0,
                scale_attn_by_inverse_layer_idx=True)
    if c.attn in ("mqa", "gqa"):
        args["group_size"] = c.n_head // c.n_kv_head
    os.makedirs(folder)
    official = OfficialWeights(OfficialConfig(**args), state)
    if weights == "safetensors":
        from safetensors.torch import save_file
        official.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  os.path.join(folder, "model.safetensors"))
    else:
        try:
            official.save_pretrained(folder)
        except RuntimeError as e:  # transformers 5: "shared tensors ... not properly defined"
            assert "shared tensors" in str(e), e
            official.config.save_pretrained(folder)
            torch.save(official.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    torch.save(dict(optimizer={}, iter_num=iter_num, best_val_loss=torch.tensor(best_val_loss)),
               os.path.join(folder, "optimizer.pt"))
    return state, args


def official_rope(x):
    """The official rotation of the last dimension's halves (the opposite direction to ours), float32 tables."""
    T, d = x.shape[1], x.shape[-1] // 2
    freqs = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, 2 * d, 2).float() / (2 * d)))
    cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)


def official_logits(sd, kind, args, idx):
    """The official models' forward in float32 (T6, T6_kvonly, llama-mha / -gqa, llama-mla), written from what they
    compute: per-token factor products divided by the rank, RoPE on B (T6) or on q and k, SwiGLU, RMSNorm."""
    import torch.nn.functional as F
    w = lambda k: sd[k].float()
    x = w("transformer.wte.weight")[idx]
    B, T = idx.shape
    C, H = x.shape[-1], args["n_head"]
    attend = lambda q, k, v, scale=None: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale).transpose(1, 2)
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.rms_norm(x, (C,))
        lin = lambda name, inp=h: inp @ w(p + name + ".weight").T
        if kind in ("T6", "T6_kvonly"):
            D, R = args["head_dim"], args["rank"]
            factor = lambda n, r, rope: (lin(f"attn.c_qkv.W_A_{n}").view(B, T, H, r)
                                         @ (official_rope if rope else (lambda b: b))(
                                             lin(f"attn.c_qkv.W_B_{n}").view(B, T, r, D))) / r
            q = (factor("q", args["q_rank"], True) if kind == "T6"
                 else official_rope(lin("attn.c_qkv.c_q").view(B, T, H, D)))
            y = attend(q, factor("k", R, True), factor("v", R, False))
        elif kind == "llama-mla":
            dc = w(p + "attn.kv_a_layernorm.weight").numel()
            dR = w(p + "attn.kv_a_proj_with_mqa.weight").shape[0] - dc  # the shared RoPE key's width
            rms = lambda t, name: F.rms_norm(t, (t.size(-1),), eps=1e-6) * w(p + name + ".weight")
            q = lin("attn.q_b_proj", rms(lin("attn.q_a_proj"), "attn.q_a_layernorm"))
            q = q.view(B, T, H, -1)
            D = q.size(-1) - dR
            ckv = lin("attn.kv_a_proj_with_mqa")
            kv = lin("attn.kv_b_proj", rms(ckv[..., :dc], "attn.kv_a_layernorm")).view(B, T, H, -1)
            k_pe = official_rope(ckv[..., dc:].view(B, T, 1, dR)).expand(B, T, H, dR)
            q = torch.cat([q[..., :D], official_rope(q[..., D:])], -1)
            y = attend(q, torch.cat([kv[..., :D], k_pe], -1), kv[..., D:], scale=(D + dR) ** -0.5)
        else:  # llama-mha (head_dim = n_embd / n_head), llama-gqa (group_size query heads per key/value head)
            D = C // H if kind == "llama-mha" else args["head_dim"]
            G = H // args.get("group_size", 1)
            q = official_rope(lin("attn.c_q").view(B, T, H, D))
            k = official_rope(lin("attn.c_k").view(B, T, G, D)).repeat_interleave(H // G, dim=2)
            y = attend(q, k, lin("attn.c_v").view(B, T, G, D).repeat_interleave(H // G, dim=2))
        x = x + y.reshape(B, T, -1) @ w(p + "attn.c_proj.weight").T
        h = F.rms_norm(x, (C,))
        x = x + (F.silu(lin("mlp.c_fc1", h)) * lin("mlp.c_fc2", h)) @ w(p + "mlp.c_proj.weight").T
    return F.rms_norm(x, (C,)) @ w("transformer.wte.weight").T


@pytest.mark.parametrize("attn", ["tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla"])
def test_official_trainer_folders_convert_with_the_official_logits(attn, tmp_path):
    """The folders the official trainer writes (out_dir and checkpoint-N/, by save_pretrained, with optimizer.pt):
    the folder, or its weights file, converts; the converted model's logits equal the official forward's (float32);
    iter_num and best_val_loss are kept."""
    opts = dict(n_head=6, head_dim=16, n_embd=96) if attn == "mha" else {}
    model = tiny_model(attn, **opts)
    kind = OFFICIAL_KIND[attn]
    run = tmp_path / f"out_{kind}_0m_Opt_adamw_LR_0.0006_D_fineweb_T_0.01B_time_20250101_jobid_0"
    state, args = write_official_run(model, str(run), iter_num=2000, best_val_loss=3.25)
    write_official_run(model, str(run / "checkpoint-1000"), iter_num=1000, best_val_loss=3.5)
    weights = next(f for f in os.listdir(run) if f.startswith(("pytorch_model", "model.")))
    x = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    want = official_logits(state, kind, args, x)
    for i, (src, iter_num, best) in enumerate([(run, 2000, 3.25), (run / "checkpoint-1000", 1000, 3.5),
                                               (run / weights, 2000, 3.25)]):
        convert.main(["--from=official", str(src), str(tmp_path / f"ours{i}")])
        back = load_checkpoint(str(tmp_path / f"ours{i}"))
        assert back["iter_num"] == iter_num and back["best_val_loss"] == pytest.approx(best)
        assert back["config"]["official"]["config_json"]["n_layer"] == model.config.n_layer
        assert back["config"]["official"]["model_type"] == kind  # from the trainer's folder name
        ours = GPT(GPTConfig(**back["model_config"]))
        ours.load_state_dict(back["model"])
        with torch.no_grad():
            torch.testing.assert_close(ours(x, all_logits=True)[0], want, rtol=1e-5, atol=1e-5)
    assert back["model_config"]["attn"] == attn


def test_official_safetensors_folder_and_refusals(tmp_path):
    """A newer save (model.safetensors, one name of the tied pair) converts; settings the converter cannot map are
    refused with the field and its value, and nothing is written."""
    model = tiny_model("tpa")
    state, args = write_official_run(model, str(tmp_path / "st"), weights="safetensors")
    assert "model.safetensors" in os.listdir(tmp_path / "st")
    convert.main(["--from=official", str(tmp_path / "st"), str(tmp_path / "ours")])
    ours = GPT(GPTConfig(**load_checkpoint(str(tmp_path / "ours"))["model_config"]))
    ours.load_state_dict(load_checkpoint(str(tmp_path / "ours"))["model"])
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, all_logits=True)[0], official_logits(state, "T6", args, x), rtol=1e-5,
                                   atol=1e-5)

    # a sharded save (an index.json naming the shards), as save_pretrained writes above its shard size
    from safetensors.torch import save_file
    shutil.copytree(tmp_path / "st", tmp_path / "sharded")
    os.remove(tmp_path / "sharded" / "model.safetensors")
    names = sorted(k for k in state if k != "lm_head.weight")
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / "sharded" / file))
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
        dict(metadata={}, weight_map={k: file for file, keys in shards.items() for k in keys})))
    convert.main(["--from=official", str(tmp_path / "sharded"), str(tmp_path / "ours_sharded")])
    assert all(torch.equal(load_checkpoint(str(tmp_path / "ours_sharded"))["model"][k], v)
               for k, v in load_checkpoint(str(tmp_path / "ours"))["model"].items())

    def refused(folder, edit=None, name=None):
        src = tmp_path / (name or f"case{len(os.listdir(tmp_path))}")
        shutil.copytree(tmp_path / "st", src)
        if edit:
            cfg = json.loads((src / "config.json").read_text())
            edit(cfg)
            (src / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / f"out_{src.name}"
        with pytest.raises(SystemExit) as e:
            convert.main(["--from=official", str(src), str(out)])
        assert not out.exists() or not os.listdir(out)  # nothing half-written
        return str(e.value)
    assert "using_groupnorm=True" in refused("g", lambda c: c.update(using_groupnorm=True))
    assert "model_type 'llama'" in refused("t", lambda c: c.update(model_type="llama"))
    assert "its settings say rank=4, but the weights hold rank=2" in refused("r", lambda c: c.update(rank=4))
    assert "model_type 'T6_partialrope' is not converted" in refused(
        "p", name="out_T6_partialrope_0m_Opt_adamw_LR_0.0006_D_x_T_1B_time_0_jobid_0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no config.json with pytorch_model.bin or model.safetensors"):
        convert.main(["--from=official", str(tmp_path / "empty"), str(tmp_path / "o")])


def test_bad_input_gets_a_clear_message(tmp_path):
    def cli(*args):  # the command line's error: a SystemExit with one line, no traceback
        with pytest.raises(SystemExit) as e:
            convert.main(list(args))
        assert str(e.value).startswith("convert: "), e.value
        return str(e.value)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    p = subprocess.run([sys.executable, "-m", "scripts.convert", "--from=official", str(tmp_path / "notes.txt"),
                        str(tmp_path / "o1")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=child_env())
    assert p.returncode != 0 and "Traceback" not in p.stderr and "cannot be read as a torch checkpoint" in p.stderr
    model = tiny_model("tpa")
    torch.save(official_layout(model), tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    assert "truncated or damaged" in cli("--from=official", str(tmp_path / "cut.pt"), str(tmp_path / "o2"))
    ck = official_layout(model)
    ck["config"]["model_type"] = "T6_partialrope"
    torch.save(ck, tmp_path / "partial.pt")
    assert "is not converted" in cli("--from=official", str(tmp_path / "partial.pt"), str(tmp_path / "o3"))
    ck = official_layout(model)
    del ck["model"]["_orig_mod.transformer.h.1.mlp.c_fc2.weight"]
    torch.save(ck, tmp_path / "missing.pt")
    assert "transformer.h.1.mlp.c_fc2.weight is missing" in cli("--from=official", str(tmp_path / "missing.pt"),
                                                                str(tmp_path / "o4"))
    ck = official_layout(model)
    ck["model"]["_orig_mod.transformer.h.0.attn.subln.weight"] = torch.ones(16)
    torch.save(ck, tmp_path / "groupnorm.pt")
    assert "group norm" in cli("--from=official", str(tmp_path / "groupnorm.pt"), str(tmp_path / "o5"))
    # Hugging Face folders
    assert "holds no config.json" in cli("--from=hf", str(tmp_path), str(tmp_path / "o6"))
    convert.to_hf(write_run(model, str(tmp_path / "run")), str(tmp_path / "hf"))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "truncated or damaged" in cli("--from=hf", str(tmp_path / "hf"), str(tmp_path / "o7"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert "is not this repository's" in cli("--from=hf", str(tmp_path / "hf"), str(tmp_path / "o8"))
    assert "not empty" in cli("--to=hf", str(tmp_path / "run"), str(tmp_path / "hf"))


def test_lm_eval_hf_backend_scores_the_export_like_our_adapter(tmp_path, monkeypatch):
    """`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True` on an export gives the numbers our
    own adapter (eval/harness.py) gives on the checkpoint."""
    pytest.importorskip("accelerate")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.harness import TPALM
    from test_eval import write_tasks
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    write_tasks(tmp_path / "tasks", n=12)
    model = tiny_model("tpa")
    convert.to_hf(write_run(model, str(tmp_path / "run")), str(tmp_path / "hf"))
    scores = []
    for lm in (HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, batch_size=4, device="cpu"),
               TPALM(model=model, batch_size=4)):
        r = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc", "toy_ll"], bootstrap_iters=0,
                                    task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
        scores.append({t: {k: v for k, v in x.items() if k.endswith(",none")} for t, x in r["results"].items()})
    assert scores[0]["toy_mc"]["acc_norm,none"] == scores[1]["toy_mc"]["acc_norm,none"]
    assert scores[0]["toy_ll"]["perplexity,none"] == pytest.approx(scores[1]["toy_ll"]["perplexity,none"], rel=1e-4)
