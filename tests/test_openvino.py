"""OpenVINO as a compress target, on real models and data: ``export --target openvino`` matches its source and runs in
bench; NNCF static int8 keeps the accuracy asked for (accuracy control) and is smaller; NNCF int8 weight compression on
MiniLM; an IR file works as a SOURCE; without OpenVINO the refusal is one line, exit 1, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, needs_fashion_mnist, subprocess_env

pytest.importorskip("openvino", reason="OpenVINO is an optional extra: pip install 'compress[openvino]' (make test installs it)")


def _last(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["stages"][-1]["metrics"]


def test_export_openvino_matches_its_source_and_runs_in_bench(cli, tmp_path):
    needs_fashion_mnist()
    out = tmp_path / "ov"
    r = cli("export", "zoo:fmnist-resnet", "--target", "openvino", "--data", "fashion-mnist", "-o", out)
    assert r.rc == 0, r.err
    assert (out / "model.xml").is_file() and (out / "model.bin").stat().st_size > 400_000     # f32 weights (0.12M params)
    m = _last(out)
    assert m["max_abs_diff"] < 1e-4 and m["top1_agreement_data"] == 1.0 and m["verified_shapes"] == ["batch 2", "batch 1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "openvino" and "model.bin" in manifest["files"]        # the weights are checksummed too
    r = cli("bench", "zoo:fmnist-resnet", out, "--budget", "0.2", "--data", "fashion-mnist", "--limit", "200", "--json", tmp_path / "b.json")
    assert r.rc == 0, r.err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[1]["format"] == "openvino" and rows[1]["metrics"]["accuracy"] == rows[0]["metrics"]["accuracy"]
    # the IR file alone is a SOURCE: input shape read from the graph
    r = cli("bench", out / "model.xml", "--budget", "0.1")
    assert r.rc == 0, r.err


def test_serve_answers_from_an_openvino_ir_as_the_ir_does_run_directly(cli, tmp_path):
    """The IR behind compress serve (a real server on loopback, batching on): v2 infer equals the IR run directly through
    OpenVINO's own API on real Fashion-MNIST images, the labels are right as often as the model is, a wrong shape is a 422."""
    pytest.importorskip("httpx", reason="compress serve needs the serve extra: pip install 'compress[serve]'")
    import numpy as np
    import openvino as ov

    from compress.data import load_data
    from tests.test_serve import Server

    needs_fashion_mnist()
    out = tmp_path / "ov"
    assert cli("--quiet", "export", "zoo:fmnist-resnet", "--target", "openvino", "-o", out).rc == 0
    ev = load_data("fashion-mnist").eval
    x = np.stack([ev[i][0].numpy() for i in range(16)]).astype(np.float32)
    labels = np.array([ev[i][1] for i in range(16)])
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    direct = compiled(x)[0]
    s = Server([out, "--workers", 1, "--max-batch-size", 8, "--max-wait-ms", 5], tmp_path, "ov")
    try:
        name = s.get("/v2/models/ov").json()["inputs"][0]["name"]
        body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = s.post("/v2/models/ov/infer", json=body)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(direct.shape)
        np.testing.assert_allclose(got, direct, atol=1e-4)
        assert (got.argmax(1) == labels).mean() >= 0.8
        body["inputs"][0]["shape"] = [16, 28, 28]
        assert s.post("/v2/models/ov/infer", json=body).status_code == 422
        assert s.get("/v2/health/ready").json()["ready"]
    finally:
        assert s.stop() == 0, s.output()


def test_a_damaged_ir_is_refused_in_one_line(cli, tmp_path):
    needs_fashion_mnist()
    out = tmp_path / "ov"
    assert cli("export", "zoo:fmnist-resnet", "--target", "openvino", "-o", out).rc == 0
    (out / "model.bin").write_bytes((out / "model.bin").read_bytes()[:1000])
    r = cli("bench", out, "--budget", "0.1")
    assert r.rc == 1 and len(r.err.strip().splitlines()) == 1 and "model.bin" in r.err      # the checksum catches it
    r = cli("bench", out / "model.xml", "--budget", "0.1", "--no-verify")
    assert r.rc == 1 and len(r.err.strip().splitlines()) == 1 and "OpenVINO" in r.err


