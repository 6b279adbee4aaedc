"""Quantization: ``dynamic``, ``static``, ``auto`` (and ``fp16``), each with a ``backend``.

- torch dynamic int8: Linear/LSTM/GRU weights int8, activations quantized on the fly; runs eagerly and
  exports to TorchScript. Helps Linear/LSTM-heavy models (transformers, RNNs) on CPU.
- onnxruntime static int8: Q/DQ per-channel, calibrated on real data; the fast CPU path for CNNs.
- onnxruntime dynamic int8: MatMul/Gemm weights int8 (after BERT fusion for transformers).
- auto: convolutions → onnxruntime static; Linear/LSTM-heavy → the faster of torch and onnxruntime dynamic.
Every result is checked against its input on real data (fidelity, accuracy) and for speed.
"""
from __future__ import annotations

import copy
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifact import Artifact, rebuilder
from ..errors import CompressError
from ..registry import option, register
from . import quantize_ort as ort_q

DYNAMIC_LAYERS = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}


@dataclass(frozen=True)
class DynamicConfig:
    backend: str = option("torch", "torch (eager int8 Linear/LSTM/GRU) or onnxruntime (int8 MatMul/Gemm)", choices=("torch", "onnxruntime"))
    layers: tuple[str, ...] = option(("Linear", "LSTM", "GRU"), "torch: layer types to quantize")
    per_channel: bool = option(True, "per-output-channel weight scales")
    reduce_range: bool = option(False, "7-bit weights (for CPUs without VNNI that overflow int16 accumulators)")
    dtype: str = option("qint8", "torch: weight dtype", choices=("qint8", "float16"))
    exclude: tuple[str, ...] = option((), "onnxruntime: node names to keep in float")
    max_accuracy_drop: float | None = option(None, "fail (or retry less aggressively) when accuracy drops more than this", range=(0.0, 1.0))
    require_speedup: bool = option(False, "fail when the result is not faster than its input (batch 1, 1 thread)")
    check_speed: bool = option(True, "time input and result briefly and warn when it is not faster")


@dataclass(frozen=True)
class StaticConfig:
    backend: str = option("onnxruntime", "onnxruntime (Q/DQ int8 ONNX) or torch (torchao PT2E, x86 quantizer, AOTInductor .pt2)",
                          choices=("onnxruntime", "torch"))
    calibration: str = option("minmax", "how activation ranges are chosen", choices=tuple(ort_q.CALIBRATION))
    samples: int = option(128, "calibration samples taken from --data", range=(1, 100_000))
    per_channel: bool = option(True, "per-output-channel weight scales")
    reduce_range: bool = option(False, "7-bit weights (CPUs without VNNI)")
    exclude: tuple[str, ...] = option((), "node names to keep in float")
    max_accuracy_drop: float | None = option(None, "retry with the first and last layers in float, then fail, when accuracy drops more than this", range=(0.0, 1.0))
    require_speedup: bool = option(False, "fail when the result is not faster than its input (batch 1, 1 thread)")
    check_speed: bool = option(True, "time input and result briefly and warn when it is not faster")


@dataclass(frozen=True)
class AutoConfig:
    backend: str | None = option(None, "ignored: auto picks the backend", choices=(None, "torch", "onnxruntime"))
    samples: int = option(128, "calibration samples when static is picked", range=(1, 100_000))
    max_accuracy_drop: float | None = option(None, "as for static/dynamic", range=(0.0, 1.0))
    require_speedup: bool = option(False, "fail when the result is not faster than its input")


# ---------------------------------------------------------------- torch dynamic
def quantize_dynamic(model: nn.Module, layers, per_channel: bool, dtype: str) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, per_channel_dynamic_qconfig

    unknown = [l for l in layers if l not in DYNAMIC_LAYERS]
    if unknown:
        raise CompressError(f"cannot dynamically quantize layer type(s) {', '.join(unknown)}", f"Supported: {', '.join(DYNAMIC_LAYERS)}")
    if dtype == "float16":
        spec = {DYNAMIC_LAYERS[l]: float16_dynamic_qconfig for l in layers}
    else:
        spec = {DYNAMIC_LAYERS[l]: (per_channel_dynamic_qconfig if per_channel and l == "Linear" else default_dynamic_qconfig) for l in layers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "x86" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "x86"
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.float16 if dtype == "float16" else torch.qint8)


