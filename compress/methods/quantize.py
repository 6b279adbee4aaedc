"""Quantization: ``dynamic``, ``static``, ``auto`` (and ``fp16``), each with a ``backend``.

- torch dynamic int8: Linear/LSTM/GRU weights int8, activations quantized on the fly; runs eagerly and
  exports to TorchScript. Helps Linear/LSTM-heavy models (transformers, RNNs) on CPU. Activations use all 8 bits
  (torch's stock module uses 7, which costs fidelity with or without VNNI); ``exclude`` keeps layers
  in float by name glob, and ``min_cosine`` keeps the measured most sensitive layers in float until a fidelity floor holds.
- onnxruntime static int8: Q/DQ per-channel, calibrated on real data; the fast CPU path for CNNs. ``reduce_range=auto``
  (the default) takes 7-bit weights on x86 CPUs without VNNI, where 8-bit ones saturate onnxruntime's int16 sums.
- onnxruntime dynamic int8: MatMul/Gemm weights int8 (after BERT fusion for transformers).
- auto: convolutions → onnxruntime static; Linear/LSTM-heavy → the faster of torch and onnxruntime dynamic.
- qat (qat.py): quantization-aware fine-tuning with torchao PT2E, packaged like torch static.
Every result is checked against its input on real data (fidelity, accuracy) and for speed.
"""
from __future__ import annotations

import logging

import copy
import fnmatch
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qd

from ..artifact import Artifact
from ..cpu import resolve_reduce_range
from ..errors import CompressError
from ..evaluate import run_with_hooks
from ..config import option
from ..registry import register
from . import quantize_ort as ort_q

log = logging.getLogger(__name__)
REDUCE_RANGE = ("auto", True, False)
REDUCE_RANGE_HELP = ("7-bit ranges, for x86 CPUs without VNNI whose int16 accumulators overflow with 8 bits; auto: true for "
                     "onnxruntime's int8 kernels when this CPU is one (torch's kernels do not saturate: false)")

DYNAMIC_LAYERS = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU, "Embedding": nn.Embedding}


@dataclass(frozen=True)
class DynamicConfig:
    backend: str = option("torch", "torch (eager int8 Linear/LSTM/GRU) or onnxruntime (int8 MatMul/Gemm)", choices=("torch", "onnxruntime"))
    layers: tuple[str, ...] = option(("Linear", "LSTM", "GRU"), "torch: layer types to quantize (add Embedding for int8 lookup tables, weight-only)")
    per_channel: bool = option(True, "per-output-channel weight scales")
    reduce_range: bool | str = option("auto", REDUCE_RANGE_HELP + " (torch: activations, onnxruntime: weights)", choices=REDUCE_RANGE)
    dtype: str = option("qint8", "torch: weight dtype", choices=("qint8", "float16"))
    exclude: tuple[str, ...] = option((), "layers kept in float: torch module-name globs (e.g. '*.output.dense'), onnxruntime node names")
    min_cosine: float | None = option(None, "fidelity floor (output cosine to the input model; needs no labels): torch keeps the most "
                                      "sensitive layers in float until it is met, and any backend fails when it is not", range=(0.0, 1.0))
    embedding_bits: int = option(8, "onnxruntime: bits of embedding tables (4: int4 blocks of 64, half the size of int8)", choices=(8, 4))
    max_accuracy_drop: float | None = option(None, "fail (or retry less aggressively) when accuracy drops more than this", range=(0.0, 1.0))
    require_speedup: bool = option(False, "fail when the result is not faster than its input (batch 1, 1 thread)")
    check_speed: bool = option(True, "time input and result briefly and warn when it is not faster")

    def __post_init__(self):   # checked when the config is built, so `validate` reports it before anything runs
        if self.backend == "torch" and self.embedding_bits != 8:
            raise ValueError(f"embedding_bits={self.embedding_bits} is an onnxruntime option (int4 embedding tables); "
                             "add backend onnxruntime (--backend onnxruntime), or drop embedding_bits")


@dataclass(frozen=True)
class StaticConfig:
    backend: str = option("onnxruntime", "onnxruntime (Q/DQ int8 ONNX) or torch (torchao PT2E, x86 quantizer, AOTInductor .pt2)",
                          choices=("onnxruntime", "torch"))
    calibration: str = option("minmax", "how activation ranges are chosen", choices=tuple(ort_q.CALIBRATION))
    samples: int = option(128, "calibration samples taken from --data", range=(1, 100_000))
    per_channel: bool = option(True, "per-output-channel weight scales")
    reduce_range: bool | str = option("auto", REDUCE_RANGE_HELP + " (onnxruntime: weights, torch: activations)", choices=REDUCE_RANGE)
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
class FullRangeDynamicLinear(qd.Linear):
    """torch's dynamic int8 Linear with 8-bit activations: the stock module hard-codes ``reduce_range=True`` (7-bit
    activations, for CPUs without VNNI whose int16 accumulators would overflow). 7 bits cost MiniLM-L6 cosine 0.973
    against 0.992 with 8 bits, and the full range is also faster on VNNI CPUs."""

    def forward(self, x):
        if self._packed_params.dtype == torch.qint8:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False).to(x.dtype)
        return super().forward(x)


