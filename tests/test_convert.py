"""scripts/convert.py: export to transformers (logits, greedy generation, what the cache holds), the round trip back,
import of the official code's checkpoints (built here from our weights in its layout), and bad input."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, child_env
from model import GPT, model_config
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
        ours = model.generate(x[:1, :6], 15, top_k=1)
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
            alone = model.generate(torch.tensor([prompt]), 8, top_k=1)[0]
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
