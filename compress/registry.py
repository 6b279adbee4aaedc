"""The method registry: a method is a frozen config dataclass plus one registered function.

``@register("prune", "magnitude", MagnitudeConfig, accepts=("torch",), produces="torch")`` makes a method
known to the CLI choices, ``compress ls``, pipeline validation and the contract tests.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from .errors import is_installed

STAGES = ("prune", "distill", "quantize", "export")
# Modules that register methods when imported; a missing optional dependency only disables that module.
METHOD_MODULES = ("compress.exporters.torchscript", "compress.exporters.onnx", "compress.exporters.pt2",
                  "compress.exporters.tensorrt", "compress.methods.pruning", "compress.methods.structured", "compress.methods.transformer",
                  "compress.methods.quantize", "compress.methods.distill", "compress.methods.fasterai",
                  "compress.methods.qat")


@dataclass(frozen=True)
class Method:
    stage: str
    name: str
    config: type
    fn: Callable
    accepts: tuple[str, ...]
    produces: str | Callable[[Any], str]
    requires: tuple[tuple[str, str | None], ...] = ()   # (module, pip extra)
    summary: str = ""
    needs_data: bool | Callable[[Any], bool] = False

    def missing(self) -> list[tuple[str, str | None]]:
        return [(m, e) for m, e in self.requires if not is_installed(m)]

    def output_format(self, config) -> str:
        return self.produces(config) if callable(self.produces) else self.produces

    def wants_data(self, config) -> bool:
        return self.needs_data(config) if callable(self.needs_data) else bool(self.needs_data)


_METHODS: dict[tuple[str, str], Method] = {}
_loaded = False


def register(stage: str, name: str, config: type, *, accepts, produces, requires=(), summary: str = "", needs_data=False):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    if not dataclasses.is_dataclass(config):
        raise TypeError("a method config must be a dataclass")

    def deco(fn):
        _METHODS[(stage, name)] = Method(stage, name, config, fn, tuple(accepts), produces, tuple(requires),
                                         summary or (fn.__doc__ or "").strip().splitlines()[0] if (summary or fn.__doc__) else "",
                                         needs_data)
        return fn
    return deco


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == mod or mod.startswith(exc.name + ".") or exc.name.startswith(mod)):
                continue  # that method module has not landed yet
            raise


def methods(stage: str | None = None) -> list[Method]:
    load_all()
    return [m for (s, _), m in sorted(_METHODS.items()) if stage is None or s == stage]


def get(stage: str, name: str) -> Method | None:
    load_all()
    return _METHODS.get((stage, name))


# ---------------------------------------------------------------- configs
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
