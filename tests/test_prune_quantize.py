"""Pruning (magnitude, structured) and torch dynamic int8: real outcomes, safe reloads, clean errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress import sources
from compress.pipeline import run

from . import models


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def tiny_lstm():
    torch.manual_seed(0)
    return TinyLSTM().eval()


@pytest.fixture
def cnn_source(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(models.tiny_cnn(num_classes=5, channels=32).state_dict(), path)
    return {"source": str(path), "arch": "tests.models:tiny_cnn", "arch_args": {"num_classes": 5, "channels": 32}, "input_shape": ["1x3x32x32"]}


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_magnitude_prune_is_permanent_and_reaches_the_amount(tmp_path, cnn_source):
    res = run({"model": cnn_source, "stages": [{"prune": {"method": "magnitude", "amount": 0.6, "scope": "global"}}]}, tmp_path / "out")
    m = res.final.stages[-1]["metrics"]
    assert abs(m["sparsity"] - 0.6) < 0.01
    reloaded = sources.load(tmp_path / "out").model
    assert not any(n.endswith("_orig") or n.endswith("_mask") for n, _ in reloaded.named_parameters())
    assert all(not mod._forward_pre_hooks for mod in reloaded.modules())
    zeros = sum(int((p == 0).sum()) for n, p in reloaded.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert zeros > 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_out(reloaded, x), _out(res.final.model, x), atol=1e-6)


def test_structured_prune_shrinks_a_residual_cnn_and_reloads_without_pickle(tmp_path, cnn_source):
    res = run({"model": cnn_source, "stages": [{"prune": {"method": "structured", "amount": 0.5, "round_to": None}}]}, tmp_path / "out")
    m = res.final.stages[-1]["metrics"]
    assert m["params_after"] < 0.6 * m["params_before"] and m["macs_after"] < m["macs_before"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model_file"].endswith(".safetensors") and manifest["rebuild"][0]["op"] == "reshape"
    reloaded = sources.load(tmp_path / "out").model
    assert reloaded.head.out_features == 5  # the classifier head is kept whole
    assert reloaded.stem[0].out_channels == 16
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(_out(reloaded, x), _out(res.final.model, x), atol=1e-5)


def test_structured_ignore_pattern_that_matches_nothing_is_a_clean_error(tmp_path, cnn_source, cli):
    r = cli("prune", cnn_source["source"], "--arch", cnn_source["arch"], "--arch-args", json.dumps(cnn_source["arch_args"]),
            "--input-shape", "1x3x32x32", "--method", "structured", "-s", "ignore=nothing_like_this*", "-o", tmp_path / "o")
    assert r.rc == 1 and "matches no prunable layer" in r.err
    assert not (tmp_path / "o").exists()


def test_amount_out_of_range_is_reported_before_running(tmp_path, cnn_source, cli):
    r = cli("prune", cnn_source["source"], "--arch", cnn_source["arch"], "--arch-args", json.dumps(cnn_source["arch_args"]),
            "--input-shape", "1x3x32x32", "--method", "structured", "--amount", "1.5", "-o", tmp_path / "o")
    assert r.rc == 1 and "out of range" in r.err and "amount" in r.err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_structured_prune_mobilenet_v2_real_weights(tmp_path):
    res = run({"model": {"source": "zoo:mobilenet_v2"}, "stages": [{"prune": {"method": "structured", "amount": 0.3}}]}, tmp_path / "out")
    m = res.final.stages[-1]["metrics"]
    assert m["params_ratio"] < 0.75 and m["macs_ratio"] < 0.75
    reloaded = sources.load(tmp_path / "out").model
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(_out(reloaded, x), _out(res.final.model, x), atol=1e-4)
    assert all(c.out_channels % 8 == 0 for c in reloaded.modules() if isinstance(c, nn.Conv2d) and c.groups == 1)


def test_dynamic_int8_on_lstm_model_reloads_identically(tmp_path):
    path = tmp_path / "lstm.pt"
    torch.save(tiny_lstm().state_dict(), path)
    src = {"source": str(path), "arch": "tests.test_prune_quantize:tiny_lstm", "input_shape": ["1x5x8"]}
    res = run({"model": src, "stages": [{"quantize": {"method": "dynamic"}}]}, tmp_path / "out")
    assert res.final.format == "torch-quantized"
    m = res.final.stages[-1]["metrics"]
    assert m["quantized_layers"] == 2 and m["cosine"] > 0.99
    reloaded = sources.load(tmp_path / "out")
    assert reloaded.format == "torch-quantized"
    x = torch.randn(4, 5, 8)
    assert torch.equal(_out(reloaded.model, x), _out(res.final.model, x))


def test_dynamic_int8_on_a_conv_only_model_says_use_static(tmp_path, cli):
    path = tmp_path / "conv.pt"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    torch.save(model.state_dict(), path)
    (tmp_path / "convnet.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())\n")
    r = cli("quantize", path, "--arch", f"{tmp_path / 'convnet.py'}:make", "--input-shape", "1x3x8x8", "--method", "dynamic", "-o", tmp_path / "o")
    assert r.rc == 1 and "static" in r.err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_minilm_dynamic_int8_keeps_sentence_embeddings(tmp_path):
    res = run({"model": {"source": "zoo:minilm-l6"}, "data": "rotten-tomatoes", "stages": [{"quantize": {"method": "dynamic"}}]},
              tmp_path / "out")
    m = res.final.stages[-1]["metrics"]
    # Measured: mean cosine 0.973 with every Linear per-channel int8 (issue #5 asks for >= 0.99: not reached yet).
    assert m["cosine"] > 0.96 and m["quantized_layers"] == 37
    assert (tmp_path / "out" / "model.pt").stat().st_size < 0.7 * 90_000_000


def _bert_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    return folder


def test_head_and_mlp_pruning_on_a_bert_reloads_and_exports(tmp_path):
    folder = _bert_folder(tmp_path)
    src = {"source": str(folder), "input_shape": ["input_ids=1x16:int64", "attention_mask=1x16:int64"]}
    res = run({"model": src, "stages": [{"prune": {"method": "heads", "amount": 0.5, "mlp_amount": 0.5}},
                                         {"export": {"target": "onnx"}}]}, tmp_path / "o")
    pruned = res.artifacts[1][1]
    m = pruned.stages[-1]["metrics"]
    assert m["heads_per_layer"] == [2, 2] and m["mlp_width_per_layer"] == [32, 32] and m["params_ratio"] < 0.9
    reloaded = sources.load(tmp_path / "o" / "stages" / "01-prune-heads").model
    layer = reloaded.model.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 16
    ids, mask = torch.randint(0, 100, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, mask), pruned.model(ids, mask), atol=1e-5)
    assert res.final.format == "onnx" and res.final.stages[-1]["metrics"]["max_abs_diff"] < 1e-4


def test_head_pruning_refuses_a_cnn(tmp_path, cnn_source, cli):
    r = cli("prune", cnn_source["source"], "--arch", cnn_source["arch"], "--arch-args", json.dumps(cnn_source["arch_args"]),
            "--input-shape", "1x3x32x32", "--method", "heads", "-o", tmp_path / "o")
    assert r.rc == 1 and "BERT-like" in r.err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_minilm_heads_pruned_keep_embeddings_close(tmp_path):
    res = run({"model": {"source": "zoo:minilm-l6"}, "data": "rotten-tomatoes", "stages": [{"prune": {"method": "heads", "amount": 0.25}}]},
              tmp_path / "o")
    m = res.final.stages[-1]["metrics"]
    # Measured 0.918 with activation importance (0.900 with weight magnitude).
    assert m["importance"] == "activation" and m["heads_per_layer"] == [9] * 6 and m["cosine"] >= 0.9, m


def test_iterative_structured_pruning_with_distillation_fine_tuning(tmp_path):
    from .trained import trained_digits_cnn

    path = tmp_path / "digits.pt"
    torch.save(trained_digits_cnn(), path)
    src = {"source": str(path), "arch": "tests.trained:digits_cnn", "input_shape": ["1x1x8x8"]}
    res = run({"model": src, "data": "digits", "seed": 0,
               "stages": [{"prune": {"method": "structured", "amount": 0.5, "round_to": None, "steps": 2, "schedule": "linear",
                                     "finetune_epochs": 3, "finetune_lr": 0.003}}]}, tmp_path / "o")
    m = res.final.stages[-1]["metrics"]
    steps = m["steps"]
    assert [s["step"] for s in steps] == [1, 2] and steps[0]["params"] > steps[1]["params"] == m["params_after"]
    assert m["params_ratio"] < 0.4
    # Fine-tuning from the unpruned teacher brings the pruned student back close to the teacher.
    assert steps[-1]["finetune"]["student_accuracy_after"] > 0.75, steps
    assert steps[-1]["finetune"]["student_accuracy_after"] > steps[-1]["finetune"]["student_accuracy_before"]
    reloaded = sources.load(tmp_path / "o").model
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(_out(reloaded, x), _out(res.final.model, x), atol=1e-5)


def test_structurally_pruned_cnn_exports_to_onnx_and_torchscript(tmp_path, cnn_source):
    res = run({"model": cnn_source, "stages": [{"prune": {"method": "structured", "amount": 0.5, "round_to": None}},
                                                {"export": {"target": "torchscript", "branch": True}},
                                                {"export": {"target": "onnx"}}]}, tmp_path / "o")
    labels = [label for label, _ in res.artifacts]
    assert labels == ["source", "01-prune-structured", "02-export-torchscript", "03-export-onnx"]
    ts, onnx_art = res.artifacts[2][1], res.artifacts[3][1]
    assert ts.format == "torchscript" and onnx_art.format == "onnx"
    # The ONNX export continued from the pruned model (branch: the TorchScript stage fed nothing).
    assert [s["stage"] for s in onnx_art.stages] == ["prune", "export"]
    for art in (ts, onnx_art):
        assert art.stages[-1]["metrics"]["max_abs_diff"] < 1e-3
    from compress.runners import load_runner

    pruned = res.artifacts[1][1]
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(load_runner(sources.load(tmp_path / "o"))(x)[0], _out(pruned.model, x), atol=1e-4)
