"""The public Python verbs (compress.load / prune / distill / quantize / export / bench / run) on real models: the same
code path as the CLI, the same run directories, configs named by their type."""
from __future__ import annotations

import json

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.methods.structured import StructuredConfig
from compress.runners import load_runner

from .trained import DIGITS, trained_digits_cnn


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "cnn.pt"
    torch.save(trained_digits_cnn(width=16), path)
    return compress.load(path, arch=DIGITS["arch"], arch_args={"width": 16}, input_shape=DIGITS["input_shape"])


def test_the_verbs_chain_like_the_cli_and_write_run_directories(digits, tmp_path):
    pruned = compress.prune(digits, StructuredConfig(amount=0.5, round_to=None), out=tmp_path / "pruned")
    assert pruned.format == "torch" and pruned.stages[-1]["method"] == "structured"
    assert pruned.stages[-1]["metrics"]["params_after"] < pruned.stages[-1]["metrics"]["params_before"]
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert manifest["stages"][-1]["config"]["amount"] == 0.5                     # the config, recorded as the CLI would
    onnx = compress.export(pruned, "onnx", out=tmp_path / "onnx")
    assert onnx.format == "onnx" and (tmp_path / "onnx" / "model.onnx").is_file()
    assert [s["stage"] for s in onnx.stages] == ["prune", "export"]              # the history continues
    int8 = compress.quantize(onnx, method="static", data="digits", samples=64, out=tmp_path / "int8")
    m = int8.stages[-1]["metrics"]
    assert m["accuracy"] >= m["accuracy_before"] - 0.03                      # int8 keeps what its input had
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(load_runner(onnx)(x)[0], load_runner(compress.load(tmp_path / "pruned"))(x)[0], atol=1e-4)
    report = compress.bench(digits, pruned, onnx, data="digits", budget_s=0.05, limit=64)
    assert [r["label"] for r in report.rows] == ["source", "structured", "onnx"]
    assert report.rows[0]["metrics"]["accuracy"] > 0.9 and report.rows[2]["speedup_vs_source"] > 0
    assert report.rows[1]["metrics"]["accuracy"] == pytest.approx(report.rows[2]["metrics"]["accuracy"], abs=0.01)   # same model


def test_a_config_names_its_method_and_bad_options_fail_like_the_cli(digits, tmp_path):
    with pytest.raises(CompressError, match="amount: 1.5 is out of range"):
        compress.prune(digits, method="structured", amount=1.5, out=tmp_path / "a")
    with pytest.raises(CompressError, match="Tensor is not the config of a prune method"):
        compress.prune(digits, torch.zeros(1), out=tmp_path / "b")
    with pytest.raises(CompressError, match="quantize static needs data"):
        compress.quantize(digits, method="static", out=tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_run_takes_a_shipped_pipeline_a_file_or_a_dict(tmp_path, digits):
    doc = {"model": {"source": digits.source, "arch": DIGITS["arch"], "arch_args": {"width": 16}, "input_shape": DIGITS["input_shape"]},
           "data": "digits", "stages": [{"prune": {"method": "magnitude", "amount": 0.3}}], "bench": {"budget_s": 0.05, "limit": 32}}
    result = compress.run(doc, tmp_path / "r", sets=["stages.0.amount=0.4"])
    assert result.final.stages[-1]["config"]["amount"] == 0.4 and result.report.rows[0]["stage"] == "source"
    assert (tmp_path / "r" / "report.html").is_file()
