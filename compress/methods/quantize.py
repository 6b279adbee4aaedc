"""Quantization: ``dynamic``, ``static``, ``auto`` (and ``fp16``), each with a ``backend``.

- torch dynamic int8: Linear/LSTM/GRU weights int8, activations quantized on the fly; runs eagerly and
  exports to TorchScript. Helps Linear/LSTM-heavy models (transformers, RNNs) on CPU. Activations use all 8 bits
  (torch's stock module uses 7, which costs fidelity with or without VNNI); ``exclude`` keeps layers
  in float by name glob, and ``min_cosine`` keeps the measured most sensitive layers in float until a fidelity floor holds.
- onnxruntime static int8: Q/DQ per-channel, calibrated on real data; the fast CPU path for CNNs. ``reduce_range=auto``
  (the default) takes 7-bit weights on x86 CPUs without VNNI, where 8-bit ones saturate onnxruntime's int16 sums.
- onnxruntime dynamic int8: MatMul/Gemm weights int8 (after BERT fusion for transformers).
- auto: convolutions → onnxruntime static; Linear/LSTM-heavy → the faster of torch and onnxruntime dynamic.
- OpenVINO (quantize_ov.py, ``backend openvino``): static int8 calibrated through NNCF (its accuracy control with
  ``max_accuracy_drop`` on labelled data); dynamic is NNCF's int8 weight compression (activations stay float).
- qat (qat.py): quantization-aware fine-tuning with torchao PT2E, packaged like torch static.
Every result is checked against its input on real data (fidelity, accuracy) and for speed.
"""
from __future__ import annotations

import copy
import shutil
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..artifact import Artifact
from ..config import option
from ..cpu import REDUCE_RANGE, REDUCE_RANGE_HELP, reduce_range
from ..errors import CompressError, first_line
from ..evaluate import run_with_hooks
from ..registry import register
from . import quantize_ort as ort_q
from . import quantize_torch as torch_q
from .quality import QualityGate, check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynamicConfig(QualityGate):
    backend: str = option("torch", "torch (eager int8 Linear/LSTM/GRU), onnxruntime (int8 MatMul/Gemm) or openvino (NNCF int8 weight "
                          "compression, activations float)", choices=("torch", "onnxruntime", "openvino"))
    layers: tuple[str, ...] = option(("Linear", "LSTM", "GRU"), "torch: layer types to quantize (add Embedding for int8 lookup tables, weight-only)")
    per_channel: bool = option(True, "per-output-channel weight scales")
    reduce_range: bool | str = option("auto", REDUCE_RANGE_HELP + " (torch: activations, onnxruntime: weights)", choices=REDUCE_RANGE)
    dtype: str = option("qint8", "torch: weight dtype", choices=("qint8", "float16"))
    exclude: tuple[str, ...] = option((), "layers kept in float: torch module-name globs (e.g. '*.output.dense'), onnxruntime node names")
    embedding_bits: int = option(8, "onnxruntime: bits of embedding tables (4: int4 blocks of 64, half the size of int8)", choices=(8, 4))

    def __post_init__(self):   # checked when the config is built, so `validate` reports it before anything runs
        if self.backend != "onnxruntime" and self.embedding_bits != 8:
            raise ValueError(f"embedding_bits={self.embedding_bits} is an onnxruntime option (int4 embedding tables); "
                             "add backend onnxruntime (--backend onnxruntime), or drop embedding_bits")


@dataclass(frozen=True)
class StaticConfig(QualityGate):
    backend: str = option("onnxruntime", "onnxruntime (Q/DQ int8 ONNX), torch (torchao PT2E, x86 quantizer, AOTInductor .pt2) "
                          "or openvino (NNCF, OpenVINO IR)", choices=("onnxruntime", "torch", "openvino"))
    calibration: str = option("minmax", "how activation ranges are chosen", choices=tuple(ort_q.CALIBRATION))
    samples: int = option(128, "calibration samples taken from --data", range=(1, 100_000))
    per_channel: bool = option(True, "per-output-channel weight scales")
    reduce_range: bool | str = option("auto", REDUCE_RANGE_HELP + " (onnxruntime: weights, torch: activations)", choices=REDUCE_RANGE)
    exclude: tuple[str, ...] = option((), "node names to keep in float")
    float_ends: bool = option(False, "onnxruntime: keep the first and last Conv/Gemm/MatMul in float (the layers int8 hurts most)")
    float_layers: float = option(0.0, "onnxruntime: the share of the Conv/Gemm/MatMul layers kept in float, the ones int8 hurts most "
                                 "as measured on the calibration data (mixed precision), e.g. 0.1", range=(0.0, 1.0))
    preset: str = option("auto", "openvino: NNCF's preset, performance (symmetric activations) or mixed (asymmetric); auto: mixed "
                         "for transformers, performance else", choices=("auto", "performance", "mixed"))

    def __post_init__(self):
        if self.backend != "openvino" and self.preset != "auto":
            raise ValueError(f"preset={self.preset} is an NNCF option; add --backend openvino, or drop preset")
        if self.backend != "onnxruntime" and (self.float_layers or self.float_ends):
            raise ValueError("float_layers and float_ends are onnxruntime options; add --backend onnxruntime, or drop them")


