"""eval/: the lm-eval adapter against direct computation, the harness end to end, and val_loss vs train.py."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

from conftest import ROOT, child_env
from engine import generate
from model import GPT, model_config
from test_generate import tiny_run  # noqa: F401  (the checkpoint fixture)
from test_model import randomize

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from eval.harness import TPALM, paper_table  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = randomize(GPT(model_config("tiny", "tpa", block_size=64)), std=0.1)
    return TPALM(model=model, batch_size=3)


def direct_logprob(model, ctx, cont, block):
    """Sum of log p(continuation) with one forward over the last block + 1 tokens."""
    whole = (ctx + cont)[-(block + 1):]
    logits = model(torch.tensor([whole[:-1]]), all_logits=True)[0][0].float()
    lp = F.log_softmax(logits, -1)
    n = min(len(cont), len(whole) - 1)
    return sum(lp[len(whole) - 1 - n + i, whole[len(whole) - n + i]].item() for i in range(n))


def inst(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_direct_computation(lm):
    enc = tiktoken.get_encoding("gpt2")
    long_context = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # > block_size tokens
    pairs = [("The cat sat on the", " mat."), ("Hello ", "world"), ("naïve café", "s are ünïcode"),
             ("Question: 2+2=", "4"), (long_context, " and ran away into the woods"), ("", "An empty context"),
             ("x", " " + " ".join(["word"] * 80))]  # a continuation longer than the block
    assert len(enc.encode_ordinary(long_context)) > 64
    got = lm.loglikelihood([inst("loglikelihood", p) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx == "":
            c, t = [enc.eot_token], enc.encode_ordinary(cont)
        else:
            n_space = len(ctx) - len(ctx.rstrip())  # lm-eval moves trailing spaces to the continuation
            ctx, cont = (ctx[:-n_space], ctx[-n_space:] + cont) if n_space else (ctx, cont)
            whole = enc.encode_ordinary(ctx + cont)
            c = enc.encode_ordinary(ctx)
            t = whole[len(c):]
        ref = direct_logprob(lm.model, c, t, 64)
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-4), (ctx[:20], cont[:20])
        assert isinstance(greedy, bool)
    # batching and order do not change the numbers
    lm2 = TPALM(model=lm.model, batch_size=1)
    assert [round(x, 3) for x, _ in lm2.loglikelihood([inst("loglikelihood", p) for p in pairs[::-1]], True)][::-1] == \
        [round(x, 3) for x, _ in got]


def test_model_with_a_smaller_vocabulary_than_its_tokenizer_is_refused():
    model = GPT(model_config("tiny", "mha", vocab_size=256))
    with pytest.raises(ValueError, match=r"vocabulary \(256 tokens\) is smaller than its tokenizer 'gpt2'"):
        TPALM(model=model)


def test_loglikelihood_rolling(lm):
    enc = tiktoken.get_encoding("gpt2")
    short = "A short document about tensor products."
    tokens = enc.encode_ordinary(short)
    ref = direct_logprob(lm.model, [enc.eot_token], tokens, 64)
    long = " ".join(["tensor product attention"] * 40)  # several disjoint windows
    got = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (short,)), inst("loglikelihood_rolling", (long,))], True)
    assert got[0] == pytest.approx(ref, rel=1e-4)
    t = enc.encode_ordinary(long)
    assert len(t) > 64
    # the harness's disjoint windows: the first 64 tokens after EOT, then blocks of 64 tokens, each predicted
    # from the 64 tokens before its last one (so its first token has the most context)
    parts = [direct_logprob(lm.model, [enc.eot_token], t[:64], 64)]
    for s in range(64, len(t), 64):
        e = min(s + 64, len(t))
        parts.append(direct_logprob(lm.model, t[max(0, e - 65):s], t[s:e], 64))
    assert got[1] == pytest.approx(sum(parts), rel=1e-4)


def test_generate_until_equals_generate(lm):
    enc = tiktoken.get_encoding("gpt2")
    ctx = "Once upon a time"
    ids = enc.encode_ordinary(ctx)
    ref = generate(lm.model, torch.tensor([ids]), 12, top_k=1)[0, len(ids):].tolist()
    text = enc.decode(ref)
    out = lm.generate_until([inst("generate_until", (ctx, {"until": ["\n\n"], "max_gen_toks": 12}))], True)[0]
    if enc.eot_token not in ref:
        assert out == text.split("\n\n")[0]
    stop = text[len(text) // 2:len(text) // 2 + 2] or "x"
    out = lm.generate_until([inst("generate_until", (ctx, {"until": [stop], "max_gen_toks": 12}))], True)[0]
    assert out == text[:text.index(stop)] if stop in text else out == text


def write_tasks(root, n=60):
    root.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    with open(root / "mc.jsonl", "w") as f:
        for i in range(n):
            choices = [" ".join(words[j] for j in torch.randint(0, 8, (3,), generator=g).tolist()) for _ in range(4)]
            f.write(json.dumps(dict(question=f"Question {i}: which one?", choices=choices, answer=i % 4)) + "\n")
    with open(root / "ll.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps(dict(context=f"Count {i}, {i + 1},", target=f" {i + 2}")) + "\n")
    (root / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (root / "toy_ll.yaml").write_text(f"""task: toy_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'll.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
