"""A pipeline checked and parsed once into a typed :class:`Plan`: the model to load, the data, each stage with its
frozen config, and the bench settings. Everything downstream receives these objects, never strings to re-parse.

:func:`check` reports every problem at once before anything runs; :func:`read_pipeline` and :func:`apply_sets` read
a YAML file and ``--set KEY=VALUE`` overrides into the dict it checks.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .config import build_config, config_to_json
from .errors import CompressError, install_hint
from .registry import STAGES
from .sources import ModelSpec

TOP_KEYS = ("model", "data", "stages", "bench", "seed", "device", "max_memory")
MODEL_KEYS = ("source", "arch", "arch_args", "input_shape", "example_input", "static_shapes", "trust_pickle", "verify", "allow_nonfinite")


class ValidationError(CompressError):
    def __init__(self, problems: list[str], where: str, missing: list[str] = ()):
        """``missing``: what is not installed here (also in ``problems``, each saying how to install it)."""
        self.problems = problems
        n = len(problems)
        these = "it" if n == 1 else "them"
        fix = ("Install it as said, then run again" if missing and len(missing) == n else
               f"Correct {these} in {where} ('compress validate {where}' checks a file without running it)"
               if str(where).endswith((".yaml", ".yml")) else f"Correct {these} and run again")
        super().__init__(f"{where} has {n} problem{'s' * (n != 1)}: " + "; ".join(problems), fix)


# ---------------------------------------------------------------- the parts of a plan
@dataclass(frozen=True)
class StagePlan:
    index: int
    stage: str
    method: registry.Method
    config: Any
    data: str | None
    branch: bool = False                   # write this stage's artifact, but let the next stage continue from its input
    sweep: tuple[float, ...] | None = None   # measure the method at each amount instead of running it once

    @property
    def label(self) -> str:
        return f"{self.index + 1:02d}-{self.stage}-{self.method.name}"

    def record(self) -> dict:
        rec = {"stage": self.stage, "method": self.method.name, "config": config_to_json(self.config)}
        return rec | ({"branch": True} if self.branch else {}) | ({"sweep": list(self.sweep)} if self.sweep else {})


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    data: str | None
    stages: tuple[StagePlan, ...]
    bench: Any = None                      # compress.measure.BenchSettings, or None: no bench
    seed: int = 0
    device: str = "cpu"
    max_memory: int | None = None          # bytes of resident memory the run may use (None: 80% of the machine)

    @property
    def protected(self) -> tuple[Path, ...]:
        """Inputs that OUT must never overwrite."""
        return () if self.model.source.startswith("zoo:") else (Path(self.model.source),)


# ---------------------------------------------------------------- reading and overriding
def shipped_configs() -> dict[str, str]:
    """The pipelines that ship with compress (the checkout's ``configs/``, package data in a wheel): name -> YAML text."""
    from importlib.resources import files

    package = files("compress")
    for root in (package / "configs", Path(str(package)).parent / "configs"):   # a wheel's package data; a checkout's folder
        if root.is_dir():
            return {f.name[:-5]: f.read_text() for f in sorted(root.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}
    return {}


def read_pipeline(path: str | Path) -> dict:
    path = Path(path)
    shipped = shipped_configs()
    if not path.exists() and str(path) in shipped:     # compress run demo: a shipped pipeline by name
        return _parse_pipeline(shipped[str(path)], Path(f"configs/{path}.yaml"), Path.cwd())
    if path.is_dir():
        raise CompressError(f"{path} is a directory, not a pipeline file", "Give a YAML file such as configs/demo.yaml")
    if not path.is_file():
        raise CompressError(f"pipeline file {path} does not exist", "Check the path; 'compress ls' lists the shipped configs")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise CompressError(f"{path} is not a text file", "Give a YAML pipeline file") from None
    return _parse_pipeline(text, path, path.resolve().parent)


def _parse_pipeline(text: str, path: Path, base: Path) -> dict:
    """Parse a pipeline's YAML; a relative model source that exists next to the file (``base``) is found there."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CompressError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}", "Fix the YAML syntax") from None
    if not isinstance(doc, dict):
        raise CompressError(f"{path} must hold a mapping with 'model' and 'stages'", "See configs/demo.yaml for the form")
    src = (doc.get("model") or {}).get("source") if isinstance(doc.get("model"), dict) else None
    if isinstance(src, str) and not src.startswith("zoo:") and not Path(src).is_absolute() and not Path(src).exists() and (base / src).exists():
        doc["model"]["source"] = str(base / src)
    return doc


def apply_sets(doc: dict, sets: list[str] | tuple[str, ...]) -> dict:
    """Apply ``KEY.PATH=VALUE`` overrides; ``stages.0.amount`` reaches into the first stage's options."""
    doc = copy.deepcopy(doc)
    for item in sets or ():
        if "=" not in item:
            raise CompressError(f"--set '{item}' is not KEY=VALUE", "e.g. --set stages.0.amount=0.3")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise CompressError(f"--set '{item}' has an empty key", "e.g. --set stages.0.amount=0.3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = doc
        for p in parts[:-1]:
            node = _descend(node, p, item)
        last = parts[-1]
        if isinstance(node, list):
            raise CompressError(f"--set '{item}': cannot set an index of a list", "Name a key inside the item, e.g. stages.0.amount=0.3")
        if not isinstance(node, dict):
            raise CompressError(f"--set '{item}': '{'.'.join(parts[:-1])}' is not a mapping", "Check the key path")
        node[last] = value
    return doc


def _descend(node, part: str, item: str):
    if isinstance(node, list):
        if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
            raise CompressError(f"--set '{item}': there is no item {part} (the list has {len(node)})", "Count stages from 0")
        node = node[int(part)]
        if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in STAGES:
            inner = next(iter(node.values()))
            if inner is None:
                inner = node[next(iter(node))] = {}
            return inner
        return node
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise CompressError(f"--set '{item}': '{part}' is inside a value, not a mapping", "Check the key path")


# ---------------------------------------------------------------- checking
def check(doc: dict, where: str = "pipeline", source_format: str | None = None) -> Plan:
    """Validate and parse a whole pipeline; raise one ValidationError naming every problem. ``source_format``: the
    format of a model given in memory (the Python API), instead of the one its source names."""
    problems: list[str] = []
    missing: list[str] = []
    if not isinstance(doc, dict):
        raise ValidationError(["the pipeline must be a mapping"], where)
    for k in doc:
        if k not in TOP_KEYS:
            problems.append(_unknown(k, TOP_KEYS, "top level"))
    model = _check_model(doc.get("model"), problems)
    data = doc.get("data")
    if data is not None and not isinstance(data, str):
        problems.append("data: expected a DATA spec string like fashion-mnist or imagefolder:DIR")
        data = None
    elif data is not None:
        _check_data(data, "data", problems, missing)
    fmt = source_format or (model.format if model else "?")
    stages: list[StagePlan] = []
    raw_stages = doc.get("stages") or []
    if not isinstance(raw_stages, list):
        problems.append("stages: expected a list of {STAGE: {options}} items")
        raw_stages = []
    for i, item in enumerate(raw_stages):
        sp, fmt = _check_stage(i, item, fmt, data, problems, missing)
        if sp:
            stages.append(sp)
    bench = _check_bench(doc.get("bench"), data, problems)
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"seed: expected an integer, got {seed!r}")
        seed = 0
    device = doc.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        problems.append(f"device: '{device}' is not cpu or cuda")
    max_memory = None
    if doc.get("max_memory") is not None:
        from .guard import parse_size

        try:
            max_memory = parse_size(doc["max_memory"])
        except CompressError as exc:
            problems.append(f"max_memory: {exc.what}")
    if problems:
        raise ValidationError(problems, where, missing)
    return Plan(model, data, tuple(stages), bench, seed, device, max_memory)


def _check_model(model, problems: list[str]) -> ModelSpec | None:
    if isinstance(model, str):
        model = {"source": model}
    if not isinstance(model, dict) or not model.get("source"):
        problems.append("model: needs 'source' (a checkpoint, run directory or zoo:NAME)")
        return None
    for k in model:
        if k not in MODEL_KEYS:
            problems.append(_unknown(k, MODEL_KEYS, "model"))
    shapes = model.get("input_shape") or ()
    if not isinstance(shapes, (str, list, tuple)) or not all(isinstance(s, str) for s in ([shapes] if isinstance(shapes, str) else shapes)):
        problems.append("model.input_shape: expected a string or a list of strings like 1x3x224x224")
        shapes = ()
    try:
        return ModelSpec.parse(model["source"], model.get("arch"), model.get("arch_args"), shapes, model.get("example_input"),
                               bool(model.get("static_shapes")), bool(model.get("trust_pickle")), model.get("verify", True) is not False,
                               bool(model.get("allow_nonfinite")))
    except CompressError as exc:
        problems.append(f"model: {exc.what}")
        return None


def _check_data(spec: str, where: str, problems: list[str], missing: list[str]) -> None:
    from .data import spec_missing, spec_problem

    why = spec_problem(spec)
    lacking = None if why else spec_missing(spec)
    if why or lacking:
        problems.append(f"{where}: {why or lacking}")
    if lacking:
        missing.append(problems[-1])


def _check_bench(bench, data, problems: list[str]):
    if bench is None:
        return None
    if not isinstance(bench, dict):
        problems.append("bench: expected a mapping (device, batch_size, threads, ...)")
        return None
    from .measure import BENCH_KEYS, BenchSettings

    for k in bench:
        if k not in BENCH_KEYS:
            problems.append(_unknown(k, BENCH_KEYS, "bench"))
    try:
        return BenchSettings.from_options({k: v for k, v in bench.items() if k in BENCH_KEYS}, data)
    except CompressError as exc:
        problems.append(f"bench: {exc.what}")
        return None


def _check_stage(i: int, item, fmt: str, data, problems: list[str], missing: list[str]):
    where = f"stages[{i}]"
    if not isinstance(item, dict) or len(item) != 1:
        problems.append(f"{where}: expected one {{STAGE: {{options}}}} mapping, e.g. {{prune: {{method: structured}}}}")
        return None, fmt
    stage, options = next(iter(item.items()))
    options = dict(options or {})
    if stage not in STAGES:
        problems.append(f"{where}: unknown stage '{stage}'" + _suggest(stage, STAGES))
        return None, fmt
    where = f"{where}.{stage}"
    available = registry.methods(stage)
    if not available:
        problems.append(f"{where}: no {stage} method could be loaded (a broken install? 'compress ls' shows what is missing)")
        return None, fmt
    name = options.pop("target" if stage == "export" else "method", None) or options.pop("method", None)
    if name is None:
        name = _default_method(stage, fmt, available)
    method = registry.get(stage, str(name))
    if method is None:
        key = "target" if stage == "export" else "method"
        problems.append(f"{where}.{key}: '{name}' is not known" + _suggest(str(name), [m.name for m in available]) + f" (available: {', '.join(m.name for m in available)})")
        return None, fmt
    own_data = options.pop("data", None)
    if own_data is not None:
        _check_data(str(own_data), f"{where}.data", problems, missing)
    stage_data = own_data or data
    branch = options.pop("branch", False)
    if not isinstance(branch, bool):
        problems.append(f"{where}.branch: expected true or false, got {branch!r}")
        branch = False
    sweep = _check_sweep(options.pop("sweep", None), method, f"{where}.sweep", problems)
    config, errs = build_config(method.config, options, where)
    problems.extend(errs)
    for mod, extra in method.missing():
        pkg = mod.split(".")[0].replace("_", "-")
        problems.append(f"{where}: {stage} {method.name} needs the package '{pkg}': {install_hint(pkg, extra)}")
        missing.append(problems[-1])
    if fmt != "?" and fmt not in method.accepts:
        problems.append(f"{where}: {stage} {method.name} takes a {' or '.join(method.accepts)} model, but gets {fmt}"
                        + (f" — put it before the stage that makes the {fmt} model" if fmt in ("onnx", "torchscript", "pt2", "tensorrt") and "torch" in method.accepts else ""))
    if config is not None and method.wants_data(config) and not stage_data:
        problems.append(f"{where}: {stage} {method.name} needs data: set 'data' (e.g. data: fashion-mnist)")
    out_fmt = fmt if branch or sweep else method.output_format(config) if config is not None else "?"
    return (StagePlan(i, stage, method, config, stage_data, branch, sweep) if config is not None else None), out_fmt


def _check_sweep(value, method: registry.Method, where: str, problems: list[str]) -> tuple[float, ...] | None:
    """``sweep: 0.1,0.3`` (or a list): amounts in [0, 1) for a method that has an ``amount``."""
    if value is None or value == "":
        return None
    if "amount" not in {f for f in getattr(method.config, "__dataclass_fields__", {})}:
        problems.append(f"{where}: {method.stage} {method.name} has no amount to sweep")
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        amounts = sorted({float(a) for a in items if str(a).strip()})
    except (TypeError, ValueError):
        problems.append(f"{where}: '{value}' is not a comma-separated list of amounts (e.g. 0.1,0.3,0.5)")
        return None
    if not amounts or any(not 0.0 <= a < 1.0 for a in amounts):
        problems.append(f"{where}: amounts must lie in [0, 1), got {value}")
        return None
    return tuple(amounts)


def _default_method(stage: str, fmt: str, available) -> str:
    defaults = {"prune": "magnitude", "distill": "kd", "quantize": "auto", "export": "onnx", "optimize": "search"}
    name = defaults[stage]
    if registry.get(stage, name) is None:
        fitting = [m for m in available if fmt in m.accepts] or available
        name = fitting[0].name
    return name


def _unknown(key, known, where) -> str:
    return f"{where}: unknown key '{key}'" + _suggest(str(key), known)


def _suggest(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""
