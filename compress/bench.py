"""Latency, throughput, size, memory and accuracy of artifacts, measured the same way for every format.

Every format goes through its runner (:mod:`compress.runners`) and the one timing loop (:class:`Clocked`):
under ``torch.inference_mode()``, warm up until the median of one window of runs is within 5% of the
previous window's (with a cap on runs and time), then time runs until a time budget or a run count is
reached. ``bench`` times all artifacts of one device × threads × batch size interleaved, in rotating slices,
so their ratios (the speedup column) survive a noisy machine. CPU time is taken with ``perf_counter_ns``; on CUDA, torch work is timed with CUDA events and a
synchronisation after every run, and the host-to-device copy of the inputs is timed apart from compute.

With ``--data``, text models are timed on real tokenized sentences at their natural (unpadded) length,
cycling through a fixed set of real batches, and every row carries accuracy (labelled data whose classes
fit the model) and fidelity to the source (max abs diff, cosine, top-1 agreement).
"""
from __future__ import annotations

import gc
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import Artifact
from .cpu import has_vnni
from .errors import CompressError
from .outputs import write_file_atomic
from .runners import load_runner

NOISY_CV = 0.15            # spread (robust coefficient of variation) above which a row is flagged as too noisy
NOT_FASTER = 1.05          # a stage must beat the source by 5% to count as faster
WARMUP_WINDOW = 5          # runs per warm-up window
WARMUP_SETTLE = 0.05       # warm-up ends when a window's median is within 5% of the previous one
TEXT_TIMING_BATCHES = 16   # real text batches cycled through while timing
QUALITY_BATCH = 32
INTERLEAVE_ROUNDS = 5      # artifacts are timed in this many interleaved slices each


@dataclass
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


# ---------------------------------------------------------------- timing
@dataclass
class Timing:
    times_ms: list[float]
    warmup_runs: int
    h2d_ms: float | None = None       # host-to-device copy of one input set (CUDA), apart from compute
    clock: str = "perf_counter"

    def stats(self, batch: int) -> dict:
        t = sorted(self.times_ms)
        mean = statistics.fmean(t)
        std = statistics.stdev(t) if len(t) > 1 else 0.0
        return {"p50_ms": _pct(t, 50), "p90_ms": _pct(t, 90), "p99_ms": _pct(t, 99), "mean_ms": mean, "std_ms": std,
                "min_ms": t[0], "cv": std / mean if mean else 0.0, "spread": spread(t), "runs": len(t), "warmup_runs": self.warmup_runs,
                "throughput_per_s": batch * 1000.0 / mean if mean else 0.0, "h2d_ms": self.h2d_ms, "clock": self.clock}


def spread(sorted_times: list[float]) -> float:
    """A robust coefficient of variation: interquartile range / 1.349 / median. It equals the cv for normally
    distributed timings, but one scheduler hiccup among thousands of sub-millisecond runs does not move it."""
    med = _pct(sorted_times, 50)
    return (_pct(sorted_times, 75) - _pct(sorted_times, 25)) / 1.349 / med if med else 0.0


def _pct(sorted_times: list[float], q: float) -> float:
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_times) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (k - lo)


