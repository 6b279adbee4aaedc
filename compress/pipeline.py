"""Pipelines: a model, data, a list of stages and a bench section. Every command runs through :func:`run`.

``compress prune ...`` builds a one-stage pipeline; ``compress run PIPELINE.yaml`` a longer one; the Python
API calls the same function. :func:`check` reports every problem at once before anything runs.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .artifact import Artifact, save, load_run_dir
from .errors import CompressError, StagesKept
from .manifest import MANIFEST, Manifest
from .outputs import check_destination, commit_dir, partial_dir, write_failure
from .registry import STAGES

TOP_KEYS = ("model", "data", "stages", "bench", "seed", "device")
MODEL_KEYS = ("source", "arch", "arch_args", "input_shape", "example_input", "static_shapes", "trust_pickle")
BENCH_KEYS = ("device", "batch_size", "threads", "data", "json", "markdown", "html", "limit", "budget_s", "min_runs", "max_runs")


class ValidationError(CompressError):
    def __init__(self, problems: list[str], where: str, missing: list[str] = ()):
        """``missing``: what is not installed here (also in ``problems``, each saying how to install it)."""
        self.problems = problems
        n = len(problems)
        these = "it" if n == 1 else "them"
        fix = (None if missing and len(missing) == n else
               f"Correct {these} in {where} ('compress validate {where}' checks a file without running it)"
               if str(where).endswith((".yaml", ".yml")) else f"Correct {these} and run again")
        super().__init__(f"{where} has {n} problem{'s' * (n != 1)}: " + "; ".join(problems), fix)


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
        for i, p in enumerate(parts[:-1]):
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
@dataclass
class StagePlan:
    index: int
    stage: str
    method: registry.Method
    config: Any
    options: dict
    data: str | None
    branch: bool = False    # write this stage's artifact, but let the next stage continue from this stage's input

    @property
    def label(self) -> str:
        return f"{self.index + 1:02d}-{self.stage}-{self.method.name}"

    def record(self) -> dict:
        rec = {"stage": self.stage, "method": self.method.name, "config": registry.config_to_json(self.config)}
        return rec | {"branch": True} if self.branch else rec


@dataclass
class Plan:
    model: dict
    data: str | None
    stages: list[StagePlan]
    bench: dict | None
    seed: int = 0
    device: str = "cpu"
    doc: dict = field(default_factory=dict)


def check(doc: dict, where: str = "pipeline") -> Plan:
    """Validate a whole pipeline; raise one ValidationError naming every problem."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ValidationError(["the pipeline must be a mapping"], where)
    for k in doc:
        if k not in TOP_KEYS:
            problems.append(_unknown(k, TOP_KEYS, "top level"))
    model = doc.get("model")
    if isinstance(model, str):
        model = {"source": model}
    if not isinstance(model, dict) or not model.get("source"):
        problems.append("model: needs 'source' (a checkpoint, run directory or zoo:NAME)")
        model = model if isinstance(model, dict) else {}
    for k in model:
        if k not in MODEL_KEYS:
            problems.append(_unknown(k, MODEL_KEYS, "model"))
    shapes = model.get("input_shape")
    if shapes is not None:
        from .specs import parse_input_shapes

        try:
            parse_input_shapes([shapes] if isinstance(shapes, str) else list(shapes))
        except CompressError as exc:
            problems.append(f"model.input_shape: {exc.what}")
        except TypeError:
            problems.append("model.input_shape: expected a string or a list of strings like 1x3x224x224")
    missing: list[str] = []
    data = doc.get("data")
    if data is not None and not isinstance(data, str):
        problems.append("data: expected a DATA spec string like fashion-mnist or imagefolder:DIR")
    elif data is not None:
        _check_data(data, "data", problems, missing)
    fmt = _source_format(str(model.get("source", "")))
    stages: list[StagePlan] = []
    raw_stages = doc.get("stages") or []
    if not isinstance(raw_stages, list):
        problems.append("stages: expected a list of {STAGE: {options}} items")
        raw_stages = []
    for i, item in enumerate(raw_stages):
        sp, fmt = _check_stage(i, item, fmt, data, problems, missing)
        if sp:
            stages.append(sp)
    bench = doc.get("bench")
    if bench is not None:
        if not isinstance(bench, dict):
            problems.append("bench: expected a mapping (device, batch_size, threads, ...)")
            bench = None
        else:
            for k in bench:
                if k not in BENCH_KEYS:
                    problems.append(_unknown(k, BENCH_KEYS, "bench"))
            from .bench import BenchSettings

            try:
                BenchSettings.from_options(bench, data)
            except CompressError as exc:
                problems.append(f"bench: {exc.what}")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"seed: expected an integer, got {seed!r}")
        seed = 0
    device = doc.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        problems.append(f"device: '{device}' is not cpu or cuda")
    if problems:
        raise ValidationError(problems, where, missing)
    return Plan(model, data, stages, bench, seed, device, doc)


