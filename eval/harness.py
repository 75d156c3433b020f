"""
Downstream evaluation with lm-evaluation-harness (pip `lm-eval`), the paper's suite by default (spec 4.2-4.3).

    python -m eval.harness --ckpt_dir=out/medium_tpa --tasks=paper --num_fewshot=0,2 --batch_size=32
    python -m eval.harness --ckpt_dir=out/medium_tpa --tasks=hellaswag,lambada_openai --limit=200
    HF_DATASETS_OFFLINE=1 python -m eval.harness --ckpt_dir=... --tasks=my_task --include_path=tasks/

`paper` is ARC-E, ARC-C, BoolQ, HellaSwag, OBQA, PIQA, WinoGrande, MMLU and SciQ with the paper's metric per
task (acc_norm, or acc for BoolQ, WinoGrande and MMLU); any harness task or group name works too. The table
(one row per shot setting, the average last) is printed and saved as harness.json and harness.md next to the
checkpoint. The model is TPALM, registered with the harness as "tpa": a TemplateLM over our checkpoints and
GPT-2 tokenizer, with batched loglikelihoods (longest first, contexts cut from the left to the block size),
rolling loglikelihoods for perplexity tasks, and generate_until through GPT.generate with the KV cache.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

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
        if model is None:
            from checkpoint import load_model
            dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
            model, ckpt = load_model(ckpt_dir, device=device, dtype=dt)
            tokenizer = ckpt.get("meta", {}).get("tokenizer", tokenizer)
        self.model, self.device_name = model.eval(), device
        self.enc = tiktoken.get_encoding(tokenizer)
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
            new = self.model.generate(x, max_new, temperature=temperature, top_k=None if sample else 1,
                                      stop_tokens={self.eot_token_id}, use_kernel=self.use_kernel)[0][len(ids):]
            text = self.tok_decode([t for t in new.tolist() if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            results.append(text)
        return results


def paper_table(results_by_shot, tasks):
    """{shots: lm-eval results} -> (rows for JSON, markdown): one row per shot setting, the average last."""
    names = [PAPER_NAMES.get(t, t) for t in tasks]
    rows, lines = [], ["| shots | " + " | ".join(names) + " | Avg |", "|---" * (len(tasks) + 2) + "|"]
    for shots, res in results_by_shot.items():
        scores = {}
        for task in tasks:
            metrics = res["results"].get(task, {})
            metric = PAPER_TASKS.get(task) or next((m for m in ("acc_norm", "acc", "exact_match") if f"{m},none" in metrics),
                                                   None)
            value = metrics.get(f"{metric},none") if metric else None
            scores[task] = dict(metric=metric, value=100 * value if isinstance(value, (int, float)) else None)
        values = [s["value"] for s in scores.values() if s["value"] is not None]
        avg = sum(values) / len(values) if values else None
        rows.append(dict(shots=shots, scores=scores, avg=avg))
        cells = [f"{s['value']:.2f}" if s["value"] is not None else "-" for s in scores.values()]
        lines.append(f"| {shots} | " + " | ".join(cells) + (f" | {avg:.2f} |" if avg is not None else " | - |"))
    return rows, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="a run directory (newest checkpoint) or a ckpt_*.pt file")
    parser.add_argument("--tasks", default="paper", help="'paper' or comma-separated harness tasks / groups")
    parser.add_argument("--num_fewshot", default="0,2", help="comma-separated shot settings")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32 (as the paper's harness runs), bfloat16, float16")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (for quick checks)")
    parser.add_argument("--include_path", default=None, help="a folder of local task YAMLs")
    parser.add_argument("--out_dir", default=None, help="where to save harness.json / .md (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    tasks = list(PAPER_TASKS) if args.tasks == "paper" else args.tasks.split(",")
    lm = TPALM(ckpt_dir=args.ckpt_dir, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    by_shot = {}
    for shots in (int(s) for s in args.num_fewshot.split(",")):
        try:
            by_shot[shots] = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=args.limit,
                                             task_manager=manager, log_samples=False, bootstrap_iters=0)
        except ConnectionError as e:
            raise SystemExit(f"{e}\nthe task data is not in the local datasets cache: run once with internet access "
                             f"(or point local task YAMLs at the files with --include_path, see the README)")
    rows, table = paper_table(by_shot, tasks)
    print(table)
    from checkpoint import find_checkpoint
    ckpt = find_checkpoint(args.ckpt_dir)
    out_dir = args.out_dir or os.path.dirname(ckpt)
    with open(os.path.join(out_dir, "harness.json"), "w") as f:
        json.dump(dict(checkpoint=ckpt, tasks=tasks, limit=args.limit, rows=rows,
                       raw={s: r["results"] for s, r in by_shot.items()}), f, indent=1, default=str)
    with open(os.path.join(out_dir, "harness.md"), "w") as f:
        f.write(f"{ckpt}\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