class Clocked:
    """One runner ready to be timed: its input sets prepared (pinned and copied on CUDA), its clock chosen, and
    warmed up until the median of one window of runs (a whole cycle of input sets, at least 5 runs) is within
    ``settle`` of the previous window's, or after ``warmup_cap`` runs or ``budget_s`` seconds. :meth:`run_for`
    then adds timed runs, in one go or in slices interleaved with other runners."""

    def __init__(self, runner, inputs, budget_s: float = 2.0, warmup_cap: int = 50, settle: float = WARMUP_SETTLE):
        sets = [inputs] if isinstance(inputs, tuple) and all(isinstance(x, torch.Tensor) for x in inputs) else list(inputs)
        self.runner, self.times = runner, []
        cuda = str(runner.device).startswith("cuda")
        gc.collect()
        with torch.inference_mode(), runner.threads_set():
            if cuda:
                sets = [tuple(x.pin_memory() for x in s) for s in sets]
            self.prepared = [runner.prepare(s) for s in sets]
            runner.sync()
            self.events = cuda and _on_cuda(self.prepared[0])
            self.h2d = _h2d_ms(runner, sets) if self.events else None
            self.once = _cuda_clock(runner) if self.events else _host_clock(runner)
            n = len(self.prepared)
            window = max(WARMUP_WINDOW, n)
            cap = max(warmup_cap, 3 * window)
            warm: list[float] = []
            warm_deadline = time.perf_counter() + budget_s
            while len(warm) < cap:
                warm.append(self.once(self.prepared[len(warm) % n]))
                if len(warm) >= 2 * window and len(warm) % window == 0:
                    before, last = statistics.median(warm[-2 * window:-window]), statistics.median(warm[-window:])
                    if abs(last - before) <= settle * before:
                        break
                if len(warm) >= 2 and time.perf_counter() > warm_deadline:
                    break
        self.warmup_runs = self.next = len(warm)

    def run_for(self, budget_s: float, min_runs: int, max_runs: int, at_least: int = 3, untimed: bool = False) -> None:
        """Timed runs until ``min_runs`` in all are done and ``budget_s`` has passed, or ``max_runs`` in all are done;
        a model far slower than the budget stops after 10 budgets (at least 10 s) once ``at_least`` runs are done
        here. ``untimed``: one run first that is not timed (it clears what another runner left in the caches)."""
        n = len(self.prepared)
        with torch.inference_mode(), self.runner.threads_set():
            if untimed:
                self.once(self.prepared[self.next % n])
            start = len(self.times)
            deadline = time.perf_counter() + budget_s
            hard_stop = deadline + max(9 * budget_s, 10.0)
            while len(self.times) < max_runs and (len(self.times) < min_runs or time.perf_counter() < deadline):
                if len(self.times) - start >= at_least and time.perf_counter() > hard_stop:
                    break
                self.times.append(self.once(self.prepared[self.next % n]))
                self.next += 1

    def timing(self) -> "Timing":
        return Timing(list(self.times), self.warmup_runs, self.h2d, "cuda-events" if self.events else "perf_counter")


def time_runner(runner, inputs, budget_s: float = 2.0, min_runs: int = 10, max_runs: int = 1000,
                warmup_cap: int = 50, settle: float = WARMUP_SETTLE) -> Timing:
    """Time ``runner`` on ``inputs`` (one tuple of tensors, or a list of them, cycled in order): warm up (see
    :class:`Clocked`), then time runs until at least ``min_runs`` are done and ``budget_s`` has passed, or
    ``max_runs`` are done (or, for a model far slower than the budget allows, after 10 budgets (at least 10 s)
    and at least 3 runs)."""
    c = Clocked(runner, inputs, budget_s, warmup_cap, settle)
    c.run_for(budget_s, min_runs, max_runs)
    return c.timing()


def time_interleaved(clocked: list[Clocked], budget_s: float, min_runs: int, max_runs: int, rounds: int = INTERLEAVE_ROUNDS,
                     on_round=None) -> dict[int, Exception]:
    """Give every runner ``budget_s`` of timed runs in ``rounds`` slices, round-robin with the order rotating each
    round and one untimed run before each slice, so all of them share the machine's drifts (clock boosts,
    neighbours on a VM) and their ratios hold. Returns {index: exception} for runners that failed while timing."""
    errors: dict[int, Exception] = {}
    for r in range(rounds):
        if on_round:
            on_round(r)
        order = list(range(len(clocked)))
        order = order[r % len(order):] + order[:r % len(order)] if order else []
        share = (r + 1) / rounds
        for i in order:
            if i in errors:
                continue
            try:
                clocked[i].run_for(budget_s / rounds, math.ceil(min_runs * share), max(1, math.ceil(max_runs * share)),
                                   at_least=1, untimed=True)
            except RuntimeError as exc:
                errors[i] = exc
    return errors


def _host_clock(runner):
    """Wall time of one run; on CUDA (runners that do not hand torch tensors, e.g. onnxruntime) after a sync."""
    def once(prepared) -> float:
        t0 = time.perf_counter_ns()
        runner.run(prepared)
        runner.sync()
        return (time.perf_counter_ns() - t0) / 1e6
    return once


def _cuda_clock(runner):
    """GPU time of one run between two CUDA events, waiting for the end event before the next run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once(prepared) -> float:
        start.record()
        runner.run(prepared)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return once


def _on_cuda(prepared) -> bool:
    items = prepared.values() if isinstance(prepared, dict) else prepared
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in items)


def _h2d_ms(runner, pinned_sets, reps: int = 5) -> float:
    """Mean time to copy one (pinned) input set to the GPU, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    total = 0.0
    for _ in range(reps):
        for s in pinned_sets:
            torch.cuda.synchronize()
            start.record()
            runner.prepare(s)
            end.record()
            end.synchronize()
            total += start.elapsed_time(end)
    return total / (reps * len(pinned_sets))


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