def _check_data(spec: str, where: str, problems: list[str], missing: list[str]) -> None:
    from .data import spec_missing, spec_problem

    why = spec_problem(spec)
    lacking = None if why else spec_missing(spec)
    if why or lacking:
        problems.append(f"{where}: {why or lacking}")
    if lacking:
        missing.append(problems[-1])


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
    config, errs = registry.build_config(method.config, options, where)
    problems.extend(errs)
    for mod, extra in method.missing():
        pkg = mod.split(".")[0].replace("_", "-")
        problems.append(f"{where}: {stage} {method.name} needs the package '{pkg}'" + (f": pip install 'compress[{extra}]'" if extra else f": pip install {pkg}"))
        missing.append(problems[-1])
    if fmt != "?" and fmt not in method.accepts:
        problems.append(f"{where}: {stage} {method.name} takes a {' or '.join(method.accepts)} model, but gets {fmt}"
                        + (f" — put it before the stage that makes the {fmt} model" if fmt in ("onnx", "torchscript", "pt2", "tensorrt") and "torch" in method.accepts else ""))
    if config is not None and method.wants_data(config) and not stage_data:
        problems.append(f"{where}: {stage} {method.name} needs data: set 'data' (e.g. data: fashion-mnist)")
    out_fmt = fmt if branch else method.output_format(config) if config is not None else "?"
    return (StagePlan(i, stage, method, config, options, stage_data, branch) if config is not None else None), out_fmt


def _default_method(stage: str, fmt: str, available) -> str:
    defaults = {"prune": "magnitude", "distill": "kd", "quantize": "auto", "export": "onnx"}
    name = defaults[stage]
    if registry.get(stage, name) is None:
        fitting = [m for m in available if fmt in m.accepts] or available
        name = fitting[0].name
    return name


def _source_format(source: str) -> str:
    p = Path(source)
    if source.startswith("zoo:"):
        return "torch"
    if p.is_dir() and (p / MANIFEST).exists():
        try:
            return json.loads((p / MANIFEST).read_text()).get("format", "?")
        except (OSError, ValueError):
            return "?"
    suffix = p.suffix.lower()
    if p.is_file() and suffix not in (".onnx", ".pt2", ".safetensors"):
        from .sources import _is_torchscript

        if _is_torchscript(p):
            return "torchscript"
    return {".onnx": "onnx", ".pt2": "pt2", ".engine": "tensorrt", ".plan": "tensorrt"}.get(suffix, "torch" if p.exists() else "?")


def _unknown(key, known, where) -> str:
    return f"{where}: unknown key '{key}'" + _suggest(str(key), known)


