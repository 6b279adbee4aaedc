"""``compress optimize`` on a real model and real data: the pick is faster than the fp32 ONNX export within the budget,
a crashing or hanging candidate does not stop the search, a killed search resumes from its finished candidates, an
impossible budget exits 3 with the closest candidate written, bad input is one line.

Candidates run as their own processes; the module shares one candidate cache so that the searches after the first
reuse what it made (which is itself tested)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress import search

from .conftest import ROOT, needs_fashion_mnist, subprocess_env

FAST = ["--data", "fashion-mnist", "--no-training", "-s", "eval_limit=500", "-s", "timing_budget_s=0.5", "-s", "only=onnx"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("optimize-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache))


def _search(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


def test_optimize_finds_an_artifact_faster_than_the_fp32_onnx_export_within_the_budget(cli, tmp_path):
    needs_fashion_mnist()
    out = tmp_path / "opt"
    r = cli("optimize", "zoo:fmnist-resnet", *FAST, "--max-accuracy-drop", "1", "--time-budget", "10m", "-o", out)
    assert r.rc == 0, r.err
    s = _search(out)
    by = {c["recipe"]: c for c in s["candidates"]}
    picked = by[s["picked"]]
    assert s["met"] and picked["error"] is None
    assert picked["p50_ms"] < by["onnx fp32"]["p50_ms"], s["candidates"]
    assert s["budget"]["floor"] == pytest.approx(s["budget"]["source"] - 0.01) and picked["accuracy"] >= s["budget"]["floor"]
    assert all(c["p50_ms"] and c["size_bytes"] and c["seconds"] for c in s["candidates"]), s["candidates"]
    # OUT is a run directory holding the pick, its history, the report and a recipe that compress run accepts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][-1]["stage"] == "optimize" and manifest["stages"][-1]["metrics"]["picked"] == s["picked"]
    assert (out / "model.onnx").is_file() if "onnx" in s["picked"] else any(out.glob("model*"))
    html = (out / "report.html").read_text()
    assert "<svg" in html and "budget" in html and s["picked"] in html
    assert "optimize" in r.out and s["picked"] in r.out                    # the candidates' table
    # threads vs processes for serving the pick, measured on this CPU's cores
    serving = s["serving"]
    assert {1, serving["cores"]} <= set(map(int, serving["throughput_per_s_by_threads"])) and all(serving["throughput_per_s_by_threads"].values())
    assert serving["best"]["threads"] * serving["best"]["processes"] <= serving["cores"] and serving["advice"]
    assert "serving: " in r.err and "Serving it on this CPU" in html
    assert cli("validate", out / "recipe.yaml").rc == 0
    assert cli("bench", out, "--budget", "0.2").rc == 0                    # the pick loads and runs


def test_a_crashing_and_a_hanging_candidate_do_not_stop_the_search(cli, tmp_path, monkeypatch):
    needs_fashion_mnist()
    real_recipes, real_command = search.recipes, search.command

    def recipes(*a, **k):
        return [search.Candidate("onnx crashes", [{"export": {"target": "onnx", "opset": 16}}]),      # (recipes no other test caches)
                search.Candidate("onnx hangs", [{"export": {"target": "onnx", "opset": 15}}]),
                *[c for c in real_recipes(*a, **k) if c.name == "onnx fp32"]]

    def command(pipeline, out):
        text = Path(pipeline).read_text()
        if "opset: 16" in text:
            return [sys.executable, "-c", "import os; os.abort()"]
        if "opset: 15" in text:
            return [sys.executable, "-c", "import time; time.sleep(120)"]
        return real_command(pipeline, out)
    monkeypatch.setattr(search, "recipes", recipes)
    monkeypatch.setattr(search, "command", command)
    out = tmp_path / "opt"
    started = time.perf_counter()
    r = cli("optimize", "zoo:fmnist-resnet", *FAST, "-s", "candidate_timeout=15s", "-o", out)
    assert r.rc == 0, r.err
    assert time.perf_counter() - started < 100
    by = {c["recipe"]: c for c in _search(out)["candidates"]}
    assert "crashed (SIGABRT)" in by["onnx crashes"]["error"]
    assert "no result within 15 s" in by["onnx hangs"]["error"]
    assert _search(out)["picked"] == "onnx fp32" and by["onnx fp32"]["error"] is None


def test_a_killed_search_resumes_without_redoing_finished_candidates(tmp_path):
    needs_fashion_mnist()
    out, cache = tmp_path / "opt", tmp_path / "cache"      # a cache of its own: the candidates must be made here
    before = set()
    cmd = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", "optimize", "zoo:fmnist-resnet", *FAST, "-o", str(out)]
    env = subprocess_env() | {"COMPRESS_CACHE_DIR": str(cache)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (set(cache.glob("optimize/*/manifest.json")) - before):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)                 # the search and its running candidate, at once
    proc.wait()
    finished = set(cache.glob("optimize/*/manifest.json")) - before
    assert finished, "no candidate finished within 4 minutes"
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    assert not (out / "search.json").exists()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "reusing the finished candidate" in r.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())   # not made again
    assert _search(out)["met"]


def test_an_impossible_budget_exits_3_with_the_closest_candidate_written_and_the_miss_explained(cli, tmp_path, monkeypatch):
    needs_fashion_mnist()
    # only recipes that cannot keep the accuracy: most channels pruned away and no training to recover them
    monkeypatch.setattr(search, "recipes", lambda *a, **k: [
        search.Candidate(f"prune {a:.0%} untrained → onnx", [{"prune": {"method": "structured", "amount": a}}, {"export": {"target": "onnx"}}])
        for a in (0.6, 0.8)])
    out = tmp_path / "opt"
    r = cli("optimize", "zoo:fmnist-resnet", *FAST, "--max-accuracy-drop", "1", "-o", out)
    assert r.rc == 3, r.err
    s = _search(out)
    by = {c["recipe"]: c for c in s["candidates"]}
    assert not s["met"] and s["budget"]["metric"] == "accuracy" and all(c["accuracy"] < s["budget"]["floor"] for c in by.values())
    assert s["picked"] == max(by, key=lambda n: by[n]["accuracy"])          # the closest to the budget
    assert "budget missed" in r.err and s["picked"] in r.err and "accuracy" in r.err
    assert (out / "manifest.json").is_file() and (out / "recipe.yaml").is_file() and (out / "model.onnx").is_file()


def test_a_training_candidate_no_faster_than_one_already_within_the_budget_is_dropped_before_it_trains(cli, tmp_path, monkeypatch):
    needs_fashion_mnist()
    # int8 of the whole model first (within the budget), then 5% of the channels pruned in fp32: far slower (the fp32
    # graph runs at about twice int8's latency), so it is never trained
    int8 = search.Candidate("onnx int8 static, entropy calibration",
                            [{"quantize": {"method": "static", "backend": "onnxruntime", "calibration": "entropy"}}])
    slow = search.Candidate("prune 5% + distill → onnx fp32", [{"prune": {"method": "structured", "amount": 0.05}}, {"distill": {}},
                                                               {"export": {"target": "onnx"}}], training=True)
    monkeypatch.setattr(search, "recipes", lambda *a, **k: [int8, slow])
    # which of the two runs faster is the CPU's (without VNNI int8 convolutions gain little, and a busy machine blurs
    # it): every measured architecture counts as "no faster" here, so the test holds the rule, not the machine's timing
    monkeypatch.setattr(search, "DOMINATED", 0.0)
    out = tmp_path / "opt"
    r = cli("optimize", "zoo:fmnist-resnet", "--data", "fashion-mnist", "-s", "eval_limit=500", "-s", "timing_budget_s=0.5", "-o", out)
    assert r.rc == 0, r.err
    by = {c["recipe"]: c for c in _search(out)["candidates"]}
    assert set(by) == {int8.name, slow.name}
    dropped = by[slow.name]
    assert dropped["error"].startswith("dropped before training") and dropped["p50_ms"] is None
    assert _search(out)["picked"] == int8.name


def test_qat_is_tried_only_when_post_training_int8_misses_and_dropped_when_its_int8_graph_is_no_faster(cli, tmp_path, monkeypatch):
    """Post-training static int8 measured short of the budget brings in QAT; its graph is the PT2E one, timed already, so
    where that is no faster than a candidate within the budget QAT is dropped untrained, with the reason."""
    needs_fashion_mnist()
    fp32 = search.Candidate("onnx fp32", [{"export": {"target": "onnx"}}])
    pt2e = search.Candidate("torch int8 static (PT2E, AOTInductor)", [{"quantize": {"method": "static", "backend": "torch"}}])
    monkeypatch.setattr(search, "recipes", lambda *a, **k: [fp32, pt2e])
    real_fits = search._Search.fits
    monkeypatch.setattr(search._Search, "fits", lambda self, row: "int8" not in row.get("label", "") and real_fits(self, row))
    monkeypatch.setattr(search, "DOMINATED", 0.0)          # the rule, not this CPU's timing (as in the test above)
    out = tmp_path / "opt"
    r = cli("optimize", "zoo:fmnist-resnet", "--data", "fashion-mnist", "-s", "eval_limit=500", "-s", "timing_budget_s=0.5", "-o", out)
    assert r.rc == 0, r.err
    by = {c["recipe"]: c for c in _search(out)["candidates"]}
    qat = by["qat int8 (PT2E QAT, AOTInductor)"]
    assert qat["error"].startswith("dropped before training: its int8 graph is the PT2E one") and qat["p50_ms"] is None, qat
    assert qat["stages"] == [{"quantize": {"method": "qat"}}]
    # its rungs set QAT's own epochs, as they set distillation's
    assert search._trained(search.Candidate("q", qat["stages"], training=True), 3, "q").stages == [{"quantize": {"method": "qat", "epochs": 3}}]
    # with labels and the budget kept by post-training int8, QAT is not brought in at all
    monkeypatch.setattr(search._Search, "fits", real_fits)
    out2 = tmp_path / "opt2"
    assert cli("optimize", "zoo:fmnist-resnet", "--data", "fashion-mnist", "-s", "eval_limit=500", "-s", "timing_budget_s=0.5",
               "--max-accuracy-drop", "5", "-o", out2).rc == 0
    assert not any("qat" in c["recipe"] for c in _search(out2)["candidates"])


def test_int8_that_misses_the_budget_brings_in_mixed_precision_until_it_holds(cli, tmp_path, monkeypatch):
    """onnxruntime static int8 measured short of the budget: the share of its layers int8 hurts most kept in float grows
    until a candidate holds the budget, and stops there."""
    needs_fashion_mnist()
    int8 = search.Candidate("onnx int8 static", [{"quantize": {"method": "static", "backend": "onnxruntime"}}])
    monkeypatch.setattr(search, "recipes", lambda *a, **k: [search.Candidate("onnx fp32", [{"export": {"target": "onnx"}}]), int8])
    real_fits = search._Search.fits
    misses = {"onnx int8 static", search._mixed_name(search.MIXED_SHARES[0])}      # all int8, and the smallest share
    monkeypatch.setattr(search._Search, "fits", lambda self, row: row.get("label") not in misses and real_fits(self, row))
    monkeypatch.setattr(search, "DOMINATED", 1e9)          # the rule, not this CPU's timing (more float is never dominated here)
    out = tmp_path / "opt"
    r = cli("optimize", "zoo:fmnist-resnet", *FAST, "--max-accuracy-drop", "5", "-o", out)
    assert r.rc == 0, r.err
    names = [c["recipe"] for c in _search(out)["candidates"]]
    mixed = [search._mixed_name(x) for x in search.MIXED_SHARES]
    assert names == ["onnx fp32", "onnx int8 static", *mixed[:2]], names        # the second share held: no third
    second = next(c for c in _search(out)["candidates"] if c["recipe"] == mixed[1])
    assert second["stages"][-1]["quantize"]["float_layers"] == search.MIXED_SHARES[1] and second["p50_ms"] and second["error"] is None


def test_training_candidates_still_short_of_the_budget_train_longer_rung_after_rung(cli, tmp_path, monkeypatch):
    """Successive halving: a training candidate measured short of the budget (and not dominated) is trained again with each
    rung's epochs, from the same recipe, until the last rung."""
    needs_fashion_mnist()
    student = search.Candidate("prune 50% + distill → onnx fp32", [{"prune": {"method": "structured", "amount": 0.5}},
                                                                  {"distill": {"limit": 1000, "eval_limit": 200}}, {"export": {"target": "onnx"}}],
                               training=True)
    monkeypatch.setattr(search, "recipes", lambda *a, **k: [search.Candidate("onnx fp32", [{"export": {"target": "onnx"}}]), student])
    real_fits = search._Search.fits
    monkeypatch.setattr(search._Search, "fits", lambda self, row: "distill" not in row.get("label", "") and real_fits(self, row))
    monkeypatch.setattr(search, "DOMINATED", 1e9)
    out = tmp_path / "opt"
    r = cli("optimize", "zoo:fmnist-resnet", "--data", "fashion-mnist", "-s", "eval_limit=300", "-s", "timing_budget_s=0.3",
            "--max-accuracy-drop", "5", "-o", out)
    assert r.rc == 0, r.err
    by = {c["recipe"]: c for c in _search(out)["candidates"]}
    for epochs in search.RUNG_EPOCHS:
        name = student.name + ("" if epochs == search.RUNG_EPOCHS[0] else f", {epochs} epochs")
        assert by[name]["error"] is None and by[name]["p50_ms"], (name, by.get(name))
        assert by[name]["stages"][1]["distill"] == {"limit": 1000, "eval_limit": 200, "epochs": epochs}, by[name]["stages"]
    assert _search(out)["picked"] == "onnx fp32"


