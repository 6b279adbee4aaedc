"""Running a :class:`~compress.plan.Plan`: every stage in order, then the bench. ``compress prune ...`` is a one-stage
plan, ``compress run PIPELINE.yaml`` a longer one, and the Python API calls the same :func:`run`.

One layout for every run directory OUT: each stage's own run directory under ``OUT/stages/NN-stage-method/``, and the
final model's files (hard links to the last stage's) with the run's ``manifest.json`` at the top, plus
``report.{json,md,html}`` when there is a bench. Each stage is committed into place as soon as it finishes (see
:class:`_Out`), so a stage folder is whole or absent and no kill loses a finished one; ``resume`` continues from them.
One command writes an OUT at a time (a lock).
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
from .guard import memory_limit
from .manifest import MANIFEST, Manifest
from .plan import Plan, StagePlan, check
from .progress import SILENT, Progress
from .rundir import check_destination, clean_stale, commit_dir, exclusive, fsync_dir, owned_partial, partial_dir, sync_tree, write_failure

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
    report: object = None                   # the BenchReport, when the plan has a bench


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
    with exclusive(out), memory_limit(plan.max_memory):
        if source is None:
            with progress.stage(f"loading {plan.model.source}"):
                source = sources.load_model(plan.model)
        return _write(plan, _Out(out, resume, plan), source, resume, progress)


def _write(plan: Plan, out: "_Out", source: Artifact, resume: bool, progress: Progress) -> RunResult:
    artifacts: list[tuple[str, Artifact]] = [("source", source)]
    current = source
    running = "?"
    data_cache: dict = {}        # DATA spec -> bundle: loaded once per run, shared by the stages and the drift reference
    try:
        reusing = resume
        for i, sp in enumerate(plan.stages):
            running = f"{sp.label.split('-', 1)[0]} ({sp.stage} {sp.method.name})"
            reused = _reusable(out.out, plan.stages[: i + 1], source) if reusing and out.live else None
            reusing = reused is not None  # once a stage runs again, every later stage must run again too
            if reused is not None:
                result = load_run_dir(reused, trust_pickle=plan.model.trust_pickle)
                log.info("reusing %s from %s", sp.label, out.out)
            else:
                result = _run_stage(sp, current, source, out, plan, progress, data_cache)
                out.progress_manifest(result)
            artifacts.append((sp.label, result))
            if not sp.branch:
                current = result
        running = "bench"
        report = None
        if plan.bench is not None:
            from .measure import bench_artifacts
            from .report import write_reports

            report = bench_artifacts(artifacts, plan.bench, progress=progress)
            write_reports(report, out.root, plan.bench)
        final = _save_final(current, artifacts, out.root, plan, data_cache)
        moved = out.finish()
        return RunResult(out.out, [(label, moved(a)) for label, a in artifacts], moved(final), report)
    except BaseException as exc:
        full = write_failure(exc, out.out)   # before cleaning up, while the disk is still full
        kept = out.fail(artifacts[-1][1] if len(artifacts) > 1 else None, exc)
        error = full or exc
        if kept and not isinstance(error, CompressError):   # Ctrl-C, SIGTERM, a bug: the caller says what was kept
            exc.kept_stages = (len(artifacts) - 1, out.out)
        if kept and isinstance(error, CompressError):
            raise StagesKept(running, error.what, len(artifacts) - 1, out.out) from exc
        if full is not None:
            raise full from exc
        raise


class _Out:
    """OUT while a run writes it. Each stage is committed — written, fsynced, renamed — into ``OUT/stages/`` as soon as
    it finishes, and OUT's manifest then names it (status ``incomplete``), so any kill, SIGKILL included, leaves every
    completed stage for ``--resume`` and never a half-written one. OUT itself appears with the first completed stage:
    until then everything is in a hidden partial folder beside it, and an OUT being replaced (``--force``) is intact."""

    def __init__(self, out: Path, resume: bool, plan: Plan):
        self.out, self.labels = out, [sp.label for sp in plan.stages]
        self.live = resume and (out / MANIFEST).is_file()          # continuing in place: OUT is this run's already
        self.tmp = None if self.live else partial_dir(out)
        self.cleared = False                                        # an earlier run's results at OUT's top removed
        if self.live:
            clean_stale(out / "stages")

    @property
    def root(self) -> Path:
        return self.out if self.live else self.tmp

    def stage_dir(self, label: str) -> Path:
        return owned_partial(self.root / "stages", label)

    def commit_stage(self, partial: Path, label: str, saved: Artifact) -> Path:
        sync_tree(partial)
        final = self.root / "stages" / label
        if final.exists():                   # an earlier run's stage of the same name, made from other stages or configs
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_dir(final.parent)
        if not self.live:                    # the first completed stage: OUT appears (replacing an earlier one with --force),
            # with its manifest already naming the stage, so a kill right after leaves an OUT that --resume continues
            self._status(saved.evolve(path=final / Path(saved.path).name), "incomplete", root=self.tmp)
            commit_dir(self.tmp, self.out)
            self.live, self.tmp, self.cleared = True, None, True
            return self.out / "stages" / label
        if not self.cleared:                 # resuming: the earlier run's final model and report no longer hold
            for f in self.out.iterdir():
                if f.is_file() and f.name != MANIFEST and not f.name.startswith("."):
                    f.unlink()
            self.cleared = True
        return final

    def progress_manifest(self, last: Artifact) -> None:
        """OUT's manifest while the run goes on: it names the last completed stage."""
        if self.live:
            self._status(last, "incomplete")

    def _status(self, last: Artifact, status: str, error: str | None = None, root: Path | None = None) -> None:
        root = root or self.out
        mf = last.manifest(str(Path(last.path).resolve().relative_to(root.resolve())))
        mf.extra.update({"status": status, "pipeline": {"stages": self.labels}})
        if error:
            mf.extra["error"] = error
        mf.write(root)

    def finish(self):
        """Make the finished run OUT (when it is still in its partial folder); returns how artifact paths move."""
        if self.live:
            return lambda a: a
        tmp = self.tmp
        commit_dir(tmp, self.out)
        self.live, self.tmp = True, None
        return lambda a: _relocate(a, tmp, self.out)

    def fail(self, last: Artifact | None, exc: BaseException) -> bool:
        """After a failure: keep OUT's completed stages (True), or remove the partial folder (False)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if not self.live or last is None or last.path is None or self.out.resolve() not in Path(last.path).resolve().parents:
            return False
        for partial in (self.out / "stages").glob(".*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(Exception):   # e.g. no room left for the manifest: OUT keeps the previous one
            self._status(last, "failed", str(exc) or type(exc).__name__)
        return True


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


def _run_stage(sp: StagePlan, current: Artifact, source: Artifact, out: _Out, plan: Plan, progress: Progress,
               data_cache: dict | None = None) -> Artifact:
    """Run one stage in a hidden work folder, then commit it into place: a stage folder is whole or absent."""
    stage_dir = out.stage_dir(sp.label)
    ctx = StageContext(stage_dir, sp.data, source, plan.seed, plan.device, progress,
                       _data_cache=data_cache if data_cache is not None else {})
    started = time.perf_counter()
    with progress.stage(f"{sp.stage} ({sp.method.name})"):
        if sp.sweep:
            from .methods.sweep import run_sweep

            result = run_sweep(sp.method.fn, current, sp.config, ctx, sp.sweep)
        else:
            result = sp.method.fn(current, sp.config, ctx)
    seconds = time.perf_counter() - started
    # the data it was given: a server preprocesses raw images the way this data was (compress.serving)
    entry = sp.record() | ({"data": sp.data} if sp.data else {}) | {"metrics": ctx.metrics, "seconds": round(seconds, 3)}
    # a stage that ran other stages (optimize) hands back their history; the rest keep their input's
    prior = result.stages if result.stages[: len(current.stages)] == current.stages else current.stages
    saved = save(result.evolve(stages=[*prior, entry], source=current.source), stage_dir)
    final_dir = out.commit_stage(stage_dir, sp.label, saved)
    progress.done(f"{sp.stage} {sp.method.name}", seconds)
    return saved.evolve(path=final_dir / Path(saved.path).name)


def _save_final(final: Artifact, artifacts, root: Path, plan: Plan, data_cache: dict | None = None) -> Artifact:
    """OUT's top: the final model's files (hard links to its stage folder's, or the source saved) and the run's manifest,
    written last: a run directory whose manifest has no ``status`` is complete."""
    stage_dir = Path(final.path).parent if final.path is not None and final is not artifacts[0][1] else None
    if stage_dir is None or root.resolve() not in stage_dir.resolve().parents:
        final = save(final, root, manifest=False)        # the source itself (no stage changed it): saved at the top
    else:
        for f in stage_dir.iterdir():
            if f.name != MANIFEST and f.is_file():
                _link(f, root / f.name)
        final = final.evolve(path=root / Path(final.path).name)
    data = plan.data or next((sp.data for sp in reversed(plan.stages) if sp.data), None)
    if data:
        _reference(final, data, root, data_cache if data_cache is not None else {})
    mf = final.manifest(Path(final.path).name)
    mf.extra["pipeline"] = {"stages": [sp.label for sp in plan.stages]}
    mf.write(root)
    return final


def _reference(final: Artifact, data: str, root: Path, data_cache: dict) -> None:
    """Keep the final model's profile on held-out data beside it (``reference.npz``, ``reference.json``: listed in the
    manifest written next), for ``compress drift``: up to 512 held-out samples through the final model, with the data the
    stages already loaded (0.2 s for zoo:fmnist-resnet; a slow model stops after about 5 s, see compress.reference).
    A run never fails for it: a warning says why there is none."""
    from .reference import write_reference

    started = time.perf_counter()
    try:
        if write_reference(final, data_cache.get(data, data), root):
            log.debug("kept a reference profile for compress drift (%.1fs)", time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - the model is made; only its drift reference is missing
        from .errors import first_line

        for name in ("reference.npz", "reference.json"):
            with contextlib.suppress(OSError):
                (root / name).unlink()
        log.warning("no reference profile for compress drift (%s); give compress drift --reference DATA instead",
                    exc.what if isinstance(exc, CompressError) else first_line(exc))


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy where links are not possible), replacing what was there at once."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        os.link(src, tmp)
    except OSError:          # a file system without hard links
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _reusable(out: Path, upto: tuple[StagePlan, ...], source: Artifact) -> Path | None:
    """The stage folder of ``upto[-1]`` in OUT, if it was made from the same source by the same stages and configs."""
    d = out / "stages" / upto[-1].label
    if not (d / MANIFEST).exists():
        return None
    try:
        made = Manifest.read(d)
        made.verify(d)
    except CompressError as exc:
        log.warning("not reusing %s: %s; it runs again", d, exc.what)
        return None

    def key(s: dict) -> dict:
        return {k: s.get(k) for k in ("stage", "method", "config")}
    history = [key(s) for s in made.stages]
    # A branch stage's output fed nothing, so it is not in the history of the stages after it.
    wanted = [key(s) for s in source.stages] + [key(sp.record()) for sp in upto[:-1] if not sp.branch] + [key(upto[-1].record())]
    return d if made.source == source.source and history == wanted else None


def _relocate(a: Artifact, tmp: Path, out: Path) -> Artifact:
    if a.path is None:
        return a
    try:
        rel = Path(a.path).resolve().relative_to(tmp.resolve())
    except ValueError:
        return a
    return a.evolve(path=out / rel)
