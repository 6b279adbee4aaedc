"""Latency, throughput, size, memory and accuracy of artifacts, measured the same way for every format.

Every artifact runs through its runner (:mod:`compress.runners`) and the one timing engine (:mod:`compress.timing`):
all artifacts of one device × threads × batch size are loaded, warmed up and then timed interleaved, so their ratios
(the speedup column) survive a noisy machine. With data, text models are timed on real tokenized sentences at their
natural (unpadded) length, and every row carries accuracy (labelled data whose classes fit the model) and fidelity
to the source. :func:`bench_artifacts` returns a :class:`BenchReport`; :mod:`compress.report` renders it.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import io
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import diagnosis
from .artifact import Artifact
from .cpu import has_vnni
from .errors import CompressError, first_line
from .progress import SILENT, Progress
from .runners import load_runner
from .timing import INTERLEAVE_ROUNDS, Clocked, time_interleaved

log = logging.getLogger(__name__)
TEXT_TIMING_BATCHES = 16   # real text batches cycled through while timing
QUALITY_BATCH = 32
BENCH_KEYS = ("device", "batch_size", "threads", "data", "json", "markdown", "html", "limit", "budget_s", "min_runs", "max_runs")


@dataclass(frozen=True)
class BenchSettings:
    devices: tuple[str, ...] = ("cpu",)
    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (1,)
    data: str | None = None
    limit: int = 512                 # samples for accuracy / fidelity
    budget_s: float = 2.0            # timed seconds per row
    min_runs: int = 10
    max_runs: int = 1000
    json: str | None = None
    markdown: str | None = None
    html: str | None = None

    @classmethod
    def from_options(cls, options: dict | None, data: str | None = None) -> "BenchSettings":
        o = dict(options or {})
        try:
            s = cls(devices=_list(o.get("device", "cpu"), str, "device"), batch_sizes=_list(o.get("batch_size", 1), int, "batch_size"),
                    threads=_list(o.get("threads", 1), int, "threads"), data=o.get("data") or data,
                    limit=int(o.get("limit", 512)), budget_s=float(o.get("budget_s", 2.0)),
                    min_runs=int(o.get("min_runs", 10)), max_runs=int(o.get("max_runs", 1000)),
                    json=o.get("json"), markdown=o.get("markdown"), html=o.get("html"))
        except (TypeError, ValueError) as exc:
            raise CompressError(f"a bench setting is not a number ({exc})", "limit, min_runs and max_runs are integers, budget_s seconds") from None
        for d in s.devices:
            if d not in ("cpu", "cuda"):
                raise CompressError(f"device '{d}' is not cpu or cuda", "Use --device cpu or --device cpu,cuda")
        if any(b < 1 for b in s.batch_sizes) or any(t < 1 for t in s.threads):
            raise CompressError("batch sizes and thread counts must be at least 1", "e.g. --batch-size 1,32 --threads 1,2")
        if s.budget_s <= 0 or s.min_runs < 1 or s.max_runs < s.min_runs or s.limit < 1:
            raise CompressError("budget_s must be > 0, limit >= 1 and 1 <= min_runs <= max_runs", "Fix the bench settings")
        return s


def _list(value, typ, name) -> tuple:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = tuple(dict.fromkeys(typ(str(v).strip()) for v in items if str(v).strip()))
    except ValueError:
        raise CompressError(f"{name} '{value}' is not a comma-separated list of {typ.__name__}s", f"e.g. --{name.replace('_', '-')} 1,8") from None
    if not out:
        raise CompressError(f"{name} is empty", f"Give at least one value for --{name.replace('_', '-')}")
    return out


@dataclass
class BenchReport:
    """What a bench measured: one row per artifact × device × batch size × thread count (the CLI contract's rows)."""
    rows: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)       # combinations that could not run, with the reason
    data: str | None = None
    peak_rss_mb: float | None = None
    settings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- what an artifact is
def stage_of(art: Artifact, baseline: bool = False) -> str:
    if baseline or not art.stages:
        return "source"
    return art.stages[-1].get("stage", "source")


