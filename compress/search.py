"""``compress optimize``: the fastest artifact that keeps the accuracy budget, on this device, found by measuring.

The recipes come from what the model is — a convolutional net gets ONNX fp32, static int8 (onnxruntime, 7- or 8-bit
as this CPU needs), torch.export and TorchScript, and with training allowed structured pruning recovered by
distillation; a transformer gets fused ONNX, dynamic int8 (int4 embedding tables too) and shallower distilled
students; with OpenVINO installed, its fp32 IR (bf16 on CPUs with native bf16) and NNCF int8 join every list. Candidates that train the same way share
one training run. Each candidate is a small pipeline run as its own ``compress run`` process under a time limit and the
memory guard, so a crash, a hang or an out-of-memory is that candidate's failure and the search goes on; finished
candidates are cached by their input and recipe, so a rerun after Ctrl-C or a kill continues where it stopped. Every
finished candidate's final artifact is then timed interleaved with the others on this device, in the deployment
asked for, and scored on held-out data (never the calibration or training samples). The pick is the best on the
objective among those within the budget; when none is, the closest is kept and the miss explained.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .artifact import Artifact, load_run_dir, save
from .config import option
from .durations import seconds
from .errors import CompressError
from .manifest import Manifest
from .recipes import Candidate, _fidelity, recipes
from .registry import register

log = logging.getLogger(__name__)
OBJECTIVES = ("latency", "throughput", "size")


@dataclass(frozen=True)
class OptimizeConfig:
    max_accuracy_drop: float | None = option(None, "accuracy points the result may lose on labelled data (default 1.0)", range=(0.0, 100.0))
    min_fidelity: float | None = option(None, "without labels: top-1 agreement (or cosine) with the input to keep (default 0.95)",
                                        range=(0.0, 1.0))
    device: str = option("cpu", "the device the artifact will run on", choices=("cpu", "cuda"))
    batch_size: int = option(1, "the batch size it will serve", range=(1, 4096))
    threads: int = option(1, "the threads each copy of it will have", range=(1, 256))
    objective: str = option("latency", "what to minimise within the budget: p50 latency, 1/throughput, or size", choices=OBJECTIVES)
    time_budget: str = option("20m", "wall time for the whole search, e.g. 90s, 20m, 1h")
    training: bool = option(True, "also try recipes that train (pruning recovered by distillation, shallower students)")
    teacher: str | None = option(None, "teacher SOURCE for the training recipes (default: the input model)")
    candidate_timeout: str = option("15m", "the most one candidate may take before it counts as hung")
    eval_limit: int = option(1000, "held-out samples each candidate is scored on", range=(16, 1_000_000))
    timing_budget_s: float = option(1.0, "timed seconds per candidate in the final interleaved measurement", range=(0.05, 60.0))
    only: tuple[str, ...] = option((), "try only the recipes whose name holds one of these words (e.g. int8, onnx, prune)")
    ray: str | None = option(None, "make the candidates (training, export, quantization) as tasks on a Ray cluster: 'local' starts "
                                   "one here, 'auto' joins the running one, or its address; every timing still runs on this machine")

    def __post_init__(self):
        for name in ("time_budget", "candidate_timeout"):
            seconds(getattr(self, name))        # checked when the config is built: validate reports it


def _cache_root() -> Path:
    from .methods.training import cache_dir

    return cache_dir() / "optimize"


def _key(input_dir: Path, cand: Candidate, data: str, seed: int) -> str:
    h = hashlib.sha256(json.dumps({"input": Manifest.read(input_dir).files, "stages": cand.stages, "data": data, "seed": seed},
                                  sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def command(pipeline: Path, out: Path) -> list[str]:
    """The process one candidate runs in: ``compress run`` of its pipeline, with this Python."""
    return [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", "--quiet", "--force", "run", str(pipeline), "-o", str(out)]


def _run_candidate(cand: Candidate, input_dir: Path, data: str, seed: int, timeout: float, work: Path, cache: Path | None = None) -> None:
    """Run one candidate as its own ``compress run`` process; its run directory is cached by input and recipe."""
    cached = (cache or _cache_root()) / _key(input_dir, cand, data, seed)
    if (cached / "manifest.json").is_file():
        try:
            Manifest.read(cached).verify(cached)
            cand.path, cand.seconds = cached, json.loads((cached / "manifest.json").read_text()).get("optimize_seconds")
            log.info("reusing the finished candidate '%s' (%s)", cand.name, cached)
            return
        except CompressError:
            shutil.rmtree(cached, ignore_errors=True)
    pipe = work / f"{cached.name}.yaml"
    pipe.write_text(yaml.safe_dump({"model": {"source": str(input_dir)}, "data": data, "seed": seed, "stages": cand.stages}, sort_keys=False))
    out = work / cached.name
    started = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COMPRESS_REFERENCE="0")    # a candidate needs no drift reference
    try:
        proc = subprocess.run(command(pipe, out), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        cand.error, cand.seconds = f"no result within {timeout:.0f} s (hung, or too slow for this budget)", timeout
        return
    cand.seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ")[:300] if lines else ""
        if proc.returncode < 0:            # killed by a signal: a crash in native code, or the out-of-memory killer
            import signal

            name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.Signals._value2member_map_ else str(-proc.returncode)
            cand.error = f"the candidate's process crashed ({name})" + (f": {last}" if last else "")
        else:
            cand.error = last or f"exit code {proc.returncode}"
        return
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["optimize_seconds"] = cand.seconds
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    Manifest.read(out).write(out)                  # re-record the checksums with the extra key
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(out, cached)
    cand.path = cached


def make_candidate(cand: Candidate, input_dir: Path, data: str, seed: int, timeout, work: Path, cache: Path | None = None) -> None:
    """Make one candidate (``timeout()``: the seconds it may take) into ``cache`` (default: the candidate cache). A training
    candidate's training (its stages up to the last distill) is its own cached run, so candidates that train the same way
    and differ in what follows (onnxruntime int8, OpenVINO int8, fp32) train once."""
    cut = max((i for i, st in enumerate(cand.stages) if "distill" in st), default=-1) + 1
    if not cand.training or cut in (0, len(cand.stages)):
        _run_candidate(cand, input_dir, data, seed, timeout(), work, cache)
        return
    head = Candidate(f"{cand.name} (training)", cand.stages[:cut], training=True)
    _run_candidate(head, input_dir, data, seed, timeout(), work, cache)
    if head.path is None:
        cand.error, cand.seconds = head.error, head.seconds
        return
    tail = Candidate(cand.name, cand.stages[cut:])
    _run_candidate(tail, head.path, data, seed, timeout(), work, cache)
    cand.path, cand.error = tail.path, tail.error
    cand.seconds = round((head.seconds or 0) + (tail.seconds or 0), 1)


def make_isolated(name: str, stages: list, training: bool, input_dir: Path, data: str, seed: int, timeout: float,
                  root: Path) -> tuple[str | None, float | None, Path]:
    """Make one candidate with ``root/cache`` as its candidate cache (a Ray task's scratch): its error, its seconds, and
    that folder, which holds every run directory it made."""
    cand, deadline, cache = Candidate(name, stages, training=training), time.perf_counter() + timeout, root / "cache"
    make_candidate(cand, input_dir, data, seed, lambda: max(1.0, deadline - time.perf_counter()), root, cache)
    return cand.error, cand.seconds, cache


# ---------------------------------------------------------------- the search
RUNG_EPOCHS = (1, 3, 9)   # training candidates: one epoch first; the fastest half still missing the budget get three, then nine
DOMINATED = 1.05       # an architecture this much slower than a candidate already within the budget cannot win


@register("optimize", "search", OptimizeConfig, accepts=("torch", "onnx"), produces="?", needs_data=True,
          summary="measure the recipes that fit the model and keep the fastest artifact within the accuracy budget, on this device")
def optimize(artifact: Artifact, config: OptimizeConfig, ctx) -> Artifact:
    from .measure import BenchSettings, bench_artifacts

    started = time.perf_counter()
    work = Path(ctx.workdir) / "_search"
    work.mkdir(parents=True, exist_ok=True)
    input_dir = work / "input"
    if not (input_dir / "manifest.json").exists():
        save(artifact, input_dir)
    bundle = ctx.data()
    search = _Search(artifact, config, ctx, input_dir, work, started + seconds(config.time_budget))
    cands = recipes(artifact, config, bundle.labelled, ctx.data_spec)
    if not cands:
        raise CompressError(f"compress optimize has no recipe for a {artifact.format} model on {config.device}",
                            "For an ONNX model on a GPU install TensorRT (pip install 'compress[trt]'), or give the torch model")
    if config.only:
        cands = [c for c in cands if _wanted(c, config)]
        if not cands:
            raise CompressError(f"no recipe for this model matches only={','.join(config.only)}",
                                "Leave 'only' out, or pick words from the recipe names in a search.json")
    with ctx.progress.task("optimize", len(cands)) as task:
        search.task = task
        cheap, trained = [c for c in cands if not c.training], [c for c in cands if c.training]
        search.premake(cheap)
        for cand in cheap:                                          # cheap first: exports, post-training quantization
            search.make(cand)
        for cand in _mixed(cheap, search, config):                  # int8 missed: its most sensitive layers in float
            cands.append(cand)
            task.advance(0, "")
            search.make(cand)
        qat = _qat(cheap, search, artifact, config, bundle.labelled)      # post-training int8 missed: train for int8
        if qat is not None:
            cands.append(qat)
            trained += [qat] if qat.error is None else []
        search.premake([*(_trained(c, None, f"{c.name} (architecture)", steps=1) for c in trained if _distills(c)),
                        *(_trained(c, RUNG_EPOCHS[0], c.name) for c in trained)])
        for cand in trained:
            search.train(cand)
        # successive halving: the fastest half of the trained candidates still short of the budget (and still faster than
        # the best within it) train longer, rung after rung, while the time left allows the next rung
        rung, first = trained, {c.name: c for c in trained}
        for before, epochs in zip(RUNG_EPOCHS, RUNG_EPOCHS[1:]):
            short = sorted((c for c in rung if c.probe and not search.fits(c.probe) and not search.dominated(c.probe)),
                           key=lambda c: c.probe["p50_ms"])
            rung = []
            for c in short[: (len(short) + 1) // 2]:
                origin = first.get(c.name, c)
                longer = _trained(origin, epochs, f"{origin.name}, {epochs} epochs")
                first[longer.name] = origin
                need = (c.seconds or 0) * epochs / before
                if need > search.left() - 30:
                    longer.error = f"skipped: {epochs} epochs would take about {need:.0f} s and {max(0, search.left()):.0f} s are left"
                cands.append(longer)
                rung.append(longer)
            todo = [c for c in rung if c.error is None]
            search.premake(todo)
            for cand in todo:
                task.advance(0, "")
                search.make(cand)
    done = [c for c in cands if c.path is not None and c.probe]
    if not done:
        raise CompressError("no candidate finished: " + "; ".join(f"{c.name}: {c.error}" for c in cands[:3]),
                            "Read the first failure; a longer --time-budget helps when they ran out of time")
    # the final word: every finished candidate's artifact timed interleaved with the others and the input
    arts = [("source", artifact)] + [(c.name, load_run_dir(c.path)) for c in done]
    settings = BenchSettings(devices=(config.device,), batch_sizes=(config.batch_size,), threads=(config.threads,), data=ctx.data_spec,
                             limit=config.eval_limit, budget_s=config.timing_budget_s, min_runs=5, max_runs=100_000)
    report = bench_artifacts(arts, settings, progress=ctx.progress)
    rows = {r["label"]: r for r in report.rows}
    for c in done:
        c.row = rows.get(c.name, {})
        if not c.row:
            c.error = next((s["reason"] for s in report.skipped if s["label"] == c.name), "it could not be measured")
    source_row = rows["source"]
    floor, metric = _budget(config, source_row)
    fits = [c for c in done if c.row and _quality(c.row, metric) is not None and _quality(c.row, metric) >= floor]
    pool = fits or [c for c in done if c.row and _quality(c.row, metric) is not None]
    if not pool:
        raise CompressError("no candidate could be scored on the data", "Give labelled data, or data the model's outputs can be compared on")
    best = _pick(fits, config.objective, metric) if fits else max(pool, key=lambda c: _quality(c.row, metric))
    met = bool(fits)
    chosen = load_run_dir(best.path)
    workdir = Path(ctx.workdir)
    result = {"candidates": [c.record() for c in cands], "picked": best.name, "met": met, "objective": config.objective,
              "budget": {"metric": metric, "floor": floor, "source": _quality(source_row, metric)},
              "source": {"p50_ms": source_row["p50_ms"], "size_bytes": source_row.get("size_bytes")},
              "deployment": {"device": config.device, "batch_size": config.batch_size, "threads": config.threads},
              "seconds": round(time.perf_counter() - started, 1), "env": report.env}
    result["serving"] = _serving(best, chosen, config, ctx)
    (workdir / "search.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (workdir / "recipe.yaml").write_text(_recipe(artifact, best, ctx.data_spec, ctx.seed))
    (workdir / "report.html").write_text(_report_html(result))
    shutil.rmtree(work, ignore_errors=True)
    miss = None if met else (f"no candidate keeps {metric} ≥ {floor:.4g}; the closest, {best.name}, reaches {_quality(best.row, metric):.4g}"
                             f" ({_costliest(done, metric)})")
    ctx.metrics.update({"picked": best.name, "met": met, "candidates": len(cands), "finished": len(done),
                        "p50_ms": best.row["p50_ms"], "speedup_vs_input": source_row["p50_ms"] / best.row["p50_ms"] if best.row["p50_ms"] else None,
                        metric: _quality(best.row, metric), f"input_{metric}": _quality(source_row, metric), "budget_floor": floor,
                        "search_seconds": result["seconds"], **({"miss": miss} if miss else {})})
    if miss:
        log.warning(miss)
    return chosen.evolve(stages=[*artifact.stages, *chosen.stages[len(artifact.stages):]], source=artifact.source, path=chosen.path)


def _trained(cand: Candidate, epochs: int | None, name: str, steps: int | None = None) -> Candidate:
    """The candidate with its training given another budget: its distillation's (``steps`` overrides epochs), or its QAT's epochs."""
    budget = {"steps": steps, "eval_limit": 16} if steps else {"epochs": epochs}

    def given(k: str, v):
        if k == "distill":
            return {**v, **budget}
        return {**v, "epochs": epochs} if k == "quantize" and v.get("method") == "qat" and epochs else v
    stages = [{k: given(k, v) for k, v in st.items()} for st in cand.stages]
    return Candidate(name, stages, training=True)


def _wanted(cand: Candidate, config: OptimizeConfig) -> bool:
    """Whether ``only`` (words of recipe names; none: every recipe) lets ``cand`` in."""
    return not config.only or any(w.lower() in cand.name.lower() for w in config.only)


def _distills(cand: Candidate) -> bool:
    return any("distill" in st for st in cand.stages)


MIXED_SHARES = (0.1, 0.2, 0.35)   # mixed precision: the shares of layers kept in float, tried in turn until the budget holds


def _mixed(cheap: list[Candidate], search: "_Search", config: OptimizeConfig):
    """Mixed precision, when onnxruntime's static int8 missed the budget: the layers int8 hurts most (measured on the
    calibration data) kept in float, a larger share each time, until one holds the budget — or until more float can only
    be slower than a candidate already within it."""
    ptq = [c for c in cheap if c.name.startswith("onnx int8 static") and c.probe]
    if not ptq or any(search.fits(c.probe) for c in ptq):
        return
    base = next((c for c in ptq if c.name == "onnx int8 static"), ptq[0])
    for share in MIXED_SHARES:
        quantize = {**base.stages[-1]["quantize"], "float_layers": share}
        cand = Candidate(_mixed_name(share), [*base.stages[:-1], {"quantize": quantize}])
        if not _wanted(cand, config):
            return
        yield cand
        if not cand.probe or search.fits(cand.probe):
            return
        if search.dominated(cand.probe):
            return                    # already no faster than a candidate within the budget: more float only slows it


def _mixed_name(share: float) -> str:
    return f"onnx int8 static, the {share:.0%} of layers int8 hurts most in float"


def _qat(cheap: list[Candidate], search: "_Search", artifact: Artifact, config: OptimizeConfig, labelled: bool) -> Candidate | None:
    """Quantization-aware training, when post-training static int8 missed the budget: only once every static int8 candidate
    has been measured short of it. Its int8 graph is the one PT2E static int8 made, so its speed is known before it
    trains: no faster than a candidate already within the budget, it is dropped untrained."""
    ptq = [c for c in cheap if "int8 static" in c.name and c.probe]
    if not (config.training and labelled and artifact.format == "torch" and ptq) or any(search.fits(c.probe) for c in ptq):
        return None
    cand = Candidate("qat int8 (PT2E QAT, AOTInductor)", [{"quantize": {"method": "qat"}}], training=True)
    if not _wanted(cand, config):
        return None
    like = next((c for c in ptq if "PT2E" in c.name), None)
    best = search.best
    if like is not None and search.dominated(like.probe):
        cand.error = (f"dropped before training: its int8 graph is the PT2E one ({like.probe['p50_ms']:.3f} ms), no faster than "
                      f"{best.name} ({best.probe['p50_ms']:.3f} ms) which already keeps the budget")
    return cand


class _Search:
    """Makes candidates one at a time, each probed at once (briefly timed, scored on a slice of the held-out data) so the
    search knows the best so far, which training candidates are dominated, and what to show."""

    def __init__(self, artifact: Artifact, config: OptimizeConfig, ctx, input_dir: Path, work: Path, deadline: float):
        from .measure import BenchSettings

        self.artifact, self.config, self.ctx, self.input_dir, self.work, self.deadline = artifact, config, ctx, input_dir, work, deadline
        self.settings = BenchSettings(devices=(config.device,), batch_sizes=(config.batch_size,), threads=(config.threads,),
                                      data=ctx.data_spec, limit=min(config.eval_limit, 256), budget_s=0.2, min_runs=3, max_runs=10_000)
        self.floor: tuple[float, str] | None = None
        self.best: Candidate | None = None
        self.task = None
        self.premade: dict[str, tuple[str | None, float | None]] = {}    # made on Ray: name -> (error, seconds)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, row: dict) -> bool:
        q = _quality(row, self.floor[1]) if self.floor else None
        return q is not None and q >= self.floor[0]

    def dominated(self, row: dict) -> bool:
        """No faster than a candidate already within the budget: training it longer cannot make it the pick."""
        return self.best is not None and row["p50_ms"] > self.best.probe["p50_ms"] * DOMINATED

    def make(self, cand: Candidate, count: bool = True) -> None:
        if self.left() <= 30:
            cand.error = "skipped: the time budget was spent"
        else:
            self._show(f"making {cand.name}")
            self._run(cand)
            if cand.path is not None:
                self._probe(cand)
        if count and self.task is not None:
            self.task.advance(1, "")
        self._show("")

    def _run(self, cand: Candidate) -> None:
        if cand.name in self.premade:          # made on Ray: a success is in the cache (found there), a failure is final
            cand.error, cand.seconds, cand.where = *self.premade.pop(cand.name), "ray"
            if cand.error:
                return
        timeout = lambda: min(seconds(self.config.candidate_timeout), self.left())  # noqa: E731
        make_candidate(cand, self.input_dir, self.ctx.data_spec, self.ctx.seed, timeout, self.work)

    def premake(self, cands: list[Candidate]) -> None:
        """With --ray: make ``cands`` as Ray tasks, in parallel, before the search takes them one by one (and only times them)."""
        if self.config.ray and cands and self.left() > 30:
            from .search_ray import make_on_ray

            self._show(f"making {len(cands)} candidates on Ray")
            timeout = min(seconds(self.config.candidate_timeout), self.left())
            self.premade.update(make_on_ray(make_isolated, cands, self.input_dir, self.ctx.data_spec, self.ctx.seed, timeout,
                                            self.config.ray, _cache_root()))

    def train(self, cand: Candidate) -> None:
        """A training candidate: its architecture first (one training step), dropped when it is no faster than a candidate
        already within the budget (more training changes its accuracy, never its speed); then its first rung of epochs."""
        if self.best is not None and self.left() > 30 and _distills(cand):      # (QAT's speed is known already: see _qat)
            probe = _trained(cand, None, f"{cand.name} (architecture)", steps=1)
            self.make(probe, count=False)
            if probe.probe and self.dominated(probe.probe):
                cand.error = (f"dropped before training: its architecture runs in {probe.probe['p50_ms']:.3f} ms, no faster than "
                              f"{self.best.name} ({self.best.probe['p50_ms']:.3f} ms) which already keeps the budget")
                if self.task is not None:
                    self.task.advance(1, "")
                return
        first = _trained(cand, RUNG_EPOCHS[0], cand.name)
        cand.stages = first.stages
        self.make(cand)

    def _probe(self, cand: Candidate) -> None:
        from .measure import bench_artifacts

        try:
            report = bench_artifacts([("source", self.artifact), (cand.name, load_run_dir(cand.path))], self.settings)
        except CompressError as exc:
            cand.error = f"it could not be measured: {exc.what}"
            return
        rows = {r["label"]: r for r in report.rows}
        if cand.name not in rows:
            cand.error = next((s["reason"] for s in report.skipped if s["label"] == cand.name), "it could not be measured")
            return
        if self.floor is None:
            self.floor = _budget(self.config, rows["source"])
        cand.probe = rows[cand.name]
        if self.fits(cand.probe) and (self.best is None or _objective(cand.probe, self.config.objective) < _objective(self.best.probe, self.config.objective)):
            self.best = cand

    def _show(self, doing: str) -> None:
        if self.task is None:
            return
        best = (f"best so far: {self.best.name} {self.best.probe['p50_ms']:.3f} ms" if self.best else "none within the budget yet")
        left = max(0, int(self.left()))
        self.task.advance(0, f"{doing + '; ' if doing else ''}{best}; {left // 60}:{left % 60:02d} left")


NOISE = 0.03   # objective values this close are one tie: timing noise between interleaved rounds is about this size


def _serving(best: Candidate, chosen: Artifact, config: OptimizeConfig, ctx) -> dict | None:
    """Threads vs processes for serving the pick on this CPU: its throughput at each thread count up to the cores, and how
    to spend the cores (one process with every thread, or several processes with fewer), from that sweep."""
    from .diagnosis import best_split, cpu_count, recommendations
    from .measure import BenchSettings, bench_artifacts

    cores = cpu_count()
    if config.device != "cpu" or cores < 2:
        return None
    sweep = tuple(sorted({1, *(t for t in (2, 4, 8, 16, 32, 64) if t < cores), cores}))
    settings = BenchSettings(devices=("cpu",), batch_sizes=(config.batch_size,), threads=sweep, data=ctx.data_spec, limit=16,
                             budget_s=config.timing_budget_s, min_runs=5, max_runs=100_000)
    try:
        report = bench_artifacts([(best.name, chosen)], settings)
    except CompressError as exc:
        return {"error": exc.what}
    rows = [r for r in report.rows if r["label"] == best.name]
    by = {r["threads"]: r["throughput_per_s"] for r in rows}
    t, procs, est = best_split(by, cores)
    return {"batch_size": config.batch_size, "cores": cores, "throughput_per_s_by_threads": by,
            "best": {"threads": t, "processes": procs, "throughput_per_s": est}, "advice": recommendations(rows)}


def _pick(fits: list[Candidate], objective: str, metric: str) -> Candidate:
    """The best on the objective; a tie within the noise goes to the higher quality, then the simpler recipe."""
    best = min(_objective(c.row, objective) for c in fits)
    close = [c for c in fits if _objective(c.row, objective) <= best + abs(best) * NOISE]
    return max(close, key=lambda c: (round(_quality(c.row, metric), 4), -len(c.stages), -fits.index(c)))


def _budget(config: OptimizeConfig, source_row: dict) -> tuple[float, str]:
    m = source_row.get("metrics", {})
    if "accuracy" in m and config.min_fidelity is None:
        drop = 1.0 if config.max_accuracy_drop is None else config.max_accuracy_drop
        return m["accuracy"] - drop / 100.0, "accuracy"
    return (0.95 if config.min_fidelity is None else config.min_fidelity), "fidelity"


def _quality(row: dict, metric: str) -> float | None:
    m = row.get("metrics", {})
    if metric == "accuracy":
        return m.get("accuracy")
    if row.get("baseline"):
        return 1.0
    return _fidelity(m)


def _objective(row: dict, objective: str) -> float:
    if objective == "throughput":
        return -row["throughput_per_s"]
    if objective == "size":
        return row.get("size_bytes") or float("inf")
    return row["p50_ms"]


def _costliest(done: list[Candidate], metric: str) -> str:
    """Which step of the recipes cost the most of the budget metric (what to relax)."""
    losses = sorted(((_quality(c.row, metric), c.name) for c in done if c.row and _quality(c.row, metric) is not None))
    return f"the largest loss comes with {losses[0][1]}" if losses else "nothing could be scored"


def _recipe(artifact: Artifact, best: Candidate, data: str, seed: int) -> str:
    """A pipeline that `compress run` turns into the same artifact: the input's own history, then the candidate's stages."""
    arch = artifact.arch or {}
    model = {"source": artifact.source}
    if arch and not str(artifact.source).startswith(("zoo:", "hf:")) and not Path(str(artifact.source)).is_dir():
        model.update({"arch": arch.get("spec"), "arch_args": arch.get("args") or {}})
    model["input_shape"] = [f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in artifact.input_spec]
    history = [{s["stage"]: {("target" if s["stage"] == "export" else "method"): s["method"], **(s.get("config") or {})}}
               for s in artifact.stages]
    doc = {"model": model, "data": data, "seed": seed, "stages": [*history, *best.stages]}
    return f"# compress optimize picked: {best.name}. `compress run recipe.yaml -o OUT` makes the same artifact again.\n" + \
        yaml.safe_dump(doc, sort_keys=False)


def _report_html(search: dict) -> str:
    from html import escape

    from .plots import pareto_svg

    metric, floor = search["budget"]["metric"], search["budget"]["floor"]
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    rows = "".join(f"<tr><td>{escape(c['recipe'])}</td><td>{num(c['p50_ms'], '.3f')}</td><td>{num(c['p99_ms'], '.3f')}</td>"
                   f"<td>{num(c.get(metric), '.4f')}</td><td>{num(c['size_bytes'], ',')}</td><td>{num(c['seconds'], '.0f')}</td>"
                   f"<td>{escape(c['error'] or '')}</td></tr>" for c in search["candidates"])
    try:
        plot = pareto_svg(search["candidates"], metric, floor, search["picked"],
                          {"p50_ms": search["source"]["p50_ms"], metric: search["budget"]["source"]})
    except ImportError:
        plot = "<p>The plot needs matplotlib: pip install 'compress[report]'.</p>"
    verdict = "budget met" if search["met"] else "budget missed"
    advice = (search.get("serving") or {}).get("advice") or []
    serving = "<h2>Serving it on this CPU</h2><ul>" + "".join(f"<li>{escape(a)}</li>" for a in advice) + "</ul>" if advice else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compress optimize</title></head><body style='font-family:sans-serif'>"
            f"<h1>compress optimize: {escape(search['picked'])} ({verdict})</h1><p>budget: {metric} ≥ {floor:.4g} "
            f"(the input: {search['budget']['source']:.4g}); {escape(str(search['env'].get('cpu')))}, batch "
            f"{search['deployment']['batch_size']}, {search['deployment']['threads']} thread(s); search took {search['seconds']:.0f} s</p>"
            f"{plot}<table border=1 cellpadding=4><tr><th>recipe</th><th>p50 ms</th><th>p99 ms</th><th>{metric}</th><th>bytes</th>"
            f"<th>seconds to make</th><th>error</th></tr>{rows}</table>{serving}</body></html>\n")
