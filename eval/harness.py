"""
Downstream evaluation with lm-evaluation-harness (pip `lm-eval`), the paper's suite by default (docs/DESIGN.md sec. 6).

    python -m eval.harness --out_dir=out/medium_tpa --tasks=paper --num_fewshot=0,2 --batch_size=32
    python -m eval.harness --out_dir=out/medium_tpa --tasks=hellaswag,lambada_openai --limit=200
    HF_DATASETS_OFFLINE=1 python -m eval.harness --out_dir=... --tasks=my_task --include_path=tasks/

`paper` is ARC-E, ARC-C, BoolQ, HellaSwag, OBQA, PIQA, WinoGrande, MMLU and SciQ with the paper's metric per
task (acc_norm, or acc for BoolQ, WinoGrande and MMLU); any harness task or group name works too. The table
(one row per shot setting, the average of the paper's tasks last) is printed and saved, with lm-eval's record of
every sample (samples_<task>_<shots>shot.jsonl), in a new folder beside the checkpoint (--output_path): harness.json
also records the lm-eval and task versions, the limit, the shots and the checkpoint's iteration. Every task's data
is loaded before the model, so a missing one is reported at once. The model is TPALM, registered with the harness
as "tpa": a TemplateLM over our checkpoints and GPT-2 tokenizer, with batched loglikelihoods (longest first,
contexts cut from the left to the block size), rolling loglikelihoods for perplexity tasks, and generate_until
through engine.generate with the KV cache.
"""

import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python eval/harness.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER_TASKS = {  # task -> the paper's metric (Tables 2-3, 11-16)
    "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
    "openbookqa": "acc_norm", "piqa": "acc_norm", "winogrande": "acc", "mmlu": "acc", "sciq": "acc_norm",
}
PAPER_NAMES = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "boolq": "BoolQ", "hellaswag": "HellaSwag",
               "openbookqa": "OBQA", "piqa": "PIQA", "winogrande": "WinoGrande", "mmlu": "MMLU", "sciq": "SciQ"}


