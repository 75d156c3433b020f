"""Every module imports, every Python file compiles, and the sources stay plain: UTF-8, no tabs, no invisible
spaces (a non-breaking space in the official repository left a model file that does not parse)."""

import glob
import importlib
import os
import py_compile

import pytest

from conftest import ROOT

FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
               if not os.path.relpath(p, ROOT).startswith((".venv", "out", "data" + os.sep + "fineweb", ".carry")))
SCRIPTS = {"train.py", "sample.py"}  # they run when imported: compiled only


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_source_is_plain_and_compiles(path, tmp_path):
    raw = open(path, "rb").read()
    text = raw.decode("utf-8")  # raises on anything but UTF-8
    assert "\t" not in text, "tabs"
    assert not any(c in text for c in "\u00a0\u200b\u2009\u202f\ufeff"), "an invisible space"
    py_compile.compile(path, cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("path", [p for p in FILES if os.path.basename(p) not in SCRIPTS
                                  and not os.path.relpath(p, ROOT).startswith(("tests", "config"))],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_module_imports(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    importlib.import_module(rel.removesuffix(".__init__"))


def test_no_undefined_names():
    """pyflakes' undefined names: a name used only on a GPU path (e.g. a kernel called only for CUDA tensors) fails
    there, not in these CPU tests, unless caught statically."""
    pytest.importorskip("pyflakes", reason="pip install pyflakes (the README's test command installs it)")
    from pyflakes import api, messages, reporter

    class Collect(reporter.Reporter):
        def __init__(self):
            super().__init__(None, None)
            self.found = []

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                self.found.append(str(message))

        def syntaxError(self, *args):
            pass  # test_source_is_plain_and_compiles reports these

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

    r = Collect()
    for path in FILES:
        api.checkPath(path, r)
    assert not r.found, "\n".join(r.found)


def top_level_names():
    """What `import NAME` finds in the repository when its root is on sys.path (python -m, pytest, a notebook
    started here): its modules, its packages, and the folders of Python files that would join a namespace package."""
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.startswith(".") or entry == "__pycache__":
            continue
        if entry.endswith(".py") and os.path.isfile(path):
            names.add(entry[:-3])
        elif os.path.isdir(path) and entry.isidentifier() and glob.glob(os.path.join(path, "*.py")):
            names.add(entry)
    return names


def test_no_top_level_name_shadows_an_installed_package():
    """A top-level `kernels/` here hid Hugging Face's `kernels`, which transformers imports with PreTrainedModel:
    every name the repository puts on sys.path must be free in the installed environment."""
    import importlib.metadata
    provided = importlib.metadata.packages_distributions()
    names = top_level_names()
    assert {"model", "train", "tpa_kernels", "data", "scripts"} <= names  # the scan sees what it must
    clashes = {n: provided[n] for n in sorted(names) if n in provided}
    assert not clashes, f"top-level names of this repository that installed distributions also provide: {clashes}"


def test_project_kernels_and_transformers_hub_kernels_in_one_process():
    """From the repository root, as `python -c` or a notebook there sees it (the root first on sys.path): the
    project's kernels, transformers' hub-kernels integration (which imports the `kernels` distribution) and
    lm-eval's hf backend load together, and `kernels` is the installed package, not a folder of ours."""
    pytest.importorskip("transformers")
    code = """
import os, sys
import model, engine, tpa_kernels
import transformers.integrations.hub_kernels
from transformers import AutoModelForCausalLM, PreTrainedModel
from lm_eval.models.huggingface import HFLM
kernels = sys.modules.get("kernels")
root = os.path.realpath(os.getcwd())
home = lambda module: os.path.dirname(os.path.dirname(os.path.realpath(module.__file__)))  # the folder on sys.path
assert kernels is None or home(kernels) != root, kernels.__file__
assert home(tpa_kernels) == root, tpa_kernels.__file__
print("ok")
"""
    import subprocess
    import sys
    from conftest import child_env
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