# ---------------------------------------------------------------- benchmarking artifacts
def bench_artifacts(artifacts: list[tuple[str, Artifact]], settings: BenchSettings, quiet: bool = False) -> dict:
    """Measure every artifact × device × batch × threads; returns the contract's report dict.

    The first artifact is the baseline for speedups and fidelity.
    """
    from .data import load_data, tokenizer_for
    from .ui import progress

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
    rows: list[dict] = []
    skipped: list[dict] = []
    total = len(artifacts) * len(settings.devices) * len(settings.batch_sizes) * len(settings.threads)
    with progress(quiet) as bar:
        task = bar.add_task("benchmarking", total=total, info="")
        for device in settings.devices:
            reference: dict = {"outputs": {}}          # the baseline's outputs, for fidelity
            once: dict[int, dict] = {}                 # per artifact: quality, params, facts (measured once per device)
            for threads in settings.threads:
                runners: dict = {}
                for batch in settings.batch_sizes:
                    c = {"device": device, "threads": threads, "batch": batch, "settings": settings, "bundle": bundle,
                         "tokenizer": tokenizer, "reference": reference, "quality_batches": quality_batches}
                    _bench_combination(artifacts, c, runners, once, rows, skipped, bar, task)
                del runners
                gc.collect()
    order = {(d, t, b): i for i, (d, t, b) in enumerate((d, t, b) for d in settings.devices for t in settings.threads for b in settings.batch_sizes)}
    rows.sort(key=lambda r: (settings.devices.index(r["device"]), r["_order"], order[(r["device"], r["threads"], r["batch_size"])]))
    for r in rows:
        del r["_order"]
    if not rows and skipped:
        first = skipped[0]
        raise CompressError(f"nothing could be measured: {first['label']} failed at batch {first.get('batch_size', '?')}: {first.get('reason', '')}".rstrip(": "),
                            "Check --input-shape (and its dtype) against the model")
    _speedups(rows)
    report = {"env": _env(), "rows": rows, "skipped": skipped, "data": settings.data, "peak_rss_mb": _peak_rss_mb(),
              "settings": {"budget_s": settings.budget_s, "min_runs": settings.min_runs, "max_runs": settings.max_runs,
                           "limit": settings.limit}}
    report["env"]["load_avg"] = _load_avg()
    busy = _busy_warning(report["env"]["load_avg"], max(settings.threads))
    report["warnings"] = ([busy] if busy else []) + warnings_for(rows, report["env"]) + _skip_warnings(skipped)
    report["recommendations"] = recommendations(rows)
    if not quiet:
        print_table(report)
    return report


def _bench_combination(artifacts, c: dict, runners: dict, once: dict, rows: list[dict], skipped: list[dict], bar, task) -> None:
    """Every artifact at one device × threads × batch size: each is loaded (once per thread count), checked for
    quality (once), warmed up, and then all are timed interleaved (:func:`time_interleaved`)."""
    device, threads, batch, settings = c["device"], c["threads"], c["batch"], c["settings"]
    ready: list[tuple[int, dict, Clocked]] = []

    def skip(idx, exc: Exception) -> None:
        label, art = artifacts[idx]
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        skipped.append({"artifact": str(art.path or art.source), "label": label, "device": device,
                        "batch_size": batch, "threads": threads, "reason": reason})
        bar.advance(task)

    for idx, (label, art) in enumerate(artifacts):
        bar.update(task, info=f"{label} {device} b{batch} t{threads}: warm-up")
        try:
            runner = runners.get(idx) or load_runner(art, device, threads)
            runners[idx] = runner
            if idx not in once:
                once[idx] = {"metrics": _artifact_quality(runner, art, idx, c["bundle"], c["quality_batches"], c["reference"]),
                             "params": param_count(art, runner), "facts": model_facts(art, runner),
                             "size_bytes": size_on_disk(art), "stage": stage_of(art, idx == 0)}
            row, clocked = _prepare(runner, art, label, idx, device, batch, threads, settings, c["bundle"], c["tokenizer"], c["reference"])
        except (CompressError, RuntimeError) as exc:   # this artifact cannot run this combination: say why
            skip(idx, exc)
            continue
        row.update(size_bytes=once[idx]["size_bytes"], params=once[idx]["params"], stage=once[idx]["stage"], **once[idx]["facts"])
        row["metrics"] = {**once[idx]["metrics"], **row["metrics"]}
        row["_order"] = idx
        ready.append((idx, row, clocked))
    errors = time_interleaved([x[2] for x in ready], settings.budget_s, settings.min_runs, settings.max_runs,
                              on_round=lambda r: bar.update(task, info=f"{device} b{batch} t{threads}: timing, round {r + 1}/{INTERLEAVE_ROUNDS}"))
    for i, (idx, row, clocked) in enumerate(ready):
        if i in errors:
            skip(idx, errors[i])
            continue
        row.update(clocked.timing().stats(batch))
        row["rss_mb"] = _rss_mb()
        row["peak_rss_mb"] = _peak_rss_mb()
        rows.append(row)
        bar.advance(task)


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


