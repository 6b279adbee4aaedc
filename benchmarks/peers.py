"""Peer tools, each used the way its documentation shows, at its best settings for a CPU.

Every builder returns a :class:`~benchmarks.harness.Variant`; one that cannot be built returns a variant
holding the reason (the results then say so) instead of raising. Peers are written against the tools'
public APIs directly, not through compress.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .harness import Variant, failed, file_bytes, state_dict_bytes


# ---------------------------------------------------------------- runners
class TorchRunner:
    def __init__(self, fn):
        self.fn = fn

    def prepare(self, inputs):
        return tuple(inputs)

    def run(self, prepared):
        return self.fn(*prepared)


class OrtRunner:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def prepare(self, inputs):
        return {n: x.numpy() for n, x in zip(self.names, inputs)}

    def run(self, feed):
        return self.session.run(None, feed)


class OvRunner:
    """OpenVINO's CPU plugin as its documentation shows: ``compile_model`` with the latency hint and the thread count; every
    other property (the inference precision among them) at OpenVINO's default for this CPU."""

    def __init__(self, path: Path, threads: int):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except RuntimeError:
            # measured on a 2-core AMD EPYC with AVX512-BF16: NNCF's int8 Fashion-MNIST CNN does not compile at the CPU's
            # default (bf16) precision ("!implementations.empty()"); what its user would do next is ask for f32
            self.compiled = ov.Core().compile_model(str(path), "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def prepare(self, inputs):
        return [x.numpy() for x in inputs]

    def run(self, feed):
        result = self.request.infer(feed, share_inputs=True)
        return [result[o] for o in self.compiled.outputs]


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------- torch
def torch_eager(model: nn.Module, name: str = "torch fp32 eager") -> Variant:
    return Variant(name, "torch", load=lambda threads: TorchRunner(model), size_bytes=state_dict_bytes(model), build_s=0.0)


def torch_compile(model: nn.Module, name: str = "torch.compile fp32") -> Variant:
    # compiled lazily in each phase's warm-up (the harness resets dynamo per phase: inductor bakes in the thread count)
    return Variant(name, "torch.compile", load=lambda threads: TorchRunner(torch.compile(model)), size_bytes=state_dict_bytes(model),
                   notes=["compile time is in warmup_s"])


def torch_dynamic_int8(model: nn.Module, name: str = "torch dynamic int8") -> Variant:
    try:
        torch.backends.quantized.engine = "x86"
        q, secs = _timed(lambda: torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8))
    except Exception as exc:  # noqa: BLE001
        return failed(name, "torch.ao", exc)
    return Variant(name, "torch.ao", load=lambda threads: TorchRunner(q), size_bytes=state_dict_bytes(q), build_s=secs)


def torchao_int8_compile(model: nn.Module, name: str = "torchao int8 dyn + compile") -> Variant:
    """torchao's Int8DynamicActivationInt8WeightConfig applied with quantize_, then torch.compile."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        def build():
            m = copy.deepcopy(model).eval()
            with _quiet():
                quantize_(m, Int8DynamicActivationInt8WeightConfig())
            return m
        q, secs = _timed(build)
        try:
            size = state_dict_bytes(q)
        except Exception:  # noqa: BLE001 - tensor subclasses may refuse plain torch.save
            size = None
    except Exception as exc:  # noqa: BLE001
        return failed(name, "torchao", exc)
    return Variant(name, "torchao", load=lambda threads: TorchRunner(torch.compile(q)), size_bytes=size, build_s=secs,
                   notes=["compile time is in warmup_s"])


def fx_static_int8(model: nn.Module, example: tuple, calib: list[tuple], name: str = "torch FX static int8") -> Variant:
    """torch.ao.quantization.quantize_fx with the x86 qconfig mapping, calibrated on real data."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        def build():
            torch.backends.quantized.engine = "x86"
            with _quiet():
                prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), example)
                with torch.no_grad():
                    for x in calib:
                        prepared(*x)
                return convert_fx(prepared)
        q, secs = _timed(build)
    except Exception as exc:  # noqa: BLE001
        return failed(name, "torch.ao FX", exc)
    return Variant(name, "torch.ao FX", load=lambda threads: TorchRunner(q), size_bytes=state_dict_bytes(q), build_s=secs)