def param_count(art: Artifact, runner=None) -> int | None:
    """Parameters (packed int8 weights included) of a torch module, a loaded TorchScript/pt2 module or an ONNX graph."""
    module = art.model if art.model is not None else getattr(runner, "module", None)
    if module is not None and hasattr(module, "parameters"):
        seen = sum(p.numel() for p in module.parameters())
        return seen + sum(_packed_numel(m) for m in module.modules()) if hasattr(module, "modules") else seen
    if art.format == "onnx" and art.path:
        import onnx

        g = onnx.load(str(art.path), load_external_data=False).graph
        shapes = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)   # shape constants, not weights
        return sum(math.prod(i.dims) for i in g.initializer if i.data_type not in shapes)
    return None


def _packed_numel(m) -> int:
    """Elements of packed (quantized) weight and bias, which modules expose as methods rather than parameters."""
    n = 0
    for name in ("weight", "bias"):
        fn = getattr(m, name, None)
        if callable(fn) and not isinstance(fn, torch.Tensor):
            try:
                t = fn()
            except Exception:  # noqa: BLE001 - packed params of some backends cannot be unpacked
                continue
            n += t.numel() if isinstance(t, torch.Tensor) else 0
    return n


def size_on_disk(art: Artifact) -> int | None:
    """Bytes of the artifact's files; for a model only in memory, of its serialized state dict."""
    size = art.size_bytes()
    if size is not None or art.model is None:
        return size
    buf = io.BytesIO()
    torch.save(art.model.state_dict(), buf)
    return buf.tell()


def model_facts(art: Artifact, runner=None) -> dict:
    """What explains speed: the weights' dtype, the share of zero weights, fp32 convolutions left in an int8 model."""
    facts: dict = {"method": art.stages[-1].get("method") if art.stages else None}
    module = art.model if art.model is not None else getattr(runner, "module", None)
    if module is not None and hasattr(module, "modules"):
        weights = [m.weight for m in module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() > 1]
        if weights:
            facts["weights_dtype"] = str(weights[0].dtype).replace("torch.", "")
            numel = sum(w.numel() for w in weights)
            facts["zero_fraction"] = sum(int((w == 0).sum()) for w in weights) / numel
        quantized = [m for m in module.modules() if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))]
        if quantized:
            facts["weights_dtype"] = "int8"
            facts["fp32_convs"] = sum(1 for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
                                      and not type(m).__module__.startswith(("torch.ao", "torch.nn.quantized")))
    elif art.format == "onnx" and art.path:
        import onnx

        g = onnx.load(str(art.path), load_external_data=False).graph
        types = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in g.initializer if len(i.dims) > 1}
        facts["weights_dtype"] = "int8" if types & {"int8", "uint8"} else "float16" if "float16" in types else "float32" if types else None
    return facts


# ---------------------------------------------------------------- inputs
def _fixed(art: Artifact, axis: int) -> int | None:
    """The size a file format fixes for ``axis`` (0: batch, 1: sequence), or None when it is dynamic."""
    if art.is_torch or art.format == "torchscript":
        return None
    for s in art.input_spec:
        if len(s.shape) > axis and axis not in s.dynamic_axes:
            return s.shape[axis]
    return None


def _text_batches(bundle, art: Artifact, batch: int, count: int, tokenizer, pad_to: int | None):
    from .data import batches

    out = []
    for inputs, labels in batches(bundle.eval, art.input_spec, batch, batch * count, tokenizer, pad_to=pad_to):
        if len(labels) == batch:
            out.append(inputs)
    return out


def timing_inputs(art: Artifact, batch: int, bundle=None, tokenizer=None) -> tuple[list[tuple], dict]:
    """Input sets to time on: real tokenized text at natural length when text data is given, else example tensors."""
    if bundle is not None and bundle.kind == "text" and tokenizer is not None:
        seq = _fixed(art, 1)
        sets = _text_batches(bundle, art, batch, TEXT_TIMING_BATCHES, tokenizer, seq)
        if sets:
            lengths = [s[0].shape[1] for s in sets]
            return sets, {"inputs": "data", "seq_len_mean": statistics.fmean(lengths), "seq_len_max": max(lengths),
                          "padded": seq is not None}
    return [tuple(s.example(batch, seed=i) for i, s in enumerate(art.input_spec))], {"inputs": "synthetic"}


# ---------------------------------------------------------------- accuracy and fidelity
def _quality_outputs(runner, batches_) -> list[torch.Tensor]:
    return [runner(*inputs)[0] for inputs, _ in batches_]


