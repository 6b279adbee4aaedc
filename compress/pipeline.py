"""Running a :class:`~compress.plan.Plan`: every stage in order, then the bench. ``compress prune ...`` is a one-stage
plan, ``compress run PIPELINE.yaml`` a longer one, and the Python API calls the same :func:`run`.

One layout for every run directory OUT: each stage's own run directory under ``OUT/stages/NN-stage-method/``, and the
final model's files (hard links to the last stage's) with the run's ``manifest.json`` at the top, plus
``report.{json,md,html}`` when there is a bench. Everything is written into a hidden partial folder that becomes OUT
at the end; a stage folder is whole or absent. When a stage fails after others completed, those are kept for
``resume``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import Artifact, load_run_dir, save
from .errors import CompressError, StagesKept
from .manifest import MANIFEST, Manifest
from .plan import Plan, StagePlan, check
from .progress import SILENT, Progress
from .rundir import check_destination, commit_dir, partial_dir, write_failure

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a method gets beside its input artifact and config."""
    workdir: Path
    data_spec: str | None
    original: Artifact                  # the pipeline's source (the default teacher)
    seed: int = 0
    device: str = "cpu"
    progress: Progress = SILENT
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
    artifacts: list[tuple[str, Artifact]]   # (label, artifact): the source first, then every stage's
    final: Artifact                         # the main line's last artifact, as saved at OUT's top
    report: dict | None = None


def run(plan: Plan | dict, out: str | Path, *, force: bool = False, resume: bool = False, progress: Progress | None = None,
        where: str = "pipeline", source: Artifact | None = None) -> RunResult:
    """Run every stage, saving each, then bench. A dict is checked first (see :func:`compress.plan.check`).
    ``source``: the model already loaded (the Python API), instead of loading ``plan.model``."""
    plan = plan if isinstance(plan, Plan) else check(plan, where)
    progress = progress or SILENT
    rank = distributed_rank()
    if rank:
        # Under torchrun, the other ranks compute alongside rank 0 (distillation trains with DDP) but keep nothing:
        # only rank 0 writes OUT.
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"compress-rank{rank}-") as scratch:
            return _run(plan, Path(scratch) / "out", force=True, resume=False, progress=SILENT, source=source)
    return _run(plan, Path(out), force=force, resume=resume, progress=progress, source=source)


def distributed_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0
    return int(os.environ.get("RANK", "0") or 0)


def _run(plan: Plan, out: Path, *, force: bool, resume: bool, progress: Progress, source: Artifact | None) -> RunResult:
    from . import sources

    if not plan.stages and plan.bench is None:
        raise CompressError("the pipeline has no stages and no bench section, so there is nothing to do", "Add stages or a bench section")
    _check_gpu(plan)
    check_destination(out, force or resume, plan.protected)   # before the (possibly slow) load: fail fast
    if source is None:
        with progress.stage(f"loading {plan.model.source}"):
            source = sources.load_model(plan.model)

    tmp = partial_dir(out)   # also removes stale partial outputs of killed runs next to it
    artifacts: list[tuple[str, Artifact]] = [("source", source)]
    current = source
    running = "?"
    try:
        reusing = resume
        for i, sp in enumerate(plan.stages):
            running = f"{sp.label.split('-', 1)[0]} ({sp.stage} {sp.method.name})"
            reused = _reusable(out, plan.stages[: i + 1], source) if reusing else None
            reusing = reused is not None  # once a stage runs again, every later stage must run again too
            if reused is not None:
                shutil.copytree(reused, tmp / "stages" / sp.label)
                result = load_run_dir(tmp / "stages" / sp.label, trust_pickle=plan.model.trust_pickle)
                log.info("reusing %s from %s", sp.label, out)
            else:
                result = _run_stage(sp, current, source, tmp, plan, progress)
            artifacts.append((sp.label, result))
            if not sp.branch:
                current = result
        running = "bench"
        report = None
        if plan.bench is not None:
            from .measure import bench_artifacts
            from .report import write_reports

            report = bench_artifacts(artifacts, plan.bench, progress=progress)
            write_reports(report, tmp, plan.bench)
        final = _save_final(current, artifacts, tmp, plan)
        commit_dir(tmp, out)
        return RunResult(out, [(label, _relocate(a, tmp, out)) for label, a in artifacts], _relocate(final, tmp, out), report)
    except BaseException as exc:
        full = write_failure(exc, out)   # before cleaning up, while the disk is still full
        kept = False
        if len(artifacts) > 1:
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
    if plan.bench is not None and "cuda" in plan.bench.devices:
        asked.append("bench device cuda")
    if asked and not torch.cuda.is_available():
        raise CompressError(f"{', '.join(asked)} was asked for but no CUDA GPU is visible",
                            "Run on a machine with an NVIDIA GPU, or ask for cpu")


def _run_stage(sp: StagePlan, current: Artifact, source: Artifact, tmp: Path, plan: Plan, progress: Progress) -> Artifact:
    """Run one stage into a hidden work folder, then move it into place: a stage folder is whole or absent."""
    stage_dir = tmp / "stages" / f".{sp.label}.partial"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage_dir, sp.data, source, plan.seed, plan.device, progress)
    started = time.perf_counter()
    with progress.stage(f"{sp.stage} ({sp.method.name})"):
        if sp.sweep:
            from .methods.sweep import run_sweep

            result = run_sweep(sp.method.fn, current, sp.config, ctx, sp.sweep)
        else:
            result = sp.method.fn(current, sp.config, ctx)
    seconds = time.perf_counter() - started
    entry = sp.record() | {"metrics": ctx.metrics, "seconds": round(seconds, 3)}
    result = result.evolve(stages=[*current.stages, entry], source=current.source)
    saved = save(result, stage_dir)
    final_dir = tmp / "stages" / sp.label
    stage_dir.rename(final_dir)
    progress.done(f"{sp.stage} {sp.method.name}", seconds)
    return saved.evolve(path=final_dir / Path(saved.path).name)


def _save_final(final: Artifact, artifacts, tmp: Path, plan: Plan) -> Artifact:
    """OUT's top: the final model's files (hard links to its stage folder's, or the source saved) and the run's manifest."""
    stage_dir = Path(final.path).parent if final.path is not None and final is not artifacts[0][1] else None
    if stage_dir is None or tmp.resolve() not in stage_dir.resolve().parents:
        final = save(final, tmp)                 # the source itself (no stage changed it): saved at the top
    else:
        for f in stage_dir.iterdir():
            if f.name != MANIFEST and f.is_file():
                _link(f, tmp / f.name)
        final = final.evolve(path=tmp / Path(final.path).name)
    mf = final.manifest(Path(final.path).name)
    mf.extra["pipeline"] = {"stages": [sp.label for sp in plan.stages]}
    mf.write(tmp)
    return final


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:          # a file system without hard links
        shutil.copy2(src, dst)


def _reusable(out: Path, upto: tuple[StagePlan, ...], source: Artifact) -> Path | None:
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
