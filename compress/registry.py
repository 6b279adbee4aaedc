"""What compress can do, found by name: methods (a config dataclass plus one function), runners by format, and the
steps that rebuild a saved torch model.

``@register("prune", "magnitude", MagnitudeConfig, accepts=("torch",), produces="torch")`` makes a method known to the
CLI, ``compress ls``, pipeline validation and the contract tests; ``@register_runner("onnx")`` gives a format its
runner. Core's methods live in ``compress.methods``; export targets are plugins (the ``compress.plugins`` entry
points: ``exporters/`` here), each registering its exporter and its runner. Core never imports a plugin by name.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from .errors import CompressError, is_installed

log = logging.getLogger(__name__)

STAGES = ("prune", "distill", "quantize", "export", "optimize")
# Core modules that register methods and runners when imported (they import optional packages only when a method runs).
CORE_MODULES = ("compress.runners", "compress.search", "compress.methods.magnitude", "compress.methods.structured", "compress.methods.heads",
                  "compress.methods.quantize", "compress.methods.distill", "compress.methods.fasterai", "compress.methods.qat")
PLUGIN_GROUP = "compress.plugins"
# Replayable steps that rebuild a saved torch model before (or after) its weights load: op -> "module:function".
REBUILD_STEPS = {
    "reshape": "compress.methods.shapes:apply",
    "keep_layers": "compress.methods.depth:keep_layers",
    "quantize_dynamic": "compress.methods.quantize_torch:rebuild_dynamic",
    "cast": "compress.methods.quantize_torch:rebuild_cast",
    "quantize_fasterai": "compress.methods.fasterai:rebuild_quantized",
}


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
_RUNNERS: dict[str, type] = {}
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


def register_runner(fmt: str):
    """Class decorator: the runner for artifacts of format ``fmt`` (see :mod:`compress.runners`)."""
    def deco(cls):
        _RUNNERS[fmt] = cls
        return cls
    return deco


def load_all() -> None:
    """Import core's method modules and every installed plugin, once. A plugin that fails to import is left out
    with a warning (the rest keeps working); a core module that fails is a bug and raises."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in CORE_MODULES:
        importlib.import_module(mod)
    from importlib.metadata import distributions

    # Every installed distribution's plugins, read one by one: a stale metadata folder of compress earlier on the path
    # (an old build's *.egg-info in the working directory) must not hide the installed one's.
    plugins = {ep.value: ep for dist in distributions() for ep in dist.entry_points if ep.group == PLUGIN_GROUP}
    for ep in plugins.values():
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
            log.warning("the compress plugin %s (%s) could not be loaded: %s", ep.name, ep.value, exc)


def methods(stage: str | None = None) -> list[Method]:
    load_all()
    return [m for (s, _), m in sorted(_METHODS.items()) if stage is None or s == stage]


def get(stage: str, name: str) -> Method | None:
    load_all()
    return _METHODS.get((stage, name))


def runner_class(fmt: str) -> type:
    load_all()
    cls = _RUNNERS.get(fmt)
    if cls is None:
        raise CompressError(f"no runner for format '{fmt}' is installed",
                            f"Runners installed: {', '.join(sorted(_RUNNERS)) or 'none'}; reinstall compress (pip install -e .) if one is missing")
    return cls


def rebuild_step(op: str) -> Callable:
    """The function that replays rebuild step ``op`` on a model (importing only the module that defines it)."""
    ref = REBUILD_STEPS.get(op)
    if ref is None:
        raise KeyError(op)
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(module), fn)