def _artifact_quality(runner, art, idx, bundle, quality_batches, reference) -> dict:
    if bundle is None:
        return {}
    batches_ = quality_batches[idx]
    outputs = _quality_outputs(runner, batches_)
    labels = [y for _, y in batches_]
    if idx == 0:
        reference["quality_outputs"] = outputs
        return quality(outputs, labels, None, bundle)
    return quality(outputs, labels, reference.get("quality_outputs"), bundle)


def _prepare(runner, art, label, idx, device, batch, threads, settings, bundle, tokenizer, reference) -> tuple[dict, Clocked]:
    """One row's facts and a warmed-up :class:`Clocked` for it (timed later, interleaved with the other artifacts)."""
    sets, info = timing_inputs(art, batch, bundle, tokenizer)
    metrics: dict = {}
    outputs = runner(*sets[0])
    key = batch
    if idx == 0:
        reference["outputs"][key] = outputs
    elif key in reference["outputs"] and bundle is None:
        ref = reference["outputs"][key]
        if outputs and ref and outputs[0].shape == ref[0].shape:
            metrics["max_abs_diff_vs_source"] = float((outputs[0].float() - ref[0].float()).abs().max())
    del outputs
    gpu = str(device).startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    clocked = Clocked(runner, sets, settings.budget_s)
    row = {"artifact": str(art.path or art.source), "label": label, "format": art.format, "device": device,
           "batch_size": batch, "threads": threads, "baseline": idx == 0}
    row.update(info)
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


def _where(r: dict) -> str:
    return f"{r['label']} ({r['format']}, {r['device']}, batch {r['batch_size']}, {r['threads']} thread(s))"


def warnings_for(rows: list[dict], env: dict | None = None) -> list[str]:
    """Flag noisy measurements and every stage that did not make the model faster, with the likely cause."""
    out = []
    vnni = (env or {}).get("vnni", has_vnni())
    noisy = [r for r in rows if r["spread"] > NOISY_CV]
    if noisy:
        worst = max(noisy, key=lambda r: r["spread"])
        out.append(f"{len(noisy)} of {len(rows)} row(s) are too noisy to trust: timings spread by more than {NOISY_CV:.0%} "
                   f"(interquartile range / 1.349 / median; worst {worst['spread']:.0%} for {_where(worst)}); close other programs, "
                   "give a longer --budget and rerun")
    for r in rows:
        s = r.get("speedup_vs_source")
        if not r["baseline"] and s is not None and s < NOT_FASTER:
            what = "slower than the source" if s < 1 / NOT_FASTER else "no faster than the source"
            cause = likely_cause(r, vnni)
            out.append(f"{_where(r)}: {what} ({s:.2f}x)" + (f"; likely cause: {cause}" if cause else ""))
    return out