def quality(outputs: list[torch.Tensor], labels: list[torch.Tensor], reference: list[torch.Tensor] | None, bundle) -> dict:
    """Accuracy (when the data's classes fit the model's outputs) and fidelity to the reference outputs."""
    from .evaluate import compare, summarize

    m: dict = {}
    if bundle.labelled and outputs and outputs[0].dim() == 2:
        from .data import BUILTIN

        classes, n = outputs[0].shape[1], bundle.num_classes
        # built-in sets know their class count; for user data it is the largest label + 1, which may be fewer
        if n is None or n == classes or (bundle.name not in BUILTIN and n <= classes):
            correct = sum(int((o.argmax(1) == y).sum()) for o, y in zip(outputs, labels))
            m["accuracy"] = correct / sum(len(y) for y in labels)
        else:
            m["accuracy_skipped"] = f"the model gives {classes} outputs but '{bundle.name}' has {bundle.num_classes} classes"
    if reference is not None:
        s = summarize([(len(o), compare(o, r)) for o, r in zip(outputs, reference)])
        m["max_abs_diff_vs_source"] = s["max_abs_diff"]
        m["cosine_vs_source"] = s["cosine"]
        if "top1_agreement" in s and "accuracy_skipped" not in m:    # argmax only means something for class scores
            m["top1_agreement_vs_source"] = s["top1_agreement"]
    m["samples"] = sum(len(y) for y in labels)
    return m


# ---------------------------------------------------------------- what to bench
def bench_sources(sources, options=None) -> list[tuple[str, Artifact]]:
    """The artifacts ``compress bench SOURCE...`` measures, labelled: a run directory stands for its stages, and the
    first is the baseline — or, when it is a run directory whose manifest names an earlier source that can still be
    loaded (e.g. zoo:mobilenet_v2), that source is. ``sources``: paths / zoo names, or Artifacts already loaded;
    ``options``: the model options (a :class:`~compress.sources.ModelSpec`) every SOURCE is loaded with."""
    from .sources import ModelSpec, load_model

    options = options or ModelSpec("")
    loaded = []
    for s in sources:
        if isinstance(s, Artifact):
            loaded.append((s.stages[-1]["method"] if s.stages else "model", s))
            continue
        stages = Path(s) / "stages"
        paths = [str(d) for d in sorted(stages.iterdir()) if d.is_dir() and not d.name.startswith(".")] if stages.is_dir() else [str(s)]
        loaded += [(Path(p).name or p, load_model(dataclasses.replace(options, source=p))) for p in paths]
    if not loaded:
        raise CompressError("nothing to benchmark", "Give at least one SOURCE")
    first = loaded[0][1]
    baseline = None
    if first.stages and first.source:
        arch = first.arch or {}
        own = not str(first.source).startswith(("zoo:", "hf:"))   # a built-in or transformers source knows its architecture
        spec = dataclasses.replace(options, source=str(first.source), arch=arch.get("spec") if own else None,
                                   arch_args=(arch.get("args") or {}) if own else {}, inputs=options.inputs or tuple(first.input_spec))
        try:
            baseline = load_model(spec)
        except CompressError as exc:
            log.info("baseline: the manifest's source %s cannot be loaded (%s); using the first SOURCE", first.source, exc.what)
    return [("source", baseline), *loaded] if baseline is not None else [("source", first), *loaded[1:]]


# ---------------------------------------------------------------- benchmarking artifacts
@dataclass
class _Measured:
    """What is measured once per artifact and device: quality on the data, parameters, facts, size, stage."""
    metrics: dict
    params: int | None
    facts: dict
    size_bytes: int | None
    stage: str


@dataclass
class _Device:
    """One device's shared state: the baseline's outputs (for fidelity) and each artifact's once-measured facts."""
    name: str
    settings: BenchSettings
    bundle: object
    tokenizer: object
    quality_batches: list | None
    reference: dict = field(default_factory=dict)      # batch size -> the baseline's outputs on the timing inputs
    reference_quality: list | None = None              # the baseline's outputs on the quality batches
    measured: dict = field(default_factory=dict)       # artifact index -> _Measured