@rebuilder("quantize_dynamic")
def _rebuild_dynamic(model: nn.Module, step: dict) -> nn.Module:
    return quantize_dynamic(model, step["layers"], step["per_channel"], step["dtype"])


def _torch_dynamic(artifact: Artifact, config: DynamicConfig, ctx) -> Artifact:
    if artifact.format != "torch":
        raise CompressError(f"torch dynamic quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    model = copy.deepcopy(artifact.model).eval()
    present = [l for l, cls in DYNAMIC_LAYERS.items() if l in config.layers and any(isinstance(m, cls) for m in model.modules())]
    if not present:
        raise CompressError(f"the model has no {'/'.join(config.layers)} layers, so dynamic quantization would change nothing",
                            "Use --method static for convolutional models")
    q = quantize_dynamic(model, tuple(config.layers), config.per_channel, config.dtype)
    from torch.ao.nn.quantized import dynamic as qd

    ctx.metrics["quantized_layers"] = sum(1 for m in q.modules() if isinstance(m, (qd.Linear, qd.LSTM, qd.GRU)))
    step = {"op": "quantize_dynamic", "layers": list(config.layers), "per_channel": config.per_channel, "dtype": config.dtype}
    return artifact.evolve(format="torch-quantized", model=q, rebuild=[*artifact.rebuild, step], float_model=artifact.model)


def _ort_dynamic(artifact: Artifact, config: DynamicConfig, ctx) -> Artifact:
    src, specs = ort_q.fp32_onnx(artifact, Path(ctx.workdir) / "_fp32", optimize_bert=True)
    dst = Path(ctx.workdir) / "model.onnx"
    ctx.metrics.update(ort_q.quantize_dynamic(src, dst, config.per_channel, config.reduce_range, config.exclude))
    shutil.rmtree(Path(ctx.workdir) / "_fp32", ignore_errors=True)
    return artifact.evolve(format="onnx", path=dst, model=None, input_spec=specs, extra={**artifact.extra, "quantization": "dynamic int8"})


@register("quantize", "dynamic", DynamicConfig, accepts=("torch", "onnx"), produces=lambda c: "torch-quantized" if c.backend == "torch" else "onnx",
          summary="int8 weights, activations quantized on the fly (Linear/LSTM/GRU or MatMul; transformers and RNNs on CPU)")
def dynamic(artifact, config: DynamicConfig, ctx):
    fn = _torch_dynamic if config.backend == "torch" and artifact.format == "torch" else _ort_dynamic
    if config.backend == "torch" and artifact.format != "torch":
        raise CompressError(f"torch dynamic quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    out = fn(artifact, config, ctx)
    return check(artifact, out, config, ctx, retry=None)


# ---------------------------------------------------------------- onnxruntime static
def _ort_static(artifact: Artifact, config: StaticConfig, ctx, src: Path, specs, batches, exclude: tuple[str, ...]) -> Artifact:
    dst = Path(ctx.workdir) / "model.onnx"
    ctx.metrics.update(ort_q.quantize_static(src, dst, batches, config.calibration, config.per_channel, config.reduce_range, exclude))
    ctx.metrics["kept_float"] = list(exclude)
    return artifact.evolve(format="onnx", path=dst, model=None, input_spec=specs, extra={**artifact.extra, "quantization": "static int8 QDQ"})


# ---------------------------------------------------------------- torch static (PT2E + AOTInductor)
def _torch_static(artifact: Artifact, config: StaticConfig, ctx) -> Artifact:
    """torchao's PT2E flow with the x86 Inductor quantizer on a torch.export graph, compiled by AOTInductor.

    (The eager PT2E model runs reference kernels and is slower than fp32; the compiled package is the fast one.)"""
    from ..errors import require

    if artifact.format != "torch":
        raise CompressError(f"torch static quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "ao", "torch static quantization (PT2E)")
    xiq = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "ao", "torch static quantization (PT2E)")
    batches = ort_q.calibration_batches(artifact, ctx, config.samples)
    example = tuple(t[:2] if len(t) >= 2 else torch.cat([t, t])[:2] for t in batches[0])
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} if 0 in s.dynamic_axes else None for s in artifact.input_spec)
    model = copy.deepcopy(artifact.model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = torch.export.export(model, example, dynamic_shapes=dynamic).module()
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"torch.export cannot capture this model for PT2E quantization ({str(exc).splitlines()[0][:160]})",
                                "Use --backend onnxruntime") from None
        quantizer = xiq.X86InductorQuantizer()
        # The x86 quantizer's weights are always per-channel; activations uint8 per tensor.
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=config.reduce_range))
        prepared = pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for inputs in batches:
                prepared(*inputs)
        converted = pt2e.convert_pt2e(prepared)
        path = Path(ctx.workdir) / "model.pt2"
        try:
            with torch.no_grad():
                program = torch.export.export(converted, example, dynamic_shapes=dynamic)
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"AOTInductor could not compile the int8 model ({str(exc).splitlines()[0][:160]})",
                                "Use --backend onnxruntime, or check that gcc is installed") from None
    ctx.metrics.update({"flow": "torchao PT2E + X86InductorQuantizer + AOTInductor", "calibration_samples": sum(len(b[0]) for b in batches)})
    return artifact.evolve(format="pt2", path=path, model=None, extra={**artifact.extra, "aoti": True, "device": "cpu",
                                                                     "quantization": "static int8 (PT2E)"})


