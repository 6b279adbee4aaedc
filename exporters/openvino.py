"""The OpenVINO export target (IR: model.xml + model.bin), verified in OpenVINO against its source, and the runner that
every OpenVINO artifact (exported, NNCF-quantized, given as SOURCE) runs through: OpenVINO's CPU plugin with the latency
hint, the thread count asked for and the inference precision recorded with the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.artifact import Artifact
from compress.config import option
from compress.errors import CompressError, first_line
from compress.openvino_model import PRECISIONS, convert, openvino, save
from compress.registry import register, register_runner
from compress.runners import Runner

from .verify import verified


@dataclass(frozen=True)
class OpenVINOConfig:
    precision: str = option("fp32", "inference precision on the CPU: fp32, bf16 (CPUs with AMX or AVX512-BF16; f32 elsewhere) "
                            "or fp16 (also stores fp16 weights, half the file)", choices=tuple(PRECISIONS))
    via: str = option("auto", "convert the torch model with OpenVINO's PyTorch frontend (torch), through an ONNX export (onnx), "
                      "or torch first and ONNX if that fails (auto)", choices=("auto", "torch", "onnx"))
    atol: float | None = option(None, "allowed max abs difference vs the source, relative to output scale (default fp32 1e-4, bf16/fp16 5e-2)",
                                range=(0, None))


@register("export", "openvino", OpenVINOConfig, accepts=("torch", "onnx"), produces="openvino", requires=(("openvino", "openvino"),),
          summary="OpenVINO IR (CPU runtime): converted from the torch model or its ONNX, fp32/bf16/fp16, verified in OpenVINO")
def export_openvino(artifact: Artifact, config: OpenVINOConfig, ctx) -> Artifact:
    """OpenVINO IR (CPU runtime): converted from the torch model or its ONNX, fp32/bf16/fp16, verified in OpenVINO."""
    model, how = convert(artifact, config.via)
    path = save(model, Path(ctx.workdir) / "model.xml", fp16_weights=config.precision == "fp16")
    out = artifact.evolve(format="openvino", path=path, model=None,
                          extra={**artifact.extra, "inference_precision": PRECISIONS[config.precision], "converted": how})
    ctx.metrics.update({"exporter": f"openvino.convert_model ({how})", "openvino": openvino().__version__,
                        "inference_precision": PRECISIONS[config.precision]})
    out = verified(artifact, out, ctx, target="openvino", precision=config.precision, atol=config.atol)
    if config.precision != "fp32":   # a CPU without bf16/fp16 kernels runs f32 whatever the hint: say which ran
        ctx.metrics["inference_precision_used"] = OpenVINORunner(out).precision
    return out


@register_runner("openvino")
class OpenVINORunner(Runner):
    """OpenVINO's CPU plugin, one infer request: latency hint, INFERENCE_NUM_THREADS = threads, and the inference precision
    the artifact was made for (f32 unless its export asked otherwise; NNCF int8 models run their int8 kernels either way)."""
    format = "openvino"

    def __init__(self, artifact, device="cpu", threads=None):
        if device != "cpu":
            raise CompressError("OpenVINO artifacts run on the CPU here (OpenVINO's GPU plugin is for Intel GPUs)",
                                "Use --device cpu, or export to ONNX/TensorRT for NVIDIA GPUs")
        super().__init__(artifact, device, threads)
        ov = openvino()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": artifact.extra.get("inference_precision", "f32")}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(artifact.path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with long messages
            raise CompressError(f"OpenVINO cannot load {artifact.path} ({first_line(exc)})", "Re-export it with compress export --target openvino") from None
        self.request = self.compiled.create_infer_request()
        self.dtypes = [i.get_element_type().to_dtype() for i in self.compiled.inputs]
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def prepare(self, inputs):
        if len(inputs) != len(self.dtypes):
            raise CompressError(f"the OpenVINO model takes {len(self.dtypes)} input(s) but {len(inputs)} were given", "Check --input-shape")
        return [np.ascontiguousarray(x.detach().cpu().numpy().astype(t, copy=False)) for x, t in zip(inputs, self.dtypes)]

    def run(self, prepared):
        try:
            result = self.request.infer(prepared, share_inputs=True)
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"OpenVINO failed to run {self.artifact.path}: {first_line(exc)}", "Check the input shapes and dtypes") from None
        return tuple(torch.from_numpy(np.asarray(result[o])) for o in self.compiled.outputs)
