"""torch → ONNX: the conversion every ONNX consumer in compress shares (the onnx export target, onnxruntime
quantization, TensorRT's parser input).

The torch.export-based exporter runs first, the TorchScript-based one as automatic fallback; the file is checked
with ``onnx.checker`` and can be fused with onnxruntime's transformer optimizer and converted to fp16. Verification
against the source is the export target's job (``exporters/onnx.py``).
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from pathlib import Path

import torch

from .artifact import Artifact
from .errors import CompressError, first_line
from .inputs import InputSpec, axis_name, example_inputs, export_batch
from .runners import flatten

EXTERNAL_DATA_BYTES = 1_800_000_000   # protobuf cannot hold 2 GB; keep headroom for the graph itself
FUSION_OPSET = 17
BERT_LIKE = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
             "camembert": "bert", "mpnet": "bert"}


def export_file(model: torch.nn.Module, specs: list[InputSpec], path: Path, *, opset: int | None = None, exporter: str = "auto",
                external_data: str = "auto", optimize: str | None = None, fp16: bool = False, arch: dict | None = None,
                fuse_embeddings: bool = True) -> dict:
    """Write ``model`` to ``path`` as ONNX (checked); returns what ran: exporter, why a fallback, opset, fusions.
    ``fuse_embeddings=False`` keeps the embedding lookups as plain Gathers (so int4 quantization can reach them)."""
    import onnx

    model = model.eval()
    batch = export_batch(specs)
    seq = next((s.shape[1] for s in specs if len(s.shape) in (2, 3) and 1 in s.dynamic_axes), None)
    inputs = example_inputs(specs, batch, max(seq, 2) if seq else None)
    with torch.no_grad():
        n_out = len(flatten(model(*inputs)))
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    big = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) > EXTERNAL_DATA_BYTES
    external = external_data == "always" or (external_data == "auto" and big)
    raw = path.parent / "_onnx_raw" / path.name
    raw.parent.mkdir(parents=True, exist_ok=True)
    order = {"auto": ("dynamo", "legacy"), "legacy-first": ("legacy", "dynamo"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    errors: dict[str, BaseException] = {}
    info: dict = {}
    try:
        for name in order:
            try:
                (_dynamo if name == "dynamo" else _legacy)(model, inputs, specs, output_names, raw, opset, big)
                info["exporter"] = name
                break
            except CompressError:
                raise
            except Exception as exc:  # noqa: BLE001 - exporters raise anything; judged below
                errors[name] = exc
                shutil.rmtree(raw.parent, ignore_errors=True)
                raw.parent.mkdir(parents=True)
        else:
            raise _export_failed(errors, opset)
        if errors:
            failed = next(iter(errors))
            info["fallback_reason"] = f"{failed} exporter failed: {_cause(errors[failed])}"
        elif exporter == "legacy-first":
            info["exporter_reason"] = f"optimize: onnxruntime's BERT fusion needs the TorchScript-based exporter's graph (opset <= {FUSION_OPSET})"
        proto = onnx.load(str(raw))
        if optimize:
            proto, info["fused_operators"] = _optimize(raw, optimize, arch, fuse_embeddings)
        if fp16:
            proto = to_fp16(proto)
        info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if path.exists():
            path.unlink()
        onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    finally:
        shutil.rmtree(raw.parent, ignore_errors=True)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise CompressError(f"the exported ONNX graph fails onnx.checker: {first_line(exc)}", "Try another --opset or -s exporter=legacy") from None
    info["external_data"] = external
    return info


def to_fp16(proto):
    """An ONNX graph with float16 weights and compute; its inputs and outputs stay float32."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        half = OnnxModel(proto)
        half.convert_float_to_float16(keep_io_types=True)
        half.topological_sort()   # the converter appends its input casts out of order
    return half.model


