"""Latency, throughput, size and accuracy of artifacts, measured the same way for every format.

Warm-up runs until the running median settles (with a cap), then timed runs until a time budget or a
count is reached. CPU time is taken with ``perf_counter_ns``; CUDA with events after synchronising.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import Artifact
from .errors import CompressError
from .outputs import write_file_atomic
from .runners import load_runner

NOISY_CV = 0.15


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
        s = cls(devices=_list(o.get("device", "cpu"), str, "device"), batch_sizes=_list(o.get("batch_size", 1), int, "batch_size"),
                threads=_list(o.get("threads", 1), int, "threads"), data=o.get("data", data),
                limit=int(o.get("limit", 512)), budget_s=float(o.get("budget_s", 2.0)),
                min_runs=int(o.get("min_runs", 10)), max_runs=int(o.get("max_runs", 1000)),
                json=o.get("json"), markdown=o.get("markdown"), html=o.get("html"))
        for d in s.devices:
            if d not in ("cpu", "cuda"):
                raise CompressError(f"device '{d}' is not cpu or cuda", "Use --device cpu or --device cpu,cuda")
        if any(b < 1 for b in s.batch_sizes) or any(t < 1 for t in s.threads):
            raise CompressError("batch sizes and thread counts must be at least 1", "e.g. --batch-size 1,32 --threads 1,2")
        if s.budget_s <= 0 or s.min_runs < 1 or s.max_runs < s.min_runs:
            raise CompressError("budget_s must be > 0 and 1 <= min_runs <= max_runs", "Fix the bench settings")
        return s


def _list(value, typ, name) -> tuple:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = tuple(typ(str(v).strip()) for v in items if str(v).strip())
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
    h2d_ms: float | None = None

    def stats(self, batch: int) -> dict:
        t = sorted(self.times_ms)
        mean = statistics.fmean(t)
        std = statistics.pstdev(t) if len(t) > 1 else 0.0
        return {"p50_ms": _pct(t, 50), "p90_ms": _pct(t, 90), "p99_ms": _pct(t, 99), "mean_ms": mean, "std_ms": std,
                "cv": std / mean if mean else 0.0, "runs": len(t), "warmup_runs": self.warmup_runs,
                "throughput_per_s": batch * 1000.0 / _pct(t, 50) if t else 0.0, "h2d_ms": self.h2d_ms}


def _pct(sorted_times: list[float], q: float) -> float:
    if not sorted_times:
        return float("nan")
    k = (len(sorted_times) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (k - lo)


def time_runner(runner, inputs, budget_s: float = 2.0, min_runs: int = 10, max_runs: int = 1000,
                warmup_cap: int = 50, settle: float = 0.05) -> Timing:
    """Warm up until the median of the last 5 runs moves less than ``settle``, then time until budget/count."""
    cuda = runner.device.startswith("cuda")
    with torch.inference_mode(), runner.threads_set():
        prepared = runner.prepare(inputs)
        runner.sync()
        h2d = None
        if cuda:
            t0 = time.perf_counter_ns()
            for _ in range(5):
                runner.prepare(inputs)
            runner.sync()
            h2d = (time.perf_counter_ns() - t0) / 5e6
        warm: list[float] = []
        prev = None
        while len(warm) < warmup_cap:
            warm.append(_once(runner, prepared, cuda))
            if len(warm) >= 5:
                med = statistics.median(warm[-5:])
                if prev is not None and abs(med - prev) <= settle * prev:
                    break
                prev = med
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
            times.append(_once(runner, prepared, cuda))
    return Timing(times, len(warm), h2d)


def _once(runner, prepared, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.run(prepared)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter_ns()
    runner.run(prepared)
    return (time.perf_counter_ns() - t0) / 1e6


# ---------------------------------------------------------------- benchmarking artifacts
def stage_of(label: str, art: Artifact) -> str:
    if label == "source" or not art.stages:
        return "source"
    return art.stages[-1]["stage"]


def param_count(art: Artifact) -> int | None:
    if art.model is not None and hasattr(art.model, "parameters"):
        n = sum(p.numel() for p in art.model.parameters())
        packed = sum(_packed_numel(m) for m in art.model.modules())
        return n + packed
    if art.format == "onnx" and art.path:
        import onnx

        g = onnx.load(str(art.path), load_external_data=False).graph
        return sum(math.prod(i.dims) for i in g.initializer)
    return None


def _packed_numel(m) -> int:
    w = getattr(m, "weight", None)
    if callable(w) and not isinstance(m, torch.nn.Parameter):
        try:
            return w().numel()
        except Exception:  # noqa: BLE001
            return 0
    return 0


def bench_artifacts(artifacts: list[tuple[str, Artifact]], settings: BenchSettings, quiet: bool = False) -> dict:
    """Measure every artifact × device × batch × threads; returns the contract's report dict."""
    from .ui import progress

    bundle = None
    if settings.data:
        from .data import load_data

        bundle = load_data(settings.data)
    rows: list[dict] = []
    total = len(artifacts) * len(settings.devices) * len(settings.batch_sizes) * len(settings.threads)
    peak_before = _peak_rss_mb()
    with progress(quiet) as bar:
        task = bar.add_task("benchmarking", total=total, info="")
        for device in settings.devices:
            reference_outputs: dict[int, tuple] = {}
            reference_runner = None
            for idx, (label, art) in enumerate(artifacts):
                quality = None
                for threads in settings.threads:
                    runner = load_runner(art, device, threads)
                    if idx == 0 and reference_runner is None:
                        reference_runner = runner
                    if quality is None:
                        quality = _quality(runner, reference_runner, bundle, settings, idx) or {}
                    for batch in settings.batch_sizes:
                        bar.update(task, info=f"{label} {device} b{batch} t{threads}")
                        inputs = tuple(s.example(batch, seed=i) for i, s in enumerate(art.input_spec))
                        outputs = runner(*inputs)
                        metrics = dict(quality)
                        if idx == 0:
                            reference_outputs[batch] = outputs
                        elif batch in reference_outputs:
                            metrics["max_abs_diff_vs_source"] = float((outputs[0].float() - reference_outputs[batch][0].float()).abs().max())
                        timing = time_runner(runner, inputs, settings.budget_s, settings.min_runs, settings.max_runs)
                        row = {"artifact": str(art.path or art.source), "label": label, "stage": stage_of(label, art),
                               "format": art.format, "device": device, "batch_size": batch, "threads": threads}
                        row.update(timing.stats(batch))
                        row["size_bytes"] = art.size_bytes()
                        row["params"] = param_count(art)
                        row["metrics"] = metrics
                        rows.append(row)
                        bar.advance(task)
    _speedups(rows)
    report = {"env": _env(), "rows": rows, "peak_rss_mb": max(_peak_rss_mb(), peak_before),
              "data": settings.data}
    report["warnings"] = warnings_for(rows)
    if not quiet:
        print_table(report)
    return report


