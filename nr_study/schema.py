"""Validated frozen dataclasses, the machinery behind every config section: `F(default, check)` declares a field
with its (predicate, allowed-text) check, `build_section` builds a section from a plain mapping (every bad field
one line: the key, the value, what is allowed), `check_section` checks one built directly. Torch-free and free of
the app: the run config (nr_study.config) and NR's own settings (nr_study.nr.settings) are both made of it."""
from __future__ import annotations

import dataclasses
import difflib
import math
import posixpath
import re
import typing
from dataclasses import field

INT64 = (-(2**63), 2**63 - 1)   # every integer of a config: what torch and numpy can hold


_MLFLOW_NAME = re.compile(r"[/\w.\- :]*")  # MLflow's rule for param, metric and tag names


MLFLOW_NAME_RULE = "letters, digits, '_', '-', '.', ' ', ':', '/' (a relative path, at most 250 characters)"


def mlflow_name_ok(name) -> bool:
    """MLflow's own check of a param/tag name (validate_param_and_metric_name + path_not_unique): a config key
    or tag it refuses would fail the run after it started, not up front."""
    return (isinstance(name, str) and 0 < len(name) <= 250 and _MLFLOW_NAME.fullmatch(name) is not None
            and posixpath.normpath(name) == name and not name.startswith(("/", "..")) and name != ".")


def show(v, limit: int = 100) -> str:
    """A value as an error line shows it: its repr, cut when long (a fuzzed 10 kB string, a 400-digit int)."""
    try:
        r = repr(v)
    except ValueError:  # an int beyond Python's str-conversion digit limit
        return f"an integer of more than {limit} digits"
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def show_key(k) -> str:
    """A key as an error line shows it: as written when printable, else its repr (a newline in a key must not
    split the line)."""
    s = str(k)
    return s if s.isprintable() else repr(s)


def rng(lo=None, hi=None, lo_open=False, hi_open=False):
    """A range check for field metadata: returns (predicate, text)."""

    def ok(v):
        if v is None:
            return True
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True

    def num(x):
        return str(x) if isinstance(x, int) else f"{x:g}"

    if hi is None and lo is not None:
        return ok, f"{{k}} {'>' if lo_open else '>='} {num(lo)}"
    text = "{k}"
    if lo is not None:
        text = f"{num(lo)} {'<' if lo_open else '<='} " + text
    if hi is not None:
        text += f" {'<' if hi_open else '<='} {num(hi)}"
    return ok, text


def choice(options):
    return (lambda v: v is None or v in options), "one of " + ", ".join(map(str, options))


def F(default, check=None, doc=""):
    """A dataclass field with an optional (predicate, allowed-text) check."""
    md = {"doc": doc}
    if check is not None:
        md["check"] = check
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


def field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(
        None
    ) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(options)}"


def type_name(v) -> str:
    return type(v).__name__


def _int_error(v, key: str) -> str | None:
    if INT64[0] <= v <= INT64[1]:
        return None
    return f"{key}: {show(v)} is out of range; allowed: a 64-bit integer ({INT64[0]} to {INT64[1]})"


def _free_form_error(value, key: str, depth: int = 0) -> str | None:
    """The first problem inside a free-form value (model.kwargs, tracking.tags, a list): a mapping key MLflow
    cannot log as (part of) a param name, or an integer beyond 64 bits; None when there is none."""
    if depth > 16:
        return f"{key}: nested deeper than 16 levels; allowed: plain values, lists and mappings"
    if isinstance(value, dict):
        for k, v in value.items():
            if not (mlflow_name_ok(k) and len(f"{key}.{k}") <= 250):
                return f"{key}: key {show(k)} is not allowed; allowed: keys of {MLFLOW_NAME_RULE}"
            bad = _free_form_error(v, f"{key}.{k}", depth + 1)
            if bad:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _free_form_error(v, f"{key}[{i}]", depth + 1)
            if bad:
                return bad
    elif isinstance(value, int) and not isinstance(value, bool):
        return _int_error(value, key)
    elif isinstance(value, str) and "\x00" in value:
        return f"{key}: {show(value)} contains a NUL character; allowed: text without NUL"
    elif not isinstance(value, (str, int, float, type(None))):  # !!binary bytes, a date, a set: not JSON
        return f"{key}: {show(value)} has type {type_name(value)}; allowed: text, numbers, booleans, null, lists, mappings"
    return None


def _coerce(value, tp, key: str, errors: list):
    """Check/convert a leaf value against its annotation; append an error line when it does not fit."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        errors.append(f"{key}: null is not allowed; expected {base.__name__}")
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            bad = _int_error(value, key)
            if bad is None:
                return value
            errors.append(bad)
            return None
    elif base is float:
        num = value
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 as a string
            try:
                num = float(value)
            except ValueError:
                pass
        if isinstance(num, (int, float)) and not isinstance(num, bool):
            try:
                return float(num)
            except OverflowError:  # an int of hundreds of digits
                errors.append(f"{key}: {show(value)} is out of range; allowed: a finite float")
                return None
    elif base in (str, tuple, dict):
        if isinstance(value, {str: str, tuple: (list, tuple), dict: dict}[base]):
            bad = _free_form_error(value, key)
            if bad is None:
                return base(value)
            errors.append(bad)
            return None
    else:  # pragma: no cover - schema error
        raise TypeError(f"unsupported annotation {tp} for {key}")
    expected = {tuple: "list", dict: "mapping"}.get(base, base.__name__)
    errors.append(f"{key}: {show(value)} has type {type_name(value)}; expected {expected}{' or null' if optional else ''}")
    return None


def _check_value(cls, name: str, val, key: str, errors: list, verdict: str = "is out of range") -> bool:
    """The field's (predicate, allowed-text) check; appends one error line and returns False when it fails."""
    check = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("check")
    if check is None:
        return True
    pred, allowed = check
    allowed = allowed() if callable(allowed) else allowed  # a registry's names: read when the error is written
    ok = pred(val) and not (isinstance(val, float) and not math.isfinite(val))
    if ok:
        return True
    if isinstance(val, str):
        opts = [o for o in allowed.removeprefix("one of ").split(", ")]
        m = difflib.get_close_matches(val, opts, n=1, cutoff=0.5)
        close = f"; did you mean {m[0]!r}?" if m else ""
        errors.append(f"{key}: {show(val)} is not allowed; allowed: {allowed}{close}")
    else:
        errors.append(f"{key}: {show(val)} {verdict}; allowed: {allowed.format(k=name)}")
    return False


def check_section(obj, prefix: str) -> list[str]:
    """Type and range errors of a section built directly (not through config_from_dict), one line each."""
    errors: list[str] = []
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        val, key, n = getattr(obj, f.name), prefix + f.name, len(errors)
        _coerce(val, hints[f.name], key, errors)
        if len(errors) == n:
            _check_value(type(obj), f.name, val, key, errors, verdict="is not allowed")
    return errors


def build_section(cls, d, prefix: str, errors: list):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: {show(d)} has type {type_name(d)}; expected a mapping")
        return cls()
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}{show_key(k)}"
        if k not in fields:
            errors.append(f"{key}: unknown key{suggest(key, [prefix + n for n in fields])}")
            continue
        tp = hints[k]
        if is_section(tp):
            kwargs[k] = build_section(tp, v, key + ".", errors)
            continue
        n_before = len(errors)
        val = _coerce(v, tp, key, errors)
        if len(errors) > n_before:
            continue
        if _check_value(cls, k, val, key, errors):
            kwargs[k] = val
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover
        errors.append(f"{prefix or 'config'}: {exc}")
        return cls()