def _dynamo(model, inputs, specs, output_names, raw: Path, opset, big: bool) -> None:
    dims = {}

    def dim(axis):
        if axis not in dims:
            dims[axis] = torch.export.Dim(axis_name(axis), min=1)
        return dims[axis]

    dynamic = tuple({a: dim(a) for a in s.dynamic_axes} or None for s in specs)
    with _quiet():
        program = torch.onnx.export(model, inputs, dynamo=True, input_names=[s.name for s in specs], output_names=output_names,
                                    opset_version=opset, dynamic_shapes=dynamic if any(dynamic) else None, verbose=False)
        program.save(str(raw), external_data=big)


def _legacy(model, inputs, specs, output_names, raw: Path, opset, big: bool) -> None:
    axes = {s.name: {a: axis_name(a) for a in s.dynamic_axes} for s in specs if s.dynamic_axes}
    with torch.no_grad():
        outs = flatten(model(*inputs))
    batch_dynamic = all(0 in s.dynamic_axes for s in specs)
    seq = next((x.shape[1] for s, x in zip(specs, inputs) if 1 in s.dynamic_axes and x.dim() in (2, 3)), None)
    for name, o in zip(output_names, outs):
        oa = {0: "batch"} if batch_dynamic and o.dim() >= 1 else {}
        if seq is not None and o.dim() >= 2 and o.shape[1] == seq:
            oa[1] = "sequence"
        if oa:
            axes[name] = oa
    with _quiet():
        torch.onnx.export(model, inputs, str(raw), dynamo=False, input_names=[s.name for s in specs], output_names=output_names,
                          opset_version=opset, dynamic_axes=axes or None, do_constant_folding=True)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and many tracer warnings; the CLI shows its own status instead."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _optimize(raw: Path, model_type: str, arch: dict | None, fuse_embeddings: bool = True):
    import json

    import onnx

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from .arch import resolve_hf_path

    cfg = json.loads((resolve_hf_path(arch["spec"][3:]) / "config.json").read_text())
    options = FusionOptions(model_type)
    options.enable_embed_layer_norm = fuse_embeddings
    with _quiet():
        opt = optimize_model(str(raw), model_type=model_type, num_heads=int(cfg.get("num_attention_heads", 0)),
                             hidden_size=int(cfg.get("hidden_size", 0)), opt_level=0, optimization_options=options)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    proto = opt.model
    domains = {n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    for d in domains - {o.domain for o in proto.opset_import}:
        proto.opset_import.append(onnx.helper.make_opsetid(d, 1))   # fused ops (Attention, SkipLayerNormalization...)
    return proto, fused


def bert_type(artifact: Artifact) -> str | None:
    spec = (artifact.arch or {}).get("spec", "")
    if not spec.startswith("hf:"):
        return None
    import json

    from .arch import resolve_hf_path

    try:
        model_type = json.loads((resolve_hf_path(spec[3:]) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, CompressError):
        return None
    return BERT_LIKE.get(model_type)


def _export_failed(errors: dict[str, BaseException], opset) -> CompressError:
    """One line naming the operator that stopped the export (when a message names one) and what to try instead."""
    ops = []
    for exc in errors.values():
        for m in re.finditer(r"operator '([\w:.]+)'|torch\.ops\.([\w.]+)|'(aten::\w+)'|No ONNX function found for <OpOverload\(op='([\w.:]+)'",
                             f"{exc} {_cause(exc)}"):
            op = next(g for g in m.groups() if g)
            if op not in ops:
                ops.append(op)
    what = "ONNX export failed"
    if ops:
        what += f": operator {ops[0]} is not supported" + (f" at opset {opset}" if opset else "")
    details = "; ".join(f"{k}: {_cause(v)[:160]}" for k, v in errors.items())
    return CompressError(f"{what} ({details})",
                         "Export with --target pt2 or --target torchscript instead, or try another --opset")


def _cause(exc: BaseException) -> str:
    """The innermost cause of an exporter error (the outer ones only say which export step failed)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"
