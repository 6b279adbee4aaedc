"""Quantization on real data: accuracy kept, formats right, auto's choices, speed/accuracy guards, clean errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress import sources
from compress.pipeline import run
from compress.runners import load_runner

from .trained import trained_digits_cnn


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "cnn.pt"
    torch.save(trained_digits_cnn(), path)
    return {"source": str(path), "arch": "tests.trained:digits_cnn", "input_shape": ["1x1x8x8"]}


def _metrics(res):
    return res.final.stages[-1]["metrics"]


def test_onnxruntime_static_int8_keeps_digits_accuracy(tmp_path, digits_source):
    res = run({"model": digits_source, "data": "digits", "stages": [{"quantize": {"method": "static", "samples": 256}}]}, tmp_path / "o", quiet=True)
    m = _metrics(res)
    assert res.final.format == "onnx" and m["format"] == "QDQ"
    assert m["accuracy_before"] > 0.9
    assert m["accuracy_drop"] < 0.02, m
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Dynamic batch survives quantization.
    art = sources.load(tmp_path / "o")
    assert load_runner(art)(torch.randn(5, 1, 8, 8))[0].shape == (5, 10)


def test_torch_static_int8_pt2e_aoti(tmp_path, digits_source):
    res = run({"model": digits_source, "data": "digits", "stages": [{"quantize": {"method": "static", "backend": "torch", "samples": 128}}]},
              tmp_path / "o", quiet=True)
    m = _metrics(res)
    assert res.final.format == "pt2" and res.final.extra["aoti"]
    assert m["accuracy_drop"] < 0.03, m
    art = sources.load(tmp_path / "o")
    assert art.extra.get("aoti") and load_runner(art)(torch.randn(3, 1, 8, 8))[0].shape == (3, 10)


def test_auto_picks_static_for_a_cnn_and_dynamic_for_an_lstm(tmp_path, digits_source):
    res = run({"model": digits_source, "data": "digits", "stages": [{"quantize": {"method": "auto", "samples": 64}}]}, tmp_path / "cnn", quiet=True)
    assert _metrics(res)["auto"]["picked"] == "static" and res.final.format == "onnx"
    from .test_prune_quantize import tiny_lstm

    path = tmp_path / "lstm.pt"
    torch.save(tiny_lstm().state_dict(), path)
    res = run({"model": {"source": str(path), "arch": "tests.test_prune_quantize:tiny_lstm", "input_shape": ["1x5x8"]},
               "stages": [{"quantize": {"method": "auto"}}]}, tmp_path / "lstm", quiet=True)
    auto = _metrics(res)["auto"]
    assert auto["picked"] == "dynamic" and auto["linear_share"] > 0.9
    assert set(auto["candidates"]) <= {"torch", "onnxruntime"} and auto["backend"] in auto["candidates"]


def test_static_without_data_is_refused_before_running(tmp_path, digits_source, cli):
    r = cli("quantize", digits_source["source"], "--arch", digits_source["arch"], "--input-shape", "1x1x8x8", "--method", "static", "-o", tmp_path / "o")
    assert r.rc == 1 and "needs data" in r.err
    assert not (tmp_path / "o").exists()


def test_empty_calibration_set_is_a_clean_error(tmp_path, digits_source, cli):
    import numpy as np

    np.savez(tmp_path / "empty.npz", inputs=np.zeros((0, 1, 8, 8), dtype=np.float32))
    r = cli("quantize", digits_source["source"], "--arch", digits_source["arch"], "--input-shape", "1x1x8x8", "--method", "static",
            "--data", f"tensors:{tmp_path / 'empty.npz'}", "-o", tmp_path / "o")
    assert r.rc == 1 and ("no samples" in r.err or "empty" in r.err)
    assert not (tmp_path / "o").exists()


def test_max_accuracy_drop_fails_and_keeps_nothing(tmp_path, digits_source, cli):
    # A drop of at most -1 (accuracy must rise by 100 points) cannot be met: the stage must fail cleanly.
    r = cli("quantize", digits_source["source"], "--arch", digits_source["arch"], "--input-shape", "1x1x8x8", "--method", "static",
            "--data", "digits", "-s", "samples=32", "-s", "max_accuracy_drop=0.0", "-s", "calibration=minmax", "-s", "per_channel=false",
            "-s", "reduce_range=true", "-o", tmp_path / "o")
    if r.rc == 0:  # int8 happened to lose nothing at all on this split: then the manifest must show a zero drop
        m = json.loads((tmp_path / "o" / "manifest.json").read_text())["stages"][-1]["metrics"]
        assert m["accuracy_drop"] <= 0.0
    else:
        assert r.rc == 1 and "max-accuracy-drop" in r.err
        assert not (tmp_path / "o").exists()


def test_require_speedup_fails_when_int8_is_not_faster(tmp_path, cli):
    # A 4->8->3 MLP: int8 bookkeeping costs more than the float matmuls it replaces.
    (tmp_path / "mlp.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))\n")
    path = tmp_path / "mlp.pt"
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict(), path)
    r = cli("quantize", path, "--arch", f"{tmp_path / 'mlp.py'}:make", "--input-shape", "1x4", "--method", "dynamic", "-s", "require_speedup=true",
            "-o", tmp_path / "o")
    if r.rc == 0:
        m = json.loads((tmp_path / "o" / "manifest.json").read_text())["stages"][-1]["metrics"]
        assert m["speedup_check"] >= 1.0
    else:
        assert r.rc == 1 and "slower than its input" in r.err
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_mobilenet_v2_static_int8_agrees_with_fp32_on_real_photos(tmp_path):
    res = run({"model": {"source": "zoo:mobilenet_v2"}, "data": "photos", "stages": [{"quantize": {"method": "static", "samples": 36}}]},
              tmp_path / "o", quiet=True)
    m = _metrics(res)
    assert m["top1_agreement"] >= 0.85 and m["cosine"] > 0.97, m
    assert m["size_bytes_after"] < 0.35 * m["size_bytes_before"]


@pytest.mark.slow
def test_minilm_onnxruntime_dynamic_int8_embeddings(tmp_path):
    res = run({"model": {"source": "zoo:minilm-l6"}, "data": "rotten-tomatoes", "stages": [{"quantize": {"method": "dynamic", "backend": "onnxruntime"}}]},
              tmp_path / "o", quiet=True)
    m = _metrics(res)
    assert res.final.format == "onnx"
    # Measured: cosine 0.9916, 90.9 MB -> 22.9 MB (MatMul weights and the embedding tables in int8).
    assert m["cosine"] >= 0.99, m
    assert m["size_bytes_after"] < 0.3 * m["size_bytes_before"]