@register_model("tpa")
class TPALM(TemplateLM):
    """An lm-eval model over a train.py checkpoint (ckpt_dir) or a GPT instance (model)."""

    def __init__(self, ckpt_dir=None, model=None, tokenizer="gpt2", device="cpu", dtype="float32", batch_size=16,
                 use_kernel=True):
        super().__init__()
        import tiktoken
        self.iter_num = None
        if model is None:
            from checkpoint import load_model
            from common import resolve_dtype
            model, ckpt = load_model(ckpt_dir, device=device, dtype=resolve_dtype(dtype, device.split(":")[0])[1])
            tokenizer = ckpt.get("meta", {}).get("tokenizer", tokenizer)
            self.iter_num = ckpt["iter_num"]
        self.model, self.device_name = model.eval(), device
        self.enc = tiktoken.get_encoding(tokenizer)
        if model.config.vocab_size < self.enc.n_vocab:  # task text would reach embedding rows the model lacks
            raise ValueError(f"the model's vocabulary ({model.config.vocab_size} tokens) is smaller than its tokenizer "
                             f"{tokenizer!r} ({self.enc.n_vocab} tokens): lm-eval tasks need a model trained with "
                             f"that tokenizer's ids (vocab_size >= {self.enc.n_vocab})")
        self.batch_size_per_gpu = int(batch_size)
        self.max_length = model.config.block_size
        self.use_kernel = use_kernel

    @property
    def eot_token_id(self):
        return self.enc.eot_token

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.enc.encode_ordinary(string)

    def tok_decode(self, tokens):
        return self.enc.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: ((context, continuation), context tokens, continuation tokens) -> [(logprob, is_greedy)]."""
        dev = self.model.lm_head.weight.device
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out = [None] * len(requests)
        for s in tqdm(range(0, len(order), self.batch_size_per_gpu), disable=disable_tqdm, desc="loglikelihood"):
            idx = order[s:s + self.batch_size_per_gpu]
            rows, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                whole = (ctx + cont)[-(self.max_length + 1):]  # keep the end: cut the context from the left
                rows.append(whole[:-1])
                conts.append(cont[-(len(whole) - 1):] if len(cont) >= len(whole) else cont)
            T = max(len(r) for r in rows)
            x = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=dev)  # right padding: causal, unseen
            logprobs = F.log_softmax(self.model(x, all_logits=True)[0].float(), dim=-1)
            for j, i in enumerate(idx):
                n, cont = len(rows[j]), conts[j]
                lp = logprobs[j, n - len(cont):n]  # the positions that predict the continuation
                target = torch.tensor(cont, device=dev)
                ll = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (ll, greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        results = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([((None, None), c, t) for c, t in windows], disable_tqdm=True)
            results.append(sum(ll for ll, _ in scores))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        from engine import generate
        dev = self.model.lm_head.weight.device
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kw.pop("max_gen_toks", 256)), self.max_length - 1)
            sample = kw.pop("do_sample", False)
            temperature = float(kw.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            x = torch.tensor([ids], device=dev)
            new = generate(self.model, x, max_new, temperature=temperature, top_k=None if sample else 1,
                           stop_tokens={self.eot_token_id}, use_kernel=self.use_kernel)[0][len(ids):]
            text = self.tok_decode([t for t in new.tolist() if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            results.append(text)
        return results


def paper_table(results_by_shot, tasks, avg="paper", limit=None):
    """{shots: lm-eval results} -> (rows for JSON, markdown): one row per shot setting, the average last.

    avg="paper" averages the paper's tasks among those run (all the tasks run if none is the paper's); "all"
    averages every task. A row's average over fewer than the paper's nine tasks, or with a task that has no
    score, is marked partial; a limited run's table says so above it."""
    names = [PAPER_NAMES.get(t, t) for t in tasks]
    avg_tasks = [t for t in tasks if t in PAPER_TASKS] if avg == "paper" else list(tasks)
    if not avg_tasks:
        avg_tasks = list(tasks)
    rows, lines = [], []
    for shots, res in results_by_shot.items():
        scores = {}
        for task in tasks:
            metrics = res["results"].get(task, {})
            metric = PAPER_TASKS.get(task) or next((m for m in ("acc_norm", "acc", "exact_match") if f"{m},none" in metrics),
                                                   None)
            value = metrics.get(f"{metric},none") if metric else None
            scores[task] = dict(metric=metric, value=100 * value if isinstance(value, (int, float)) else None)
        values = [scores[t]["value"] for t in avg_tasks if scores[t]["value"] is not None]
        mean = sum(values) / len(values) if values else None
        partial = len(values) < len(avg_tasks) or (avg == "paper" and set(avg_tasks) <= set(PAPER_TASKS)
                                                    and len(values) < len(PAPER_TASKS))
        rows.append(dict(shots=shots, scores=scores, avg=mean, avg_tasks=avg_tasks, avg_partial=partial))
        cells = [f"{s['value']:.2f}" if s["value"] is not None else "-" for s in scores.values()]
        avg_cell = "-" if mean is None else f"{mean:.2f}" + (f" ({len(values)} of {len(PAPER_TASKS)} paper tasks)"
                                                             if partial and avg == "paper" else " (partial)" if partial
                                                             else "")
        lines.append(f"| {shots} | " + " | ".join(cells) + f" | {avg_cell} |")
    label = "Avg" if avg == "paper" and set(avg_tasks) <= set(PAPER_TASKS) else f"Avg ({len(avg_tasks)} tasks)"
    head = ["| shots | " + " | ".join(names) + f" | {label} |", "|---" * (len(tasks) + 2) + "|"]
    note = [f"**Limited run: at most {limit:g} examples per task; not comparable with full runs.**", ""] if limit else []
    return rows, "\n".join(note + head + lines)


MISSING_HELP = """
Task data comes from the Hugging Face hub and is cached under ~/.cache/huggingface: run once with internet access
(HF_DATASETS_OFFLINE=1 afterwards), or write task YAMLs that read local files and pass their folder with
--include_path (README, "Evaluation")."""


def check_tasks(tasks, manager):
    """Load every task's data before the model is loaded: one message listing each task that cannot be loaded."""
    missing = []
    for task in tasks:
        try:
            manager.load([task])  # builds the task, which loads its data
        except Exception as e:  # an unknown name, no network, a missing local file: lm-eval raises many kinds
            first = (str(e).strip().splitlines() or [""])[0][:200]
            missing.append(f"  {task}: {type(e).__name__}: {first}")
    if missing:
        raise SystemExit("these tasks cannot be loaded (checked before loading the model):\n" + "\n".join(missing)
                         + MISSING_HELP)


