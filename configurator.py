"""
Strict nanoGPT-style configuration, shared by every script.

    python train.py config/small_tpa.py --batch_size=16 --compile=False

Arguments without "--" are config files: Python that assigns keys (exec'd in order). Arguments
"--key=value" override single keys; values are Python literals, or bare strings. Every key must be
a known one and keep its type, whether set in a file or on the command line: a misspelt or unused
key is an error that names the closest valid keys, not a silent no-op.

Usage in a script (nanoGPT's defaults block stays the single source of defaults):

    batch_size = 12
    ...
    config = configure(globals(), sys.argv[1:], extra={"n_head": int})
    globals().update(config)
"""

import difflib
import os
import sys
import tokenize
import types
from ast import literal_eval

_CONFIG_TYPES = (bool, int, float, str, type(None), list, dict)


def _closest(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; valid keys: {', '.join(sorted(known))}"


def _check_type(key, value, expected, where):
    """expected: a type, or None when any config type (or None) is allowed."""
    if value is None or expected is None:
        return value
    if expected is float and type(value) is int:
        return float(value)
    if expected is list and type(value) is tuple:
        return list(value)
    if type(value) is not expected:
        raise ValueError(f"{where}: {key}={value!r} has type {type(value).__name__}, "
                         f"expected {expected.__name__}")
    return value


def key_comments(path, lines=None):
    """{key: its comment} for the one-key assignments of a defaults block (`key = value  # comment`): the module's
    top level, or the given (first, last) lines of a function."""
    out = {}
    with open(path) as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    for i, tok in enumerate(tokens[:-2]):
        row, col = tok.start
        where = col == 0 if lines is None else lines[0] <= row <= lines[1]
        if (where and tok.type == tokenize.NAME and tokens[i + 1].string == "=" and
                (i == 0 or tokens[i - 1].type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT))):
            j = i + 2
            while j < len(tokens) and tokens[j].type not in (tokenize.NEWLINE, tokenize.COMMENT):
                j += 1
            if j < len(tokens) and tokens[j].type == tokenize.COMMENT:
                out.setdefault(tok.string, tokens[j].string.lstrip("# "))
    return out


def help_text(config, frame, aliases):
    """The calling script's docstring, then every key with its default and the comment beside it in the defaults
    block (frame: the caller's, whose module top level or function holds the block)."""
    source, code = frame.f_code.co_filename, frame.f_code
    span = None  # the function's lines, when a function holds the defaults
    if code.co_name != "<module>":
        span = (code.co_firstlineno, max(line for _, _, line in code.co_lines() if line is not None))
    comments = key_comments(source, span) if os.path.isfile(source) else {}
    if span and not set(comments) & set(config):  # a function configuring module-level defaults
        comments = key_comments(source)
    doc = frame.f_globals.get("__doc__")
    width = min(40, max((len(f"{k} = {v!r}") for k, v in config.items()), default=0))
    lines = [(doc or "").strip(), "", "Settings (config files, then --key=value; unknown keys are errors):"]
    lines += [f"  {f'{k} = {v!r}':<{width}}  {('# ' + comments[k]) if k in comments else ''}".rstrip()
              for k, v in config.items()]
    if aliases:
        lines += ["", "Also accepted: " + ", ".join(f"--{a} (= --{k})" for a, k in aliases.items())]
    return "\n".join(lines)


def configure(defaults, argv, extra=None, aliases=None):
    """Resolve config files and --key=value overrides against the known keys.

    defaults: the script's namespace (e.g. globals()); its keys that hold bool/int/float/str/None/list/dict
        and do not start with "_" are the config keys, typed by their default value.
    extra: further keys {name: type} that default to None (e.g. model settings resolved elsewhere).
    aliases: {other name: key}, older or alternative names of keys (eval's --ckpt_dir for --out_dir).
    --help (or -h) prints the calling script's docstring and every key with its default and comment, and exits.
    Returns {key: value} for every config key, defaults included.
    """
    config = {k: v for k, v in defaults.items()
              if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)}
    expected = {k: (type(v) if v is not None else None) for k, v in config.items()}
    for k, t in (extra or {}).items():
        config.setdefault(k, None)
        expected[k] = t
    aliases = aliases or {}
    if "--help" in argv or "-h" in argv:
        print(help_text(config, sys._getframe(1), aliases))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--") and arg[2:].split("=", 1)[0] in aliases:
            name, _, rest = arg[2:].partition("=")
            arg = f"--{aliases[name]}={rest}"
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} does not exist (arguments without '--' are config files; "
                                 f"overrides are written --key=value)")
            namespace = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for k, v in namespace.items():
                if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue
                if k not in config:
                    raise ValueError(f"{arg}: unknown config key {k!r}{_closest(k, list(config))}")
                if v is not config[k]:
                    config[k] = _check_type(k, v, expected[k], arg)
            continue
        if "=" not in arg:
            raise ValueError(f"argument {arg!r}: write overrides as --key=value")
        key, val = arg[2:].split("=", 1)
        if key not in config:
            raise ValueError(f"unknown config key {key!r} in {arg!r}{_closest(key, list(config))}")
        try:
            val = literal_eval(val)
        except (SyntaxError, ValueError):
            pass  # a bare string, e.g. --attn=mha
        if expected[key] is str and not isinstance(val, str):
            val = arg.split("=", 1)[1]  # --out_dir=123 is still a string
        config[key] = _check_type(key, val, expected[key], arg)
    return config