@dataclass(frozen=True)
class AutoConfig(QualityGate):
    backend: str | None = option(None, "ignored: auto picks the backend", choices=(None, "torch", "onnxruntime"))
    samples: int = option(128, "calibration samples when static is picked", range=(1, 100_000))


@dataclass(frozen=True)
class CastConfig(QualityGate):
    dtype: str = option("float16", "float16 (NVIDIA GPUs) or bfloat16 (GPUs and CPUs with AMX/AVX512-BF16)", choices=("float16", "bfloat16"))


def _ort_dynamic(artifact: Artifact, config: DynamicConfig, ctx) -> Artifact:
    src, specs = ort_q.fp32_onnx(artifact, Path(ctx.workdir) / "_fp32", optimize_bert=True, fuse_embeddings=config.embedding_bits == 8)
    dst = Path(ctx.workdir) / "model.onnx"
    ctx.metrics.update(ort_q.quantize_dynamic(src, dst, config.per_channel, reduce_range(config.reduce_range, ctx.metrics, True), config.exclude, config.embedding_bits))
    shutil.rmtree(Path(ctx.workdir) / "_fp32", ignore_errors=True)
    return artifact.evolve(format="onnx", path=dst, model=None, input_spec=specs, extra={**artifact.extra, "quantization": "dynamic int8"})


@register("quantize", "dynamic", DynamicConfig, accepts=("torch", "onnx"),
          produces=lambda c: {"torch": "torch-quantized", "openvino": "openvino"}.get(c.backend, "onnx"),
          summary="int8 weights, activations quantized on the fly (Linear/LSTM/GRU or MatMul; transformers and RNNs on CPU)")