def _quality(runner, reference, bundle, settings: BenchSettings, idx: int) -> dict | None:
    if bundle is None:
        return None
    from .evaluate import accuracy, fidelity

    if bundle.labelled:
        try:
            return {"accuracy": accuracy(runner, bundle, settings.limit)["accuracy"]}
        except CompressError:
            pass
    if idx == 0:
        return {}
    f = fidelity(runner, reference, bundle, settings.limit)
    return {k: v for k, v in f.items() if k != "samples"}


def _speedups(rows: list[dict]) -> None:
    base = {(r["device"], r["batch_size"], r["threads"]): r["p50_ms"] for r in rows if r["stage"] == "source"}
    src_acc = {(r["device"]): r["metrics"].get("accuracy") for r in rows if r["stage"] == "source"}
    for r in rows:
        b = base.get((r["device"], r["batch_size"], r["threads"]))
        r["speedup_vs_source"] = (b / r["p50_ms"]) if b and r["p50_ms"] else None
        acc, ref = r["metrics"].get("accuracy"), src_acc.get(r["device"])
        if acc is not None and ref is not None:
            r["metrics"]["accuracy_delta"] = acc - ref


def warnings_for(rows: list[dict]) -> list[str]:
    """Flag noisy measurements and stages that did not make the model faster, with the likely cause."""
    out = []
    for r in rows:
        where = f"{r['label']} ({r['format']}, {r['device']}, batch {r['batch_size']}, {r['threads']} thread(s))"
        if r["cv"] > NOISY_CV:
            out.append(f"{where}: timings vary by {r['cv']:.0%} (coefficient of variation); close other programs and rerun")
        s = r.get("speedup_vs_source")
        if r["stage"] != "source" and s is not None and s < 1.05:
            out.append(f"{where}: no faster than the source ({s:.2f}x)" + (f"; likely cause: {likely_cause(r)}" if likely_cause(r) else ""))
    return out


