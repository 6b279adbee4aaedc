"""The one timing engine: ``compress bench``, the quantize speed check, the prune sweep and ``benchmarks/`` all time
runners here.

A runner (anything with ``prepare(inputs)``, ``run(prepared)``, ``sync()``, ``threads_set()`` and ``device``) is
warmed up until the median of one window of runs is within 5% of the previous window's (:class:`Clocked`), then
timed. :func:`time_interleaved` times several runners round-robin in rotating slices, each after one untimed run,
so the machine's drifts hit them all alike and their ratios hold. CPU time is ``perf_counter_ns``; on CUDA, torch
work is timed with CUDA events and the host-to-device copy of the inputs apart from compute.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

WARMUP_WINDOW = 5          # runs per warm-up window
WARMUP_SETTLE = 0.05       # warm-up ends when a window's median is within 5% of the previous one
INTERLEAVE_ROUNDS = 5      # runners are timed in this many interleaved slices each


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
        return {"p50_ms": percentile(t, 50), "p90_ms": percentile(t, 90), "p99_ms": percentile(t, 99), "mean_ms": mean, "std_ms": std,
                "min_ms": t[0], "cv": std / mean if mean else 0.0, "spread": spread(t), "runs": len(t), "warmup_runs": self.warmup_runs,
                "throughput_per_s": batch * 1000.0 / mean if mean else 0.0, "h2d_ms": self.h2d_ms, "clock": self.clock}


def spread(sorted_times: list[float]) -> float:
    """A robust coefficient of variation: interquartile range / 1.349 / median. It equals the cv for normally
    distributed timings, but one scheduler hiccup among thousands of sub-millisecond runs does not move it."""
    med = percentile(sorted_times, 50)
    return (percentile(sorted_times, 75) - percentile(sorted_times, 25)) / 1.349 / med if med else 0.0


def percentile(sorted_times: list[float], q: float) -> float:
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
        cuda = str(getattr(runner, "device", "cpu")).startswith("cuda")
        gc.collect()
        with torch.inference_mode(), _threads(runner):
            if cuda:
                sets = [tuple(x.pin_memory() for x in s) for s in sets]
            self.prepared = [runner.prepare(s) for s in sets]
            _sync(runner)
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
        with torch.inference_mode(), _threads(self.runner):
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
            except Exception as exc:  # noqa: BLE001 - a runner failing mid-timing is reported, the others go on
                errors[i] = exc
    return errors


def _threads(runner):
    """The runner's thread setting while timing (runners of other tools may have none)."""
    return runner.threads_set() if hasattr(runner, "threads_set") else contextlib.nullcontext()


def _sync(runner) -> None:
    if hasattr(runner, "sync"):
        runner.sync()


def _host_clock(runner):
    """Wall time of one run; on CUDA (runners that do not hand torch tensors, e.g. onnxruntime) after a sync."""
    def once(prepared) -> float:
        t0 = time.perf_counter_ns()
        runner.run(prepared)
        _sync(runner)
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
