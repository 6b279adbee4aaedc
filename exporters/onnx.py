"""Export to ONNX: the torch.export-based exporter, with the TorchScript-based one as automatic fallback.

The file is checked with ``onnx.checker``, optionally fused with onnxruntime's transformer optimizer and
converted to fp16, then run in onnxruntime against the source model (see :mod:`compress.exporters.verify`).
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import Artifact
from compress.errors import CompressError
from compress.registry import option, register
from compress.runners import _flatten
from compress.specs import InputSpec

from .verify import example_inputs, export_batch, verify

EXTERNAL_DATA_BYTES = 1_800_000_000   # protobuf cannot hold 2 GB; keep headroom for the graph itself
FUSION_OPSET = 17
BERT_LIKE = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
             "camembert": "bert", "mpnet": "bert"}


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
    specs = resolve_axes(artifact.input_spec, config.dynamic_axes, config.static_shapes)
    bert_type = _bert_type(artifact) if config.optimize else None
    if config.optimize and bert_type is None:
        raise CompressError("optimize: true applies onnxruntime's transformer optimizer, which needs a BERT-like transformers model",
                            f"Drop optimize for this model ({(artifact.arch or {}).get('spec', 'no architecture spec')})")
    exporter, opset = config.exporter, config.opset
    if bert_type is not None:
        # onnxruntime's attention fusion recognises the TorchScript-based exporter's graph (eager attention), not
        # dynamo's, and at opset 17 (measured on MiniLM: 6 Attention nodes at 14 and 17, none at 20).
        exporter = "legacy-first" if exporter == "auto" else exporter
        opset = opset or FUSION_OPSET
    path = Path(ctx.workdir) / "model.onnx"
    info = export_file(artifact.model, specs, path, opset=opset, exporter=exporter, external_data=config.external_data,
                       optimize=bert_type, fp16=config.fp16, arch=artifact.arch)
    out = artifact.evolve(format="onnx", path=path, model=None, input_spec=specs, extra={k: info[k] for k in ("exporter", "opset")})
    ctx.metrics.update(info)
    ctx.metrics.update(verify(artifact, out, ctx, target="onnx", precision="fp16" if config.fp16 else "fp32", atol=config.atol))
    ctx.metrics["file_size_bytes"] = out.size_bytes()
    return out


def resolve_axes(specs: list[InputSpec], requested=None, static: bool = False) -> list[InputSpec]:
    """The input specs with the dynamic axes the export will have."""
    if static:
        return [InputSpec(s.name, s.shape, s.dtype, ()) for s in specs]
    if not requested:
        return list(specs)
    out = []
    for s in specs:
        axes = set()
        for a in requested:
            a = str(a).strip().lower()
            if a == "batch":
                axes.add(0)
            elif a in ("sequence", "seq"):
                if len(s.shape) in (2, 3):
                    axes.add(1)
            elif a.isdigit():
                if int(a) < len(s.shape):
                    axes.add(int(a))
            else:
                raise CompressError(f"dynamic_axes: '{a}' is not an axis", "Use batch, sequence or axis numbers, e.g. -s dynamic_axes=batch,sequence")
        out.append(InputSpec(s.name, s.shape, s.dtype, tuple(sorted(axes))))
    return out


def _axis_name(axis: int) -> str:
    return {0: "batch", 1: "sequence"}.get(axis, f"dim{axis}")


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
        n_out = len(_flatten(model(*inputs)))
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
            from onnxruntime.transformers.onnx_model import OnnxModel

            with _quiet():
                half = OnnxModel(proto)
                half.convert_float_to_float16(keep_io_types=True)
                half.topological_sort()   # the converter appends its input casts out of order
            proto = half.model
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
        raise CompressError(f"the exported ONNX graph fails onnx.checker: {_first_line(exc)}", "Try another --opset or -s exporter=legacy") from None
    info["external_data"] = external
    return info


def _dynamo(model, inputs, specs, output_names, raw: Path, opset, big: bool) -> None:
    dims = {}

    def dim(axis):
        if axis not in dims:
            dims[axis] = torch.export.Dim(_axis_name(axis), min=1)
        return dims[axis]

    dynamic = tuple({a: dim(a) for a in s.dynamic_axes} or None for s in specs)
    with _quiet():
        program = torch.onnx.export(model, inputs, dynamo=True, input_names=[s.name for s in specs], output_names=output_names,
                                    opset_version=opset, dynamic_shapes=dynamic if any(dynamic) else None, verbose=False)
        program.save(str(raw), external_data=big)


def _legacy(model, inputs, specs, output_names, raw: Path, opset, big: bool) -> None:
    axes = {s.name: {a: _axis_name(a) for a in s.dynamic_axes} for s in specs if s.dynamic_axes}
    with torch.no_grad():
        outs = _flatten(model(*inputs))
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

    from compress.arch import resolve_hf_path

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


def _bert_type(artifact: Artifact) -> str | None:
    spec = (artifact.arch or {}).get("spec", "")
    if not spec.startswith("hf:"):
        return None
    import json

    from compress.arch import resolve_hf_path

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
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))   # exporters colour their messages
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
