"""The ONNX export target: torch → ONNX (:mod:`compress.onnx_export`), verified in onnxruntime against its source,
and the onnxruntime runner every ONNX artifact (exported, quantized, given as SOURCE) runs through.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.artifact import Artifact
from compress.config import option
from compress.errors import CompressError, first_line
from compress.inputs import with_dynamic_axes
from compress.onnx_export import FUSION_OPSET, bert_type, export_file
from compress.registry import register, register_runner
from compress.runners import Runner

from .verify import verified


@dataclass(frozen=True)
class OnnxConfig:
    opset: int | None = option(None, "ONNX opset version (default: the exporter's own; 17 with optimize)", range=(9, 25))
    exporter: str = option("auto", "torch.export-based 'dynamo', TorchScript-based 'legacy', or 'auto' (dynamo, legacy on failure)",
                           choices=("auto", "dynamo", "legacy"))
    dynamic_axes: tuple[str, ...] | None = option(None, "axes to make dynamic: batch, sequence or axis numbers (default: the input spec's)")
    static_shapes: bool = option(False, "make no axis dynamic")
    external_data: str = option("auto", "weights in a separate model.onnx.data file: auto (only above 2 GB), always, never",
                                choices=("auto", "always", "never"))
    optimize: bool = option(False, "fuse attention/layer-norm with onnxruntime's transformer optimizer (BERT-like models)")
    fp16: bool = option(False, "convert weights and compute to float16 (inputs and outputs stay float32)")
    atol: float | None = option(None, "allowed max abs difference vs the source, relative to output scale (default 1e-4, fp16 2e-2)", range=(0, None))


@register("export", "onnx", OnnxConfig, accepts=("torch",), produces="onnx", requires=(("onnx", None), ("onnxruntime", None)),
          summary="ONNX via torch.export (legacy exporter as fallback), dynamic batch, verified in onnxruntime")
def export_onnx(artifact: Artifact, config: OnnxConfig, ctx) -> Artifact:
    """ONNX via torch.export (legacy exporter as fallback), dynamic batch, verified in onnxruntime."""
    specs = with_dynamic_axes(artifact.input_spec, config.dynamic_axes, config.static_shapes)
    bert = bert_type(artifact) if config.optimize else None
    if config.optimize and bert is None:
        raise CompressError("optimize: true applies onnxruntime's transformer optimizer, which needs a BERT-like transformers model",
                            f"Drop optimize for this model ({(artifact.arch or {}).get('spec', 'no architecture spec')})")
    exporter, opset = config.exporter, config.opset
    if bert is not None:
        # onnxruntime's attention fusion recognises the TorchScript-based exporter's graph (eager attention), not
        # dynamo's, and at opset 17 (measured on MiniLM: 6 Attention nodes at 14 and 17, none at 20).
        exporter = "legacy-first" if exporter == "auto" else exporter
        opset = opset or FUSION_OPSET
    path = Path(ctx.workdir) / "model.onnx"
    info = export_file(artifact.model, specs, path, opset=opset, exporter=exporter, external_data=config.external_data,
                       optimize=bert, fp16=config.fp16, arch=artifact.arch)
    out = artifact.evolve(format="onnx", path=path, model=None, input_spec=specs, extra={k: info[k] for k in ("exporter", "opset")})
    ctx.metrics.update(info)
    return verified(artifact, out, ctx, target="onnx", precision="fp16" if config.fp16 else "fp32", atol=config.atol)


@register_runner("onnx")
class ONNXRunner(Runner):
    format = "onnx"

    def __init__(self, artifact, device="cpu", threads=None):
        super().__init__(artifact, device, threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CompressError("onnxruntime here has no CUDA support", "pip install onnxruntime-gpu in place of onnxruntime")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(artifact.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            raise CompressError(f"onnxruntime cannot load {artifact.path} ({first_line(exc)})", "Re-export the model, or check the opset") from None
        self.names = [i.name for i in self.session.get_inputs()]
        self.types = [i.type for i in self.session.get_inputs()]

    def prepare(self, inputs):
        if len(inputs) != len(self.names):
            raise CompressError(f"the ONNX model takes {len(self.names)} input(s) but {len(inputs)} were given", "Check --input-shape")
        feed = {}
        for name, typ, x in zip(self.names, self.types, inputs):
            arr = x.detach().cpu().numpy()
            if "int64" in typ and arr.dtype != np.int64:
                arr = arr.astype(np.int64)
            elif "float16" in typ:
                arr = arr.astype(np.float16)
            elif "float" in typ and arr.dtype != np.float32:
                arr = arr.astype(np.float32)
            feed[name] = arr
        return feed

    def run(self, prepared):
        try:
            out = self.session.run(None, prepared)
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"onnxruntime failed to run {self.artifact.path}: {first_line(exc)}", "Check the input shapes and dtypes") from None
        return tuple(torch.from_numpy(np.asarray(o)) for o in out)