@register("quantize", "static", StaticConfig, accepts=("torch", "onnx"), produces=lambda c: "onnx" if c.backend == "onnxruntime" else "pt2",
          needs_data=True, requires=(("onnxruntime", None),),
          summary="int8 weights and activations calibrated on --data: onnxruntime Q/DQ (fast CPU path for CNNs) or torch PT2E → .pt2")
def static(artifact, config: StaticConfig, ctx):
    if config.backend == "torch":
        return check(artifact, _torch_static(artifact, config, ctx), config, ctx, retry=None)
    try:
        # Export and calibration data are made once; a retry only re-quantizes with more layers kept in float.
        src, specs = ort_q.fp32_onnx(artifact, Path(ctx.workdir) / "_fp32")
        batches = ort_q.calibration_batches(artifact, ctx, config.samples)
        out = _ort_static(artifact, config, ctx, src, specs, batches, tuple(config.exclude))

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
    try:
        with torch.no_grad():
            model(*[s.example(1) for s in artifact.input_spec])
    finally:
        for h in hooks:
            h.remove()
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


# ---------------------------------------------------------------- checks shared by every method
def check(before: Artifact, after: Artifact, config, ctx, retry=None) -> Artifact:
    """Fidelity/accuracy on real data (with --max-accuracy-drop) and a quick speed check (with --require-speedup)."""
    from ..runners import load_runner

    ref, new = load_runner(before), load_runner(after)
    quality = _quality(ref, new, ctx, before)
    drop = quality.get("accuracy_drop")
    limit = getattr(config, "max_accuracy_drop", None)
    if limit is not None and drop is not None and drop > limit:
        if retry is not None:
            ctx.metrics["first_attempt_accuracy_drop"] = drop
            after = retry()
            new = load_runner(after)
            quality = _quality(ref, new, ctx, before)
            drop = quality.get("accuracy_drop")
        if drop is not None and drop > limit:
            raise CompressError(f"quantization dropped accuracy by {drop:.2%}, more than --max-accuracy-drop {limit:.2%}",
                                "Nothing was written. Try -s calibration=entropy, more samples, or keep more layers in float (-s exclude=...)")
    ctx.metrics.update(quality)
    ctx.metrics["size_bytes_before"], ctx.metrics["size_bytes_after"] = _size(before), _size(after)
    if getattr(config, "check_speed", True):
        speed = _speed_ratio(ref, new, before)
        ctx.metrics["speedup_check"] = speed
        if speed < 1.0:
            msg = f"the quantized model is slower than its input ({speed:.2f}x at batch 1, 1 thread)"
            if getattr(config, "require_speedup", False):
                raise CompressError(msg, "Nothing was written. Try --method auto, or static int8 for convolutional models")
            if not ctx.quiet:
                from ..ui import console

                console().print(f"[yellow]warning:[/yellow] {msg}")
            ctx.metrics["warning"] = msg
    return after


