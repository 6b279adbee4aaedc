"""Method configs: frozen dataclasses whose fields carry help text, choices and ranges (see :func:`option`).

:func:`build_config` turns a dict of options (YAML, ``-s KEY=VALUE``) into a config, collecting every problem;
:func:`config_to_json` is what a manifest records.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import field
from typing import Any

import yaml


def config_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build_config(cls, options: dict, where: str) -> tuple[Any, list[str]]:
    """Make a config from a dict; returns (config or None, every problem found)."""
    problems = []
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in options.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            problems.append(f"{where}: unknown key '{key}'" + (f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(fields) or 'none'})"))
            continue
        ok, coerced, why = coerce(value, hints[key])
        if not ok:
            problems.append(f"{where}.{key}: {why}")
            continue
        meta = fields[key].metadata
        if "choices" in meta and coerced not in meta["choices"]:
            near = difflib.get_close_matches(str(coerced), [str(c) for c in meta["choices"]], n=1)
            problems.append(f"{where}.{key}: '{coerced}' is not one of {', '.join(map(str, meta['choices']))}" + (f" (did you mean '{near[0]}'?)" if near else ""))
            continue
        if "range" in meta and coerced is not None:
            lo, hi = meta["range"]
            items = coerced if isinstance(coerced, (list, tuple)) else [coerced]
            bad = [v for v in items if (lo is not None and v < lo) or (hi is not None and v > hi)]
            if bad:
                problems.append(f"{where}.{key}: {bad[0]} is out of range [{'' if lo is None else lo}, {'' if hi is None else hi}]")
                continue
        values[key] = coerced
    if problems:
        return None, problems
    try:
        return cls(**values), []
    except (TypeError, ValueError) as exc:
        return None, [f"{where}: {exc}"]


def coerce(value, hint) -> tuple[bool, Any, str]:
    """Check (and gently convert) a value against a type hint; strings from the command line are parsed as YAML."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return True, None, ""
        for a in args:
            if a is type(None):
                continue
            ok, v, _ = coerce(value, a)
            if ok:
                return True, v, ""
        return False, None, f"expected {_name(hint)}, got {value!r}"
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            if origin not in (tuple, list):   # a list may be plain comma-separated text, e.g. globs like *.dense
                return False, None, f"cannot read {value!r}"
    if hint is Any:
        return True, value, ""
    if hint is bool:
        return (True, value, "") if isinstance(value, bool) else (False, None, f"expected true or false, got {value!r}")
    if hint is int:
        return (True, value, "") if isinstance(value, int) and not isinstance(value, bool) else (False, None, f"expected an integer, got {value!r}")
    if hint is float:
        return (True, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (False, None, f"expected a number, got {value!r}")
    if hint is str:
        return (True, value, "") if isinstance(value, str) else (True, str(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (False, None, f"expected a string, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = []
        for v in value:
            ok, c, why = coerce(v, inner)
            if not ok:
                return False, None, why
            out.append(c)
        return True, tuple(out) if origin is tuple else out, ""
    if origin is dict or hint is dict:
        return (True, dict(value), "") if isinstance(value, dict) else (False, None, f"expected a mapping, got {value!r}")
    return True, value, ""


def _name(hint) -> str:
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def config_to_json(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def option(default, help: str = "", **meta):
    """A config field with help text and optional ``choices`` / ``range`` checked by validation."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})
