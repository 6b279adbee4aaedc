"""The benchmark harness: variants timed interleaved in one process, and the results as JSON, Markdown and a plot.

A *variant* is one way to serve a model (compress's artifact, or a peer tool's), with a loader that gives a
runner for a thread count. A runner has ``prepare(inputs) -> prepared`` (host-side conversion, not timed) and
``run(prepared)`` (timed). :func:`measure` runs *phases* (batch size × threads × input sets): in each phase all
variants are loaded with that thread count and timed by compress's own engine (:mod:`compress.timing`, the one
``compress bench`` uses): warmed up on every input set, then timed round-robin — each round gives every variant
one untimed run (to clear the previous variant's cache and spinning threads) and then ``runs`` timed runs, and the
variant order rotates every round — so a noisy machine slows them all alike and their ratios hold. Every variant
sees the same inputs in the same order.
"""
from __future__ import annotations

import gc
import io
import json
import math
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compress import timing
from compress.report import format_size
from compress.timing import Clocked, percentile

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- variants and phases
@dataclass
class Variant:
    name: str
    tool: str                                    # "compress", or the peer tool's name
    load: Callable[[int], Any] | None = None     # threads -> runner (prepare / run)
    size_bytes: int | None = None
    build_s: float | None = None                 # compression / conversion time (compress: the pipeline's stage seconds)
    quality: dict = field(default_factory=dict)  # {"accuracy": ...} or {"fidelity": ...}: the first evaluated phase's
    phase_quality: dict = field(default_factory=dict)  # phase key -> quality measured in that phase's configuration
    notes: list[str] = field(default_factory=list)
    error: str | None = None                     # why it could not be built: its rows say so instead of numbers
    info: dict = field(default_factory=dict)     # anything else worth keeping (stages, format, ...)
    phase_errors: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # phase key -> stats
    warmup_s: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Phase:
    batch_size: int
    threads: int
    inputs: list[tuple]          # input sets (tuples of tensors) cycled in order
    rounds: int = 5
    runs: int = 10               # timed runs per variant per round
    warmup: int = 2              # passes over all input sets before timing
    budget_s: float | None = None   # cap on a variant's timed seconds over the phase (spread over the rounds; ≥ 1 run a round)
    evaluate: bool | Callable = False   # measure quality with this phase's runners (after timing); a callable
                                        # replaces measure()'s evaluate for this phase (e.g. batch 1 at natural length)

    @property
    def key(self) -> str:
        return f"b{self.batch_size}-t{self.threads}"


