"""The public Python verbs: ``compress.load``, ``prune``, ``distill``, ``quantize``, ``export``, ``optimize``, ``bench`` and ``run``
(and ``package``, reached as ``compress.api.package``).

Each is a thin layer over the code path the CLI and YAML pipelines use (a one-stage plan through
:func:`compress.pipeline.run`), so it checks its options the same way and writes the same run directory::

    import compress
    from compress.methods.structured import StructuredConfig

    model = compress.load("zoo:fmnist-resnet")
    pruned = compress.prune(model, StructuredConfig(amount=0.5), out="runs/pruned")
    onnx = compress.export(pruned, "onnx", out="runs/onnx")
    report = compress.bench(model, pruned, onnx, data="fashion-mnist")

A method is named by its config (dispatch on the config's type, as torchao's ``quantize_(model, config)``) or by
``method=``/``target=`` with its options as keywords. ``out`` defaults to a new folder under the system's temp dir.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CompressError

if TYPE_CHECKING:        # imported where used: ``import compress`` stays light (the CLI's --help does not load torch)
    from .artifact import Artifact


def load(source, *, arch: str | None = None, arch_args=None, input_shape=(), example_input: str | None = None,
         static_shapes: bool = False, trust_pickle: bool = False) -> Artifact:
    """A SOURCE (a checkpoint with its ``arch``, a run directory, an ONNX/TorchScript/.pt2 file, ``zoo:NAME``) as an Artifact."""
    from .sources import load as load_source

    return load_source(source, arch, arch_args, input_shape, static_shapes, trust_pickle, example_input)


def prune(model, config=None, *, data: str | None = None, out=None, **options) -> Artifact:
    """Prune ``model`` (an Artifact, or a SOURCE to load): ``config`` a prune method's config, or ``method=`` and options."""
    return _stage("prune", model, config, data, out, options)


def distill(model, config=None, *, data: str | None = None, out=None, **options) -> Artifact:
    """Train ``model`` to match a teacher (``teacher=`` a SOURCE; default: the model itself as it was given)."""
    return _stage("distill", model, config, data, out, options)


def quantize(model, config=None, *, data: str | None = None, out=None, **options) -> Artifact:
    """Quantize ``model``: ``config`` a quantize method's config, or ``method=`` (dynamic, static, auto, ...) and options."""
    return _stage("quantize", model, config, data, out, options)


def export(model, target, *, data: str | None = None, out=None, **options) -> Artifact:
    """Export ``model`` to ``target`` (onnx, pt2, torchscript, trt, or an export config), verified against it."""
    config = None if isinstance(target, str) else target
    if isinstance(target, str):
        options = {"target": target, **options}
    return _stage("export", model, config, data, out, options)


def optimize(model, *, data: str, out=None, **options) -> Artifact:
    """The fastest artifact that keeps the accuracy budget on this device, found by measuring the recipes that fit
    ``model`` (options as :class:`~compress.search.OptimizeConfig`: max_accuracy_drop, min_fidelity, batch_size,
    threads, objective, time_budget, training, ...). Its stage metrics say what was picked and whether the budget was
    met; ``search.json``, ``report.html`` and ``recipe.yaml`` lie beside it."""
    return _stage("optimize", model, None, data, out, options)


def bench(*models, data: str | None = None, **settings):
    """Measure every model (Artifacts or SOURCEs; the first is the baseline) as ``compress bench`` does; returns a
    :class:`~compress.measure.BenchReport`. ``settings``: device, batch_size, threads, budget_s, limit, ..."""
    from .measure import BenchSettings, bench_artifacts, bench_sources

    settings = BenchSettings.from_options(settings, data)
    return bench_artifacts(bench_sources([str(m) if isinstance(m, Path) else m for m in models]), settings)


