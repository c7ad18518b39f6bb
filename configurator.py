"""Typed configuration overrides, nanoGPT-style, without nanoGPT's exec-into-globals.

Every script declares its defaults as a dict (one hyperparameter per line, trailing comment) and
calls `configure(defaults, argv)`. Arguments are applied left to right:

    python pretrain_decoder.py config/paper_pretrain_decoder.py --batch_size=8 --lr=3e-5

- a positional argument is a config file: Python whose top-level names override the defaults;
- `--key=value` overrides one key; the value is parsed as a Python literal, except for a string key,
  whose value is taken as written (--out_dir=1 is the folder "1").

The type of each default is binding: an unknown key or a value of the wrong type is an error that
names the key (and the file) and lists the valid keys. An int is accepted where a float is expected.

Beyond its type a value may have to lie in a range, be one of a few words, parse as a spec or name a file:
a script passes `rules`, {key: rule}, one line each beside its config, and configure checks the final
values before the script does anything else, every bad one named in one error with its valid range or
form. A rule is a function (value, cfg) -> None when the value is fine, else what is wrong ("must be at least 1");
must, at_least, above, between, one_of and parses build them.
"""
import ast
import math
from types import SimpleNamespace


class ConfigError(ValueError):
    pass


def _check(key: str, value, defaults: dict, where: str):
    if key not in defaults:
        raise ConfigError(f"{where}: unknown config key '{key}'. Valid keys: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # int -> float is the one widening we allow (lr=1 means 1.0)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(f"{where}: config key '{key}' expects {type(default).__name__} "
                          f"(default {default!r}), got {type(value).__name__} {value!r}. "
                          f"Valid keys: {', '.join(sorted(defaults))}")
    return value


def _parse_value(text: str, default):
    if isinstance(default, str):
        return text
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a literal: _check reports it as a string where another type is expected


def _read_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            source = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    namespace: dict = {}
    exec(compile(source, path, "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}


# ----------------------------------------------------------------------------- rules: valid values beyond the type

def must(ok, form: str):
    """A rule from a predicate ok(value, cfg) and the form a valid value has. A predicate that fails on the
    value (a division by a zero setting, a file that is not JSON) counts as False: the value is invalid."""
    def rule(value, cfg):
        try:
            good = ok(value, cfg)
        except (ArithmeticError, LookupError, OSError, TypeError, ValueError):
            good = False
        return None if good else f"must be {form}"
    return rule


def at_least(lo, why: str = ""):
    return must(lambda v, c: lo <= v < math.inf, f"at least {lo}" + (f" ({why})" if why else ""))


def above(lo, why: str = ""):
    return must(lambda v, c: lo < v < math.inf, f"more than {lo}" + (f" ({why})" if why else ""))


def between(lo, hi, why: str = ""):
    return must(lambda v, c: lo <= v <= hi, f"in [{lo}, {hi}]" + (f" ({why})" if why else ""))


def one_of(*choices):
    return must(lambda v, c: v in choices, "one of " + ", ".join(map(repr, choices)))


def parses(parse):
    """A rule from a parser parse(value) that raises ValueError saying what is wrong (a spec's own words)."""
    def rule(value, cfg):
        try:
            parse(value)
        except ValueError as e:
            return str(e)
        return None
    return rule


def only_if(condition, rule):
    """`rule` where condition(cfg) holds (a path the config uses only in one mode), else any value."""
    return lambda value, cfg: rule(value, cfg) if condition(cfg) else None


def check(cfg: SimpleNamespace, rules: dict):
    """Every rule whose key is in cfg, in cfg's order; all the failures in one ConfigError."""
    problems = []
    for key, value in vars(cfg).items():
        problem = rules[key](value, cfg) if key in rules else None
        if problem is not None:
            problems.append(f"config key {key}={value!r}: {problem}")
    if problems:
        raise ConfigError("\n".join(problems) if len(problems) == 1 else
                          f"{len(problems)} config values are invalid:\n" + "\n".join(problems))


def configure(defaults: dict, argv: list[str] | None = None, rules: dict | None = None) -> SimpleNamespace:
    """Apply config files and --key=value flags from `argv` to `defaults`; check `rules`; return the typed config."""
    config = dict(defaults)
    for arg in argv or []:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"flag '{arg}' must look like --key=value. "
                                  f"Valid keys: {', '.join(sorted(defaults))}")
            config[key] = _check(key, _parse_value(text, defaults.get(key)), defaults, f"flag {arg}")
        else:
            for key, value in _read_file(arg).items():
                config[key] = _check(key, value, defaults, f"config file {arg}")
    cfg = SimpleNamespace(**config)
    check(cfg, rules or {})
    return cfg