def output_dir(path, ckpt_path, iter_num):
    """A new folder for this run's results: path, or harness_<iteration>_<time> beside the checkpoint; results are
    never written over."""
    if path:
        if os.path.isdir(path) and os.listdir(path):
            raise SystemExit(f"{path} already holds files; results are never written over: choose another "
                             f"--output_path, or leave it out for a new folder beside the checkpoint")
    else:
        base = os.path.join(os.path.dirname(ckpt_path), f"harness_{iter_num:07d}_{time.strftime('%Y%m%d-%H%M%S')}")
        path, k = base, 1
        while os.path.exists(path):
            k += 1
            path = f"{base}_{k}"
    os.makedirs(path, exist_ok=True)
    return path


def write_samples(out_dir, shots, samples):
    """lm-eval's per-sample records, one JSON line each: samples_<task>_<shots>shot.jsonl."""
    for task, records in samples.items():
        with open(os.path.join(out_dir, f"samples_{task}_{shots}shot.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")


def main(argv=None):
    from common import check_dtype, resolve_device
    from configurator import configure
    out_dir = "out"  # the run folder (its newest checkpoint) or a ckpt_*.pt file; --ckpt_dir is the same
    tasks = "paper"  # 'paper' or comma-separated harness tasks / groups
    num_fewshot = "0,2"  # comma-separated shot settings
    batch_size = 16
    device = "auto"  # auto (CUDA if present), cpu, cuda, cuda:N
    dtype = "float32"  # float32 (as the paper's harness runs), bfloat16 / bf16, float16 / fp16
    limit = None  # examples per task (for quick checks)
    include_path = ""  # a folder of local task YAMLs
    avg = "paper"  # average the paper's tasks ('paper') or every task run ('all')
    output_path = ""  # a new folder for the results (default: harness_<iter>_<time> beside the checkpoint)
    try:
        cfg = configure(locals(), sys.argv[1:] if argv is None else argv, aliases={"ckpt_dir": "out_dir"})
        if cfg["avg"] not in ("paper", "all"):
            raise ValueError(f"avg={cfg['avg']!r}: use 'paper' or 'all'")
        if cfg["limit"] is not None and not (isinstance(cfg["limit"], (int, float)) and cfg["limit"] > 0):
            raise ValueError(f"limit={cfg['limit']!r} must be a number > 0 (examples per task, or a fraction < 1)")
        cfg["device"] = resolve_device(cfg["device"])[0]
        check_dtype(cfg["dtype"])
    except ValueError as e:
        raise SystemExit(f"config error: {e}")
    args = types.SimpleNamespace(**dict(cfg, num_fewshot=str(cfg["num_fewshot"])))
    import importlib.metadata

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from checkpoint import find_checkpoint
    tasks = list(PAPER_TASKS) if args.tasks == "paper" else args.tasks.split(",")
    try:
        ckpt_path = find_checkpoint(args.out_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"cannot load a checkpoint: {e}")
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    check_tasks(tasks, manager)
    lm = TPALM(ckpt_dir=ckpt_path, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    out_dir = output_dir(args.output_path or None, ckpt_path, lm.iter_num)
    by_shot = {}
    for shots in (int(s) for s in args.num_fewshot.split(",")):
        try:
            by_shot[shots] = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=args.limit,
                                             task_manager=manager, log_samples=True, bootstrap_iters=0)
        except ConnectionError as e:
            raise SystemExit(f"{e}{MISSING_HELP}")
        write_samples(out_dir, shots, by_shot[shots].pop("samples"))
    rows, table = paper_table(by_shot, tasks, args.avg, args.limit)
    version = importlib.metadata.version("lm_eval")
    print(table)
    meta = dict(checkpoint=ckpt_path, iter_num=lm.iter_num, tasks=tasks, shots=list(by_shot), limit=args.limit,
                avg=args.avg, dtype=args.dtype, lm_eval_version=version, argv=sys.argv if argv is None else argv,
                date=time.strftime("%Y-%m-%d %H:%M:%S"),
                task_versions={s: r.get("versions") for s, r in by_shot.items()},
                n_samples={s: r.get("n-samples") for s, r in by_shot.items()})
    with open(os.path.join(out_dir, "harness.json"), "w") as f:
        json.dump(dict(meta, rows=rows, raw={s: r["results"] for s, r in by_shot.items()}), f, indent=1, default=str)
    with open(os.path.join(out_dir, "harness.md"), "w") as f:
        f.write(f"{ckpt_path} (iteration {lm.iter_num}), lm-eval {version}, {args.dtype}\n\n{table}\n")
    print(f"results and per-sample logs: {out_dir}")
    return rows, out_dir


if __name__ == "__main__":
    main()
