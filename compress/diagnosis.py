"""Reading a bench's rows as a person would: timings too noisy to trust, stages that did not make the model faster
and their likely cause, a machine too busy to measure on, and threads vs processes for CPU serving."""
from __future__ import annotations

import os

from .cpu import has_vnni

NOISY_CV = 0.15            # spread (robust coefficient of variation) above which a row is flagged as too noisy
NOT_FASTER = 1.05          # a stage must beat the source by 5% to count as faster


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


def best_split(throughput_by_threads: dict[int, float], cores: int) -> tuple[int, int, float]:
    """How to spend ``cores`` on serving: (threads per process, processes, estimated items/s) with the most throughput,
    from a thread sweep (processes are assumed not to slow each other)."""
    return max(((t, cores // t, tp * (cores // t)) for t, tp in sorted(throughput_by_threads.items()) if t <= cores), key=lambda o: o[2])


def recommendations(rows: list[dict]) -> list[str]:
    """For CPU serving: from the thread sweep, whether several single-threaded processes beat one threaded process."""
    cores = cpu_count()
    out = []
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["device"] == "cpu":
            groups.setdefault((r["label"], r["batch_size"]), {})[r["threads"]] = r
    for (label, batch), by_threads in groups.items():
        usable = {t: r for t, r in by_threads.items() if t <= cores}
        if len(usable) < 2:
            continue
        top = max(usable)
        single = usable[top]["throughput_per_s"]
        t, procs, est = best_split({t: r["throughput_per_s"] for t, r in usable.items()}, cores)
        if (t, procs) == (top, cores // top):
            out.append(f"{label}, batch {batch}: {top} threads × {cores // top} process(es) is best on this {cores}-core machine "
                       f"({single * (cores // top):.1f} items/s)")
        else:
            out.append(f"{label}, batch {batch}: {t} thread{'s' * (t > 1)} × {procs} processes gives ~{est:.1f} items/s vs {top} threads × 1 "
                       f"process {single:.1f} items/s (estimate from the thread sweep on {cores} cores: processes are assumed not to slow each other)")
    return out


def load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_warning(load: float | None, own_threads: int) -> str | None:
    """Other programs competing for the CPUs make timings (multi-threaded ones most) unreliable."""
    cores = cpu_count()
    if load is None or load - own_threads <= 0.5 * cores:
        return None
    return (f"the machine was busy while measuring (load average {load:.1f} on {cores} cores, of which this bench "
            f"accounts for at most {own_threads}); other programs competed for the CPUs, so timings, multi-threaded ones "
            "most, are unreliable: rerun on a quiet machine")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
