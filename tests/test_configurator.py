"""configurator.parse, the command line of train.py, sample.py and stream.py: values typed like their
defaults, both spellings (--name=value, --name value), bare booleans, and one clear error for an
unknown setting or a value of the wrong type."""

import pytest

import configurator

DEFAULTS = dict(out_dir="out", n_layer=4, learning_rate=3e-4, resume=False, compile=None, top_k=0, prompt="")


def parse(*argv):
    return configurator.parse(list(argv), DEFAULTS)


def error(*argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    return str(e.value.code)


def test_values_take_the_type_of_their_default():
    got = parse("--out_dir=runs/a", "--n_layer=6", "--learning_rate=1e-3", "--resume=True", "--compile=False")
    assert got == dict(out_dir="runs/a", n_layer=6, learning_rate=1e-3, resume=True, compile=False)
    assert type(got["n_layer"]) is int and type(got["learning_rate"]) is float
    assert parse("--learning_rate=1") == {"learning_rate": 1.0}  # an int where a float goes
    assert type(parse("--learning_rate=1")["learning_rate"]) is float
    assert parse("--resume=true") == {"resume": True}  # lower case too
    # strings are taken as written, even when they look like numbers, and may hold '='
    assert parse("--out_dir=3", "--prompt=a=b c") == dict(out_dir="3", prompt="a=b c")
    assert parse() == {}  # only what the command line sets


def test_name_value_as_two_arguments_and_bare_booleans():
    assert parse("--n_layer", "2", "--resume", "--prompt", "hi there") == dict(n_layer=2, resume=True,
                                                                               prompt="hi there")
    assert parse("--compile") == {"compile": True}  # a None default is a boolean
    assert parse("--top_k", "-1") == {"top_k": -1}  # the value may start with '-'
    assert "--n_layer needs a value" in error("--n_layer")


def test_unknown_setting_names_it_a_close_match_and_the_list():
    msg = error("--n_layers=2")
    assert msg.startswith("error: unknown setting --n_layers (did you mean --n_layer?)") and "\n" not in msg
    msg = error("--zzz=1")  # no close match: the list instead, still one line
    assert "did you mean" not in msg and "\n" not in msg
    assert "settings: out_dir, n_layer, learning_rate, resume, compile, top_k, prompt" in msg


def test_bad_values_and_bad_arguments():
    assert "--n_layer takes an integer (default 4), got 'two'" in error("--n_layer=two")
    assert "--n_layer takes an integer" in error("--n_layer=2.5")
    assert "--learning_rate takes a number" in error("--learning_rate=fast")
    assert "--resume takes True or False" in error("--resume=1")
    assert "--name=value" in error("n_layer=2")  # not a --setting at all


def test_help_prints_the_docstring_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        configurator.parse(["--help"], DEFAULTS, "Train a model.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Train a model.") and "--n_layer=4" in out and "--out_dir='out'" in out


def test_apply_sets_a_scripts_globals_and_starts_from_the_defaults_each_call():
    import math  # a module global that is not a setting
    scope = dict(__doc__="doc", math=math, steps=500, lr=1e-3, name="a", _private=1, HERE="/x", flag=None)
    assert configurator.settings(scope) == dict(steps=500, lr=1e-3, name="a", flag=None)
    assert configurator.apply(scope, ["--steps=7", "--flag"]) == dict(steps=7, flag=True)
    assert (scope["steps"], scope["lr"], scope["flag"]) == (7, 1e-3, True)
    # a second call (a test running main(argv) twice) does not inherit the first call's values
    assert configurator.apply(scope, ["--lr=3"]) == dict(lr=3.0)
    assert (scope["steps"], scope["lr"], scope["flag"]) == (500, 3.0, None)
    with pytest.raises(SystemExit):
        configurator.apply(scope, ["--HERE=/y"])  # not a setting


def test_check_ranges_names_the_setting_and_its_interval():
    ranges = {"n_layer top_k": "[1, inf)", "learning_rate": "(0, inf)", "dropout": "[0, 1)", "frac": "[0, 1]"}
    good = dict(n_layer=1, top_k=5, learning_rate=3e-4, dropout=0.0, frac=1.0)
    configurator.check_ranges(good, ranges)  # in range: nothing happens

    def error(**bad):
        with pytest.raises(SystemExit) as e:
            configurator.check_ranges(dict(good, **bad), ranges)
        return str(e.value.code)

    assert error(top_k=0) == "error: --top_k must be >= 1, got 0"
    assert error(learning_rate=0.0) == "error: --learning_rate must be > 0, got 0.0"
    assert error(dropout=1.0) == "error: --dropout must be in [0, 1), got 1.0"
    assert error(frac=1.5) == "error: --frac must be in [0, 1], got 1.5"
    assert error(learning_rate=float("inf")) == "error: --learning_rate must be a finite number > 0, got inf"
    assert "got nan" in error(dropout=float("nan"))  # NaN is in no interval
    assert "got 'x'" in error(n_layer="x")  # not a number (a damaged checkpoint's settings)
