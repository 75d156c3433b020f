"""The strict configurator: unknown keys and wrong types are errors, in files and on the command line."""

import pytest

from configurator import configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, out_dir="out", init_from="scratch",
                wandb_run_name=None, _private=1, torch=object())


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides(tmp_path):
    cfg = configure(DEFAULTS, [])
    assert cfg == dict(batch_size=12, learning_rate=6e-4, compile=True, out_dir="out", init_from="scratch",
                       wandb_run_name=None)
    path = write(tmp_path, "import math\nbatch_size = 2 * 8\nlearning_rate = 1e-3\n_tmp = 3\n")
    cfg = configure(DEFAULTS, [path, "--compile=False", "--out_dir=runs/a", "--learning_rate=1", "--batch_size=4"])
    assert cfg["batch_size"] == 4 and cfg["compile"] is False and cfg["out_dir"] == "runs/a"
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)  # int is fine for a float key
    assert configure(DEFAULTS, ["--out_dir=123"])["out_dir"] == "123"  # a str key stays a str
    assert configure(DEFAULTS, ["--wandb_run_name=t6"])["wandb_run_name"] == "t6"
    # a later file or flag wins
    second = write(tmp_path, "batch_size = 7\n", "second.py")
    assert configure(DEFAULTS, [path, second])["batch_size"] == 7


def test_extra_keys_are_typed(tmp_path):
    cfg = configure(DEFAULTS, ["--n_head=8"], extra={"n_head": int, "attn_gate": bool})
    assert cfg["n_head"] == 8 and cfg["attn_gate"] is None
    with pytest.raises(ValueError, match="n_head='eight' has type str, expected int"):
        configure(DEFAULTS, ["--n_head=eight"], extra={"n_head": int})
    with pytest.raises(ValueError, match="attn_gate=1 has type int, expected bool"):
        configure(DEFAULTS, [write(tmp_path, "attn_gate = 1\n")], extra={"attn_gate": bool})


@pytest.mark.parametrize("args,message", [
    (["--batchsize=4"], "unknown config key 'batchsize'.*did you mean 'batch_size'"),
    (["--compile=1"], "compile=1 has type int, expected bool"),
    (["--batch_size=4.5"], "batch_size=4.5 has type float, expected int"),
    (["--batch_size"], "write overrides as --key=value"),
    (["nonexistent.py"], "config file 'nonexistent.py' does not exist"),
])
def test_cli_errors(args, message):
    with pytest.raises(ValueError, match=message):
        configure(DEFAULTS, args)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cfg.py: unknown config key 'learning_rte'.*did you mean 'learning_rate'"):
        configure(DEFAULTS, [write(tmp_path, "learning_rte = 1e-3\n")])
    with pytest.raises(ValueError, match="cfg.py: batch_size='16' has type str, expected int"):
        configure(DEFAULTS, [write(tmp_path, "batch_size = '16'\n")])
    with pytest.raises(ValueError, match="unknown config key 'q_lora_rank'"):  # the official repo's silent MLA bug
        configure(DEFAULTS, [write(tmp_path, "q_lora_rank = 1024\n")])


def test_aliases_name_the_same_key():
    aliases = {"ckpt_dir": "out_dir"}
    assert configure(DEFAULTS, ["--ckpt_dir=runs/a"], aliases=aliases)["out_dir"] == "runs/a"
    with pytest.raises(ValueError, match="unknown config key 'ckpt_dir'"):
        configure(DEFAULTS, ["--ckpt_dir=runs/a"])


def test_every_entry_point_lists_its_keys_with_defaults_and_comments():
    """--help: the script's docstring, then every key, its default and the comment of its line; exit 0."""
    import subprocess
    import sys

    from conftest import ROOT, child_env
    cases = {"train.py": ("batch_size = 30", "# micro-batch per GPU"),
             "sample.py": ("top_p = 1.0", "# nucleus sampling"),
             "-m eval.val_loss": ("out_dir = 'out'", "--ckpt_dir (= --out_dir)"),
             "-m eval.harness": ("num_fewshot = '0,2'", "# comma-separated shot settings"),
             "-m scripts.sweep": ("final_eval_tokens = 0", "# ")}
    for script, needles in cases.items():
        p = subprocess.run([sys.executable, *script.split(), "--help"], cwd=ROOT, env=child_env(), capture_output=True,
                           text=True)
        assert p.returncode == 0, (script, p.stderr[-2000:])
        assert "Settings (config files, then --key=value" in p.stdout, script
        line = next((ln for ln in p.stdout.splitlines() if needles[0] in ln), "")
        assert needles[1] in (line if needles[1].startswith("#") else p.stdout), (script, line)


def test_scripts_run_by_path_as_well_as_as_modules():
    """`python scripts/convert.py ...`, the form a nanoGPT user types, finds the repository's modules as
    `python -m scripts.convert` does: every entry point in scripts/, benchmarks/ and eval/ puts the repository root
    on sys.path before its first import of a repository module (read from its source), and three of them run by path."""
    import ast
    import glob
    import subprocess
    import sys

    from conftest import ROOT, child_env
    ours = ("checkpoint", "common", "configurator", "model", "engine", "data", "eval", "scripts", "tpa_kernels")
    paths = sorted(p for d in ("scripts", "benchmarks", "eval")
                   for p in glob.glob(f"{d}/**/*.py", root_dir=ROOT, recursive=True)
                   if '__name__ == "__main__"' in open(f"{ROOT}/{p}").read())
    assert {"scripts/convert.py", "eval/harness.py", "benchmarks/bench_train.py"} <= set(paths)
    for p in paths:
        tree = ast.parse(open(f"{ROOT}/{p}").read())
        fix = next((n.lineno for n in tree.body if isinstance(n, ast.If) and "__package__" in ast.unparse(n.test)
                    and "sys.path.insert" in ast.unparse(n)), None)
        first = min((n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                     and any((a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] in ours
                             for a in n.names)), default=None)
        assert first is None or (fix is not None and fix < first), f"{p}: imports the repository before finding it"
    procs = {p: subprocess.Popen([sys.executable, p, "--help"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for p in ("scripts/convert.py", "scripts/compare.py", "eval/val_loss.py")}
    for p, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() and "Traceback" not in err, (p, proc.returncode, err[-2000:])