def test_on_a_gpu_the_recipes_are_the_ones_with_cuda_kernels(monkeypatch):
    """--device cuda: fp32/fp16 ONNX (CUDA provider), torch fp16, torch.export, TensorRT fp16/int8 where TensorRT is
    installed, students in fp16; no CPU-only int8 or OpenVINO recipe. (Timing them needs a GPU: see the README.)"""
    import compress
    from compress.errors import is_installed

    art = compress.load("zoo:fmnist-resnet")
    cuda = search.OptimizeConfig(device="cuda")
    names = lambda cands: [c.name for c in cands]  # noqa: E731
    plain = search.recipes(art, cuda, True, "fashion-mnist")
    assert {"onnx fp32 (CUDA)", "onnx fp16 (CUDA)", "torch fp16", "pt2 (torch.export)"} <= set(names(plain)), names(plain)
    assert not any("int8" in n or "openvino" in n for n in names(plain)) or is_installed("tensorrt"), names(plain)
    fp16 = next(c for c in plain if c.name == "onnx fp16 (CUDA)")
    assert fp16.stages == [{"export": {"target": "onnx", "fp16": True}}]
    from compress import recipes

    real = recipes.is_installed
    monkeypatch.setattr(recipes, "is_installed", lambda name: name == "tensorrt" or real(name))
    with_trt = search.recipes(art, cuda, True, "fashion-mnist")
    by = {c.name: c for c in with_trt}
    assert by["tensorrt fp16"].stages == [{"export": {"target": "trt", "precision": "fp16"}}]
    assert by["tensorrt int8"].stages == [{"export": {"target": "trt", "precision": "int8"}}]
    students = [c for c in with_trt if c.training]
    assert students and all(c.stages[-1] == {"export": {"target": "trt", "precision": "fp16"}} for c in students)
    assert not any(c.training for c in search.recipes(art, search.OptimizeConfig(device="cuda", training=False), True, "fashion-mnist"))


