"""A Triton Inference Server model repository for a run directory (``compress package --target triton``).

``OUT/NAME/config.pbtxt`` and ``OUT/NAME/1/model.onnx`` (onnxruntime backend), ``model.plan`` (TensorRT) or
``model.pt`` (libtorch, with Triton's ``INPUT__i``/``OUTPUT__i`` names for TorchScript), the inputs and outputs read
from the model file itself (names, data types, dynamic axes as -1), dynamic batching, instance groups and the
response cache. A torch model, which Triton cannot load, is exported first with compress's own exporters (verified
against it): float models to ONNX, torch int8 ones to TorchScript.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError

# format → (Triton platform, the file name Triton looks for in a version folder)
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan"), "torchscript": ("pytorch_libtorch", "model.pt")}
# how a torch model becomes one Triton loads
CONVERT = {"torch": "onnx", "torch-quantized": "torchscript"}
NUMPY_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
               "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(bfloat16)": "TYPE_BF16", "tensor(double)": "TYPE_FP64",
             "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int16)": "TYPE_INT16", "tensor(int8)": "TYPE_INT8",
             "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}
V2_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "FP64": "TYPE_FP64", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT16": "TYPE_INT16",
            "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}
# per-instance thread count, where the backend takes one
THREADS = {"onnxruntime_onnx": "intra_op_thread_count", "pytorch_libtorch": "INTRA_OP_THREAD_COUNT"}


@dataclass
class Tensor:
    name: str
    data_type: str              # TYPE_FP32, ...
    shape: list[int]            # with the batch axis; -1 where dynamic


def write_repository(run_dir: Path, manifest, tmp: Path, name: str, opts, progress) -> tuple[str, str, list[str]]:
    """Write the repository into ``tmp``; returns the format Triton serves, the kind of model and notes for the user."""
    from .artifact import _companions

    fmt, notes = manifest.format, []
    if fmt in CONVERT:
        target = CONVERT[fmt]
        with progress.stage(f"exporting to {target} for Triton"):
            art = _convert(run_dir, target, tmp / ".convert", progress)
        why = "ONNX does not take torch's int8 modules" if fmt == "torch-quantized" else "onnxruntime is Triton's portable CPU/GPU backend"
        notes.append(f"Triton cannot load a {fmt} model: exported it to {target} with compress's exporter, verified against it ({why})")
        model_file, specs, fmt = Path(art.path), art.input_spec, target
    elif fmt in PLATFORMS:
        model_file, specs, art = run_dir / manifest.model_file, manifest.input_spec, None
    else:
        hint = {"pt2": "Triton's PyTorch backend does not load torch.export programs: package the run directory it was exported from "
                       "(exported to ONNX for Triton), or compress export that one with --target onnx"}
        raise CompressError(f"Triton cannot load a {fmt} model (it serves ONNX, TensorRT plans and TorchScript)",
                            hint.get(fmt, "Package the run directory this was made from (torch or ONNX), or compress export it with --target onnx"))
    platform, filename = PLATFORMS[fmt]
    version = tmp / name / "1"
    version.mkdir(parents=True)
    _link_or_copy(model_file, version / filename)
    for f in _companions(model_file):            # ONNX external data: named inside the graph, so kept as it is
        _link_or_copy(f, version / f.name)
    with progress.stage("reading the model's inputs and outputs"):
        inputs, outputs = _tensors(fmt, version / filename, specs, art if art is not None else run_dir)
    if fmt == "tensorrt":
        notes.append("a TensorRT plan's outputs are read by Triton from the plan (it fills them into the config); its instances run on the GPU")
    batch = opts.batch("triton")
    batchable = all(t.shape and t.shape[0] == -1 for t in inputs + outputs)
    if not batchable:
        notes.append("the model's batch axis is fixed, so max_batch_size is 0 (no batching; requests carry the full shape)")
    max_batch = batch if batchable else 0
    gpu = opts.device == "cuda" or fmt == "tensorrt"
    params = {THREADS[platform]: str(opts.threads)} if platform in THREADS and not gpu else {}
    text = config_text(name, platform, max_batch, inputs, outputs, delay_us=round(opts.max_wait_ms * 1000) if max_batch > 1 else None,
                       count=opts.replicas or 1, kind="KIND_GPU" if gpu else "KIND_CPU", cache=opts.cache_size > 0, parameters=params)
    (tmp / name / "config.pbtxt").write_text(text)
    shutil.rmtree(tmp / ".convert", ignore_errors=True)
    kind = _kind(manifest, specs)
    text_note = ("\nIt takes token ids (tokenize on the client with the model's tokenizer; compress serve's POST /predict takes raw text)."
                 if kind == "text" else "")
    cache = "\nThe response cache needs a cache on the server: tritonserver ... --cache-config local,size=104857600" if opts.cache_size else ""
    if fmt == "onnx":
        import onnx

        m = onnx.load(str(version / filename), load_external_data=False)
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in m.opset_import)
        cache += (f"\nONNX IR version {m.ir_version}, opsets {opsets}: use a Triton release whose onnxruntime reads them "
                  "(its release notes name the onnxruntime version).")
    (tmp / "README.txt").write_text(f"""A Triton Inference Server model repository for '{name}' ({platform}), written by compress package --target triton