class ContiguousQuantEmbedding(torch.ao.nn.quantized.Embedding):
    """torch's int8 weight-only Embedding, taking any index tensor (transformers pass sliced, non-contiguous position ids)."""

    def forward(self, indices):
        return super().forward(indices.contiguous())


def dynamic_layer_names(model: nn.Module, layers) -> list[str]:
    """Names of the modules ``quantize_dynamic`` would replace (layer types from DYNAMIC_LAYERS)."""
    unknown = [l for l in layers if l not in DYNAMIC_LAYERS]
    if unknown:
        raise CompressError(f"cannot dynamically quantize layer type(s) {', '.join(unknown)}", f"Supported: {', '.join(DYNAMIC_LAYERS)}")
    types = tuple(DYNAMIC_LAYERS[l] for l in layers)
    return [n for n, m in model.named_modules() if n and isinstance(m, types)]


def match_layers(names: list[str], patterns) -> list[str]:
    """The names matched by glob ``patterns`` (``*`` crosses dots); a pattern that matches nothing is a user error."""
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            some = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise CompressError(f"exclude pattern '{p}' matches no quantizable layer", f"Layer names look like: {some or '(none)'}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def quantize_dynamic(model: nn.Module, layers, per_channel: bool, dtype: str, exclude=(), reduce_range: bool = False) -> nn.Module:
    """torch dynamic quantization of ``layers`` types, keeping the modules named in ``exclude`` (exact names) in float."""
    from torch.ao.quantization import (default_dynamic_qconfig, float16_dynamic_qconfig, float_qparams_weight_only_qconfig,
                                       per_channel_dynamic_qconfig)
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    dynamic_layer_names(model, layers)  # checks the layer type names
    if dtype == "float16":
        spec = {DYNAMIC_LAYERS[l]: float16_dynamic_qconfig for l in layers}
    else:
        spec = {DYNAMIC_LAYERS[l]: (per_channel_dynamic_qconfig if per_channel and l == "Linear" else default_dynamic_qconfig) for l in layers}
    if "Embedding" in layers:   # weight-only int8 lookup tables (one scale per row); not for float16
        spec[nn.Embedding] = float_qparams_weight_only_qconfig if dtype != "float16" else None
    spec.update({name: None for name in exclude})
    mapping = get_default_dynamic_quant_module_mappings()
    if not reduce_range:
        mapping = {**mapping, nn.Linear: FullRangeDynamicLinear}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "x86" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "x86"
        q = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.float16 if dtype == "float16" else torch.qint8, mapping=mapping)
    for m in q.modules():
        if type(m) is torch.ao.nn.quantized.Embedding:   # its from_float ignores subclasses in the mapping
            m.__class__ = ContiguousQuantEmbedding
    return q


def rebuild_dynamic(model: nn.Module, step: dict) -> nn.Module:
    # Steps written before these keys existed ran torch's stock 7-bit-activation Linear with nothing kept in float.
    return quantize_dynamic(model, step["layers"], step["per_channel"], step["dtype"], step.get("exclude", ()), step.get("reduce_range", True))