def likely_cause(row: dict) -> str | None:
    stage, fmt, dev = row["stage"], row["format"], row["device"]
    if stage == "prune" and fmt == "torch":
        return "unstructured sparsity (zeros) does not speed up dense kernels; use structured pruning"
    if fmt == "torch-quantized" and dev == "cpu":
        return "dynamic int8 only quantizes Linear/LSTM layers; convolutions stay fp32 and gain nothing (use static int8)"
    if fmt == "onnx" and row.get("metrics", {}).get("dtype") == "float16" and dev == "cpu":
        return "fp16 is slow on CPUs; keep fp32 or int8 for CPU"
    if stage == "quantize" and dev == "cpu" and not _has_vnni():
        return "this CPU has no VNNI int8 instructions"
    if row["batch_size"] == 1 and row["p50_ms"] < 0.2:
        return "the model is so small that per-call overhead dominates"
    return None


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx" in flags


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
            "cores": os.cpu_count(), "compress": env.get("compress"), "vnni": _has_vnni()}


# ---------------------------------------------------------------- reports
def _fmt_metrics(m: dict) -> str:
    parts = []
    if "accuracy" in m:
        parts.append(f"acc {m['accuracy']:.2%}" + (f" ({m['accuracy_delta']:+.2%})" if "accuracy_delta" in m else ""))
    if "top1_agreement" in m:
        parts.append(f"top1 {m['top1_agreement']:.1%}")
    if "cosine" in m:
        parts.append(f"cos {m['cosine']:.4f}")
    if "max_abs_diff_vs_source" in m:
        parts.append(f"Δmax {m['max_abs_diff_vs_source']:.2g}")
    return ", ".join(parts)


def _size(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def table_rows(report: dict) -> list[list[str]]:
    return [[r["label"], r["format"], r["device"], str(r["batch_size"]), str(r["threads"]), f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['throughput_per_s']:.1f}",
             f"{r['speedup_vs_source']:.2f}x" if r.get("speedup_vs_source") else "-", _size(r["size_bytes"]),
             _fmt_metrics(r["metrics"])] for r in report["rows"]]


HEADERS = ["stage", "format", "device", "batch", "threads", "p50 ms", "p90 ms", "items/s", "speedup", "size", "accuracy / fidelity"]


def print_table(report: dict) -> None:
    from rich.table import Table

    from .ui import console, out_console

    t = Table(title="compress bench", show_lines=False)
    for h in HEADERS:
        t.add_column(h, justify="right" if h not in ("stage", "format", "device", "accuracy / fidelity") else "left")
    for row in table_rows(report):
        t.add_row(*row)
    out_console().print(t)
    for w in report.get("warnings", []):
        console().print(f"[yellow]warning:[/yellow] {w}")


def markdown(report: dict) -> str:
    lines = ["# compress bench", "", f"CPU: {report['env'].get('cpu')} · GPU: {report['env'].get('gpu') or 'none'} · "
             f"torch {report['env'].get('torch')} · onnxruntime {report['env'].get('onnxruntime')}", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def html(report: dict) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(report))
    warn = "".join(f"<li>{escape(w)}</li>" for w in report.get("warnings", []))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compress bench</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>"
            f"</head><body><h1>compress bench</h1><p>{escape(str(report['env'].get('cpu')))}</p><table><tr>{head}</tr>{body}</table>"
            f"{'<h2>Warnings</h2><ul>' + warn + '</ul>' if warn else ''}</body></html>")


def write_reports(report: dict, directory: Path | None, settings: BenchSettings) -> list[Path]:
    """Write report.json/.md/.html into ``directory`` (pipelines) and wherever --json/--markdown/--html say."""
    written = []
    targets = []
    if directory is not None:
        targets += [(Path(directory) / "report.json", "json"), (Path(directory) / "report.md", "md"), (Path(directory) / "report.html", "html")]
    for path, kind in ((settings.json, "json"), (settings.markdown, "md"), (settings.html, "html")):
        if path:
            targets.append((Path(path), kind))
    for path, kind in targets:
        text = json.dumps(report, indent=2, default=str) if kind == "json" else markdown(report) if kind == "md" else html(report)
        written.append(write_file_atomic(path, text))
    return written