def package(run_dir, target: str, out=None, *, force: bool = False, **options):
    """Write ``out`` from which ``target`` serves ``run_dir``'s model: ``"ray"`` (a Ray Serve application),
    ``"triton"`` (a Triton model repository) or ``"docker"`` (a Dockerfile running compress serve); options as
    :class:`~compress.packaging.PackageOptions` (replicas, autoscale, threads, max_batch_size, max_wait_ms, cache_size,
    device, host, port). Returns the :class:`~compress.packaging.PackageResult` (files written, commands that start it)."""
    from .packaging import package as package_run

    return package_run(run_dir, target, _out(out, "package"), force=force, **options)


def run(pipeline, out=None, *, sets=(), force: bool = False, resume: bool = False):
    """Run a pipeline (a YAML file, a shipped pipeline's name, a dict, or a checked Plan) into ``out``; returns the
    :class:`~compress.pipeline.RunResult` (every stage's artifact and the bench report)."""
    from .pipeline import run as run_plan
    from .plan import Plan, apply_sets, read_pipeline

    where = "pipeline"
    if isinstance(pipeline, (str, Path)):
        where, pipeline = str(pipeline), read_pipeline(pipeline)
    if not isinstance(pipeline, Plan):
        pipeline = apply_sets(pipeline, sets)
    return run_plan(pipeline, _out(out, "run"), force=force, resume=resume, where=where)


def drift(run_dir, current, *, reference: str | None = None, window: str | None = None, sample: int | None = None,
          sample_out=None, labels=None, alpha: float = 0.05, limit: int = 1000, model: str | None = None,
          json_path=None, html_path=None, force: bool = False, calibrate: bool = True):
    """``compress drift``: compare ``current`` (a DATA spec, the ``--log-dir`` of ``compress serve``, a DataBundle or a
    Dataset) with the reference profile the run directory ``run_dir`` (or the Artifact a verb returned) keeps, or one
    made from ``reference`` (a DATA spec); returns the :class:`~compress.drift_check.DriftReport` (``drifted``,
    ``tests``, ``accuracy``, ``windows``, ``exit_code``: 0 no drift, 3 drift). Options as the CLI's flags."""
    from .artifact import Artifact
    from .drift_check import check

    if isinstance(run_dir, Artifact):
        if run_dir.path is None:
            raise CompressError("this Artifact was not saved to a run directory", "Give out= to the verb that made it, or a run directory")
        run_dir = Path(run_dir.path).parent
    return check(run_dir, current, reference=reference, window=window, sample=sample, sample_out=sample_out, labels=labels,
                 alpha=alpha, limit=limit, model=model, json_path=json_path, html_path=html_path, force=force, calibrate=calibrate)


# ---------------------------------------------------------------- one stage, the pipeline's way
def _stage(stage: str, model, config, data, out, options: dict) -> Artifact:
    from .pipeline import run as run_plan
    from .plan import check

    if config is not None:
        options = {**_named(stage, config), **options}
    source = _artifact(model)
    doc: dict[str, Any] = {"model": {"source": source.source}, "stages": [{stage: options}]}
    if data:
        doc["data"] = data
    plan = check(doc, f"compress.{stage}", source_format=source.format)
    return run_plan(plan, _out(out, stage), source=source).final


def _named(stage: str, config) -> dict:
    """A method config as pipeline options: its method found by the config's type."""
    from . import registry
    from .config import config_to_json

    method = next((m for m in registry.methods(stage) if isinstance(config, m.config)), None)
    if method is None:
        known = ", ".join(sorted({m.config.__name__ for m in registry.methods(stage)}))
        raise CompressError(f"{type(config).__name__} is not the config of a {stage} method", f"Give one of: {known}")
    return {"target" if stage == "export" else "method": method.name, **config_to_json(config)}


def _artifact(model) -> Artifact:
    from .artifact import Artifact

    if isinstance(model, Artifact):
        return model
    if isinstance(model, (str, Path)):
        return load(model)
    raise CompressError(f"a {type(model).__name__} is not a model compress can take here",
                        "Give an Artifact (compress.load(...)) or a SOURCE: a path or zoo:NAME")


def _out(out, stage: str) -> Path:
    return Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"compress-{stage}-")) / "out"