def likely_cause(row: dict, vnni: bool | None = None) -> str | None:
    """The most common reasons a compressed model is not faster, read from the row's facts."""
    vnni = has_vnni() if vnni is None else vnni
    dev, dtype, stage = row["device"], row.get("weights_dtype"), row.get("stage")
    if dev == "cpu" and dtype in ("float16", "bfloat16"):
        return f"{dtype} on a CPU: most CPU kernels convert to fp32 and back; keep fp32 or use int8 for CPU"
    if dev == "cpu" and row.get("fp32_convs"):
        return (f"dynamic int8 quantizes only Linear/LSTM layers; the model's {row['fp32_convs']} convolution(s) stay fp32, "
                "so a conv net gains nothing on x86 (use static int8: --method static --backend onnxruntime)")
    if dev == "cpu" and dtype == "int8" and not vnni:
        return "this CPU has no VNNI int8 instructions (avx512_vnni/avx_vnni/amx), so int8 kernels gain little over fp32"
    if (row.get("zero_fraction") or 0) > 0.2 and stage == "prune":
        return (f"unstructured sparsity: {row['zero_fraction']:.0%} of the weights are zero, but dense kernels do the same "
                "work on zeros; use structured pruning (--method structured) to remove whole channels")
    if row.get("padded"):
        return "this artifact has a static sequence length, so it ran on padded text while the source ran at natural length"
    if row["spread"] > NOISY_CV:
        return "the measurement is noisy; rerun before drawing conclusions"
    if row["batch_size"] == 1 and row["p50_ms"] < 0.2:
        return "the model is so small that per-call overhead dominates"
    return None