def test_only_matching_no_recipe_is_one_line(cli, tmp_path):
    needs_fashion_mnist()
    r = cli("optimize", "zoo:fmnist-resnet", "--data", "fashion-mnist", "-s", "only=nothing-like-this", "-o", tmp_path / "opt")
    assert r.rc == 1 and len(r.err_lines) == 1 and "no recipe" in r.err and not (tmp_path / "opt").exists()


@pytest.mark.parametrize("args, message", [
    (["zoo:fmnist-resnet"], "needs data"),
    (["zoo:fmnist-resnet", "--data", "fashion-mnist", "--max-accuracy-drop", "200"], "max_accuracy_drop"),
    (["zoo:fmnist-resnet", "--data", "fashion-mnist", "--objective", "speed"], "objective"),
    (["zoo:fmnist-resnet", "--data", "fashion-mnist", "--time-budget", "soon"], "not a duration"),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, args, message):
    out = tmp_path / "opt"
    r = cli("optimize", *args, "-o", out)
    assert r.rc == 1 and len(r.err_lines) == 1 and message in r.err, r.err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_candidates_made_as_ray_tasks_come_back_and_are_timed_here(tmp_path):
    """--ray local: the candidates are made on a local Ray instance's workers (each in a scratch cache of its own), their
    run directories come back packed into this machine's cache with checksums intact, and the search times and scores them here."""
    pytest.importorskip("ray", reason="optimize --ray needs the ray extra: pip install 'compress[ray]'")
    needs_fashion_mnist()
    out, cache = tmp_path / "opt", tmp_path / "cache"
    cmd = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", "optimize", "zoo:fmnist-resnet", *FAST,
           "-s", "only=onnx fp32,entropy", "--ray", "local", "-o", str(out)]
    env = subprocess_env() | {"COMPRESS_CACHE_DIR": str(cache), "RAY_ADDRESS": ""}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = _search(out)
    assert len(s["candidates"]) >= 2 and all(c["made_on"] == "ray" for c in s["candidates"]), s["candidates"]
    made = [c for c in s["candidates"] if c["error"] is None]
    assert made and all(c["p50_ms"] and c["accuracy"] and c["seconds"] for c in made), made
    assert len(list(cache.glob("optimize/*/manifest.json"))) >= len(made) and not list(cache.glob("optimize/.*.ray"))
    assert json.loads((out / "manifest.json").read_text())["stages"][-1]["metrics"]["picked"] == s["picked"]


def test_a_ray_cluster_that_cannot_be_reached_is_one_line(cli, tmp_path):
    pytest.importorskip("ray", reason="optimize --ray needs the ray extra: pip install 'compress[ray]'")
    needs_fashion_mnist()
    r = cli("optimize", "zoo:fmnist-resnet", *FAST, "--ray", "127.0.0.1:9", "-o", tmp_path / "opt")
    assert r.rc == 1 and len(r.err_lines) == 1 and "cannot reach a Ray cluster at '127.0.0.1:9'" in r.err, r.err
    assert not (tmp_path / "opt").exists()