def _quality(ref, new, ctx, before: Artifact) -> dict:
    from ..evaluate import accuracy, compare, fidelity

    if not ctx.data_spec:
        x = tuple(s.example(4) for s in before.input_spec)
        return compare(new(*x)[0], ref(*x)[0])
    bundle = ctx.data()
    out = {k: v for k, v in fidelity(new, ref, bundle, limit=256).items() if k != "samples"}
    if bundle.labelled:
        try:
            acc_new = accuracy(new, bundle, limit=2000)["accuracy"]
            acc_ref = accuracy(ref, bundle, limit=2000)["accuracy"]
            out.update({"accuracy": acc_new, "accuracy_before": acc_ref, "accuracy_drop": acc_ref - acc_new})
        except CompressError:
            pass
    return out


def _speed_ratio(ref, new, art: Artifact) -> float:
    from ..bench import time_runner

    inputs = tuple(s.example(1) for s in art.input_spec)
    ref.threads = new.threads = 1
    a = time_runner(ref, inputs, budget_s=0.4, min_runs=5, max_runs=200).stats(1)["p50_ms"]
    b = time_runner(new, inputs, budget_s=0.4, min_runs=5, max_runs=200).stats(1)["p50_ms"]
    return a / b if b else 0.0


def _size(art: Artifact) -> int | None:
    if art.path is not None:
        return art.size_bytes()
    if art.model is None:
        return None
    import io

    buf = io.BytesIO()
    torch.save(art.model.state_dict(), buf)
    return buf.tell()


# ---------------------------------------------------------------- fp16 / bf16 casts
@dataclass(frozen=True)
class CastConfig:
    dtype: str = option("float16", "float16 (NVIDIA GPUs) or bfloat16 (GPUs and CPUs with AMX/AVX512-BF16)", choices=("float16", "bfloat16"))
    require_speedup: bool = option(False, "fail when the result is not faster than its input")
    check_speed: bool = option(True, "time input and result briefly and warn when it is not faster")
    max_accuracy_drop: float | None = option(None, "fail when accuracy drops more than this", range=(0.0, 1.0))


def cast(model: nn.Module, dtype: str) -> nn.Module:
    """Weights in half precision; float inputs are cast on the way in and outputs back to float32 on the way out."""
    dt = getattr(torch, dtype)
    model = model.to(dt)

    def cast_in(module, args):
        return tuple(a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def cast_out(module, args, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        if isinstance(out, (tuple, list)):
            return type(out)(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return out
    model.register_forward_pre_hook(cast_in)
    model.register_forward_hook(cast_out)
    return model


@rebuilder("cast")
def _rebuild_cast(model: nn.Module, step: dict) -> nn.Module:
    return cast(model, step["dtype"])


@register("quantize", "fp16", CastConfig, accepts=("torch",), produces="torch",
          summary="cast weights to float16/bfloat16 (for GPUs; slow on most CPUs); or export ONNX with -s fp16=true")
def fp16(artifact, config: CastConfig, ctx):
    model = cast(copy.deepcopy(artifact.model).eval(), config.dtype)
    out = artifact.evolve(model=model, rebuild=[*artifact.rebuild, {"op": "cast", "dtype": config.dtype}])
    return check(artifact, out, config, ctx, retry=None)