def recommendations(rows: list[dict]) -> list[str]:
    """For CPU serving: from the thread sweep, whether several single-threaded processes beat one threaded process."""
    cores = _cores()
    out = []
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["device"] == "cpu":
            groups.setdefault((r["label"], r["batch_size"]), {})[r["threads"]] = r
    for (label, batch), by_threads in groups.items():
        usable = {t: r for t, r in by_threads.items() if t <= cores}
        if len(usable) < 2:
            continue
        options = [(t, cores // t, r["throughput_per_s"] * (cores // t)) for t, r in sorted(usable.items())]
        top = max(usable)
        single = usable[top]["throughput_per_s"]
        t, procs, est = max(options, key=lambda o: o[2])
        if (t, procs) == (top, cores // top):
            out.append(f"{label}, batch {batch}: {top} threads × {cores // top} process(es) is best on this {cores}-core machine "
                       f"({single * (cores // top):.1f} items/s)")
        else:
            out.append(f"{label}, batch {batch}: {t} thread{'s' * (t > 1)} × {procs} processes gives ~{est:.1f} items/s vs {top} threads × 1 "
                       f"process {single:.1f} items/s (estimate from the thread sweep on {cores} cores: processes are assumed not to slow each other)")
    return out


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_warning(load: float | None, own_threads: int) -> str | None:
    """Other programs competing for the CPUs make timings (multi-threaded ones most) unreliable."""
    cores = _cores()
    if load is None or load - own_threads <= 0.5 * cores:
        return None
    return (f"the machine was busy while measuring (load average {load:.1f} on {cores} cores, of which this bench "
            f"accounts for at most {own_threads}); other programs competed for the CPUs, so timings, multi-threaded ones "
            "most, are unreliable: rerun on a quiet machine")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
            "cores": _cores(), "compress": env.get("compress"), "python": env.get("python"), "vnni": has_vnni()}


# ---------------------------------------------------------------- reports
def _fmt_metrics(m: dict) -> str:
    parts = []
    if "accuracy" in m:
        parts.append(f"acc {m['accuracy']:.2%}" + (f" ({m['accuracy_delta']:+.2%})" if "accuracy_delta" in m else ""))
    if "top1_agreement_vs_source" in m:
        parts.append(f"top1 {m['top1_agreement_vs_source']:.1%}")
    if "cosine_vs_source" in m:
        parts.append(f"cos {m['cosine_vs_source']:.4f}")
    if "max_abs_diff_vs_source" in m:
        parts.append(f"Δmax {m['max_abs_diff_vs_source']:.2g}")
    return ", ".join(parts)


def format_size(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def _count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


HEADERS = ["artifact", "stage", "format", "device", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "spread", "items/s",
           "speedup", "size", "params", "accuracy / fidelity"]
LEFT = ("artifact", "stage", "format", "device", "accuracy / fidelity")


def table_rows(report: dict) -> list[list[str]]:
    return [[r["label"], r["stage"], r["format"], r["device"], str(r["batch_size"]), str(r["threads"]), f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['spread']:.0%}", f"{r['throughput_per_s']:.1f}",
             f"{r['speedup_vs_source']:.2f}x" if r.get("speedup_vs_source") else "-", format_size(r["size_bytes"]),
             _count(r.get("params")), _fmt_metrics(r["metrics"])] for r in report["rows"]]


def _footer(report: dict) -> str:
    parts = [f"peak RSS {report['peak_rss_mb']:.0f} MiB"] if report.get("peak_rss_mb") else []
    if report.get("data"):
        parts.append(f"data {report['data']}")
    text = [r for r in report["rows"] if r.get("inputs") == "data"]
    if text:
        lengths = sorted({round(r["seq_len_mean"]) for r in text})
        parts.append(f"timed on real text at natural length (mean {', '.join(map(str, lengths))} tokens per batch)")
    return " · ".join(parts)


def print_table(report: dict) -> None:
    from rich.table import Table

    from .ui import console, out_console

    t = Table(title="compress bench", caption=_footer(report), show_lines=False)
    for h in HEADERS:
        t.add_column(h, justify="left" if h in LEFT else "right")
    for r, cells in zip(report["rows"], table_rows(report)):
        s = r.get("speedup_vs_source")
        if s is not None and not r["baseline"]:
            color = "red" if s < 1 / NOT_FASTER else "yellow" if s < NOT_FASTER else "green"
            cells[11] = f"[{color}]{cells[11]}[/{color}]"
        t.add_row(*cells)
    out_console().print(t)
    for w in report.get("warnings", []):
        console().print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    for line in report.get("recommendations", []):
        console().print(f"[cyan]serving:[/cyan] {line}", soft_wrap=True)


def _env_line(report: dict) -> str:
    e = report["env"]
    return (f"CPU: {e.get('cpu')} ({e.get('cores')} cores, VNNI {'yes' if e.get('vnni') else 'no'}) · GPU: {e.get('gpu') or 'none'} · "
            f"torch {e.get('torch')} · onnxruntime {e.get('onnxruntime')}")


def markdown(report: dict) -> str:
    lines = ["# compress bench", "", _env_line(report), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" if h in LEFT else "---:" for h in HEADERS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table_rows(report)]
    if _footer(report):
        lines += ["", _footer(report)]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    if report.get("recommendations"):
        lines += ["", "## CPU serving", ""] + [f"- {r}" for r in report["recommendations"]]
    return "\n".join(lines) + "\n"


def html(report: dict) -> str:
    """A single self-contained HTML file: table, warnings, and inline SVG plots when matplotlib is installed."""
    from html import escape

    from .plots import svg_plots

    head = "".join(f"<th>{escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td class='{'l' if h in LEFT else 'r'}'>{escape(c)}</td>" for h, c in zip(HEADERS, r)) + "</tr>"
                   for r in table_rows(report))
    parts = [f"<h1>compress bench</h1><p>{escape(_env_line(report))}</p>", f"<table><tr>{head}</tr>{body}</table>",
             f"<p>{escape(_footer(report))}</p>"]
    if report.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{escape(w)}</li>" for w in report["warnings"]) + "</ul>")
    if report.get("recommendations"):
        parts.append("<h2>CPU serving</h2><ul>" + "".join(f"<li>{escape(r)}</li>" for r in report["recommendations"]) + "</ul>")
    try:
        plots = svg_plots(report)
    except ImportError:
        parts.append("<p class='note'>Plots need matplotlib, which is not installed: pip install 'compress[report]'.</p>")
    else:
        parts.append("<h2>Plots</h2>" + "".join(f"<figure><figcaption>{escape(title)}</figcaption>{svg}</figure>" for title, svg in plots))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:14px}"
             "td,th{border:1px solid #ccc;padding:4px 8px}td.r{text-align:right}td.l{text-align:left}th{background:#f3f3f3}"
             "figure{display:inline-block;margin:1em}figcaption{font-weight:bold}.note{color:#a60}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compress bench</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def to_json(report: dict) -> str:
    return json.dumps(_jsonable(report), indent=2, default=str, allow_nan=False) + "\n"


def write_reports(report: dict, directory: Path | None, settings: BenchSettings) -> list[Path]:
    """Write report.json/.md/.html into ``directory`` (pipelines) and wherever --json/--markdown/--html say, atomically."""
    written = []
    targets = []
    if directory is not None:
        targets += [(Path(directory) / "report.json", "json"), (Path(directory) / "report.md", "md"), (Path(directory) / "report.html", "html")]
    for path, kind in ((settings.json, "json"), (settings.markdown, "md"), (settings.html, "html")):
        if path:
            targets.append((Path(path), kind))
    render = {"json": to_json, "md": markdown, "html": html}
    for path, kind in targets:
        written.append(write_file_atomic(path, render[kind](report)))
    return written
