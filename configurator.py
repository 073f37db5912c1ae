"""
The command line of train.py, sample.py and stream.py (after nanoGPT's configurator.py): a script's
settings are plain values with defaults, and the command line overrides them by name.

    --name=value   strings as written; numbers and booleans as Python literals (3, 1e-3, True)
    --name value   the same, as two arguments
    --name         a boolean setting: True
    --help         the script's docstring and its settings with their defaults

Every value is checked against the type of its default (a float setting also takes 3; a setting
whose default is None takes a boolean). A mistake ends the script with one line naming it.
"""

import ast
import difflib
import sys


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
            sys.exit(f"error: unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else "")
                     + f"\nsettings: {', '.join(defaults)}")
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
        sys.exit(f"error: --{key} takes a {want.__name__} (default {default!r}), got {text!r}")
    return value
