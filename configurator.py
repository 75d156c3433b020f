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


def configure(defaults, argv, extra=None):
    """Resolve config files and --key=value overrides against the known keys.

    defaults: the script's namespace (e.g. globals()); its keys that hold bool/int/float/str/None/list/dict
        and do not start with "_" are the config keys, typed by their default value.
    extra: further keys {name: type} that default to None (e.g. model settings resolved elsewhere).
    Returns {key: value} for every config key, defaults included.
    """
    config = {k: v for k, v in defaults.items()
              if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)}
    expected = {k: (type(v) if v is not None else None) for k, v in config.items()}
    for k, t in (extra or {}).items():
        config.setdefault(k, None)
        expected[k] = t
    for arg in argv:
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