def test_nncf_static_int8_keeps_the_accuracy_asked_for_and_is_smaller(cli, tmp_path):
    needs_fashion_mnist()
    out = tmp_path / "int8"
    r = cli("quantize", "zoo:fmnist-resnet", "--method", "static", "--backend", "openvino", "--data", "fashion-mnist",
            "--max-accuracy-drop", "0.01", "-o", out)
    assert r.rc == 0, r.err
    m = _last(out)
    assert m["quantizer"].startswith("nncf") and m["accuracy_control"]["max_drop"] == 0.01
    assert m["accuracy_drop"] <= 0.01 and m["accuracy"] > 0.9
    assert m["size_bytes_after"] < m["size_bytes_before"] / 2
    assert (out / "model.xml").is_file()
    # pipelines take the same options, and the run directory exports nowhere else (it is OpenVINO already)
    r = cli("export", out, "--target", "onnx", "-o", tmp_path / "again")
    assert r.rc == 1 and "openvino" in r.err.lower() and not (tmp_path / "again").exists()


def test_nncf_int8_weight_compression_on_minilm(cli, tmp_path):
    out = tmp_path / "w8"
    r = cli("quantize", "zoo:minilm-l6", "--method", "dynamic", "--backend", "openvino", "--data", "rotten-tomatoes", "-o", out)
    assert r.rc == 0, r.err
    m = _last(out)
    assert m["mode"] == "int8_asym weights" and m["cosine"] > 0.99
    assert m["size_bytes_after"] < m["size_bytes_before"] / 3          # int8 weights: a quarter of fp32, plus scales


def test_bad_options_are_one_line(cli, tmp_path):
    r = cli("quantize", "zoo:fmnist-resnet", "--method", "static", "--data", "fashion-mnist", "-s", "preset=mixed", "-o", tmp_path / "x")
    assert r.rc == 1 and "backend openvino" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("export", "zoo:fmnist-resnet", "--target", "openvino", "-s", "precision=int3", "-o", tmp_path / "y")
    assert r.rc == 1 and "precision" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_without_openvino_the_refusal_is_one_line_and_nothing_is_written(tmp_path):
    # an `openvino` package that cannot be imported, first on the path: what a machine without the extra sees
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path / 'site'}:{env['PYTHONPATH']}"
    out = tmp_path / "ov"
    r = subprocess.run([sys.executable, "-m", "cli", "export", "zoo:fmnist-resnet", "--target", "openvino", "-o", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "pip install" in r.stderr and "openvino" in r.stderr
    assert not out.exists()


def test_a_pipeline_exports_openvino_beside_nncf_int8_and_benches_both(cli, tmp_path):
    needs_fashion_mnist()
    pipe = tmp_path / "p.yaml"
    pipe.write_text("model: {source: zoo:fmnist-resnet}\ndata: fashion-mnist\nstages:\n"
                    "  - export: {target: openvino, branch: true}\n"
                    "  - quantize: {method: static, backend: openvino, preset: mixed, samples: 64}\n"
                    "bench: {budget_s: 0.2, limit: 500}\n")
    assert cli("validate", pipe).rc == 0
    out = tmp_path / "run"
    r = cli("run", pipe, "-o", out)
    assert r.rc == 0, r.err
    report = json.loads((out / "report.json").read_text())
    formats = [row["format"] for row in report["rows"]]
    assert formats.count("openvino") == 2, formats
    int8 = report["rows"][-1]
    assert int8["metrics"]["accuracy"] > 0.9 and int8["size_bytes"] < report["rows"][0]["size_bytes"] / 2
    assert _last(out)["preset"] == "mixed" and _last(out)["calibration_samples"] == 64
