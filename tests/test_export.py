"""Export stage: ONNX, TorchScript, pt2 and TensorRT targets, each verified against its source.

Exports are loaded back in their own runtimes (onnxruntime, torch.jit, torch.export) at batch sizes and
sequence lengths other than the export's, and compared with the source model.
"""
from __future__ import annotations

import json
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress import pipeline, registry, sources
from compress.artifact import Artifact, load_run_dir
from compress.errors import CompressError
from exporters import tensorrt as trt_export
from exporters.onnx import OnnxConfig, export_onnx
from exporters.pt2 import PT2Config, export_pt2
from exporters.torchscript import TorchScriptConfig, export_torchscript
from exporters.verify import ExportVerificationError
from compress.pipeline import StageContext
from compress.runners import load_runner
from exporters.onnx import ONNXRunner
from compress.inputs import InputSpec

from . import models


# ---------------------------------------------------------------- small models for these tests
class TinyLSTM(nn.Module):
    """An LSTM classifier over [batch, time, features]."""

    def __init__(self, features: int = 6, hidden: int = 12, classes: int = 4):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@torch.library.custom_op("compress_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    """Calls an operator that no ONNX exporter knows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.compress_test.mystery(self.lin(x))


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, the tracing exporter records one branch."""

    def forward(self, x):
        if x.mean() > -100:
            return x * 2
        return x


def _lstm() -> nn.Module:
    torch.manual_seed(0)
    return TinyLSTM().eval()


def _ctx(tmp_path: Path, name: str = "work", data: str | None = None) -> StageContext:
    work = tmp_path / name
    work.mkdir()
    return StageContext(work, data, None)


def _ort(path: Path, *inputs: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)[0]


def _tiny_cnn_doc(tmp_path: Path, target: str, **options) -> dict:
    path = tmp_path / "tiny.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), path)
    return {"model": {"source": str(path), "arch": "tests.models:TinyCNN", "arch_args": {"num_classes": 5},
                      "input_shape": ["1x3x32x32"]},
            "stages": [{"export": {"target": target, **options}}]}


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a partial output was left behind"


# ---------------------------------------------------------------- registry
def test_export_targets_are_registered_and_listed(cli):
    names = {m.name for m in registry.methods("export")}
    assert {"onnx", "torchscript", "pt2", "trt"} <= names
    res = cli("ls", "export")
    assert res.rc == 0
    for name in ("onnx", "torchscript", "pt2", "trt"):
        assert f"│ {name} " in res.out
    assert "legacy" in res.out and "deprecated" in res.out   # TorchScript is labelled as such


# ---------------------------------------------------------------- real pretrained models
@pytest.mark.slow
def test_mobilenet_v2_to_onnx_through_cli_runs_in_onnxruntime_at_other_batch(cli, tmp_path):
    out = tmp_path / "mb-onnx"
    res = cli("export", "zoo:mobilenet_v2", "--target", "onnx", "--data", "photos", "-o", out)
    assert res.rc == 0, res.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["model_file"] == "model.onnx"
    metrics = manifest["stages"][-1]["metrics"]
    assert metrics["exporter"] == "dynamo" and metrics["opset"] >= 18
    assert metrics["verified_shapes"] == ["batch 2", "batch 1"]
    assert metrics["max_abs_diff"] < 1e-3
    assert metrics["samples_data"] > 0 and metrics["top1_agreement_data"] == 1.0   # real photos
    assert manifest["arch"]["spec"] == "torchvision:mobilenet_v2"
    source = sources.load("zoo:mobilenet_v2")
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    got = _ort(out / "model.onnx", x)
    with torch.no_grad():
        ref = source.model(x).numpy()
    assert got.shape == (3, 1000)
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow
def test_mobilenet_v2_to_pt2_loads_back_at_other_batch(tmp_path):
    source = sources.load("zoo:mobilenet_v2")
    ctx = _ctx(tmp_path)
    art = export_pt2(source, PT2Config(), ctx)
    assert art.path == ctx.workdir / "model.pt2" and art.model is None and art.arch == source.arch
    program = torch.export.load(str(art.path)).module()
    x = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(program(x), source.model(x), rtol=0, atol=1e-4)
    assert ctx.metrics["exporter"] == "torch.export" and ctx.metrics["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_minilm_to_onnx_with_dynamic_batch_and_sequence_via_pipeline(tmp_path):
    doc = {"model": {"source": "zoo:minilm-l6", "input_shape": ["input_ids=1x32:int64", "attention_mask=1x32:int64"]},
           "stages": [{"export": {"target": "onnx", "dynamic_axes": ["batch", "sequence"]}}]}
    result = pipeline.run(doc, tmp_path / "minilm")
    art = result.final
    assert art.format == "onnx" and art.arch["spec"].startswith("hf:")   # the tokenizer can still be found
    metrics = art.stages[-1]["metrics"]
    assert metrics["verified_shapes"] == ["batch 2, sequence 32", "batch 1, sequence 16"]
    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"], ["batch", "sequence"]]
    source = sources.load("zoo:minilm-l6")
    ids = torch.randint(1000, 5000, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    got = _ort(art.path, ids, mask)
    with torch.no_grad():
        ref = source.model.eval()(ids, mask).numpy()
    assert got.shape == (3, 384)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow
def test_minilm_optimize_fuses_attention_and_keeps_outputs(tmp_path):
    source = sources.load("zoo:minilm-l6", input_shape=["input_ids=1x16:int64", "attention_mask=1x16:int64"])
    source = source.evolve(input_spec=[InputSpec(s.name, s.shape, s.dtype, (0, 1)) for s in source.input_spec])
    ctx = _ctx(tmp_path)
    art = export_onnx(source, OnnxConfig(optimize=True), ctx)
    assert ctx.metrics["exporter"] == "legacy" and "BERT fusion" in ctx.metrics["exporter_reason"]
    assert ctx.metrics["fused_operators"].get("Attention") == 6    # one per layer
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    ids = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(4))
    got = _ort(art.path, ids, torch.ones_like(ids))
    with torch.no_grad():
        ref = source.model(ids, torch.ones_like(ids)).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_optimize_refuses_a_model_that_is_not_bert_like(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 4), "float32", (0,))], "x", model=models.tiny_mlp().eval())
    with pytest.raises(CompressError, match="BERT-like"):
        export_onnx(art, OnnxConfig(optimize=True), _ctx(tmp_path))


# ---------------------------------------------------------------- a CNN with residual connections, every CPU target
@pytest.mark.parametrize("target", ["onnx", "torchscript", "pt2"])
def test_residual_cnn_exports_verify_and_run_at_other_batch(tmp_path, target):
    out = tmp_path / f"cnn-{target}"
    result = pipeline.run(_tiny_cnn_doc(tmp_path, target), out)
    art = load_run_dir(out)
    assert art.format == {"onnx": "onnx", "torchscript": "torchscript", "pt2": "pt2"}[target]
    assert art.arch == {"spec": "tests.models:TinyCNN", "args": {"num_classes": 5}}
    metrics = result.final.stages[-1]["metrics"]
    assert metrics["verified_shapes"] == ["batch 2", "batch 1"] and metrics["file_size_bytes"] > 0
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = models.tiny_cnn(num_classes=5)(x)
    got = load_runner(art)(x)[0]   # the runner bench uses
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_onnx_opset_is_selectable_and_legacy_exporter_can_be_chosen(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 3, 16, 16), "float32", (0,))], "x", model=models.tiny_cnn(3))
    ctx = _ctx(tmp_path)
    out = export_onnx(art, OnnxConfig(opset=17, exporter="legacy"), ctx)
    proto = onnx.load(str(out.path))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert ctx.metrics["exporter"] == "legacy" and ctx.metrics["opset"] == 17


def test_onnx_falls_back_to_the_legacy_exporter_and_says_why(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 4), "float32", (0,))], "x", model=DataDependentBranch())
    ctx = _ctx(tmp_path)
    out = export_onnx(art, OnnxConfig(), ctx)
    assert ctx.metrics["exporter"] == "legacy"
    assert ctx.metrics["fallback_reason"].startswith("dynamo exporter failed: ")
    assert out.extra["exporter"] == "legacy"
    np.testing.assert_allclose(_ort(out.path, torch.ones(3, 4)), np.full((3, 4), 2.0))


def test_static_shapes_fix_the_batch(tmp_path):
    art = Artifact("torch", [InputSpec("input", (2, 3, 16, 16), "float32", (0,))], "x", model=models.tiny_cnn(3))
    ctx = _ctx(tmp_path)
    out = export_onnx(art, OnnxConfig(static_shapes=True), ctx)
    assert out.input_spec[0].dynamic_axes == ()
    assert ctx.metrics["verified_shapes"] == ["batch 2"]
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 16, 16]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort(out.path, torch.randn(3, 3, 16, 16))


def test_external_data_and_fp16(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 3, 16, 16), "float32", (0,))], "x", model=models.tiny_cnn(3, channels=32))
    ctx = _ctx(tmp_path)
    out = export_onnx(art, OnnxConfig(external_data="always", fp16=True), ctx)
    assert (ctx.workdir / "model.onnx.data").is_file() and ctx.metrics["external_data"] is True
    proto = onnx.load(str(out.path))
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT   # float32 in and out
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = art.model(x).numpy()
    assert np.abs(_ort(out.path, x) - ref).max() < 1e-2
    assert ctx.metrics["tolerance"] == 2e-2
    assert out.size_bytes() > (ctx.workdir / "model.onnx").stat().st_size   # size counts the external data


# ---------------------------------------------------------------- LSTM
def test_lstm_exports_to_onnx_with_dynamic_batch_and_sequence(tmp_path):
    model = _lstm()
    art = Artifact("torch", [InputSpec("input", (1, 10, 6), "float32", (0, 1))], "x", model=model)
    ctx = _ctx(tmp_path)
    out = export_onnx(art, OnnxConfig(exporter="legacy"), ctx)
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_ort(out.path, x) - ref).max() < 1e-5
    assert ctx.metrics["verified_shapes"] == ["batch 2, sequence 10", "batch 1, sequence 5"]


def test_lstm_pt2_names_an_axis_it_cannot_keep_dynamic(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 10, 6), "float32", (0, 1))], "x", model=_lstm())
    with pytest.raises(CompressError, match="axis 'sequence' dynamic.*dynamic_axes=batch"):
        export_pt2(art, PT2Config(), _ctx(tmp_path, "a"))
    out = export_pt2(art, PT2Config(dynamic_axes=("batch",)), _ctx(tmp_path, "b"))
    x = torch.randn(3, 10, 6)
    torch.testing.assert_close(load_runner(out)(x)[0], art.model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- TorchScript, including torch dynamic-quantized models
@pytest.mark.parametrize("mode", ["trace", "script"])
def test_dynamic_quantized_lstm_exports_to_torchscript(tmp_path, mode):
    model = torch.ao.quantization.quantize_dynamic(_lstm(), {nn.Linear, nn.LSTM}, dtype=torch.qint8)
    art = Artifact("torch-quantized", [InputSpec("input", (1, 10, 6), "float32", (0, 1))], "x", model=model)
    ctx = _ctx(tmp_path)
    out = export_torchscript(art, TorchScriptConfig(mode=mode), ctx)
    assert out.format == "torchscript" and out.path.name == "model.torchscript.pt"
    loaded = torch.jit.load(str(out.path))
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
    assert ctx.metrics["exporter"] == f"torch.jit.{mode}" and ctx.metrics["frozen"] is True


def test_pipeline_refuses_onnx_for_a_torch_quantized_model():
    assert "torch-quantized" not in registry.get("export", "onnx").accepts
    assert "torch-quantized" in registry.get("export", "torchscript").accepts


def test_torchscript_optimize_for_inference_is_applied_or_explained(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 3, 16, 16), "float32", (0,))], "x", model=models.tiny_cnn(3))
    ctx = _ctx(tmp_path)
    export_torchscript(art, TorchScriptConfig(), ctx)
    # MKLDNN-converted graphs cannot be saved; then the frozen graph is kept and the metrics say so.
    assert ctx.metrics["optimize_for_inference"] is True or "cannot be saved" in ctx.metrics["optimize_for_inference_skipped"]


# ---------------------------------------------------------------- pt2 with AOTInductor
@pytest.mark.slow
def test_pt2_aoti_package_runs_at_other_batch(tmp_path):
    torch.manual_seed(0)
    art = Artifact("torch", [InputSpec("input", (1, 4), "float32", (0,))], "x", model=models.tiny_mlp().eval())
    out = pipeline.run({"model": {"source": _save_mlp(tmp_path, art.model), "arch": "tests.models:tiny_mlp", "input_shape": ["1x4"]},
                        "stages": [{"export": {"target": "pt2", "aoti": True}}]}, tmp_path / "aoti")
    loaded = load_run_dir(tmp_path / "aoti")
    assert loaded.extra["aoti"] is True and loaded.path.name == "model.pt2"
    x = torch.randn(6, 4)
    torch.testing.assert_close(load_runner(loaded)(x)[0], art.model(x), rtol=0, atol=1e-5)
    assert out.final.stages[-1]["metrics"]["exporter"] == "aoti_compile_and_package"


def _save_mlp(tmp_path: Path, model: nn.Module) -> str:
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    return str(path)


# ---------------------------------------------------------------- failures
def test_verification_failure_raises_named_error_and_leaves_no_output(tmp_path, monkeypatch):
    original = ONNXRunner.run

    def noisy(self, prepared):
        return tuple(o + 0.5 for o in original(self, prepared))

    monkeypatch.setattr(ONNXRunner, "run", noisy)
    out = tmp_path / "bad"
    with pytest.raises(ExportVerificationError) as info:
        pipeline.run(_tiny_cnn_doc(tmp_path, "onnx"), out)
    assert "output 0 at batch 2: max abs diff 0.5" in str(info.value)
    assert "output 0 at batch 1" in str(info.value)
    assert isinstance(info.value, CompressError) and len(info.value.failures) == 2
    _no_leftovers(out)
    # the tolerance can be overridden
    pipeline.run(_tiny_cnn_doc(tmp_path, "onnx", atol=1.0), out)
    assert (out / "model.onnx").is_file()


def test_verification_failure_through_cli_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("exporters.torchscript.TorchScriptRunner.run", lambda self, p: (torch.full((len(p[0]), 5), 7.0),))
    path = tmp_path / "tiny.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), path)
    out = tmp_path / "ts"
    res = cli("export", path, "--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32",
              "--target", "torchscript", "-o", out)
    assert res.rc == 1
    assert len(res.err_lines) == 1 and "does not match its source" in res.err and "atol" in res.err
    _no_leftovers(out)


def test_unsupported_operator_names_it_and_suggests_another_target(tmp_path):
    art = Artifact("torch", [InputSpec("input", (1, 4), "float32", (0,))], "x", model=UsesCustomOp().eval())
    ctx = _ctx(tmp_path)
    with pytest.raises(CompressError, match=r"operator compress_test.mystery is not supported.*--target pt2"):
        export_onnx(art, OnnxConfig(), ctx)
    assert list(ctx.workdir.iterdir()) == []


def test_unknown_export_option_is_reported_before_running(cli, tmp_path):
    res = cli("export", "zoo:mobilenet_v2", "--target", "onnx", "-s", "opsett=17", "-o", tmp_path / "x")
    assert res.rc == 1 and "did you mean 'opset'" in res.err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- TensorRT
def test_trt_without_tensorrt_exits_1_with_one_line_and_writes_nothing(cli, tmp_path):
    if trt_export.is_installed("tensorrt") and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are both present here")
    path = tmp_path / "tiny.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), path)
    out = tmp_path / "trt"
    res = cli("export", path, "--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32",
              "--target", "trt", "-o", out)
    assert res.rc == 1
    assert len(res.err_lines) == 1
    assert ("tensorrt" in res.err and "pip install 'compress[trt]'" in res.err) or "NVIDIA GPU" in res.err
    _no_leftovers(out)


class FakeTensorRT(types.ModuleType):
    """A FAKE ``tensorrt`` module: records the calls compress makes, builds nothing. Not TensorRT."""

    def __init__(self, version: str):
        super().__init__("tensorrt")
        self.__version__ = version
        self.__spec__ = ModuleSpec("tensorrt", None)
        self.calls: list[tuple] = []
        fake = self
        major = int(version.split(".")[0])

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                pass

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 5   # the real enum value does not matter to compress

        class BuilderFlag:
            if major < 11:   # TensorRT 11 removed the precision flags
                FP16, INT8 = "FP16", "INT8"

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        class Input:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.errors = network, []

            def parse_from_file(self, path):
                model = onnx.load(path)
                fake.calls.append(("parse", path, model))
                if any(n.op_type == "Mystery" for n in model.graph.node):
                    self.errors = ["In node 0 (importFallbackPluginImporter): UNSUPPORTED_NODE: Mystery"]
                    return False
                for i in model.graph.input:
                    dims = tuple(d.dim_value if d.dim_value > 0 else -1 for d in i.type.tensor_type.shape.dim)
                    self.network.inputs.append(Input(i.name, dims))
                return True

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        class Profile:
            def set_shape(self, name, mins, opts, maxs):
                fake.calls.append(("profile", name, mins, opts, maxs))

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class BuilderConfig:
            int8_calibrator = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile",))

            def create_timing_cache(self, data):
                fake.calls.append(("timing_cache_in", bytes(data)))
                self.cache = TimingCache(bytes(data))
                return self.cache

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network", flags))
                return Network(flags)

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if config.int8_calibrator is not None:   # what TensorRT 10 does: pull batches until None
                    while (ptrs := config.int8_calibrator.get_batch([i.name for i in network.inputs])) is not None:
                        fake.calls.append(("calibration_batch", len(ptrs)))
                return b"FAKE-ENGINE"

        for name, obj in list(locals().items()):
            if isinstance(obj, type):
                setattr(self, name, obj)

    def called(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


@pytest.fixture
def cnn_onnx(tmp_path) -> tuple[Path, list[InputSpec]]:
    from exporters.onnx import export_file

    specs = [InputSpec("input", (1, 3, 16, 16), "float32", (0,))]
    path = tmp_path / "cnn.onnx"
    export_file(models.tiny_cnn(3), specs, path, exporter="legacy")
    return path, specs


def _build(fake, onnx_path, specs, tmp_path, calibration=None, **cfg):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    engine = tmp_path / "model.engine"
    info = trt_export.build_engine(fake, onnx_path, engine, specs, trt_export.TensorRTConfig(**cfg), calibration, scratch, device="cpu")
    return engine, info


def test_fake_trt10_fp16_profile_workspace_and_timing_cache(tmp_path, cnn_onnx):
    fake = FakeTensorRT("10.9.0")
    cache = tmp_path / "timing.cache"
    engine, info = _build(fake, *cnn_onnx, tmp_path, precision="fp16", min_batch=1, opt_batch=4, max_batch=16,
                          workspace_gb=2, timing_cache=str(cache))
    assert engine.read_bytes() == b"FAKE-ENGINE"
    assert fake.called("network") == [("network", 0)]
    assert fake.called("flag") == [("flag", "FP16")]
    assert fake.called("pool") == [("pool", "WORKSPACE", 2 << 30)]
    assert fake.called("profile") == [("profile", "input", (1, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16))]
    assert info["timing_cache"] == "created" and cache.read_bytes() == b"+timings"
    _, info = _build(FakeTensorRT("10.9.0"), *cnn_onnx, tmp_path, timing_cache=str(cache))   # a second build reuses it
    assert info["timing_cache"] == "reused" and cache.read_bytes() == b"+timings+timings"


def test_fake_trt10_int8_feeds_the_entropy_calibrator_from_data(tmp_path, cnn_onnx):
    fake = FakeTensorRT("10.9.0")
    batches = [(torch.randn(4, 3, 16, 16),) for _ in range(3)]
    _, info = _build(fake, *cnn_onnx, tmp_path, calibration=batches, precision="int8")
    assert ("flag", "INT8") in fake.calls
    assert fake.called("calibration_batch") == [("calibration_batch", 1)] * 3
    assert info["int8"] == "entropy calibration on 3 batches"
    with pytest.raises(CompressError, match="int8 needs calibration data"):
        _build(FakeTensorRT("10.9.0"), *cnn_onnx, tmp_path, precision="int8")


def test_fake_trt11_is_strongly_typed_fp16_from_the_graph(tmp_path, cnn_onnx):
    fake = FakeTensorRT("11.1.0")
    _, info = _build(fake, *cnn_onnx, tmp_path, precision="fp16")
    assert fake.called("network") == [("network", 1 << 5)] and info["typing"] == "strong"
    assert fake.called("flag") == []   # no precision flags exist in TensorRT 11
    parsed = fake.called("parse")[0][2]
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in parsed.graph.initializer)


def test_fake_trt11_int8_parses_a_qdq_graph(tmp_path, cnn_onnx):
    fake = FakeTensorRT("11.1.0")
    batches = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    _build(fake, *cnn_onnx, tmp_path, calibration=batches, precision="int8")
    ops = {n.op_type for n in fake.called("parse")[0][2].graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and fake.called("flag") == []
    with pytest.raises(CompressError, match="Q/DQ"):
        _build(FakeTensorRT("11.1.0"), *cnn_onnx, tmp_path, precision="int8")


def test_fake_trt_parse_error_is_one_clear_error(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Mystery", ["x"], ["y"], domain="custom")], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(CompressError, match="cannot parse the ONNX graph: .*UNSUPPORTED_NODE: Mystery"):
        _build(FakeTensorRT("10.9.0"), path, [InputSpec("x", (1, 4))], tmp_path)


def test_trt_needs_a_gpu_even_when_the_package_is_there(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.9.0"))
    with pytest.raises(CompressError, match="NVIDIA GPU") as info:
        trt_export.require_tensorrt()
    assert "tensorrt' package" not in str(info.value)


@pytest.mark.gpu
def test_real_tensorrt_engine_runs_at_other_batch(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA), which this machine lacks")
    pytest.importorskip("tensorrt", reason="needs the tensorrt package (pip install 'compress[trt]')")
    out = tmp_path / "trt"
    pipeline.run(_tiny_cnn_doc(tmp_path, "trt", max_batch=8), out)
    art = load_run_dir(out)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = models.tiny_cnn(num_classes=5)(x)
    torch.testing.assert_close(load_runner(art, "cuda")(x)[0], ref, rtol=0, atol=5e-2)