def pt2e_compile(model: nn.Module, example: tuple, calib: list[tuple], name: str = "torchao PT2E int8 + compile") -> Variant:
    """torchao's PT2E flow with the X86InductorQuantizer, then torch.compile (the documented Inductor path).

    Compiled once here so a failure (on torch 2.14: onednn.qconv_prepack) is recorded as this variant's result."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

        def build():
            batch = torch.export.Dim("batch", min=1, max=1024)
            two = tuple(torch.cat([t, t]) for t in example)   # a batch of 1 would be specialised to a constant
            with _quiet():
                graph = torch.export.export(copy.deepcopy(model).eval(), two, dynamic_shapes=tuple({0: batch} for _ in example)).module()
                quantizer = xiq.X86InductorQuantizer()
                quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
                prepared = prepare_pt2e(graph, quantizer)
                with torch.no_grad():
                    for x in calib:
                        prepared(*x)
                converted = convert_pt2e(prepared)
                with torch.no_grad():
                    torch.compile(converted)(*example)   # surfaces a lowering failure now
            return converted
        q, secs = _timed(build)
    except Exception as exc:  # noqa: BLE001
        return failed(name, "torchao PT2E", exc)
    return Variant(name, "torchao PT2E", load=lambda threads: TorchRunner(torch.compile(q)), size_bytes=state_dict_bytes(q), build_s=secs,
                   notes=["compile time is in warmup_s"])


# ---------------------------------------------------------------- onnxruntime
def export_onnx(model: nn.Module, example: tuple, names: list[str], path: Path, dynamic: dict[str, dict[int, str]]) -> Path:
    """torch.onnx.export with the TorchScript-based exporter at opset 17 (the graph onnxruntime's fusions recognise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        torch.onnx.export(model.eval(), example, str(path), dynamo=False, opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={**dynamic, "logits": {0: "batch"}}, do_constant_folding=True)
    return path


def ort_fp32(onnx_path: Path, name: str = "onnxruntime fp32", build_s: float | None = None, tool: str = "onnxruntime") -> Variant:
    return Variant(name, tool, load=lambda threads: OrtRunner(onnx_path, threads), size_bytes=file_bytes(onnx_path), build_s=build_s)


def ort_transformer_fused(onnx_path: Path, out: Path, num_heads: int, hidden: int) -> Path:
    """onnxruntime.transformers.optimizer: Attention / SkipLayerNormalization / BiasGelu fusion for BERT."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        opt = optimize_model(str(onnx_path), model_type="bert", num_heads=num_heads, hidden_size=hidden)
        opt.save_model_to_file(str(out))
    return out


def ort_optimum_dynamic_int8(fused: Path, out: Path) -> Path:
    """Optimum's ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)``: QOperator dynamic int8 of
    MatMul/Add, int8 symmetric weights, uint8 asymmetric activations, no reduce_range."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # The quantizer needs the type of every MatMul output; plain ONNX shape inference stops at the fused contrib ops,
    # so fill them in with onnxruntime's symbolic shape inference first (as its transformer tools do).
    typed = out.parent / (out.stem + "_typed.onnx")
    with _quiet():
        onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(fused)), auto_merge=True, guess_output_rank=True), str(typed))
        quantize_dynamic(str(typed), str(out), op_types_to_quantize=["MatMul", "Add"], per_channel=False, reduce_range=False,
                         weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    typed.unlink(missing_ok=True)
    return out


class _Reader:
    def __init__(self, batches, names):
        self.items = [dict(zip(names, (t.numpy() for t in b))) for b in batches]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def ort_static_qdq(fp32: Path, out: Path, calib: list[tuple], reduce_range: bool = False) -> Path:
    """onnxruntime's documented CNN recipe: quant_pre_process, then quantize_static to Q/DQ (int8 per-channel weights,
    uint8 activations, MinMax calibration on real data). ``reduce_range`` (7-bit weights) is what onnxruntime's docs
    advise for CPUs without VNNI."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.parent / (out.stem + "_pre.onnx")
    with _quiet(), contextlib.chdir(out.parent):
        quant_pre_process(str(fp32), str(pre))
        names = [i.name for i in ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()]
        quantize_static(str(pre), str(out), _Reader(calib, names), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=reduce_range)
    pre.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- OpenVINO
def openvino_peers(model: nn.Module, example: tuple, calib: list[tuple], workdir: Path, transformer: bool = False, log=print) -> list[Variant]:
    """OpenVINO as its documentation recommends: ``ov.convert_model`` from the torch model with an example input, saved with
    its defaults (fp16-compressed weights) and run with its default precision for the CPU; NNCF post-training int8 on the
    calibration data (``nncf.quantize``, the default preset and the mixed one; the transformer model type for attention
    models); for transformers also NNCF's int8 weight compression (``nncf.compress_weights``)."""
    tool = "OpenVINO"
    try:
        import openvino as ov
    except ImportError:
        return [failed("OpenVINO fp32", tool, "openvino is not installed (pip install 'compress[openvino]')")]
    workdir.mkdir(parents=True, exist_ok=True)
    log("  peer: OpenVINO fp32 / NNCF int8")
    out: list[Variant] = []

    def save(m, name: str) -> Path:
        path = workdir / f"{name}.xml"
        ov.save_model(m, str(path))
        return path

    def variant(name: str, path: Path, secs: float) -> Variant:
        return Variant(name, tool, load=lambda threads: OvRunner(path, threads), size_bytes=file_bytes(path), build_s=secs,
                       notes=["OpenVINO's default precision for this CPU; f32 where that does not compile"])
    try:
        with _quiet(), torch.no_grad():
            fp32, secs = _timed(lambda: ov.convert_model(model.eval(), example_input=example))
        out.append(variant("OpenVINO fp32", save(fp32, "ov_fp32"), secs))
    except Exception as exc:  # noqa: BLE001
        return [failed("OpenVINO fp32", tool, exc)]
    try:
        import nncf
    except ImportError:
        return out + [failed("OpenVINO + NNCF int8", tool, "nncf is not installed (pip install 'compress[openvino]')")]
    dataset = nncf.Dataset([[x.numpy() for x in b] for b in calib])
    kind = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    recipes = [("OpenVINO + NNCF int8", {}), ("OpenVINO + NNCF int8, mixed preset", {"preset": nncf.QuantizationPreset.MIXED})]
    if transformer:   # the transformer model type defaults to the mixed preset: the other one is the performance preset
        recipes[1] = ("OpenVINO + NNCF int8, performance preset", {"preset": nncf.QuantizationPreset.PERFORMANCE})
    for i, (name, preset) in enumerate(recipes):
        try:
            with _quiet():
                q, qs = _timed(lambda: nncf.quantize(fp32, dataset, subset_size=len(calib), **kind, **preset))
            out.append(variant(name, save(q, f"ov_int8_{i}"), secs + qs))
        except Exception as exc:  # noqa: BLE001
            out.append(failed(name, tool, exc))
    if transformer:
        try:
            with _quiet():
                w, ws = _timed(lambda: nncf.compress_weights(fp32))
            out.append(variant("OpenVINO + NNCF int8 weights", save(w, "ov_int8_weights"), secs + ws))
        except Exception as exc:  # noqa: BLE001
            out.append(failed("OpenVINO + NNCF int8 weights", tool, exc))
    return out


# ---------------------------------------------------------------- peer sets
def cnn_peers(model: nn.Module, example: tuple, calib: list[tuple], workdir: Path, log=print) -> list[Variant]:
    """The vision peers: torch eager, torch.compile, FX static int8, torchao PT2E + compile, onnxruntime fp32 and static QDQ
    int8, with onnxruntime's default 8-bit weights and with the 7-bit weights (reduce_range) its docs advise without VNNI."""
    out = [torch_eager(model), torch_compile(model)]
    log("  peer: torch FX static int8")
    out.append(fx_static_int8(model, example, calib))
    log("  peer: torchao PT2E int8 + compile")
    out.append(pt2e_compile(model, example, calib))
    workdir.mkdir(parents=True, exist_ok=True)
    log("  peer: onnxruntime fp32 / static QDQ int8")
    try:
        fp32, secs = _timed(lambda: export_onnx(model, example, ["input"], workdir / "peer_fp32.onnx", {"input": {0: "batch"}}))
        out.append(ort_fp32(fp32, build_s=secs))
    except Exception as exc:  # noqa: BLE001
        out.append(failed("onnxruntime fp32", "onnxruntime", exc))
        out.append(failed("onnxruntime static QDQ int8", "onnxruntime", "needs the fp32 ONNX export, which failed"))
        return out
    for name, reduce in (("onnxruntime static QDQ int8", False), ("onnxruntime static QDQ int8, reduce_range", True)):
        try:
            q, qs = _timed(lambda: ort_static_qdq(fp32, workdir / f"peer_qdq{'_rr' if reduce else ''}.onnx", calib, reduce))
            out.append(ort_fp32(q, name, build_s=secs + qs))
        except Exception as exc:  # noqa: BLE001
            out.append(failed(name, "onnxruntime", exc))
    return out + openvino_peers(model, example, calib, workdir, log=log)


def text_peers(model: nn.Module, export_model: nn.Module, example: tuple, calib: list[tuple], workdir: Path, num_heads: int, hidden: int,
               log=print) -> list[Variant]:
    """The text peers: torch eager, torch.compile, torch dynamic int8, torchao int8 + compile, onnxruntime fused fp32,
    onnxruntime fused + dynamic int8 (Optimum's recipe) and OpenVINO (fp32, NNCF int8 for transformers, int8 weights).
    ``export_model`` is the same weights with eager attention, whose graph onnxruntime's fusion recognises."""
    out = [torch_eager(model), torch_compile(model), torch_dynamic_int8(model)] + openvino_peers(model, example, calib, workdir, True, log)
    log("  peer: torchao int8")
    out.append(torchao_int8_compile(model))
    workdir.mkdir(parents=True, exist_ok=True)
    log("  peer: onnxruntime fused fp32 / Optimum dynamic int8")
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    try:
        def fp32_fused():
            raw = export_onnx(export_model, example, ["input_ids", "attention_mask"], workdir / "peer_raw.onnx", axes)
            return ort_transformer_fused(raw, workdir / "peer_fused.onnx", num_heads, hidden)
        fused, secs = _timed(fp32_fused)
        out.append(ort_fp32(fused, "onnxruntime fp32 fused", build_s=secs))
    except Exception as exc:  # noqa: BLE001
        out.append(failed("onnxruntime fp32 fused", "onnxruntime", exc))
        out.append(failed("onnxruntime fused + dyn int8 (Optimum)", "onnxruntime", "needs the fused fp32 export, which failed"))
        return out
    try:
        q, qs = _timed(lambda: ort_optimum_dynamic_int8(fused, workdir / "peer_int8.onnx"))
        out.append(ort_fp32(q, "onnxruntime fused + dyn int8 (Optimum)", build_s=secs + qs))
    except Exception as exc:  # noqa: BLE001
        out.append(failed("onnxruntime fused + dyn int8 (Optimum)", "onnxruntime", exc))
    return out