def _suggest(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


# ---------------------------------------------------------------- running
@dataclass
class StageContext:
    workdir: Path
    data_spec: str | None
    original: Artifact
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False
    metrics: dict = field(default_factory=dict)
    _data_cache: dict = field(default_factory=dict)

    def data(self):
        if not self.data_spec:
            raise CompressError("this step needs data", "Give --data (e.g. --data fashion-mnist)")
        if self.data_spec not in self._data_cache:
            from .data import load_data

            self._data_cache[self.data_spec] = load_data(self.data_spec)
        return self._data_cache[self.data_spec]


@dataclass
class RunResult:
    out: Path
    artifacts: list[tuple[str, Artifact]]   # (label, artifact): the source first
    report: dict | None = None

    @property
    def final(self) -> Artifact:
        return self.artifacts[-1][1]


def run(doc: dict, out: str | Path, *, force: bool = False, resume: bool = False, quiet: bool = False,
        where: str = "pipeline") -> RunResult:
    """Check, then run every stage, saving each; then bench. The one code path of CLI, YAML and API."""
    rank = distributed_rank()
    if rank:
        # Under torchrun, the other ranks compute alongside rank 0 (distillation trains with DDP) but keep nothing:
        # only rank 0 writes OUT.
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"compress-rank{rank}-") as scratch:
            return _run(doc, Path(scratch) / "out", force=True, resume=False, quiet=True, where=where)
    return _run(doc, out, force=force, resume=resume, quiet=quiet, where=where)


def distributed_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0
    return int(os.environ.get("RANK", "0") or 0)


def _run(doc: dict, out: str | Path, *, force: bool, resume: bool, quiet: bool, where: str) -> RunResult:
    from rich.markup import escape

    from . import sources
    from .ui import console, status

    plan = check(doc, where)
    out = Path(out)
    m = plan.model
    shapes = m.get("input_shape") or ()
    if not plan.stages and plan.bench is None:
        raise CompressError("the pipeline has no stages and no bench section, so there is nothing to do", "Add stages or a bench section")
    _check_gpu(plan)
    protect = (Path(m["source"]),) if not str(m["source"]).startswith("zoo:") else ()
    check_destination(out, force or resume, protect)   # before the (possibly slow) load: fail fast
    with status(f"loading {m['source']}", quiet):
        source = sources.load(m["source"], m.get("arch"), m.get("arch_args"), [shapes] if isinstance(shapes, str) else shapes,
                              bool(m.get("static_shapes")), bool(m.get("trust_pickle")), m.get("example_input"))

    tmp = partial_dir(out)   # also removes stale partial outputs of killed runs next to it
    single = len(plan.stages) == 1
    artifacts: list[tuple[str, Artifact]] = [("source", source)]
    current = source
    done_any = False
    running = "?"
    try:
        reusing = resume and not single
        for i, sp in enumerate(plan.stages):
            running = f"{sp.label.split('-', 1)[0]} ({sp.stage} {sp.method.name})"
            reused = _reusable(out, plan.stages[: i + 1], source) if reusing else None
            reusing = reused is not None  # once a stage runs again, every later stage must run again too
            if reused is not None:
                shutil.copytree(reused, tmp / "stages" / sp.label)
                result = load_run_dir(tmp / "stages" / sp.label, trust_pickle=bool(m.get("trust_pickle")))
                if not quiet:
                    console().print(f"[dim]reusing {sp.label} from {escape(str(out))}[/dim]")
            else:
                result = _run_stage(sp, current, source, tmp, single, plan, quiet)
            artifacts.append((sp.label, result))
            if not sp.branch:
                current = result
            done_any = True
        report = None
        running = "bench"
        if plan.bench is not None:
            from .bench import BenchSettings, bench_artifacts, write_reports

            settings = BenchSettings.from_options(plan.bench, plan.data)
            report = bench_artifacts(artifacts, settings, quiet=quiet)
            write_reports(report, tmp, settings)
        final = current
        if single:
            pass  # the stage wrote OUT itself
        else:
            rel = Path(final.path).resolve().relative_to(tmp.resolve()) if final.path and plan.stages else None
            if rel is None:
                final = save(source, tmp / "stages" / "00-source")
                rel = Path(final.path).resolve().relative_to(tmp.resolve())
                artifacts[0] = ("source", final)
            mf = final.manifest(str(rel))
            mf.extra["pipeline"] = {"stages": [sp.label for sp in plan.stages]}
            mf.write(tmp)
        commit_dir(tmp, out)
        result_artifacts = [(label, _relocate(a, tmp, out)) for label, a in artifacts]
        return RunResult(out, result_artifacts, report)
    except BaseException as exc:
        full = write_failure(exc, out)   # before cleaning up, while the disk is still full
        kept = False
        if done_any and not single:
            with contextlib.suppress(Exception):   # e.g. no room left for the manifest: then keep nothing
                _keep_completed(tmp, out, artifacts, exc)
                kept = True
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
        error = full or exc
        if kept and not isinstance(error, CompressError):   # Ctrl-C, SIGTERM, a bug: the caller says what was kept
            exc.kept_stages = (len(artifacts) - 1, out)
        if kept and isinstance(error, CompressError):
            raise StagesKept(running, error.what, len(artifacts) - 1, out) from exc
        if full is not None:
            raise full from exc
        raise