def dynamic(artifact, config: DynamicConfig, ctx):
    if config.backend == "torch" and artifact.format != "torch":
        raise CompressError(f"torch dynamic quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    if config.backend == "torch":
        out = torch_q.torch_dynamic(artifact, config, ctx, reduce_range(config.reduce_range, ctx.metrics, False))
    elif config.backend == "openvino":
        from . import quantize_ov

        out, info = quantize_ov.weights(artifact, ctx)
        ctx.metrics.update(info)
    else:
        out = _ort_dynamic(artifact, config, ctx)
    return check(artifact, out, config, ctx, retry=None)


# ---------------------------------------------------------------- onnxruntime static
def _ort_static(artifact: Artifact, config: StaticConfig, ctx, src: Path, specs, batches, exclude: tuple[str, ...]) -> Artifact:
    dst = Path(ctx.workdir) / "model.onnx"
    ctx.metrics.update(ort_q.quantize_static(src, dst, batches, config.calibration, config.per_channel, reduce_range(config.reduce_range, ctx.metrics, True), exclude))
    ctx.metrics["kept_float"] = list(exclude)
    return artifact.evolve(format="onnx", path=dst, model=None, input_spec=specs, extra={**artifact.extra, "quantization": "static int8 QDQ"})


@register("quantize", "static", StaticConfig, accepts=("torch", "onnx"),
          produces=lambda c: {"onnxruntime": "onnx", "openvino": "openvino"}.get(c.backend, "pt2"),
          needs_data=True, requires=(("onnxruntime", None),),
          summary="int8 weights and activations calibrated on --data: onnxruntime Q/DQ (fast CPU path for CNNs) or torch PT2E → .pt2")
def static(artifact, config: StaticConfig, ctx):
    if config.backend == "torch":
        out = torch_q.torch_static(artifact, config.samples, ctx, reduce_range(config.reduce_range, ctx.metrics, False))
        return check(artifact, out, config, ctx, retry=None)
    if config.backend == "openvino":
        from . import quantize_ov

        out, info = quantize_ov.static(artifact, ctx, samples=config.samples, preset=config.preset, max_accuracy_drop=config.max_accuracy_drop)
        ctx.metrics.update(info)
        return check(artifact, out, config, ctx, retry=None)
    try:
        # Export and calibration data are made once; a retry only re-quantizes with more layers kept in float.
        src, specs = ort_q.fp32_onnx(artifact, Path(ctx.workdir) / "_fp32")
        batches = ort_q.calibration_batches(artifact, ctx, config.samples)
        exclude = tuple(config.exclude) + (tuple(ort_q.first_and_last(src)) if config.float_ends else ())
        out = _ort_static(artifact, config, ctx, src, specs, batches, exclude)
        if config.float_layers:       # mixed precision: measure what int8 costs each layer, keep the worst in float
            try:
                worst = ort_q.most_sensitive(src, out.path, batches, config.float_layers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds; say which step failed
                raise CompressError(f"mixed precision could not measure the layers' sensitivity: {first_line(exc, 200)}",
                                    "Keep layers in float by name instead (-s exclude=NODE,...), or -s float_ends=true") from None
            shown = ", ".join(f"{w['node']} {w['loss_db']:.1f} dB" for w in worst[:5]) + (", …" if len(worst) > 5 else "")
            log.info(f"mixed precision: the {len(worst)} layers int8 hurts most are kept in float ({shown})")
            exclude += tuple(w["node"] for w in worst if w["node"] not in exclude)
            out = _ort_static(artifact, config, ctx, src, specs, batches, exclude)
            ctx.metrics["sensitivity_db"] = {w["node"]: w["loss_db"] for w in worst}

        def retry():
            sensitive = tuple(config.exclude) + tuple(ort_q.first_and_last(src))
            return _ort_static(artifact, config, ctx, src, specs, batches, sensitive)
        return check(artifact, out, config, ctx, retry=retry)
    finally:
        shutil.rmtree(Path(ctx.workdir) / "_fp32", ignore_errors=True)


# ---------------------------------------------------------------- auto
def layer_mix(artifact: Artifact) -> dict:
    """Share of multiply-adds in convolutions vs Linear/RNN layers, measured with hooks on one example."""
    model = artifact.model
    macs = {"conv": 0, "linear": 0}
    hooks = []

    def hook(kind):
        def fn(m, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            if kind == "conv":
                macs["conv"] += o.numel() * m.weight[0].numel()
            elif isinstance(m, nn.Linear):
                macs["linear"] += o.numel() * m.in_features
            else:
                macs["linear"] += sum(p.numel() for p in m.parameters()) * (o.shape[1] if o.dim() == 3 else 1)
        return fn
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(hook("conv")))
        elif isinstance(m, (nn.Linear, nn.LSTM, nn.GRU)):
            hooks.append(m.register_forward_hook(hook("linear")))
    run_with_hooks(model, hooks, [[s.example(1) for s in artifact.input_spec]])
    total = max(1, macs["conv"] + macs["linear"])
    return {"conv_share": macs["conv"] / total, "linear_share": macs["linear"] / total}


@register("quantize", "auto", AutoConfig, accepts=("torch", "onnx"), produces="?",
          summary="pick per model: convolutions → static int8 (onnxruntime), Linear/LSTM-heavy → the faster dynamic int8")
def auto(artifact, config: AutoConfig, ctx):
    if artifact.format == "onnx":
        choice = "static" if ctx.data_spec else "dynamic"
        mix = {}
    else:
        mix = layer_mix(artifact)
        choice = "static" if mix["conv_share"] >= 0.5 else "dynamic"
    ctx.metrics["auto"] = {"picked": choice, **{k: round(v, 3) for k, v in mix.items()}}
    if choice == "static":
        if not ctx.data_spec:
            raise CompressError("auto picked static int8 for this convolutional model, which needs calibration data", "Give --data (e.g. --data photos)")
        return static(artifact, StaticConfig(samples=config.samples, max_accuracy_drop=config.max_accuracy_drop,
                                             require_speedup=config.require_speedup), ctx)
    candidates = []
    backends = ["onnxruntime"] if artifact.format == "onnx" else ["torch", "onnxruntime"]
    for backend in backends:
        sub = copy.copy(ctx)
        sub.metrics = {}
        sub.workdir = Path(ctx.workdir) / f"_auto_{backend}"
        sub.workdir.mkdir(parents=True, exist_ok=True)
        try:
            out = dynamic(artifact, DynamicConfig(backend=backend, max_accuracy_drop=config.max_accuracy_drop, check_speed=True), sub)
        except CompressError as exc:
            ctx.metrics["auto"][f"{backend}_failed"] = exc.what
            continue
        candidates.append((sub.metrics.get("speedup_check", 0.0), backend, out, sub))
    if not candidates:
        raise CompressError("auto could not quantize this model with any backend", "Try --method dynamic --backend torch and read its error")
    speed, backend, out, sub = max(candidates, key=lambda c: c[0])
    ctx.metrics["auto"]["candidates"] = {b: round(s, 3) for s, b, _, _ in candidates}
    ctx.metrics["auto"]["backend"] = backend
    ctx.metrics.update(sub.metrics)
    if out.format == "onnx":
        final = Path(ctx.workdir) / "model.onnx"
        shutil.move(str(out.path), final)
        out = out.evolve(path=final)
    for _, b, _, s in candidates:
        shutil.rmtree(s.workdir, ignore_errors=True)
    if config.require_speedup and speed <= 1.0:
        raise CompressError(f"no quantized variant was faster than the input (best {speed:.2f}x)", "Keep the float model, or prune first")
    return out


# ---------------------------------------------------------------- fp16 / bf16 casts
@register("quantize", "fp16", CastConfig, accepts=("torch",), produces="torch",
          summary="cast weights to float16/bfloat16 (for GPUs; slow on most CPUs); or export ONNX with -s fp16=true")
def fp16(artifact, config: CastConfig, ctx):
    model = torch_q.cast(copy.deepcopy(artifact.model).eval(), config.dtype)
    out = artifact.evolve(model=model, rebuild=[*artifact.rebuild, {"op": "cast", "dtype": config.dtype}])
    return check(artifact, out, config, ctx, retry=None)