def failed(name: str, tool: str, exc: BaseException | str, **kw) -> Variant:
    """A variant that could not be built: kept, with the reason, so the results say what was skipped."""
    return Variant(name, tool, error=exc if isinstance(exc, str) else short_error(exc), **kw)


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Size of a module's weights as ``torch.save`` writes them (what a peer would ship)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def file_bytes(path: str | Path) -> int:
    """Bytes of a model file and what it needs: for ONNX, the external-data files its tensors name (not every
    ``.data`` file lying next to it), for OpenVINO IR its .bin, for a folder, all its files."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    size = p.stat().st_size
    if p.suffix == ".xml" and p.with_suffix(".bin").is_file():      # OpenVINO IR: the graph, and its weights beside it
        size += p.with_suffix(".bin").stat().st_size
    if p.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(p), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                     for e in t.external_data if e.key == "location"}
        size += sum((p.parent / loc).stat().st_size for loc in locations if (p.parent / loc).is_file())
    return size


def output_tensor(out) -> torch.Tensor:
    """The first output of a runner's ``run`` (torch tensors, numpy arrays, tuples, HF outputs) as a torch tensor."""
    while isinstance(out, (list, tuple)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def infer(runner, inputs: tuple) -> torch.Tensor:
    with torch.inference_mode():
        return output_tensor(runner.run(runner.prepare(inputs))).detach().float().cpu()


# ---------------------------------------------------------------- timing
class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _reset_compiled() -> None:
    """torch.compile specialises on the thread count at compile time: each phase compiles afresh."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def time_interleaved(runners: dict[str, Any], inputs: list[tuple], rounds: int, runs: int, warmup: int = 2,
                     log: Callable[[str], None] | None = None,
                     budget_s: float | None = None) -> tuple[dict[str, list[float]], dict[str, str], dict[str, float]]:
    """Time every runner on the same inputs with compress's timing engine (:mod:`compress.timing`), interleaved
    round-robin in ``rounds`` rotating slices. Returns (times_ms, errors, warm-up seconds).

    Each variant cycles through ``inputs`` in order and gets ``runs`` timed runs a round (after one untimed run). With
    ``budget_s``, a variant stops a round's runs early (after at least one) once its slice of the budget is spent:
    cheap variants still get every run, a slow one fewer, and every round still samples every variant."""
    errors: dict[str, str] = {}
    warm_s: dict[str, float] = {}
    clocked: dict[str, Clocked] = {}
    for name, r in runners.items():
        t0 = time.perf_counter()
        try:
            # a fixed warm-up (two windows, or what the budget allows), the same for every variant: their timed runs
            # then start at the same input, so every variant sees the same inputs in the same order
            clocked[name] = Clocked(r, list(inputs), budget_s=budget_s or 10.0, warmup_cap=max(1, warmup) * len(inputs), settle=math.inf)
        except Exception as exc:  # noqa: BLE001 - a peer failing to run is a result, not a crash
            errors[name] = short_error(exc)
            if log:
                log(f"  {name}: failed while warming up: {errors[name]}")
        warm_s[name] = time.perf_counter() - t0
    live = list(clocked)
    total = runs * rounds
    failed = timing.time_interleaved([clocked[k] for k in live], math.inf if budget_s is None else budget_s,
                                     total if budget_s is None else rounds, total, rounds=rounds)
    for i, exc in failed.items():
        errors[live[i]] = short_error(exc)
        if log:
            log(f"  {live[i]}: failed while timing: {errors[live[i]]}")
    return {k: clocked[k].timing().times_ms for k in live if k not in errors}, errors, warm_s


def stats(times_ms: list[float], batch: int) -> dict:
    t = sorted(times_ms)
    mean = statistics.fmean(t)
    return {"p50_ms": percentile(t, 50), "p90_ms": percentile(t, 90), "p99_ms": percentile(t, 99), "mean_ms": mean, "min_ms": t[0],
            "cv": (statistics.stdev(t) / mean) if len(t) > 1 and mean else 0.0, "runs": len(t),
            "throughput_per_s": batch * 1000.0 / mean if mean else None}


def measure(variants: list[Variant], phases: list[Phase], evaluate: Callable[[Any], dict] | None = None,
            log: Callable[[str], None] | None = print) -> None:
    """Run every phase over every buildable variant; fills ``timings``, ``warmup_s``, ``phase_errors`` and ``quality``."""
    for phase in phases:
        if log:
            log(f"  timing batch {phase.batch_size}, {phase.threads} thread(s): {sum(v.ok for v in variants)} variants × "
                f"{phase.rounds} rounds × {phase.runs} runs" + (f" (≤ {phase.budget_s:g} s of timed runs each)" if phase.budget_s else ""))
        with _threads(phase.threads):
            _reset_compiled()
            runners = {}
            for v in variants:
                if not v.ok:
                    continue
                try:
                    runners[v.name] = v.load(phase.threads)
                except Exception as exc:  # noqa: BLE001
                    v.phase_errors[phase.key] = f"could not load: {short_error(exc)}"
            times, errors, warm = time_interleaved(runners, phase.inputs, phase.rounds, phase.runs, phase.warmup, log, phase.budget_s)
            by_name = {v.name: v for v in variants}
            for name, err in errors.items():
                by_name[name].phase_errors[phase.key] = err
            for name, t in times.items():
                by_name[name].timings[phase.key] = stats(t, phase.batch_size)
            for name, s in warm.items():
                by_name[name].warmup_s[phase.key] = s
            judge = phase.evaluate if callable(phase.evaluate) else evaluate if phase.evaluate else None
            if judge is not None:
                for name, r in runners.items():
                    if name in errors:
                        continue
                    try:
                        q = judge(r)
                        by_name[name].phase_quality[phase.key] = q
                        if not by_name[name].quality:
                            by_name[name].quality.update(q)
                    except Exception as exc:  # noqa: BLE001
                        by_name[name].notes.append(f"quality not measured: {short_error(exc)}")
                        if log:
                            log(f"  {name}: quality failed: {short_error(exc)}\n{traceback.format_exc(limit=3)}")
            del runners
            gc.collect()


def rows_for(variants: list[Variant], phases: list[Phase]) -> list[dict]:
    """The JSON rows: one per variant and phase; failed ones carry status and note instead of numbers."""
    rows = []
    for v in variants:
        for ph in phases:
            t = v.timings.get(ph.key)
            row = {"variant": v.name, "tool": v.tool, "batch_size": ph.batch_size, "threads": ph.threads,
                   "p50_ms": None, "p90_ms": None, "p99_ms": None, "throughput_per_s": None,
                   "size_bytes": v.size_bytes, **{k: q[k] for q in [v.phase_quality.get(ph.key, v.quality)] for k in ("accuracy", "fidelity", "fidelity_calibration_inputs") if k in q},
                   "compression_s": _round(v.build_s), "warmup_s": _round(v.warmup_s.get(ph.key))}
            if t:
                row.update({k: _round(t[k], 4) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "cv")})
                row["throughput_per_s"] = _round(t["throughput_per_s"], 2)
                row["runs"] = t["runs"]
                row["status"] = "ok"
            else:
                row["status"] = "failed"
                row["note"] = v.error or v.phase_errors.get(ph.key) or "not measured"
            if v.notes:
                row["notes"] = list(v.notes)
            if v.info:
                row["info"] = v.info
            rows.append(row)
    return rows


def _round(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


# ---------------------------------------------------------------- machine
def machine() -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), cpu)
        flags = info
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": cores, "vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx")),
            "avx512": "avx512f" in flags, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_avg_at_start": load}


# ---------------------------------------------------------------- verdicts
def verdict(target: str, passed: bool | None, measured: str) -> dict:
    """passed None: could not be judged (a side failed or was skipped); the measured text says why."""
    return {"target": target, "passed": passed, "measured": measured}


def mark(v: dict, bold: bool = False) -> str:
    """PASS / MISSED / not judged; a quick run's targets are marked indicative (its training budget is too small)."""
    m = "PASS" if v["passed"] else "not judged" if v["passed"] is None else ("**MISSED**" if bold else "MISSED")
    return f"indicative, {m}" if v.get("indicative") else m


def best(rows: list[dict], tool_is_compress: bool, key: str = "p50_ms", batch: int = 1, bar: Callable[[dict], bool] | None = None):
    """The fastest row (lowest ``key``) at ``batch`` among compress's rows or among the peers' rows, optionally meeting a bar."""
    cands = [r for r in rows if r["batch_size"] == batch and r.get(key) is not None and (r["tool"] == "compress") == tool_is_compress
             and (bar is None or bar(r))]
    return min(cands, key=lambda r: r[key]) if cands else None


# ---------------------------------------------------------------- quick vs full
CLEAR = 1.15   # a pair of variants is clearly ordered when one is at least this much faster than the other


def ordering(quick: dict, full: dict, clear: float = CLEAR) -> dict:
    """Does a quick run reproduce a full run's ordering? Compared at batch 1 over the variants both runs measured:

    - Kendall's tau between the two latency rankings (1: the same order);
    - *flips*: pairs the full run ordered clearly (one ≥ ``clear``× faster) that the quick run reverses;
    - the full run's pick against the full run's best peer, both by name: their ratio in each run, and whether the
      quick ratio lands on the same side of the suite's speed target.

    Compared by name, because a quick run's students train too briefly to meet the accuracy bar themselves: what a
    quick run can check is the speed ordering, which the training budget does not change (the architecture does).
    Where the full run's pick is a recipe the quick run does not reach (a trained student), compress's row is set
    beside it by its role instead (``role``: each run's pick against its best peer), and the verdict rests on the flips."""
    q = {r["variant"]: r["p50_ms"] for r in quick.get("rows", []) if r["batch_size"] == 1 and r.get("p50_ms")}
    f = {r["variant"]: r["p50_ms"] for r in full.get("rows", []) if r["batch_size"] == 1 and r.get("p50_ms")}
    names = [n for n in f if n in q]
    concordant = discordant = 0
    flips = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sf, sq = f[a] - f[b], q[a] - q[b]
            if sf * sq > 0:
                concordant += 1
            elif sf * sq < 0:
                discordant += 1
                fast, slow = (a, b) if sf < 0 else (b, a)
                if f[slow] / f[fast] >= clear:
                    flips.append({"faster_in_full": fast, "slower_in_full": slow, "full_ratio": round(f[slow] / f[fast], 3),
                                  "quick_ratio": round(q[slow] / q[fast], 3)})
    pairs = concordant + discordant
    out = {"compared": names, "missing_in_quick": [n for n in f if n not in q], "kendall_tau": round((concordant - discordant) / pairs, 3) if pairs else None,
           "flips": flips, "clear": clear}
    pick, metric, bar = full.get("selected"), full.get("metric", "accuracy"), full.get("quality_bar")
    peer = best(full.get("rows", []), False, bar=None if bar is None else (lambda r: r.get(metric) is not None and r[metric] >= bar))
    target = full.get("speed_target")
    if pick in f and pick in q and peer is not None and peer["variant"] in q:
        full_ratio, quick_ratio = f[peer["variant"]] / f[pick], q[peer["variant"]] / q[pick]
        out["pick"] = {"variant": pick, "peer": peer["variant"], "full_ratio": round(full_ratio, 3), "quick_ratio": round(quick_ratio, 3),
                       "target": target, "same_side": None if target is None else (full_ratio >= target) == (quick_ratio >= target),
                       # within ``clear`` of 1 (or of the target) the full run itself did not order them clearly
                       "clear_of_peer": max(full_ratio, 1 / full_ratio) >= clear,
                       "clear_of_target": target is not None and max(full_ratio / target, target / full_ratio) >= clear}
    else:
        # compress's row by its role: the quick run's pick (no training) against the quick run's best peer, beside the
        # full run's; reported, not judged (a recipe the quick run does not reach has no quick latency to compare)
        mine = best(quick.get("rows", []), True, bar=None)
        qpeer = best(quick.get("rows", []), False, bar=None if quick.get("quality_bar") is None else
                     (lambda r: r.get(metric) is not None and r[metric] >= quick["quality_bar"])) or best(quick.get("rows", []), False)
        if mine is not None and qpeer is not None and pick in f and peer is not None:
            out["role"] = {"quick_pick": mine["variant"], "quick_peer": qpeer["variant"], "quick_ratio": round(qpeer["p50_ms"] / mine["p50_ms"], 3),
                           "full_pick": pick, "full_peer": peer["variant"], "full_ratio": round(f[peer["variant"]] / f[pick], 3)}
    return out


def ordering_verdict(o: dict) -> dict:
    p = o.get("pick")
    if p is None:
        r = o.get("role")
        if r is None or len(o["compared"]) < 2:
            return verdict("quick run reproduces the full run's ordering (batch 1, 1 thread)", None,
                           "the full run's pick or its best peer was not measured in both runs")
        # the full run's pick is a recipe the quick run does not reach (it trains): judged on the variants both measured
        text = (f"Kendall's tau {o['kendall_tau']:.2f} over {len(o['compared'])} variants both runs measured; {len(o['flips'])} clear "
                f"flip(s) (pairs ≥ {o['clear']:.2f}× apart in the full run, reversed here); compress's row, not compared by name: "
                f"here {r['quick_pick']} is {r['quick_ratio']:.2f}× {r['quick_peer']}, in the full run {r['full_pick']} was "
                f"{r['full_ratio']:.2f}× {r['full_peer']}")
        if o["flips"]:
            text += "; flipped: " + ", ".join(f"{x['faster_in_full']} / {x['slower_in_full']} ({x['full_ratio']:.2f}× → {1 / x['quick_ratio']:.2f}×)"
                                              for x in o["flips"][:4])
        return verdict("quick run reproduces the full run's ordering (batch 1, 1 thread)", not o["flips"], text)
    same_direction = (p["quick_ratio"] >= 1.0) == (p["full_ratio"] >= 1.0)     # the pick is ahead of (or behind) the peer in both
    # A swap only counts where the full run was clear about it (≥ ``clear``× apart), as for the flips above.
    ok = not o["flips"] and (same_direction or not p.get("clear_of_peer", True)) \
        and (p["same_side"] is not False or not p.get("clear_of_target", True))
    text = (f"Kendall's tau {o['kendall_tau']:.2f} over {len(o['compared'])} variants; {len(o['flips'])} clear flip(s) "
            f"(pairs ≥ {o['clear']:.2f}× apart in the full run, reversed here); the full run's pick, {p['variant']}, is "
            f"{p['quick_ratio']:.2f}× its best peer {p['peer']} here vs {p['full_ratio']:.2f}× in the full run")
    if not same_direction and not p.get("clear_of_peer", True):
        text += f" (a swap within {o['clear']:.2f}×, which the full run did not order clearly either)"
    if p.get("target"):
        text += f" (target {p['target']:g}×: {'same side' if p['same_side'] else 'other side'}"
        text += ")" if p["same_side"] or p.get("clear_of_target", True) else f", but the full run was within {o['clear']:.2f}× of it)"
    if o["flips"]:
        text += "; flipped: " + ", ".join(f"{x['faster_in_full']} / {x['slower_in_full']} ({x['full_ratio']:.2f}× → {1 / x['quick_ratio']:.2f}×)"
                                          for x in o["flips"][:4])
    return verdict("quick run reproduces the full run's ordering (batch 1, 1 thread)", ok, text)


# ---------------------------------------------------------------- writing
def write_results(results: dict, out: str | Path) -> list[Path]:
    """latest.json, RESULTS.md and latency_vs_accuracy.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "latest.json"
    path.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    written.append(path)
    plot = out / "latency_vs_accuracy.png"
    try:
        plot_latency_vs_quality(results, plot)
        written.append(plot)
    except ImportError:
        plot = None
    md = out / "RESULTS.md"
    md.write_text(markdown(results, plot.name if plot else None))
    written.append(md)
    return written


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def quality_of(row: dict) -> tuple[str, float | None]:
    if row.get("accuracy") is not None:
        return "accuracy", row["accuracy"]
    if row.get("fidelity") is not None:
        return "fidelity", row["fidelity"]
    return "", None


def suite_table(suite: dict) -> list[str]:
    """One line per variant: batch-1 latency percentiles, batch-N throughput, size, quality, compression time."""
    rows = suite["rows"]
    small = [r for r in rows if r["batch_size"] == 1]
    large = {r["variant"]: r for r in rows if r["batch_size"] != 1}
    big = next(iter(large.values()), None)
    metric = suite.get("metric", "accuracy")
    head = ["variant", "tool", "p50 ms", "p90 ms", "p99 ms",
            f"items/s (b{big['batch_size']}, {big['threads']}t)" if big else "items/s", "size", metric, "compression s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 7 + ["---"]) + "|"]
    selected = suite.get("selected")
    for r in small:
        b = large.get(r["variant"], {})
        _, q = quality_of(r)
        name = f"**{r['variant']}**" if r["variant"] == selected else r["variant"]
        note = r.get("note") or b.get("note") or "; ".join(r.get("notes", [])) or ""
        comp = r.get("compression_s")
        lines.append("| " + " | ".join([
            name, r["tool"], _num(r["p50_ms"], "{:.3f}"), _num(r["p90_ms"], "{:.3f}"), _num(r["p99_ms"], "{:.3f}"),
            _num(b.get("throughput_per_s"), "{:.1f}"), format_size(r.get("size_bytes")),
            _num(q, "{:.2%}") if metric == "accuracy" else _num(q, "{:.3f}"), _num(comp, "{:.1f}"),
            note.replace("|", "\\|").replace("\n", " ")[:240]]) + " |")
    return lines


def markdown(results: dict, plot: str | None = None) -> str:
    m = results.get("machine", {})
    lines = ["# compress benchmarks", ""]
    if results.get("quick"):
        lines += ["> **Quick run** (`--quick`): batch 1 only, fewer timed runs, a short search that does not train; the figures and the targets are "
                  "indicative only; what it checks is that it reproduces the full run's latency ordering.", ""]
    lines += [f"Machine: {m.get('cpu')} · {m.get('cores')} cores · VNNI {'yes' if m.get('vnni') else 'no'} · "
              f"torch {m.get('torch')} · onnxruntime {m.get('onnxruntime')} · Python {m.get('python')} · "
              f"load average {_num(m.get('load_avg_at_start'))} at start, {_num(m.get('load_avg_at_end'))} at end.", "",
              "Latency: batch 1, 1 thread, p50/p90/p99 over all timed runs. Throughput: the larger batch with all threads. "
              "Variants are timed interleaved in one process (round-robin, rotating order, one untimed run before each "
              "variant's turn) on the same real inputs; size is the bytes on disk of what is served.", ""]
    for suite in results.get("suites", []):
        lines += [f"## {suite['name']}: {suite.get('title', '')}".rstrip(": "), ""]
        if suite.get("description"):
            lines += [suite["description"], ""]
        if suite.get("error"):
            lines += [f"**The suite failed:** {suite['error']}", ""]
        if suite.get("verdicts"):
            lines += ["Targets:", ""]
            for v in suite["verdicts"]:
                lines.append(f"- {mark(v, bold=True)} — {v['target']}: {v['measured']}")
            lines.append("")
        if suite.get("rows"):
            lines += suite_table(suite) + [""]
        if suite.get("stages"):
            lines += ["compress pipeline, stage by stage:", "", "| stage | format | " + suite.get("metric", "accuracy") + " | seconds |",
                      "|---|---|---:|---:|"]
            for s in suite["stages"]:
                q = s.get("accuracy", s.get("fidelity"))
                lines.append(f"| {s['label']} | {s.get('format', '')} | {_num(q, '{:.2%}') if 'accuracy' in s else _num(q, '{:.3f}')} | "
                             f"{_num(s.get('seconds'), '{:.1f}')} |")
            lines.append("")
        if suite.get("notes"):
            lines += ["Notes:", ""] + [f"- {n}" for n in suite["notes"]] + [""]
    if plot:
        lines += ["## Latency vs accuracy", "", f"![latency vs accuracy]({plot})", ""]
    return "\n".join(lines)


def plot_latency_vs_quality(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # ImportError without matplotlib: the caller leaves the plot out

    suites = [s for s in results.get("suites", []) if any(r["batch_size"] == 1 and r.get("p50_ms") and quality_of(r)[1] is not None
                                                          for r in s.get("rows", []))]
    if not suites:
        raise ImportError("nothing to plot")
    fig = Figure(figsize=(6.0 * len(suites), 4.5))
    for i, s in enumerate(suites):
        ax = fig.add_subplot(1, len(suites), i + 1)
        rows = [r for r in s["rows"] if r["batch_size"] == 1 and r.get("p50_ms") and quality_of(r)[1] is not None]
        bar = s.get("quality_bar")
        low = [r for r in rows if bar is not None and quality_of(r)[1] < bar - 0.25]   # e.g. a pruned model before retraining
        rows = [r for r in rows if r not in low] or rows
        if low:
            ax.text(0.01, 0.01, "not shown (far below the bar): " + ", ".join(f"{r['variant']} ({quality_of(r)[1]:.2f})" for r in low),
                    transform=ax.transAxes, fontsize=6, color="grey", va="bottom")
        for r in rows:
            metric, q = quality_of(r)
            mine = r["tool"] == "compress"
            ax.scatter(r["p50_ms"], q, color="tab:red" if mine else "tab:blue", marker="*" if r["variant"] == s.get("selected") else "o",
                       s=120 if r["variant"] == s.get("selected") else 36, zorder=3)
            ax.annotate(r["variant"], (r["p50_ms"], q), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if s.get("quality_bar") is not None:
            ax.axhline(s["quality_bar"], color="grey", linestyle="--", linewidth=1, label=f"bar ({s['quality_bar']:.3f})")
        ax.scatter([], [], color="tab:red", label="compress")
        ax.scatter([], [], color="tab:blue", label="peers")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("p50 latency, batch 1, 1 thread (ms, log)")
        ax.set_ylabel(quality_of(rows[0])[0])
        ax.set_title(s["name"])
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ort_call_floor_ms(shape: tuple[int, ...], calls: int = 2000) -> float:
    """p50 of one onnxruntime call of a graph that does nothing (Identity) on a float input of ``shape``, 1 thread:
    the per-call floor below which no ONNX model can run from Python on this machine."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    info = lambda n: onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(shape))  # noqa: E731
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "floor", [info("x")], [info("y")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = {"x": np.zeros(shape, np.float32)}
    per = []
    for _ in range(calls // 100):
        t = time.perf_counter()
        for _ in range(100):
            sess.run(None, x)
        per.append((time.perf_counter() - t) * 10)   # ms per call
    return statistics.median(per)