def _check_gpu(plan: Plan) -> None:
    """Fail before any work when the pipeline asks for a GPU that is not there (instead of after the stages)."""
    import torch

    asked = ["device: cuda"] if plan.device == "cuda" else []
    asked += [f"{sp.stage} device=cuda" for sp in plan.stages if getattr(sp.config, "device", None) == "cuda"]
    if plan.bench is not None:
        from .bench import BenchSettings

        if "cuda" in BenchSettings.from_options(plan.bench, plan.data).devices:
            asked.append("bench device cuda")
    if asked and not torch.cuda.is_available():
        raise CompressError(f"{', '.join(asked)} was asked for but no CUDA GPU is visible",
                            "Run on a machine with an NVIDIA GPU, or ask for cpu")


def _run_stage(sp: StagePlan, current: Artifact, source: Artifact, tmp: Path, single: bool, plan: Plan, quiet: bool) -> Artifact:
    """Run one stage into a hidden work folder, then move it into place: a stage folder is whole or absent."""
    from .ui import console, status

    stage_dir = tmp if single else tmp / "stages" / f".{sp.label}.partial"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage_dir, sp.data, source, plan.seed, plan.device, quiet)
    started = time.perf_counter()
    with status(f"{sp.stage} ({sp.method.name})", quiet):
        result = sp.method.fn(current, sp.config, ctx)
    seconds = time.perf_counter() - started
    entry = sp.record() | {"metrics": ctx.metrics, "seconds": round(seconds, 3)}
    result = result.evolve(stages=[*current.stages, entry], source=current.source)
    saved = save(result, stage_dir)
    if not single:
        final_dir = tmp / "stages" / sp.label
        stage_dir.rename(final_dir)
        saved = saved.evolve(path=final_dir / Path(saved.path).name)
    if not quiet:
        console().print(f"[green]✓[/green] {sp.stage} {sp.method.name} in {seconds:.1f}s")
    return saved


def _reusable(out: Path, upto: list[StagePlan], source: Artifact) -> Path | None:
    """The stage folder of ``upto[-1]`` in OUT, if it was made from the same source by the same stages and configs."""
    d = out / "stages" / upto[-1].label
    if not (d / MANIFEST).exists():
        return None
    try:
        made = Manifest.read(d)
    except CompressError:
        return None
    def key(s: dict) -> dict:
        return {k: s.get(k) for k in ("stage", "method", "config")}
    history = [key(s) for s in made.stages]
    # A branch stage's output fed nothing, so it is not in the history of the stages after it.
    wanted = [key(s) for s in source.stages] + [key(sp.record()) for sp in upto[:-1] if not sp.branch] + [key(upto[-1].record())]
    return d if made.source == source.source and history == wanted else None


def _keep_completed(tmp: Path, out: Path, artifacts, exc: BaseException) -> None:
    label, last = artifacts[-1]
    mf = last.manifest(str(Path(last.path).resolve().relative_to(tmp.resolve())))
    mf.extra["status"] = "failed"
    mf.extra["error"] = str(exc) or type(exc).__name__
    mf.write(tmp)
    for partial in (tmp / "stages").glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    commit_dir(tmp, out)


def _relocate(a: Artifact, tmp: Path, out: Path) -> Artifact:
    if a.path is None:
        return a
    try:
        rel = Path(a.path).resolve().relative_to(tmp.resolve())
    except ValueError:
        return a
    return a.evolve(path=out / rel)