""")


def test_harness_end_to_end(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    write_tasks(tmp_path / "tasks")
    from eval.harness import main
    rows, out = main([f"--out_dir={tiny_run}", "--tasks=toy_mc,toy_ll", "--num_fewshot=0,2", "--batch_size=8",
                      "--device=cpu", f"--include_path={tmp_path / 'tasks'}"])
    assert [r["shots"] for r in rows] == [0, 2]
    assert os.path.dirname(out) == tiny_run and os.path.basename(out).startswith("harness_0000002_")
    for r in rows:
        mc = r["scores"]["toy_mc"]
        assert mc["metric"] == "acc_norm" and 5 <= mc["value"] <= 50  # a random model: near 25% chance
        assert r["scores"]["toy_ll"]["metric"] == "acc" and r["avg"] is not None
        # the per-sample records reproduce the reported scores
        for task, metric in (("toy_mc", "acc_norm"), ("toy_ll", "acc")):
            samples = [json.loads(line) for line in open(os.path.join(out, f"samples_{task}_{r['shots']}shot.jsonl"))]
            assert len(samples) == (60 if task == "toy_mc" else 20)
            assert 100 * np.mean([x[metric] for x in samples]) == pytest.approx(r["scores"][task]["value"])
    table = open(os.path.join(out, "harness.md")).read()
    assert "| shots | toy_mc | toy_ll | Avg (2 tasks) |" in table and "| 2 |" in table and "lm-eval 0.4" in table
    saved = json.load(open(os.path.join(out, "harness.json")))
    assert saved["tasks"] == ["toy_mc", "toy_ll"] and len(saved["rows"]) == 2 and saved["iter_num"] == 2
    assert saved["lm_eval_version"] == lm_eval.__version__ if hasattr(lm_eval, "__version__") else saved["lm_eval_version"]
    assert saved["limit"] is None and set(saved["task_versions"]["0"]) == {"toy_mc", "toy_ll"}
    out_table = subprocess.run([sys.executable, "-m", "scripts.eval_table", tiny_run, "--names=T6"], cwd=ROOT,
                               capture_output=True, text=True)
    assert out_table.returncode == 0 and "| T6 |" in out_table.stdout and "0-shot" in out_table.stdout
    # a second, limited run goes to a new folder, and says it is limited
    rows2, out2 = main([f"--ckpt_dir={tiny_run}", "--tasks=toy_mc", "--num_fewshot=0", "--batch_size=8",
                        "--device=cpu", f"--include_path={tmp_path / 'tasks'}", "--limit=10"])
    assert out2 != out and os.path.exists(os.path.join(out, "harness.json"))
    assert "Limited run: at most 10 examples per task" in open(os.path.join(out2, "harness.md")).read()
    assert len(open(os.path.join(out2, "samples_toy_mc_0shot.jsonl")).readlines()) == 10
    out_table = subprocess.run([sys.executable, "-m", "scripts.eval_table", out, out2, "--names=full,quick"],
                               cwd=ROOT, capture_output=True, text=True)
    assert "| quick (limit 10) |" in out_table.stdout and "not comparable with full runs" in out_table.stdout
    with pytest.raises(SystemExit, match="already holds files; results are never written over"):
        main([f"--out_dir={tiny_run}", "--tasks=toy_mc", "--num_fewshot=0", "--device=cpu",
              f"--include_path={tmp_path / 'tasks'}", f"--output_path={out}"])


def test_missing_task_data_fails_before_the_model_loads(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    write_tasks(tmp_path / "tasks")
    (tmp_path / "tasks" / "mc.jsonl").rename(tmp_path / "gone.jsonl")  # toy_mc's file is missing
    import checkpoint
    import eval.harness as harness

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the tasks were checked")
    monkeypatch.setattr(checkpoint, "load_model", no_model)
    with pytest.raises(SystemExit) as e:
        harness.main([f"--out_dir={tiny_run}", "--tasks=toy_mc,toy_ll,no_such_task", "--num_fewshot=0",
                      "--device=cpu", f"--include_path={tmp_path / 'tasks'}"])
    message = str(e.value)
    assert "these tasks cannot be loaded" in message and "toy_mc:" in message and "no_such_task:" in message
    assert "toy_ll:" not in message and "--include_path" in message


def test_paper_average_and_partial_rows():
    fake = {0: {"results": {t: {f"{m},none": 0.5} for t, m in harness_tasks().items()}}}
    fake[0]["results"]["lambada_openai"] = {"acc,none": 0.9}
    rows, md = paper_table(fake, list(harness_tasks()) + ["lambada_openai"])
    assert rows[0]["avg"] == pytest.approx(50.0) and not rows[0]["avg_partial"]  # LAMBADA is not in the paper's Avg
    assert "| Avg |" in md
    del fake[0]["results"]["mmlu"]
    rows, md = paper_table(fake, list(harness_tasks()), limit=200)
    assert rows[0]["avg_partial"] and "(8 of 9 paper tasks)" in md and "Limited run: at most 200" in md
    rows, md = paper_table(fake, ["boolq", "lambada_openai"], avg="all")
    assert rows[0]["avg"] == pytest.approx(70.0) and "Avg (2 tasks)" in md


def harness_tasks():
    from eval.harness import PAPER_TASKS
    return PAPER_TASKS


def test_paper_table_metrics():
    fake = {0: {"results": {"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.6}, "boolq": {"acc,none": 0.7},
                            "mmlu": {"acc,none": 0.25}}}}
    rows, md = paper_table(fake, ["arc_easy", "boolq", "mmlu"])
    assert rows[0]["scores"]["arc_easy"] == dict(metric="acc_norm", value=pytest.approx(60.0))  # the paper's metric
    assert rows[0]["avg"] == pytest.approx((60 + 70 + 25) / 3)
    assert "| ARC-E | BoolQ | MMLU | Avg |" in md


def test_val_loss_equals_train_eval(tiny_run):  # noqa: F811
    p = subprocess.run([sys.executable, "-m", "eval.val_loss", f"--ckpt_dir={tiny_run}", "--batch_size=3"], cwd=ROOT,
                       capture_output=True, text=True, env=child_env())
    assert p.returncode == 0, p.stderr
    got = json.load(open(os.path.join(tiny_run, "val_loss.json")))
    logged = [json.loads(line) for line in open(os.path.join(tiny_run, "metrics.jsonl")) if "val_loss" in line][-1]
    assert got["iter_num"] == logged["iter"] == 2
    assert got["loss"] == pytest.approx(logged["val_loss"], abs=1e-5)  # train.py used batch 2, here batch 3
    assert got["tokens"] == (256 - 1) // 64 * 64 and got["bpb"] > 0 and got["ppl"] == pytest.approx(2.718281828 ** got["loss"])


def test_bits_per_byte_counts_text_bytes_only(tmp_path):
    """A model that predicts the uniform distribution (zero logits: loss ln V per token) on documents of known
    bytes: bpb is (text targets x ln V / ln 2) / (their bytes); <|endoftext|> counts in neither."""
    from data.loader import ValSet
    from data.shards import write_shard
    from eval.val_loss import bits_per_byte, evaluate
    enc = tiktoken.get_encoding("gpt2")
    docs = ["Tensor products.", "naïve café — ünïcode text", "A third, longer document about attention heads."]
    tokens = []
    for d in docs:
        tokens += [enc.eot_token] + enc.encode_ordinary(d)
    for split in ("train", "val"):
        write_shard(str(tmp_path / f"d_{split}_000000.bin"), np.array(tokens, dtype=np.uint16))
    n = len(tokens)
    model = GPT(model_config("tiny", "mha", block_size=n - 1))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: every token has probability 1 / V
    val = ValSet(str(tmp_path), n - 1, n)  # one window: every token after the first is a target
    V = model.config.vocab_size
    got = bits_per_byte(model, val, 2)
    hand_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["bytes"] == hand_bytes and got["text_tokens"] == n - 1 - (len(docs) - 1)
    assert got["bpb"] == pytest.approx(got["text_tokens"] * math.log(V) / math.log(2) / hand_bytes, rel=1e-6)
    everything = evaluate(model, val, 2)  # the plain loss still counts every target
    assert everything["tokens"] == n - 1 and everything["loss"] == pytest.approx(math.log(V), rel=1e-6)


def test_val_loss_compiles_the_model_once(tmp_path):
    """Every validation batch reaches a compiled model with one shape and one layout: the windows are views
    (stride block_size + 1) and the padded last batch is a new tensor, which once compiled the whole model a
    second time on every run's first evaluation."""
    from data.loader import ValSet
    from data.shards import write_shard
    from eval.val_loss import evaluate
    write_shard(str(tmp_path / "d_val_000000.bin"), np.arange(300, dtype=np.uint16) % 256)
    val = ValSet(str(tmp_path), 16, 5 * 16 + 1)  # 5 windows: batches of 2, 2 and a padded 1
    assert val.n_windows == 5
    model = GPT(model_config("tiny", "mha", block_size=16, vocab_size=256))
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    got = evaluate(compiled, val, 2)["loss"]
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert got == pytest.approx(evaluate(model, val, 2)["loss"], rel=1e-5)
