"""compress bench: the timing loop, statistics, multi-format benching, reports, the CLI and the pipeline bench section."""
from __future__ import annotations

import json
import os
import re
import sys
import statistics
import time

import pytest
import torch
from torch import nn

from compress import diagnosis, measure
from compress import report as report_mod
from compress.artifact import Artifact, save
from compress.measure import BenchSettings, bench_artifacts
from compress.timing import Timing, time_runner
from cli import main
from compress.errors import CompressError
from compress.runners import load_runner
from compress.inputs import parse_input_shapes

CONTRACT_ROW = {"artifact", "stage", "format", "device", "batch_size", "threads", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                "std_ms", "throughput_per_s", "size_bytes", "speedup_vs_source", "metrics"}

TINY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.features(x))
'''


def _load(path, **kw):
    import compress.sources as sources

    return sources.load(str(path), **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny conv classifier as a state dict, a traced TorchScript file and an ONNX file, plus labelled data whose
    labels are the model's own predictions (so every faithful format scores 100%)."""
    d = tmp_path_factory.mktemp("bench")
    (d / "tiny.py").write_text(TINY)
    sys.path.insert(0, str(d))
    try:
        from tiny import Net
    finally:
        sys.path.remove(str(d))
    torch.manual_seed(0)
    model = Net().eval()
    torch.save(model.state_dict(), d / "net.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.jit.trace(model, x).save(str(d / "net.ts.pt"))
        torch.onnx.export(model, (x,), str(d / "net.onnx"), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        torch.onnx.export(model, (x,), str(d / "static.onnx"), input_names=["input"], output_names=["logits"], dynamo=False)
        inputs = torch.randn(80, 3, 32, 32)
        labels = model(inputs).argmax(1)
    torch.save({"inputs": inputs, "labels": labels}, d / "data.pt")
    return {"dir": d, "arch": f"{d / 'tiny.py'}:Net", "model": model, "pt": d / "net.pt", "ts": d / "net.ts.pt",
            "onnx": d / "net.onnx", "static": d / "static.onnx", "data": f"tensors:{d / 'data.pt'}"}


def _torch_artifact(model, shape="1x3x32x32", **kw):
    return Artifact("torch", parse_input_shapes([shape]), "test", model=model.eval(), **kw)


class SleepRunner:
    """A runner whose n-th run takes durations[n] seconds (then the last one), for testing the loop itself."""

    device, threads = "cpu", None

    def __init__(self, durations):
        self.durations, self.calls, self.seen = durations, 0, []

    def threads_set(self):
        import contextlib

        return contextlib.nullcontext()

    def prepare(self, inputs):
        return inputs

    def sync(self):
        pass

    def run(self, prepared):
        self.seen.append(prepared[0].shape[0])
        time.sleep(self.durations[min(self.calls, len(self.durations) - 1)])
        self.calls += 1
        return prepared


# ---------------------------------------------------------------- the timing loop
def test_statistics_are_percentiles_mean_std_cv_and_throughput():
    s = Timing([float(v) for v in range(100, 0, -1)], warmup_runs=3).stats(batch=4)
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["std_ms"] == pytest.approx(29.011, abs=1e-3)          # sample standard deviation
    assert s["cv"] == pytest.approx(29.011 / 50.5, abs=1e-4)
    assert s["spread"] == pytest.approx((75.25 - 25.75) / 1.349 / 50.5, abs=1e-4)   # IQR / 1.349 / median
    assert s["throughput_per_s"] == pytest.approx(4 * 1000 / 50.5)
    assert s["runs"] == 100 and s["warmup_runs"] == 3


def test_one_outlier_among_many_runs_moves_the_cv_but_not_the_spread_or_the_noise_warning():
    from compress.diagnosis import NOISY_CV, warnings_for

    times = [1.0 + 0.01 * (i % 10) for i in range(999)] + [60.0]       # one scheduler hiccup in 1000 runs
    s = Timing(times, warmup_runs=1).stats(batch=1)
    assert s["cv"] > NOISY_CV and s["spread"] < 0.05
    row = {"label": "x", "stage": "export", "format": "onnx", "device": "cpu", "batch_size": 1, "threads": 1,
           "baseline": True, **s}
    assert not any("too noisy" in w for w in warnings_for([row], {"vnni": True}))
    assert any("too noisy" in w for w in warnings_for([dict(row, spread=0.3)], {"vnni": True}))


def test_warmup_runs_until_the_median_settles():
    # 5 slow-then-faster runs, then steady 2 ms: window 1 (median 6 ms) vs window 2 (2 ms) differ, window 3 agrees
    r = SleepRunner([0.010, 0.008, 0.006, 0.004, 0.003, 0.002])
    # settle=25%: far apart from 6 ms vs 2 ms, and wide enough that a VM's sleep jitter (2.1 vs 2.3 ms) is not a miss
    t = time_runner(r, (torch.zeros(1, 2),), budget_s=1.0, min_runs=5, max_runs=20, settle=0.25)
    assert t.warmup_runs == 15
    assert 1.5 < t.stats(1)["p50_ms"] < 6


def test_warmup_is_capped_and_timed_runs_respect_count_and_budget():
    # alternating windows never settle: warm-up stops at the cap
    r = SleepRunner([0.001] * 5 + [0.004] * 5 + [0.001] * 5 + [0.004] * 5 + [0.001] * 5 + [0.004] * 5 + [0.001])
    t = time_runner(r, (torch.zeros(1, 2),), budget_s=5.0, min_runs=3, max_runs=12, warmup_cap=30)
    assert t.warmup_runs == 30 and len(t.times_ms) == 12                      # max_runs ends a long budget
    t = time_runner(SleepRunner([0.001]), (torch.zeros(1, 2),), budget_s=1e-6, min_runs=7, max_runs=100)
    assert len(t.times_ms) == 7                                                 # min_runs outlasts a tiny budget
    started = time.perf_counter()
    t = time_runner(SleepRunner([0.001]), (torch.zeros(1, 2),), budget_s=0.2, min_runs=1, max_runs=100000)
    assert 0.2 <= time.perf_counter() - started < 1.5 and 20 < len(t.times_ms) < 200


def test_timing_cycles_through_a_fixed_set_of_input_batches():
    r = SleepRunner([0.0])
    sets = [(torch.zeros(n, 2),) for n in (1, 2, 3)]
    t = time_runner(r, sets, budget_s=1e-6, min_runs=6, max_runs=6, warmup_cap=6)
    assert r.seen == [1, 2, 3] * ((t.warmup_runs + 6) // 3) + [1, 2, 3][: (t.warmup_runs + 6) % 3]


class DriftRunner(SleepRunner):
    """Sleeps ``base`` seconds, times ``clock["slow"]``: a machine whose speed drifts, shared by every runner."""

    def __init__(self, base, clock):
        super().__init__([base])
        self.base, self.clock = base, clock

    def run(self, prepared):
        self.calls += 1
        time.sleep(self.base * self.clock["slow"])
        return prepared


def test_interleaved_timing_keeps_the_ratio_when_the_machine_slows_down_halfway():
    from compress.timing import Clocked, time_interleaved

    def measure(interleave: bool) -> float:
        clock = {"slow": 1.0}
        a, b = DriftRunner(0.002, clock), DriftRunner(0.004, clock)       # b is truly 2x slower than a
        ca, cb = Clocked(a, (torch.zeros(1),), budget_s=0.05), Clocked(b, (torch.zeros(1),), budget_s=0.05)
        if interleave:
            def drift(r):
                clock["slow"] = 3.0 if r >= 2 else 1.0                     # the machine slows down from round 3 on
            assert time_interleaved([ca, cb], 0.3, 10, 10_000, rounds=4, on_round=drift) == {}
        else:
            ca.run_for(0.3, 10, 10_000)
            clock["slow"] = 3.0                                             # ... while b is being timed
            cb.run_for(0.3, 10, 10_000)
        ta, tb = ca.timing().stats(1), cb.timing().stats(1)
        assert ta["runs"] >= 10 and tb["runs"] >= 10
        return statistics.fmean(cb.times) / statistics.fmean(ca.times)

    assert measure(interleave=False) > 4.0          # one after the other: b looks 6x slower
    assert 1.5 < measure(interleave=True) < 2.7     # interleaved: both see the same drift, the ratio stays near 2


def test_interleaved_slices_rotate_start_with_an_untimed_run_and_drop_a_runner_that_fails():
    from compress.timing import Clocked, time_interleaved

    calls: list = []

    class Named(SleepRunner):
        def __init__(self, name, fail_at=None):
            super().__init__([0.0])
            self.name, self.fail_at = name, fail_at

        def run(self, prepared):
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RuntimeError("device lost")
            calls.append(self.name)
            return prepared

    x, y, z = Named("x"), Named("y"), Named("z", fail_at=7)    # z: 2 warm-up runs, then fails in its 2nd slice
    cs = [Clocked(r, (torch.zeros(1),), budget_s=1e-6, warmup_cap=10) for r in (x, y, z)]
    calls.clear()
    errors = time_interleaved(cs, 1e-6, 6, 6, rounds=3, on_round=lambda r: calls.append("|"))
    assert {i: str(e) for i, e in errors.items()} == {2: "device lost"}
    rounds = ["".join(dict.fromkeys(chunk)) for chunk in "".join(calls).split("|")[1:]]
    assert rounds == ["xyz", "yzx", "xy"]          # the order rotates; z is dropped after failing in round 2
    assert len(cs[0].times) == len(cs[1].times) == 6
    assert x.calls - cs[0].warmup_runs == 6 + 3     # 6 timed runs + 1 untimed run before each of 3 slices


def test_harness_median_agrees_with_torch_utils_benchmark():
    """Our median and torch.utils.benchmark.Timer's median on the same conv model, 1 thread, within 25%."""
    from torch.utils.benchmark import Timer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 3, 64, 64)
    runner = load_runner(_torch_artifact(model, "1x3x64x64"), "cpu", threads=1)

    def call():
        with torch.inference_mode():
            model(x)

    ratios = []
    for attempt in range(3):    # the best of up to three attempts (order alternating), for a busy 2-core machine
        if attempt % 2:
            b = Timer("call()", globals={"call": call}, num_threads=1).blocked_autorange(min_run_time=1.0).median * 1e3
        a = time_runner(runner, (x,), budget_s=1.0, min_runs=20, max_runs=5000).stats(1)["p50_ms"]
        if not attempt % 2:
            b = Timer("call()", globals={"call": call}, num_threads=1).blocked_autorange(min_run_time=1.0).median * 1e3
        assert 0.5 < b < 200, f"the check model should take milliseconds, took {b:.2f} ms"
        ratios.append(a / b)
        if abs(ratios[-1] - 1) <= 0.25:
            break
    assert min(abs(r - 1) for r in ratios) <= 0.25, f"compress/torch.utils.benchmark median ratios {ratios}"


def test_a_long_timing_loop_keeps_memory_flat():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    runner = load_runner(_torch_artifact(model, "8x64"), "cpu", threads=1)
    x = (torch.randn(8, 64),)
    time_runner(runner, x, budget_s=1e-6, min_runs=300, max_runs=300)     # allocator warm
    before = measure._rss_mb()
    started = time.perf_counter()
    t = time_runner(runner, x, budget_s=1e-6, min_runs=2000, max_runs=2000)
    growth = measure._rss_mb() - before
    assert len(t.times_ms) == 2000 and time.perf_counter() - started < 30
    assert growth < 8, f"RSS grew by {growth:.1f} MiB over 2000 runs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_cuda_uses_events_and_reports_host_to_device_copies_apart():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
    runner = load_runner(_torch_artifact(model, "1x3x64x64"), "cuda", threads=1)
    t = time_runner(runner, (torch.randn(8, 3, 64, 64),), budget_s=0.2)
    assert t.clock == "cuda-events" and t.h2d_ms is not None and t.h2d_ms > 0
    assert t.stats(8)["p50_ms"] > 0


# ---------------------------------------------------------------- benchmarking artifacts
def test_torch_torchscript_and_onnx_are_benched_side_by_side(files):
    shapes = ["1x3x32x32"]
    source = _load(files["pt"], arch=files["arch"], input_shape=shapes)
    ts = _load(files["ts"], input_shape=shapes)
    onnx_art = _load(files["onnx"])
    sparse_model = _load(files["pt"], arch=files["arch"], input_shape=shapes).model
    with torch.no_grad():
        for p in sparse_model.parameters():
            if p.dim() > 1:
                p[torch.rand_like(p) < 0.6] = 0
    pruned = source.evolve(model=sparse_model, stages=[{"stage": "prune", "method": "magnitude", "config": {}}])
    settings = BenchSettings.from_options({"batch_size": "1,4", "budget_s": 0.05, "min_runs": 5, "limit": 64}, files["data"])
    report = bench_artifacts([("source", source), ("ts", ts), ("onnx", onnx_art), ("pruned", pruned)], settings)

    rows = report.rows
    assert [(r["label"], r["batch_size"]) for r in rows] == [(a, b) for a in ("source", "ts", "onnx", "pruned") for b in (1, 4)]
    assert not report.skipped
    for r in rows:
        assert CONTRACT_ROW <= set(r)
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"])
        assert r["metrics"]["samples"] == 16
    by = {(r["label"], r["batch_size"]): r for r in rows}
    assert by["source", 1]["speedup_vs_source"] == 1.0 and by["source", 1]["stage"] == "source"
    for label in ("ts", "onnx"):
        m = by[label, 1]["metrics"]
        assert m["accuracy"] == 1.0 and m["accuracy_delta"] == 0.0
        assert m["max_abs_diff_vs_source"] < 1e-4 and m["cosine_vs_source"] > 0.9999 and m["top1_agreement_vs_source"] == 1.0
        assert by[label, 4]["speedup_vs_source"] == pytest.approx(by["source", 4]["p50_ms"] / by[label, 4]["p50_ms"])
    assert by["source", 1]["metrics"]["accuracy"] == 1.0
    # size on disk and parameter count for every artifact
    n_params = sum(p.numel() for p in files["model"].parameters())
    assert by["ts", 1]["size_bytes"] == os.path.getsize(files["ts"]) and by["onnx", 1]["size_bytes"] == os.path.getsize(files["onnx"])
    assert by["source", 1]["size_bytes"] > 4 * n_params                    # state dict serialized in memory
    assert by["source", 1]["params"] == by["ts", 1]["params"] == n_params
    assert 0.9 * n_params < by["onnx", 1]["params"] <= n_params              # BatchNorm folded into the conv
    # the pruned copy: its zeros are known and its accuracy drop is reported against the source
    p = by["pruned", 1]
    assert p["stage"] == "prune" and p["zero_fraction"] == pytest.approx(0.6, abs=0.05)
    assert p["metrics"]["accuracy"] < 1.0 and p["metrics"]["accuracy_delta"] < 0 and p["metrics"]["top1_agreement_vs_source"] < 1.0
    assert report.peak_rss_mb > 0 and all(r["peak_rss_mb"] > 0 for r in rows)
    assert set(report.env) >= {"cpu", "gpu", "torch", "onnxruntime"}


def test_a_static_batch_onnx_file_is_skipped_at_other_batch_sizes_with_the_reason(files):
    source = _load(files["pt"], arch=files["arch"], input_shape=["1x3x32x32"])
    settings = BenchSettings.from_options({"batch_size": [1, 3], "budget_s": 0.02, "min_runs": 3})
    report = bench_artifacts([("source", source), ("static", _load(files["static"]))], settings)
    assert [(r["label"], r["batch_size"]) for r in report.rows] == [("source", 1), ("source", 3), ("static", 1)]
    assert report.rows[2]["metrics"]["max_abs_diff_vs_source"] < 1e-4
    (skip,) = report.skipped
    assert skip["batch_size"] == 3 and "static" in skip["label"] and skip["reason"]
    assert any("was not measured" in w for w in report.warnings)


def test_slow_stages_are_flagged_with_their_likely_cause():
    base = {"label": "x", "format": "torch", "device": "cpu", "batch_size": 1, "threads": 1, "p50_ms": 5.0, "cv": 0.01, "spread": 0.01,
            "baseline": False, "metrics": {}}
    rows = [dict(base, label="src", baseline=True, speedup_vs_source=1.0, stage="source"),
            dict(base, label="fp16", stage="quantize", weights_dtype="float16", speedup_vs_source=0.4),
            dict(base, label="dyn", format="torch-quantized", stage="quantize", weights_dtype="int8", fp32_convs=52, speedup_vs_source=0.98),
            dict(base, label="sparse", stage="prune", zero_fraction=0.7, speedup_vs_source=1.01),
            dict(base, label="int8", format="onnx", stage="quantize", weights_dtype="int8", speedup_vs_source=1.0),
            dict(base, label="fast", stage="prune", speedup_vs_source=1.8),
            dict(base, label="noisy", stage="export", cv=0.4, spread=0.4, speedup_vs_source=1.3)]
    w = diagnosis.warnings_for(rows, {"vnni": False})
    assert any(s.startswith("fp16 ") and "slower than the source (0.40x)" in s and "float16 on a CPU" in s for s in w)
    assert any(s.startswith("dyn ") and "no faster" in s and "52 convolution(s) stay fp32" in s for s in w)
    assert any(s.startswith("sparse ") and "unstructured sparsity" in s and "70%" in s for s in w)
    assert any(s.startswith("int8 ") and "VNNI" in s for s in w)
    assert not any(s.startswith(("fast ", "src ")) for s in w)
    assert any("1 of 7 row(s) are too noisy" in s and "rerun" in s for s in w)
    assert diagnosis.likely_cause(rows[4], vnni=True) is None


def test_dynamic_quantized_convolutions_are_recognised_as_the_cause():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 16, 16))
    q = torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)
    facts = measure.model_facts(Artifact("torch-quantized", [], "t", model=q, stages=[{"stage": "quantize", "method": "dynamic"}]))
    assert facts == {"method": "dynamic", "weights_dtype": "int8", "zero_fraction": 0.0, "fp32_convs": 2}
    row = {"device": "cpu", "stage": "quantize", "batch_size": 1, "p50_ms": 1.0, "cv": 0.0, "spread": 0.0, **facts}
    assert "convolution(s) stay fp32" in diagnosis.likely_cause(row, vnni=True)
    # packed int8 weights still count as parameters
    assert measure.param_count(Artifact("torch-quantized", [], "t", model=q)) == sum(p.numel() for p in model.parameters())


def test_thread_sweep_gives_a_serving_recommendation(monkeypatch):
    monkeypatch.setattr(diagnosis, "cpu_count", lambda: 2)
    rows = [{"label": "m", "device": "cpu", "batch_size": 1, "threads": 1, "throughput_per_s": 100.0},
            {"label": "m", "device": "cpu", "batch_size": 1, "threads": 2, "throughput_per_s": 150.0},
            {"label": "n", "device": "cpu", "batch_size": 1, "threads": 1, "throughput_per_s": 100.0},
            {"label": "n", "device": "cpu", "batch_size": 1, "threads": 2, "throughput_per_s": 250.0}]
    rec = diagnosis.recommendations(rows)
    assert rec[0].startswith("m, batch 1: 1 thread × 2 processes gives ~200.0 items/s vs 2 threads × 1 process 150.0 items/s")
    assert rec[1].startswith("n, batch 1: 2 threads × 1 process(es) is best") and len(rec) == 2


def test_settings_are_checked():
    with pytest.raises(CompressError, match="not cpu or cuda"):
        BenchSettings.from_options({"device": "tpu"})
    with pytest.raises(CompressError, match="at least 1"):
        BenchSettings.from_options({"batch_size": "1,0"})
    with pytest.raises(CompressError, match="comma-separated"):
        BenchSettings.from_options({"threads": "one"})
    assert BenchSettings.from_options({"batch_size": "1, 8,8", "device": ["cpu"]}).batch_sizes == (1, 8)


# ---------------------------------------------------------------- reports and the CLI
def test_cli_bench_prints_the_table_and_writes_json_markdown_and_html(files, tmp_path, capsys):
    out = {k: tmp_path / f"report.{k}" for k in ("json", "md", "html")}
    argv = ["bench", str(files["pt"]), str(files["ts"]), str(files["onnx"]), "--arch", files["arch"], "--input-shape", "1x3x32x32",
            "--batch-size", "1,2", "--threads", "1,2", "--budget", "0.03", "--data", files["data"], "--limit", "32",
            "--json", str(out["json"]), "--markdown", str(out["md"]), "--html", str(out["html"])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "compress bench" in captured.out and "net.onnx" in captured.out and "speedup" in captured.out
    report = json.loads(out["json"].read_text())
    assert {"env", "rows"} <= set(report) and {"cpu", "gpu", "torch", "onnxruntime"} <= set(report["env"])
    assert len(report["rows"]) == 3 * 2 * 2
    for r in report["rows"]:
        assert CONTRACT_ROW <= set(r) and r["stage"] == "source" and r["device"] == "cpu"
        assert "accuracy" in r["metrics"]
    assert [r["artifact"] for r in report["rows"][::4]] == [str(files["pt"]), str(files["ts"]), str(files["onnx"])]
    assert all("max_abs_diff_vs_source" in r["metrics"] for r in report["rows"][4:])
    assert {(r["batch_size"], r["threads"]) for r in report["rows"]} == {(1, 1), (2, 1), (1, 2), (2, 2)}
    md = out["md"].read_text()
    assert md.count("\n| ") == 1 + 12 and "| artifact | stage | format |" in md
    page = out["html"].read_text()
    assert page.count("<svg") == 3 and "Throughput vs batch size" in page and "Latency vs accuracy" in page and "<table>" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", page) and "<link" not in page   # self-contained
    assert not list(tmp_path.glob(".*partial"))
    # existing reports are kept without --force
    before = out["json"].read_text()
    assert main(argv[:-6] + ["--json", str(out["json"])]) == 1
    assert "already exists" in capsys.readouterr().err and out["json"].read_text() == before
    assert main(["--force", *argv[:8], "--budget", "0.02", "--json", str(out["json"])]) == 0
    assert len(json.loads(out["json"].read_text())["rows"]) == 3


def test_html_falls_back_to_the_table_without_matplotlib(monkeypatch):
    row = {"label": "a", "stage": "source", "format": "torch", "device": "cpu", "batch_size": 1, "threads": 1, "p50_ms": 1.0,
           "p90_ms": 1.2, "p99_ms": 1.5, "cv": 0.05, "spread": 0.05, "throughput_per_s": 1000.0, "speedup_vs_source": 1.0, "size_bytes": 2048,
           "params": 10, "metrics": {}, "baseline": True}
    report = measure.BenchReport(rows=[row], env={"cpu": "x"}, peak_rss_mb=100.0)
    assert "<svg" in report_mod.html(report)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = report_mod.html(report)
    assert "<svg" not in page and "<table>" in page and "pip install 'compress[report]'" in page


def test_a_run_directory_is_benched_against_the_source_its_manifest_names(files, tmp_path):
    source = _load(files["pt"], arch=files["arch"], input_shape=["1x3x32x32"])
    run_dir = tmp_path / "run"
    save(source.evolve(source=str(files["pt"]), stages=[{"stage": "distill", "method": "kd", "config": {}}]), run_dir)
    assert main(["bench", str(run_dir), "--budget", "0.02", "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["stage"], r["artifact"]) for r in rows] == [("source", str(files["pt"])), ("distill", str(run_dir / "model.safetensors"))]
    assert rows[1]["metrics"]["max_abs_diff_vs_source"] == 0.0


def test_a_pipeline_bench_section_writes_the_reports(files, tmp_path):
    from compress.pipeline import run

    doc = {"model": {"source": str(files["pt"]), "arch": files["arch"], "input_shape": ["1x3x32x32"]}, "data": files["data"],
           "bench": {"batch_size": [1, 2], "budget_s": 0.02, "min_runs": 3, "limit": 16}}
    result = run(doc, tmp_path / "out")
    assert [r["batch_size"] for r in result.report.rows] == [1, 2]
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 200
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"][0]["metrics"]["accuracy"] == 1.0


@pytest.mark.slow
def test_minilm_is_timed_on_real_sentences_at_their_natural_length():
    source = _load("zoo:minilm-l6")
    q = torch.ao.quantization.quantize_dynamic(source.model, {nn.Linear}, dtype=torch.qint8)
    quantized = source.evolve(format="torch-quantized", model=q, stages=[{"stage": "quantize", "method": "dynamic", "config": {}}])
    settings = BenchSettings.from_options({"batch_size": [1, 4], "budget_s": 0.3, "min_runs": 5, "limit": 32}, "rotten-tomatoes")
    report = bench_artifacts([("source", source), ("int8", quantized)], settings)
    rows = report.rows
    assert len(rows) == 4 and not report.skipped
    for r in rows:
        assert r["inputs"] == "data" and not r["padded"]
        assert r["seq_len_mean"] < 64 and r["seq_len_max"] <= 128          # real sentences, not padded to 128
        assert "accuracy" not in r["metrics"] and "384 outputs" in r["metrics"]["accuracy_skipped"]
        assert "top1_agreement_vs_source" not in r["metrics"]                # embeddings are not class scores
    one = [r for r in rows if r["batch_size"] == 1][0]
    assert one["seq_len_mean"] != int(one["seq_len_mean"])                 # lengths vary from sentence to sentence
    int8 = [r for r in rows if r["label"] == "int8"]
    assert all(r["metrics"]["cosine_vs_source"] > 0.9 and r["weights_dtype"] == "int8" for r in int8)
    assert int8[0]["size_bytes"] < 0.7 * rows[0]["size_bytes"]          # the embedding table stays fp32


def test_a_busy_machine_is_reported(monkeypatch):
    monkeypatch.setattr(diagnosis, "cpu_count", lambda: 2)
    assert "load average 4.4 on 2 cores" in diagnosis.busy_warning(4.4, own_threads=2)
    assert diagnosis.busy_warning(2.5, own_threads=2) is None and diagnosis.busy_warning(None, 1) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is visible")
def test_cuda_without_a_gpu_is_a_one_line_user_error(files, capsys):
    assert main(["bench", str(files["onnx"]), "--device", "cpu,cuda", "--budget", "0.01"]) == 1
    assert "no CUDA GPU is visible" in capsys.readouterr().err
