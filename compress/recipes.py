"""What ``compress optimize`` tries for a model: its candidates (a recipe is a short pipeline), chosen from what the
model is (a convolutional net, a Linear-heavy one, a transformer), where it will run (CPU or an NVIDIA GPU) and what is
installed (OpenVINO and NNCF, TensorRT)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .artifact import Artifact
from .cpu import has_bf16
from .errors import CompressError, is_installed


@dataclass
class Candidate:
    name: str
    stages: list[dict]                       # pipeline items: [{"quantize": {"method": "static", ...}}, ...]
    training: bool = False
    seconds: float | None = None
    error: str | None = None
    path: Path | None = None                 # its finished run directory
    probe: dict = field(default_factory=dict)  # its quick measurement right after it was made
    row: dict = field(default_factory=dict)  # its row in the final, interleaved measurement
    where: str = "here"                      # "ray" when --ray made it on a Ray worker

    def record(self) -> dict:
        r = self.row
        m = r.get("metrics", {})
        return {"recipe": self.name, "stages": self.stages, "p50_ms": r.get("p50_ms"), "p90_ms": r.get("p90_ms"), "p99_ms": r.get("p99_ms"),
                "throughput_per_s": r.get("throughput_per_s"), "size_bytes": r.get("size_bytes"), "accuracy": m.get("accuracy"),
                "fidelity": _fidelity(m), "seconds": self.seconds, "error": self.error, "made_on": self.where}


def _fidelity(m: dict) -> float | None:
    return m.get("top1_agreement_vs_source", m.get("cosine_vs_source"))


def recipes(artifact: Artifact, config, labelled: bool, data: str) -> list[Candidate]:
    """What to try for this model (``config``: the search's OptimizeConfig): cheap candidates first (exports, post-training
    quantization), then training ones."""
    from .methods.quantize import layer_mix
    from .onnx_export import bert_type

    text = bool((artifact.arch or {}).get("spec", "").startswith("hf:")) and artifact.input_spec[0].dtype.startswith("int")
    if config.device == "cuda":
        return _gpu_recipes(artifact, config, labelled, text)
    cands: list[Candidate] = []
    ov = is_installed("openvino")
    ov_int8 = ov and is_installed("nncf")
    ov_static = Candidate("openvino int8 (NNCF)", [{"quantize": {"method": "static", "backend": "openvino"}}])
    ov_bf16 = Candidate("openvino bf16", [{"export": {"target": "openvino", "precision": "bf16"}}])   # CPUs with native bf16 only
    if artifact.format == "onnx":
        return [Candidate("onnx int8 static", [{"quantize": {"method": "static"}}]),
                Candidate("onnx int8 dynamic", [{"quantize": {"method": "dynamic", "backend": "onnxruntime"}}]),
                *([Candidate("openvino fp32", [{"export": {"target": "openvino"}}])] if ov else []),
                *([ov_static] if ov_int8 else [])]
    conv = not text and layer_mix(artifact)["conv_share"] >= 0.5
    if text:
        fused = {"optimize": True} if bert_type(artifact) else {}
        cands += [Candidate("onnx fp32" + (" (fused)" if fused else ""), [{"export": {"target": "onnx", **fused}}]),
                  Candidate("onnx int8 dynamic", [{"quantize": {"method": "dynamic", "backend": "onnxruntime"}}]),
                  Candidate("onnx int8 dynamic, int4 embeddings",
                            [{"quantize": {"method": "dynamic", "backend": "onnxruntime", "embedding_bits": 4}}]),
                  Candidate("torch int8 dynamic", [{"quantize": {"method": "dynamic", "backend": "torch"}}])]
        cands += [Candidate("openvino fp32", [{"export": {"target": "openvino"}}])] if ov else []
        cands += [ov_bf16] if ov and has_bf16() else []
        cands += [ov_static, Candidate("openvino int8 weights (NNCF)", [{"quantize": {"method": "dynamic", "backend": "openvino"}}])] if ov_int8 else []
    else:
        cands += [Candidate("onnx fp32", [{"export": {"target": "onnx"}}]),
                  Candidate("pt2 (torch.export)", [{"export": {"target": "pt2"}}]),
                  Candidate("torchscript", [{"export": {"target": "torchscript"}}])]
        cands += [Candidate("openvino fp32", [{"export": {"target": "openvino"}}])] if ov else []
        cands += [ov_bf16] if ov and has_bf16() else []
        cands += [ov_static] if ov_int8 else []
        if conv:
            cands += [Candidate("onnx int8 static", [{"quantize": {"method": "static", "backend": "onnxruntime"}}]),
                      Candidate("onnx int8 static, entropy calibration",
                                [{"quantize": {"method": "static", "backend": "onnxruntime", "calibration": "entropy"}}]),
                      Candidate("onnx int8 static, first and last layers float",
                                [{"quantize": {"method": "static", "backend": "onnxruntime", "float_ends": True}}]),
                      Candidate("torch int8 static (PT2E, AOTInductor)", [{"quantize": {"method": "static", "backend": "torch"}}])]
        else:
            cands += [Candidate("onnx int8 dynamic", [{"quantize": {"method": "dynamic", "backend": "onnxruntime"}}]),
                      Candidate("torch int8 dynamic", [{"quantize": {"method": "dynamic", "backend": "torch"}}])]
    if config.training and labelled and artifact.format == "torch":
        teacher = {"teacher": config.teacher} if config.teacher else {}
        if text:
            layers = _encoder_layers(artifact)
            for keep in sorted({max(1, layers // 2), max(1, layers // 3)}, reverse=True)[:2] if layers > 1 else []:
                student = {"distill": {"student_layers": keep, "lr": 1e-4, **teacher}}
                tail = [{"quantize": {"method": "dynamic", "backend": "onnxruntime", "embedding_bits": 4}}]
                cands.append(Candidate(f"distill {keep}-layer student → onnx int8 dynamic, int4 embeddings", [student, *tail], training=True))
                if ov_int8:
                    cands.append(Candidate(f"distill {keep}-layer student → openvino int8 (NNCF)", [student, *ov_static.stages], training=True))
        else:
            for amount in (0.3, 0.5):
                head = [{"prune": {"method": "structured", "amount": amount}}, {"distill": {**teacher}}]
                cands.append(Candidate(f"prune {amount:.0%} + distill → onnx fp32", [*head, {"export": {"target": "onnx"}}], training=True))
                if conv:
                    cands.append(Candidate(f"prune {amount:.0%} + distill → onnx int8 static",
                                           [*head, {"quantize": {"method": "static", "backend": "onnxruntime"}}], training=True))
                if ov_int8:
                    cands.append(Candidate(f"prune {amount:.0%} + distill → openvino int8 (NNCF)", [*head, *ov_static.stages], training=True))
    return cands


def _gpu_recipes(artifact: Artifact, config, labelled: bool, text: bool) -> list[Candidate]:
    """For an NVIDIA GPU: the formats with CUDA kernels in fp32 and fp16 (onnxruntime's CUDA provider, torch, torch.export),
    TensorRT fp16 and int8 when TensorRT is installed (int8 from a Q/DQ graph calibrated on the data, which TensorRT 10
    and 11 both build), and with training allowed the smaller students in fp16. CPU-only recipes (onnxruntime and
    torch int8 kernels, OpenVINO) are left out: they would run on the CPU or fall back to float."""
    from .onnx_export import bert_type

    fused = {"optimize": True} if text and bert_type(artifact) else {}
    trt = is_installed("tensorrt")
    if artifact.format == "onnx":
        return [Candidate("tensorrt fp16", [{"export": {"target": "trt", "precision": "fp16"}}]),
                Candidate("tensorrt int8", [{"export": {"target": "trt", "precision": "int8"}}])] if trt else []
    cands = [Candidate("onnx fp32 (CUDA)" + (" (fused)" if fused else ""), [{"export": {"target": "onnx", **fused}}]),
             Candidate("onnx fp16 (CUDA)", [{"export": {"target": "onnx", "fp16": True, **fused}}]),
             Candidate("torch fp16", [{"quantize": {"method": "fp16"}}]),
             Candidate("pt2 (torch.export)", [{"export": {"target": "pt2"}}])]
    if trt:
        cands += [Candidate("tensorrt fp16", [{"export": {"target": "trt", "precision": "fp16"}}]),
                  Candidate("tensorrt int8", [{"export": {"target": "trt", "precision": "int8"}}])]
    if config.training and labelled:
        teacher = {"teacher": config.teacher} if config.teacher else {}
        tail = [{"export": {"target": "trt", "precision": "fp16"}}] if trt else [{"export": {"target": "onnx", "fp16": True, **fused}}]
        where = "tensorrt fp16" if trt else "onnx fp16"
        if text:
            layers = _encoder_layers(artifact)
            for keep in sorted({max(1, layers // 2), max(1, layers // 3)}, reverse=True)[:2] if layers > 1 else []:
                cands.append(Candidate(f"distill {keep}-layer student → {where}",
                                       [{"distill": {"student_layers": keep, "lr": 1e-4, **teacher}}, *tail], training=True))
        elif artifact.format == "torch":
            for amount in (0.3, 0.5):
                cands.append(Candidate(f"prune {amount:.0%} + distill → {where}",
                                       [{"prune": {"method": "structured", "amount": amount}}, {"distill": {**teacher}}, *tail], training=True))
    return cands


def _encoder_layers(artifact: Artifact) -> int:
    from .methods.depth import encoder_layers

    try:
        return len(encoder_layers(artifact.model)[2])
    except CompressError:
        return 0


# ---------------------------------------------------------------- running candidates
