"""Benchmark compress against peer tools on real pretrained models and real offline data.

    python benchmarks/run.py [--suite text|vision|fmnist ...] [--quick] [--out DIR]

Writes DIR/latest.json, DIR/RESULTS.md and DIR/latency_vs_accuracy.png (DIR defaults to benchmarks/results, and
to benchmarks/results/quick with --quick, so a quick run never replaces the published full run).
``--quick`` keeps every peer but times batch 1 only, with fewer runs, and its search does not train; its figures are indicative only. It then
checks that it reproduces the full run's ordering (``--compare``, default benchmarks/results/latest.json).
Run it on a quiet machine for numbers worth publishing: variants are interleaved so their ratios hold under
noise, but absolute latencies do not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import DEFAULT_OUT, machine, mark, ordering, ordering_verdict, short_error, write_results  # noqa: E402
from benchmarks.suites import SUITES, Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", choices=sorted(SUITES), help="suite to run (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="batch 1 only, fewer timed runs, a 90-second search without training (same peers)")
    p.add_argument("--out", default=None, help="where latest.json, RESULTS.md and the plot go (default: benchmarks/results, "
                                               "or benchmarks/results/quick with --quick)")
    p.add_argument("--compare", default=str(DEFAULT_OUT / "latest.json"),
                   help="--quick: the full run whose ordering the quick run should reproduce (default: %(default)s)")
    p.add_argument("--work", default=None, help="scratch folder for pipeline outputs and peer exports (default: a temporary folder)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="trained teachers are kept here between runs")
    p.add_argument("--merge", action="store_true", help="keep the other suites already in OUT/latest.json (each keeps its own machine record)")
    p.add_argument("--threads", type=int, default=None, help="threads for the large-batch phase (default: all cores)")
    a = p.parse_args(argv)
    a.out = a.out or str(DEFAULT_OUT / "quick" if a.quick else DEFAULT_OUT)
    names = a.suite or list(SUITES)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")                  # peers' deprecation chatter; failures are recorded per variant
    logging.getLogger("torch").setLevel(logging.ERROR)
    torch._logging.set_logs(all=logging.ERROR)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = a.threads or cores
    torch.set_num_threads(threads)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="compress-bench-"))
    started = time.perf_counter()
    settings = Settings(quick=a.quick, work=work, cache=Path(a.cache), threads=threads,
                        log=lambda m: print(f"[{time.perf_counter() - started:5.0f}s] {m}", flush=True))
    results = {"machine": machine(), "quick": a.quick, "suites": []}
    for name in names:
        t0 = time.perf_counter()
        print(f"== suite {name}{' (quick)' if a.quick else ''}", flush=True)
        try:
            suite = SUITES[name](settings)
        except Exception as exc:  # noqa: BLE001 - one broken suite must not hide the others' results
            traceback.print_exc()
            suite = {"name": name, "error": short_error(exc), "rows": [], "verdicts": [], "notes": []}
        suite["seconds"] = round(time.perf_counter() - t0, 1)
        results["suites"].append(suite)
        for v in suite.get("verdicts", []):
            v["indicative"] = a.quick     # a quick run judges its ordering (below), not the targets
            print(f"   {mark(v)}: {v['target']}: {v['measured']}", flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results["seconds"] = round(time.perf_counter() - started, 1)
    if a.quick:
        compare_with_full(results, Path(a.compare))
    for suite in results["suites"]:
        suite["machine"] = results["machine"]
    previous = Path(a.out) / "latest.json"
    if a.merge and previous.exists():
        old = json.loads(previous.read_text())
        kept = [{"machine": old.get("machine"), **x} for x in old.get("suites", []) if x["name"] not in names]
        results["suites"] = sorted(kept + results["suites"], key=lambda x: list(SUITES).index(x["name"]) if x["name"] in SUITES else 99)
    for path in write_results(results, a.out):
        print(f"wrote {path}")
    return 0


def compare_with_full(results: dict, path: Path) -> None:
    """Add to each quick suite whether it reproduces the full run's ordering (a verdict, and the details)."""
    if not path.is_file():
        print(f"no full run at {path} to compare the quick run's ordering with", flush=True)
        return
    full = json.loads(path.read_text())
    here = results["machine"]
    for suite in results["suites"]:
        ref = next((x for x in full.get("suites", []) if x["name"] == suite["name"] and x.get("rows")), None)
        if ref is None or not suite.get("rows"):
            continue
        o = ordering(suite, ref)
        there = ref.get("machine") or full.get("machine") or {}
        same = all(there.get(k) == here.get(k) for k in ("cpu", "cores", "vnni", "avx512"))
        o["full_run"] = {"path": str(path), "machine": {k: there.get(k) for k in ("cpu", "cores", "vnni", "avx512")}, "same_kind_of_machine": same}
        suite["ordering"] = o
        v = ordering_verdict(o)
        if not same:
            v["measured"] += " (the full run was on another kind of CPU, so its ordering may differ for real)"
        suite.setdefault("verdicts", []).append(v)
        print(f"   {suite['name']}: {mark(v)}: {v['target']}: {v['measured']}", flush=True)
    took = results["seconds"]
    print(f"quick run took {took / 60:.1f} min" + ("" if took <= 600 else " (over the 10-minute goal)"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
