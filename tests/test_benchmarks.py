"""Smoke tests of the benchmark harness (benchmarks/): the interleaved timer, rows, verdicts and the writers.

The suites themselves train and time real models for minutes and are not run here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Phase, Variant, failed, measure, rows_for, time_interleaved, write_results
from benchmarks.peers import OrtRunner, TorchRunner
from benchmarks.suites import _speed_verdicts

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """A runner that logs every call into a shared list, to check the interleaving."""

    def __init__(self, name, log, fail_after=None):
        self.name, self.log, self.fail_after, self.calls = name, log, fail_after, 0

    def prepare(self, inputs):
        return inputs

    def run(self, prepared):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("boom")
        self.log.append((self.name, int(prepared[0].item())))
        return prepared


def test_interleaved_rounds_rotate_and_every_variant_sees_the_same_inputs():
    log: list = []
    inputs = [(torch.tensor(i),) for i in range(3)]
    runners = {"a": Recorder("a", log), "b": Recorder("b", log)}
    times, errors, warm = time_interleaved(runners, inputs, rounds=4, runs=3, warmup=1)
    assert errors == {} and set(warm) == {"a", "b"}
    assert len(times["a"]) == len(times["b"]) == 12
    assert all(t >= 0 for t in times["a"] + times["b"])
    timed = log[-2 * 4 * (1 + 3):]                     # after the warm-up: 4 rounds of (1 untimed + 3 timed) runs each
    blocks = [timed[i:i + 4] for i in range(0, len(timed), 4)]   # 1 untimed + 3 timed runs per turn
    order = [blk[0][0] for blk in blocks]
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]    # the order rotates every round
    seq = {n: [i for name, i in timed if name == n] for n in "ab"}
    assert seq["a"] == seq["b"]                         # same inputs in the same order


class Slow(Recorder):
    def run(self, prepared):
        time.sleep(0.02)
        return super().run(prepared)


def test_a_budget_caps_a_slow_variant_but_every_round_samples_it_and_it_cycles_all_inputs():
    log: list = []
    inputs = [(torch.tensor(i),) for i in range(4)]
    runners = {"fast": Recorder("fast", log), "slow": Slow("slow", log)}
    times, errors, _ = time_interleaved(runners, inputs, rounds=8, runs=5, warmup=1, budget_s=0.25)
    assert errors == {} and len(times["fast"]) == 40               # far under budget: every run
    assert 8 <= len(times["slow"]) < 20                              # ≥ 1 a round, stopped near 0.25 s of 20 ms runs
    timed = [i for name, i in log[-(len(times["fast"]) + len(times["slow"]) + 2 * 8):] if name == "slow"]
    assert set(timed) == {0, 1, 2, 3}                                # still cycles through every input


def test_a_runner_that_fails_is_reported_and_the_others_still_timed():
    log: list = []
    inputs = [(torch.tensor(0),)]
    times, errors, _ = time_interleaved({"ok": Recorder("ok", log), "bad": Recorder("bad", log, fail_after=2)}, inputs, rounds=3, runs=2)
    assert "bad" in errors and "boom" in errors["bad"] and "bad" not in times
    assert len(times["ok"]) == 6


def test_measure_rows_and_writers(tmp_path):
    lin = torch.nn.Linear(8, 4).eval()
    good = Variant("tiny linear", "torch", load=lambda t: TorchRunner(lin), size_bytes=harness.state_dict_bytes(lin), build_s=0.0)
    mine = Variant("compress: tiny", "compress", load=lambda t: TorchRunner(lambda x: x[:, :4] * 2), size_bytes=10, build_s=1.5)
    broken = failed("broken peer", "nothing", ValueError("cannot build"))
    phases = [Phase(1, 1, [(torch.randn(1, 8),), (torch.randn(1, 8),)], rounds=2, runs=3, warmup=1),
              Phase(4, 2, [(torch.randn(4, 8),)], rounds=2, runs=2, warmup=1, evaluate=True)]
    measure([good, mine, broken], phases, evaluate=lambda r: {"accuracy": 0.5}, log=None)
    rows = rows_for([good, mine, broken], phases)
    assert len(rows) == 6
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0 and r["accuracy"] == 0.5
    assert {r["batch_size"] for r in ok} == {1, 4} and {r["threads"] for r in ok} == {1, 2}
    bad = [r for r in rows if r["variant"] == "broken peer"]
    assert all(r["status"] == "failed" and "cannot build" in r["note"] and r["p50_ms"] is None for r in bad)

    suite = {"name": "toy", "title": "two trivial variants", "metric": "accuracy", "rows": rows, "selected": "compress: tiny",
             "verdicts": _speed_verdicts(rows, next(r for r in rows if r["variant"] == "compress: tiny" and r["batch_size"] == 1),
                                         "accuracy", 0.4, 1000.0, "compress ≥ 1000× faster"),
             "notes": ["a note"], "stages": [{"label": "source", "format": "torch", "accuracy": 0.5, "seconds": None}]}
    results = {"machine": harness.machine(), "quick": True, "suites": [suite]}
    written = write_results(results, tmp_path)
    assert {p.name for p in written} == {"latest.json", "RESULTS.md", "latency_vs_accuracy.png"}
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["machine"]["cores"] >= 1 and doc["suites"][0]["name"] == "toy"
    row = doc["suites"][0]["rows"][0]
    for key in ("variant", "tool", "batch_size", "threads", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "size_bytes", "accuracy"):
        assert key in row
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| **compress: tiny** | compress |" in md and "| broken peer | nothing | - |" in md
    assert "**MISSED** — compress ≥ 1000× faster" in md and "Quick run" in md
    assert (tmp_path / "latency_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_phase_can_measure_quality_in_its_own_configuration():
    """Batch-1 rows carry the batch-1 evaluation, large-batch rows the batched one; the variant keeps the first."""
    lin = torch.nn.Linear(8, 4).eval()
    v = Variant("tiny linear", "torch", load=lambda t: TorchRunner(lin))
    phases = [Phase(1, 1, [(torch.randn(1, 8),)], rounds=1, runs=2, warmup=1, evaluate=lambda r: {"accuracy": 0.7}),
              Phase(4, 1, [(torch.randn(4, 8),)], rounds=1, runs=2, warmup=1, evaluate=True)]
    measure([v], phases, evaluate=lambda r: {"accuracy": 0.6}, log=None)
    rows = rows_for([v], phases)
    assert [(r["batch_size"], r["accuracy"]) for r in rows] == [(1, 0.7), (4, 0.6)]
    assert v.quality == {"accuracy": 0.7}


def test_the_onnxruntime_call_floor_is_measured():
    floor = harness.ort_call_floor_ms((1, 1, 28, 28), calls=200)
    assert 0 < floor < 5.0


def _row(variant, tool, p50, acc):
    return {"variant": variant, "tool": tool, "batch_size": 1, "p50_ms": p50, "accuracy": acc}


def test_speed_verdict_compares_with_the_fastest_peer_meeting_the_bar():
    rows = [_row("fast but wrong", "peer", 1.0, 0.5), _row("good peer", "peer", 3.0, 0.9), _row("mine", "compress", 1.5, 0.9)]
    (v,) = _speed_verdicts(rows, rows[2], "accuracy", 0.89, 2.0, "≥ 2×")
    assert v["passed"] is True and "2.00×" in v["measured"] and "fast but wrong" in v["measured"]
    (v,) = _speed_verdicts(rows, rows[2], "accuracy", 0.89, 2.5, "≥ 2.5×")
    assert v["passed"] is False
    (v,) = _speed_verdicts(rows, None, "accuracy", 0.95, 2.0, "≥ 2×")
    assert v["passed"] is False and "no compress artifact met" in v["measured"]


def test_ort_runner_runs_an_exported_model(tmp_path):
    from benchmarks.peers import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x = torch.randn(2, 1, 8, 8)
    path = export_onnx(model, (x[:1],), ["input"], tmp_path / "m.onnx", {"input": {0: "batch"}})
    r = OrtRunner(path, 1)
    out = harness.infer(r, (x,))
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, model(x).detach(), atol=1e-5, rtol=1e-4)
    (tmp_path / "leftover-from-a-tool.data").write_bytes(b"x" * 1000)   # not named by the model: not counted
    assert harness.file_bytes(path) == path.stat().st_size


def test_cli_help():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--quick" in p.stdout and "--suite" in p.stdout


def test_cli_rejects_an_unknown_suite():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "audio"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def _suite(rows, selected="mine", target=2.0, bar=0.8):
    return {"rows": [_row(*r) for r in rows], "selected": selected, "metric": "accuracy", "quality_bar": bar, "speed_target": target}


def test_quick_ordering_matches_when_only_close_pairs_swap():
    full = _suite([("mine", "compress", 1.0, 0.9), ("peer a", "peer", 2.5, 0.9), ("peer b", "peer", 2.6, 0.9), ("wrong", "peer", 0.5, 0.1)])
    # The quick run's students miss the bar (accuracy 0.5), and two peers 4% apart swap: neither breaks the ordering.
    quick = _suite([("mine", "compress", 1.1, 0.5), ("peer a", "peer", 2.9, 0.9), ("peer b", "peer", 2.8, 0.9), ("wrong", "peer", 0.6, 0.1)],
                   selected=None)
    o = harness.ordering(quick, full)
    assert o["compared"] == ["mine", "peer a", "peer b", "wrong"] and o["flips"] == []
    assert o["kendall_tau"] == pytest.approx(4 / 6, abs=1e-3)      # 5 concordant pairs, 1 discordant
    # The full run's pick is compared by name with the full run's best peer meeting the bar (not "wrong").
    assert o["pick"]["peer"] == "peer a" and o["pick"]["full_ratio"] == 2.5 and o["pick"]["same_side"] is True
    v = harness.ordering_verdict(o)
    assert v["passed"] is True and "2.64× its best peer peer a here vs 2.50×" in v["measured"]


def test_quick_ordering_fails_on_a_clear_flip_or_the_other_side_of_the_target():
    full = _suite([("mine", "compress", 1.0, 0.9), ("peer a", "peer", 2.5, 0.9), ("peer b", "peer", 4.0, 0.9)])
    flipped = _suite([("mine", "compress", 1.0, 0.9), ("peer a", "peer", 4.0, 0.9), ("peer b", "peer", 2.5, 0.9)])
    o = harness.ordering(flipped, full)
    assert [(f["faster_in_full"], f["slower_in_full"]) for f in o["flips"]] == [("peer a", "peer b")]
    v = harness.ordering_verdict(o)
    assert v["passed"] is False and "peer a / peer b" in v["measured"]
    slower = _suite([("mine", "compress", 1.5, 0.9), ("peer a", "peer", 2.5, 0.9), ("peer b", "peer", 4.0, 0.9)])
    o = harness.ordering(slower, full)
    assert o["flips"] == [] and o["pick"]["same_side"] is False     # 1.67× here: below the 2× target, 2.5× in the full run
    assert harness.ordering_verdict(o)["passed"] is False
    missing = _suite([("peer a", "peer", 2.5, 0.9), ("peer b", "peer", 4.0, 0.9)])
    assert harness.ordering_verdict(harness.ordering(missing, full))["passed"] is None


def test_quick_ordering_tolerates_a_swap_the_full_run_did_not_order_clearly():
    # The full run's pick was 0.92× its peer (two sessions of one graph): a quick run at 1.10× is the same noise.
    full = _suite([("mine", "compress", 1.0, 0.9), ("peer a", "peer", 0.92, 0.9), ("slow", "peer", 3.0, 0.9)], target=1.0)
    quick = _suite([("mine", "compress", 1.0, 0.9), ("peer a", "peer", 1.10, 0.9), ("slow", "peer", 3.2, 0.9)], target=1.0)
    o = harness.ordering(quick, full)
    assert o["pick"]["clear_of_peer"] is False and o["pick"]["same_side"] is False and o["flips"] == []
    v = harness.ordering_verdict(o)
    assert v["passed"] is True and "did not order clearly either" in v["measured"] and "within 1.15× of it" in v["measured"]
    # ... but the same swap from a clear full-run lead (0.5×) fails.
    clear = _suite([("mine", "compress", 1.0, 0.9), ("peer a", "peer", 0.5, 0.9), ("slow", "peer", 3.0, 0.9)], target=1.0)
    assert harness.ordering_verdict(harness.ordering(quick, clear))["passed"] is False



def test_quick_ordering_sets_compress_row_by_role_when_the_full_pick_trained():
    # The full run picked a trained student the no-training quick run never makes: compress's rows are set side by side
    # by their role (each run's pick vs its best peer) and the verdict rests on the peers both runs measured.
    full = _suite([("student", "compress", 1.0, 0.9), ("peer a", "peer", 2.5, 0.9), ("peer b", "peer", 4.0, 0.9)], selected="student")
    quick = _suite([("int8", "compress", 2.0, 0.9), ("peer a", "peer", 2.4, 0.9), ("peer b", "peer", 4.2, 0.9)], selected="int8")
    o = harness.ordering(quick, full)
    assert "pick" not in o and o["compared"] == ["peer a", "peer b"]
    assert o["role"] == {"quick_pick": "int8", "quick_peer": "peer a", "quick_ratio": 1.2,
                         "full_pick": "student", "full_peer": "peer a", "full_ratio": 2.5}
    v = harness.ordering_verdict(o)
    assert v["passed"] is True and "int8 is 1.20× peer a, in the full run student was 2.50× peer a" in v["measured"]
    flipped = _suite([("int8", "compress", 2.0, 0.9), ("peer a", "peer", 4.4, 0.9), ("peer b", "peer", 2.4, 0.9)], selected="int8")
    v = harness.ordering_verdict(harness.ordering(flipped, full))
    assert v["passed"] is False and "peer a / peer b" in v["measured"]


def test_a_quick_runs_targets_are_marked_indicative_in_the_markdown(tmp_path):
    v = {"target": "compress ≥ 2× faster", "passed": False, "measured": "1.2×"}
    suite = {"name": "s", "rows": [], "verdicts": [dict(v, indicative=True), {**v, "target": "ordering", "passed": True}]}
    md = (tmp_path / "RESULTS.md")
    write_results({"machine": {}, "quick": True, "suites": [suite]}, tmp_path)
    text = md.read_text()
    assert "- indicative, **MISSED** — compress ≥ 2× faster: 1.2×" in text and "- PASS — ordering" in text
    assert harness.mark({"passed": None}) == "not judged" and harness.mark({"passed": False}) == "MISSED"