def bench_artifacts(artifacts: list[tuple[str, Artifact]], settings: BenchSettings, progress: Progress | None = None) -> BenchReport:
    """Measure every artifact × device × batch × threads. The first artifact is the baseline for speedups and fidelity."""
    from .data import load_data, tokenizer_for

    progress = progress or SILENT
    if not artifacts:
        raise CompressError("nothing to benchmark", "Give at least one SOURCE")
    if "cuda" in settings.devices and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA GPU is visible", "Run on a machine with an NVIDIA GPU, or use --device cpu")
    bundle = load_data(settings.data) if settings.data else None
    tokenizer = None
    if bundle is not None and bundle.kind == "text":
        tokenizer = next((t for t in (tokenizer_for(a) for _, a in artifacts) if t is not None), None)
        if tokenizer is None:
            raise CompressError(f"'{settings.data}' is text, and none of the artifacts carries a tokenizer",
                                "Bench a transformers model (hf: or zoo:minilm-l6) first, or use tensors: data")
    quality_batches = _quality_plan(artifacts, bundle, tokenizer, settings.limit)
    rows: list[tuple[int, dict]] = []                   # (artifact index, row)
    skipped: list[dict] = []
    total = len(artifacts) * len(settings.devices) * len(settings.batch_sizes) * len(settings.threads)
    with progress.task("benchmarking", total) as task:
        for device in settings.devices:
            dev = _Device(device, settings, bundle, tokenizer, quality_batches)
            for threads in settings.threads:
                runners: dict = {}
                for batch in settings.batch_sizes:
                    _bench_combination(artifacts, dev, threads, batch, runners, rows, skipped, task)
                del runners
                gc.collect()
    combos = [(d, t, b) for d in settings.devices for t in settings.threads for b in settings.batch_sizes]
    rows.sort(key=lambda ir: (settings.devices.index(ir[1]["device"]), ir[0], combos.index((ir[1]["device"], ir[1]["threads"], ir[1]["batch_size"]))))
    ordered = [r for _, r in rows]
    if not ordered and skipped:
        first = skipped[0]
        raise CompressError(f"nothing could be measured: {first['label']} failed at batch {first.get('batch_size', '?')}: {first.get('reason', '')}".rstrip(": "),
                            "Check --input-shape (and its dtype) against the model")
    _speedups(ordered)
    env = _env() | {"load_avg": diagnosis.load_avg()}
    busy = diagnosis.busy_warning(env["load_avg"], max(settings.threads))
    return BenchReport(ordered, env, skipped, settings.data, _peak_rss_mb(),
                       {"budget_s": settings.budget_s, "min_runs": settings.min_runs, "max_runs": settings.max_runs, "limit": settings.limit},
                       ([busy] if busy else []) + diagnosis.warnings_for(ordered, env) + _skip_warnings(skipped),
                       diagnosis.recommendations(ordered))


def _bench_combination(artifacts, dev: _Device, threads: int, batch: int, runners: dict, rows: list, skipped: list[dict], task) -> None:
    """Every artifact at one device × threads × batch size: each is loaded (once per thread count), measured once per
    device, warmed up, and then all are timed interleaved (:func:`compress.timing.time_interleaved`)."""
    ready: list[tuple[int, dict, Clocked]] = []

    def skip(idx, exc: Exception) -> None:
        label, art = artifacts[idx]
        skipped.append({"artifact": str(art.path or art.source), "label": label, "device": dev.name,
                        "batch_size": batch, "threads": threads, "reason": first_line(exc, 300)})
        task.advance(1)

    for idx, (label, art) in enumerate(artifacts):
        task.advance(0, f"{label} {dev.name} b{batch} t{threads}: warm-up")
        try:
            runner = runners.get(idx) or load_runner(art, dev.name, threads)
            runners[idx] = runner
            if idx not in dev.measured:
                dev.measured[idx] = _Measured(_artifact_quality(runner, idx, dev), param_count(art, runner), model_facts(art, runner),
                                              size_on_disk(art), stage_of(art, idx == 0))
            row, clocked = _prepare(runner, art, label, idx, dev, batch, threads)
        except (CompressError, RuntimeError) as exc:   # this artifact cannot run this combination: say why
            skip(idx, exc)
            continue
        m = dev.measured[idx]
        row.update(size_bytes=m.size_bytes, params=m.params, stage=m.stage, **m.facts)
        row["metrics"] = {**m.metrics, **row["metrics"]}
        ready.append((idx, row, clocked))
    settings = dev.settings
    errors = time_interleaved([x[2] for x in ready], settings.budget_s, settings.min_runs, settings.max_runs,
                              on_round=lambda r: task.advance(0, f"{dev.name} b{batch} t{threads}: timing, round {r + 1}/{INTERLEAVE_ROUNDS}"))
    for i, (idx, row, clocked) in enumerate(ready):
        if i in errors:
            skip(idx, errors[i])
            continue
        row.update(clocked.timing().stats(batch))
        row["rss_mb"] = _rss_mb()
        row["peak_rss_mb"] = _peak_rss_mb()
        rows.append((idx, row))
        task.advance(1)


