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
