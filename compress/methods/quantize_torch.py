"""torch's int8 paths: dynamic int8 (eager Linear/LSTM/GRU/Embedding, 8-bit activations, layers kept in float by
name or by measured sensitivity), static int8 through torchao's PT2E flow compiled by AOTInductor, and fp16/bf16 casts.
Every function here takes resolved values; :mod:`.quantize` holds the methods and their configs."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qd

from ..artifact import Artifact
from ..errors import CompressError, first_line, require

DYNAMIC_LAYERS = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU, "Embedding": nn.Embedding}


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
    return [n for n, m in model.named_modules() if n and (isinstance(m, types) or ("Linear" in layers and is_conv1d(m)))]


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored transposed, ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers ``Conv1D`` in ``model`` (in place) by the ``nn.Linear`` it computes, so torch's dynamic
    int8 (which maps only ``nn.Linear``) quantizes GPT-2's projections; the names stay, so ``exclude`` patterns still match."""
    for name, m in list(model.named_modules()):
        if name and is_conv1d(m):
            n_in, n_out = m.weight.shape
            linear = nn.Linear(n_in, n_out, bias=m.bias is not None, dtype=m.weight.dtype, device=m.weight.device)
            with torch.no_grad():
                linear.weight.copy_(m.weight.t())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            _swap(model, name, linear)
    return model


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
    if "Linear" in layers:
        conv1d_as_linear(model)
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


def read_directly(model: nn.Module, names: list[str]) -> list[str]:
    """Layers whose parent's forward reads their ``.weight`` or ``.bias`` itself instead of calling them: quantized, they
    would break it (a quantized module's weight is a method), so they stay in float."""
    import inspect
    import re

    out = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            source = inspect.getsource(type(parent).forward)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(child)}\.(weight|bias)\b", source):
            out.append(name)
    return out


def torch_dynamic(artifact: Artifact, config, ctx, reduce: bool) -> Artifact:
    """Dynamic int8 of a torch model (``config``: the dynamic method's); ``reduce``: 7-bit activations."""
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
    direct = [n for n in read_directly(model, names) if n not in kept]
    if direct:           # Swin's attention calls F.linear(x, self.qkv.weight): a quantized module's weight is a method
        kept = [*kept, *direct]
        ctx.metrics["kept_float_read_directly"] = direct

    def make(exclude):
        return quantize_dynamic(copy.deepcopy(model), tuple(config.layers), config.per_channel, config.dtype, tuple(exclude), reduce)
    q = make(kept)
    try:
        with torch.no_grad():
            q(*(s.example(1) for s in artifact.input_spec))
    except Exception as exc:  # noqa: BLE001 - whatever a model does with a module it did not expect to be quantized
        raise CompressError(f"the dynamic int8 model no longer runs ({first_line(exc, 160)})",
                            "Keep the layer in float with -s exclude=NAME, or use --backend onnxruntime") from None
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


def torch_static(artifact: Artifact, samples: int, ctx, reduce: bool) -> Artifact:
    """torchao's PT2E flow with the x86 Inductor quantizer on a torch.export graph, compiled by AOTInductor.

    (The eager PT2E model runs reference kernels and is slower than fp32; the compiled package is the fast one.)"""
    from .quantize_ort import calibration_batches

    if artifact.format != "torch":
        raise CompressError(f"torch static quantization takes a torch model, not {artifact.format}", "Use --backend onnxruntime for ONNX models")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "ao", "torch static quantization (PT2E)")
    xiq = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "ao", "torch static quantization (PT2E)")
    batches = calibration_batches(artifact, ctx, samples)
    example, dynamic = pt2e_example(artifact, batches[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = pt2e_capture(artifact, copy.deepcopy(artifact.model).eval(), example, dynamic, "static")
        quantizer = xiq.X86InductorQuantizer()
        # The x86 quantizer's weights are always per-channel; activations uint8 per tensor.
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce))
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
        raise CompressError(f"torch.export cannot capture this model for PT2E quantization ({first_line(exc, 160)})",
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
            raise CompressError(f"AOTInductor could not compile the int8 model ({first_line(exc, 160)})",
                                "Use --backend onnxruntime, or check that gcc is installed") from None
    return artifact.evolve(format="pt2", path=path, model=None, extra={**artifact.extra, "aoti": True, "device": "cpu", "quantization": label})


# ---------------------------------------------------------------- fp16 / bf16 casts
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