def _skip_warnings(skipped: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for s in skipped:
        groups.setdefault((s["label"], s["device"], s["reason"]), []).append(s)
    return [f"{label} ({device}) was not measured at " + ", ".join(f"batch {s['batch_size']}/{s['threads']} thread(s)" for s in items)
            + f": {reason}" for (label, device, reason), items in groups.items()]


def _quality_plan(artifacts, bundle, tokenizer, limit: int):
    """One set of data batches per artifact with the same sample boundaries for all, so outputs compare one to one."""
    if bundle is None:
        return None
    fixed_batches = [b for b in (_fixed(a, 0) for _, a in artifacts) if b]
    size = min([QUALITY_BATCH, *fixed_batches])
    seqs = [s for s in (_fixed(a, 1) for _, a in artifacts) if s] if bundle.kind == "text" else []
    pad_to = min(seqs) if seqs else None
    from .data import batches

    plan = []
    for _, art in artifacts:
        items = [(x, y) for x, y in batches(bundle.eval, art.input_spec, size, limit, tokenizer, pad_to=pad_to)
                 if not fixed_batches or len(y) == size]
        plan.append(items)
    return plan


def _artifact_quality(runner, idx: int, dev: _Device) -> dict:
    if dev.bundle is None:
        return {}
    batches_ = dev.quality_batches[idx]
    outputs = _quality_outputs(runner, batches_)
    labels = [y for _, y in batches_]
    if idx == 0:
        dev.reference_quality = outputs
        return quality(outputs, labels, None, dev.bundle)
    return quality(outputs, labels, dev.reference_quality, dev.bundle)


def _prepare(runner, art: Artifact, label: str, idx: int, dev: _Device, batch: int, threads: int) -> tuple[dict, Clocked]:
    """One row's facts and a warmed-up :class:`Clocked` for it (timed later, interleaved with the other artifacts)."""
    sets, info = timing_inputs(art, batch, dev.bundle, dev.tokenizer)
    metrics: dict = {}
    outputs = runner(*sets[0])
    if idx == 0:
        dev.reference[batch] = outputs
    elif batch in dev.reference and dev.bundle is None:
        ref = dev.reference[batch]
        if outputs and ref and outputs[0].shape == ref[0].shape:
            metrics["max_abs_diff_vs_source"] = float((outputs[0].float() - ref[0].float()).abs().max())
    del outputs
    gpu = str(dev.name).startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    clocked = Clocked(runner, sets, dev.settings.budget_s)
    row = {"artifact": str(art.path or art.source), "label": label, "format": art.format, "device": dev.name,
           "batch_size": batch, "threads": threads, "baseline": idx == 0, **info}
    if gpu:
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20     # over the warm-up: the model's own peak
    row["metrics"] = metrics
    return row, clocked


def _speedups(rows: list[dict]) -> None:
    base = {(r["device"], r["batch_size"], r["threads"]): r["p50_ms"] for r in rows if r["baseline"]}
    src_acc = {r["device"]: r["metrics"].get("accuracy") for r in rows if r["baseline"]}
    for r in rows:
        b = base.get((r["device"], r["batch_size"], r["threads"]))
        r["speedup_vs_source"] = (b / r["p50_ms"]) if b and r["p50_ms"] else None
        acc, ref = r["metrics"].get("accuracy"), src_acc.get(r["device"])
        if acc is not None and ref is not None and not r["baseline"]:
            r["metrics"]["accuracy_delta"] = acc - ref


def _rss_mb() -> float | None:
    """Resident memory now (Linux), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _env() -> dict:
    from .manifest import environment

    env = environment()
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"cpu": env.get("device"), "gpu": env.get("gpu"), "torch": env.get("torch"), "onnxruntime": ort,
            "cores": diagnosis.cpu_count(), "compress": env.get("compress"), "python": env.get("python"), "vnni": has_vnni()}