def _torch_dynamic(artifact: Artifact, config: DynamicConfig, ctx) -> Artifact:
    if artifact.format != "torch":
        raise CompressError(f"torch dynamic quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    model = artifact.model.eval()
    names = dynamic_layer_names(model, config.layers)
    if not names:
        raise CompressError(f"the model has no {'/'.join(config.layers)} layers, so dynamic quantization would change nothing",
                            "Use --method static for convolutional models")
    kept = match_layers(names, config.exclude)
    if len(kept) == len(names):
        raise CompressError(f"exclude keeps all {len(names)} quantizable layers in float, so nothing would be quantized", "Exclude fewer layers")

    reduce = reduce_range(config, ctx, saturating_kernels=False)

    def make(exclude):
        return quantize_dynamic(copy.deepcopy(model), tuple(config.layers), config.per_channel, config.dtype, tuple(exclude), reduce)
    q = make(kept)
    if config.min_cosine is not None:
        q, kept = _fidelity_floor(artifact, q, names, kept, config.min_cosine, ctx)
    ctx.metrics["quantized_layers"] = sum(1 for m in q.modules() if isinstance(m, (qd.Linear, qd.LSTM, qd.GRU)))
    ctx.metrics["kept_float"] = list(kept)
    ctx.metrics["activation_bits"] = 7 if reduce else 8
    step = {"op": "quantize_dynamic", "layers": list(config.layers), "per_channel": config.per_channel, "dtype": config.dtype,
            "exclude": list(kept), "reduce_range": reduce}
    return artifact.evolve(format="torch-quantized", model=q, rebuild=[*artifact.rebuild, step], float_model=artifact.model)


def _fidelity_floor(artifact: Artifact, q: nn.Module, names: list[str], kept: list[str], floor: float, ctx):
    """Keep the most sensitive layers in float, one at a time, until the cosine to the float model reaches ``floor``.

    Sensitivity is measured: each layer alone is quantized in the float model and scored by the output cosine on the
    first 64 samples. The floor is judged on the same data as the stage's fidelity metric (256 held-out samples)."""
    model = artifact.model.eval()
    cosine = _cosine_fn(artifact, ctx, model)
    reached = cosine(q)
    search = {"min_cosine": floor, "first_attempt_cosine": round(reached, 5)}
    ctx.metrics["fidelity_search"] = search
    if reached >= floor:
        search["cosine"] = round(reached, 5)
        return q, kept
    # One layer quantized at a time, in a float copy: swap the int8 module in, score it, swap the float one back.
    work = copy.deepcopy(model)
    sensitivity = {}
    for name in (n for n in names if n not in kept):
        float_mod = work.get_submodule(name)
        _swap(work, name, q.get_submodule(name))
        try:
            sensitivity[name] = cosine(work, samples=64)
        finally:
            _swap(work, name, float_mod)
    order = sorted(sensitivity, key=sensitivity.get)
    search["most_sensitive"] = {n: round(sensitivity[n], 5) for n in order[:5]}
    kept = list(kept)
    for name in order[:-1]:          # at least one layer stays int8
        _swap(q, name, copy.deepcopy(model.get_submodule(name)))
        kept.append(name)
        reached = cosine(q)
        if reached >= floor:
            search["cosine"] = round(reached, 5)
            return q, kept
    raise CompressError(f"int8 could not reach --min-cosine {floor} (cosine {reached:.4f} with all but one of {len(names)} layers in float)",
                        "Nothing was written. Lower min_cosine, or try --backend onnxruntime or -s dtype=float16")


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _cosine_fn(artifact: Artifact, ctx, reference: nn.Module):
    """``cosine(model, samples=256)``: mean output cosine to ``reference`` on the batches the stage's fidelity metric uses
    (held-out data, batches of 32), or on the deterministic example inputs without data. Reference outputs are computed once."""
    from ..data import batches, tokenizer_for
    from ..evaluate import compare, summarize
    from ..runners import TorchRunner

    if ctx.data_spec:
        sets = [x for x, _ in batches(ctx.data().eval, artifact.input_spec, 32, 256, tokenizer_for(artifact))]
    else:
        sets = [tuple(s.example(4) for s in artifact.input_spec)]
    ref = TorchRunner(artifact, module=reference)
    expected = [ref(*x)[0] for x in sets]

    def cosine(model: nn.Module, samples: int = 256) -> float:
        run, stats, n = TorchRunner(artifact, module=model), [], 0
        for x, e in zip(sets, expected):
            if n >= samples:
                break
            stats.append((len(x[0]), compare(run(*x)[0], e)))
            n += len(x[0])
        return summarize(stats)["cosine"]
    return cosine


def reduce_range(config, ctx, saturating_kernels: bool) -> bool:
    """The config's ``reduce_range`` resolved for this CPU and backend; the manifest's metrics say what was used and why."""
    value, why = resolve_reduce_range(config.reduce_range, saturating_kernels)
    ctx.metrics["reduce_range"] = value
    if config.reduce_range == "auto":
        ctx.metrics["reduce_range_why"] = why
    return value


def _ort_dynamic(artifact: Artifact, config: DynamicConfig, ctx) -> Artifact:
    src, specs = ort_q.fp32_onnx(artifact, Path(ctx.workdir) / "_fp32", optimize_bert=True, fuse_embeddings=config.embedding_bits == 8)
    dst = Path(ctx.workdir) / "model.onnx"
    ctx.metrics.update(ort_q.quantize_dynamic(src, dst, config.per_channel, reduce_range(config, ctx, True), config.exclude, config.embedding_bits))
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
    ctx.metrics.update(ort_q.quantize_static(src, dst, batches, config.calibration, config.per_channel, reduce_range(config, ctx, True), exclude))
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
    example, dynamic = pt2e_example(artifact, batches[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = pt2e_capture(artifact, copy.deepcopy(artifact.model).eval(), example, dynamic, "static")
        quantizer = xiq.X86InductorQuantizer()
        # The x86 quantizer's weights are always per-channel; activations uint8 per tensor.
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range(config, ctx, False)))
        prepared = pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for inputs in batches:
                prepared(*inputs)
        converted = pt2e.convert_pt2e(prepared)
    ctx.metrics.update({"flow": "torchao PT2E + X86InductorQuantizer + AOTInductor", "calibration_samples": sum(len(b[0]) for b in batches)})
    return pt2e_package(artifact, converted, example, dynamic, ctx, "static int8 (PT2E)")


def pt2e_example(artifact: Artifact, inputs: tuple) -> tuple[tuple, tuple]:
    """Example inputs (batch 2) and dynamic shapes (a dynamic batch where the spec has one) for torch.export."""
    example = tuple(t[:2] if len(t) >= 2 else torch.cat([t, t])[:2] for t in inputs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return example, tuple({0: batch} if 0 in s.dynamic_axes else None for s in artifact.input_spec)


def pt2e_capture(artifact: Artifact, model: nn.Module, example: tuple, dynamic: tuple, what: str) -> nn.Module:
    """The torch.export graph module that PT2E quantizers annotate."""
    if artifact.format != "torch":
        raise CompressError(f"torch {what} quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    try:
        return torch.export.export(model, example, dynamic_shapes=dynamic).module()
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"torch.export cannot capture this model for PT2E quantization ({str(exc).splitlines()[0][:160]})",
                            "Use --backend onnxruntime") from None


def pt2e_package(artifact: Artifact, converted: nn.Module, example: tuple, dynamic: tuple, ctx, label: str) -> Artifact:
    """Compile a converted PT2E int8 graph with AOTInductor into ``model.pt2`` (the fast CPU artifact)."""
    path = Path(ctx.workdir) / "model.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                program = torch.export.export(converted, example, dynamic_shapes=dynamic)
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"AOTInductor could not compile the int8 model ({str(exc).splitlines()[0][:160]})",
                                "Use --backend onnxruntime, or check that gcc is installed") from None
    return artifact.evolve(format="pt2", path=path, model=None, extra={**artifact.extra, "aoti": True, "device": "cpu", "quantization": label})


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
    floor = getattr(config, "min_cosine", None)
    if floor is not None and quality.get("cosine", 1.0) < floor:
        raise CompressError(f"the result's output cosine to its input is {quality['cosine']:.4f}, below --min-cosine {floor}",
                            "Nothing was written. Keep sensitive layers in float (-s exclude=...), or use --backend torch, which does so itself")
    ctx.metrics.update(quality)
    ctx.metrics["size_bytes_before"], ctx.metrics["size_bytes_after"] = _size(before), _size(after)
    if getattr(config, "check_speed", True):
        speed = _speed_ratio(before, after)
        ctx.metrics["speedup_check"] = speed
        if speed < 1.0:
            msg = f"the quantized model is slower than its input ({speed:.2f}x at batch 1, 1 thread)"
            if getattr(config, "require_speedup", False):
                raise CompressError(msg, "Nothing was written. Try --method auto, or static int8 for convolutional models")
            log.warning(msg)
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


def _speed_ratio(before: Artifact, after: Artifact) -> float:
    """p50 latency of ``before`` over ``after`` at batch 1, both on one thread. The runners are loaded here with
    threads=1: an onnxruntime session's thread pool is fixed when the session is made."""
    from ..timing import time_runner
    from ..runners import load_runner

    inputs = tuple(s.example(1) for s in before.input_spec)
    ref, new = load_runner(before, threads=1), load_runner(after, threads=1)
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


def rebuild_cast(model: nn.Module, step: dict) -> nn.Module:
    return cast(model, step["dtype"])


@register("quantize", "fp16", CastConfig, accepts=("torch",), produces="torch",
          summary="cast weights to float16/bfloat16 (for GPUs; slow on most CPUs); or export ONNX with -s fp16=true")
def fp16(artifact, config: CastConfig, ctx):
    model = cast(copy.deepcopy(artifact.model).eval(), config.dtype)
    out = artifact.evolve(model=model, rebuild=[*artifact.rebuild, {"op": "cast", "dtype": config.dtype}])
    return check(artifact, out, config, ctx, retry=None)