from {run_dir.resolve()}.{text_note}{cache}
    docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD":/models nvcr.io/nvidia/tritonserver:25.01-py3 \\
        tritonserver --model-repository=/models{' --cache-config local,size=104857600' if opts.cache_size else ''}
    curl localhost:8000/v2/models/{name}/config
{'' if kind == 'text' else f"    compress loadtest http://127.0.0.1:8000 --name {name} --data DATA{chr(10)}"}Files: {name}/config.pbtxt, {name}/1/{filename} (Triton ignores the files at the repository's top).
""")
    return fmt, kind, notes


def _convert(run_dir: Path, target: str, where: Path, progress):
    """The run directory's torch model exported to ``target`` by compress's exporter (a one-stage pipeline)."""
    from .artifact import load_run_dir
    from .pipeline import run as run_plan
    from .plan import check

    source = load_run_dir(run_dir)
    plan = check({"model": {"source": source.source}, "stages": [{"export": {"target": target}}]}, "compress package", source_format=source.format)
    return run_plan(plan, where, source=source, progress=progress).final


def _tensors(fmt: str, path: Path, specs, source) -> tuple[list[Tensor], list[Tensor]]:
    """The inputs and outputs Triton will check the model against."""
    if fmt == "onnx":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            from .errors import first_line

            raise CompressError(f"onnxruntime cannot load {path.name} ({first_line(exc)})", "Re-export the model") from None

        def tensors(items):
            return [Tensor(t.name, ORT_TYPES.get(t.type, "TYPE_FP32"), [d if isinstance(d, int) and d >= 0 else -1 for d in (t.shape or [])]) for t in items]
        return tensors(session.get_inputs()), tensors(session.get_outputs())
    named = fmt == "torchscript"                 # libtorch's inputs have no names: Triton's convention is INPUT__i, OUTPUT__i
    inputs = [Tensor(f"INPUT__{i}" if named else s.name, NUMPY_TYPES.get(s.dtype, "TYPE_FP32"),
                     [-1 if a in (s.dynamic_axes or ()) else d for a, d in enumerate(s.shape)]) for i, s in enumerate(specs)]
    if fmt == "tensorrt":
        return inputs, []
    served = _served(source)
    outputs = [Tensor(f"OUTPUT__{i}", V2_TYPES.get(dt, "TYPE_FP32"), list(shape)) for i, (dt, shape) in enumerate(zip(served.output_dtypes, served.output_shapes))]
    return inputs, outputs


def _served(source):
    """compress's ServedModel of ``source`` (a run directory or an Artifact): one example run tells the outputs."""
    import torch

    from .serving import ServedModel

    threads = torch.get_num_threads()
    try:
        return ServedModel.load(source, "model", threads=1)
    finally:
        torch.set_num_threads(threads)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _kind(manifest, specs) -> str:
    first = specs[0]
    if first.dtype.startswith(("int", "uint")) and str((manifest.arch or {}).get("spec", "")).startswith("hf:"):
        return "text"
    return "image" if len(first.shape) == 4 and first.dtype.startswith(("float", "bfloat")) else "tensor"


def config_text(name: str, platform: str, max_batch: int, inputs: list[Tensor], outputs: list[Tensor], *, delay_us: int | None, count: int,
                kind: str, cache: bool, parameters: dict[str, str]) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig)."""
    def tensor(t: Tensor) -> str:
        dims = t.shape[1:] if max_batch > 0 else t.shape
        reshape = "" if dims else "\n    reshape: { shape: [ ] }"       # one value per sample: Triton needs a dimension
        return (f"  {{\n    name: {json.dumps(t.name)}\n    data_type: {t.data_type}\n    dims: [ {', '.join(str(d) for d in dims or [1])} ]{reshape}\n  }}")

    parts = [f"name: {json.dumps(name)}", f"platform: {json.dumps(platform)}", f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(tensor(t) for t in inputs) + "\n]"]
    if outputs:
        parts.append("output [\n" + ",\n".join(tensor(t) for t in outputs) + "\n]")
    if delay_us is not None:
        parts.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}")
    parts.append(f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]")
    if cache:
        parts.append("response_cache {\n  enable: true\n}")
    for key, value in parameters.items():
        parts.append(f"parameters {{\n  key: {json.dumps(key)}\n  value: {{ string_value: {json.dumps(value)} }}\n}}")
    return "# written by compress package --target triton\n" + "\n".join(parts) + "\n"
