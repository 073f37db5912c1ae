"""
The command line of every script (after nanoGPT's configurator.py). A script's settings are its
module globals with plain values, written at the top with their defaults and a comment each:

    steps = 500  # optimizer steps
    dataset = "shapes"

and configurator.apply(globals()) lets the command line override them by name:

    --name=value   strings as written; numbers and booleans as Python literals (3, 1e-3, True)
    --name value   the same, as two arguments
    --name         a boolean setting: True
    --help         the script's docstring and its settings with their defaults

Every value is checked against the type of its default (a float setting also takes 3; a setting
whose default is None takes a boolean), and check_ranges checks values against ranges written as
intervals ("[1, inf)", "[0, 1)"). A mistake ends the script with one line naming it.
"""

import ast
import difflib
import math
import sys


def settings(scope):
    """{name: value} of a script's settings: the globals in `scope` with a lowercase name (no leading
    underscore) and a plain value (bool, int, float, str or None)."""
    return {k: v for k, v in scope.items() if not k.startswith("_") and k.islower()
            and isinstance(v, (bool, int, float, str, type(None)))}


def apply(scope, argv=None, doc=None):
    """Override the settings in `scope` (a script's globals()) from argv (default: sys.argv[1:]);
    returns {name: value} of those the command line set. Each call starts again from the defaults
    (kept at the first call), so a script's main(argv) can run more than once in one process."""
    if "_default_settings" not in scope:
        scope["_default_settings"] = settings(scope)
    defaults = scope["_default_settings"]
    scope.update(defaults)
    cli = parse(sys.argv[1:] if argv is None else argv, defaults, scope.get("__doc__", "") if doc is None else doc)
    scope.update(cli)
    return cli


def parse(argv, defaults, doc=""):
    """argv (a list of strings) -> {name: value} of the settings it sets, typed like `defaults`."""
    out, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print((doc or "").strip() + "\n\nsettings (--name=value), with their defaults:")
            print("\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            sys.exit(0)
        if not arg.startswith("--"):
            sys.exit(f"error: arguments are --name=value (or --name value; a bare --name for a boolean), got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else f"; settings: {', '.join(defaults)}"
            sys.exit(f"error: unknown setting --{key}{hint}; --help lists them with their defaults")
        default = defaults[key]
        is_bool = default is None or isinstance(default, bool)
        if not eq and is_bool:  # a bare --flag
            text = "True"
        elif not eq:
            if not args:
                sys.exit(f"error: --{key} needs a value: --{key}=VALUE (default {default!r})")
            text = args.pop(0)
        out[key] = value_of(key, text, default)
    return out


def value_of(key, text, default):
    """The text of --key, as a value of its default's type."""
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(text.lower(), text)
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    want = bool if default is None else type(default)
    if type(value) is not want:
        kind = {"int": "an integer", "float": "a number", "bool": "True or False"}.get(want.__name__, want.__name__)
        sys.exit(f"error: --{key} takes {kind} (default {default!r}), got {text!r}")
    return value


def check_ranges(values, ranges):
    """Stop with one line at the first of `values` ({name: value}) outside its range. `ranges` maps
    space-separated names to an interval: "[0, 1)" is 0 <= value < 1, "(0, inf)" is value > 0."""
    for names, interval in ranges.items():
        low, high = (float(b) for b in interval[1:-1].split(","))
        for name in names.split():
            v = values[name]
            inside = (type(v) in (int, float) and (v >= low if interval[0] == "[" else v > low)
                      and (v <= high if interval[-1] == "]" else v < high))  # NaN is in no interval
            if not inside:
                finite = "a finite number " if type(v) is float and math.isinf(v) else ""  # 1e999 reads as inf
                sys.exit(f"error: --{name} must be {finite}{describe(interval)}, got {v!r}")


def describe(interval):
    """An interval in words: "[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", "[0, 1)" -> "in [0, 1)"."""
    if interval.endswith("inf)"):
        return (">= " if interval[0] == "[" else "> ") + interval[1:-1].split(",")[0]
    return f"in {interval}"
