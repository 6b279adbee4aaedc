"""Load a SOURCE: a state dict plus --arch, a run directory, a TorchScript/ONNX/pt2 file, a built-in model,
or (only with --trust-pickle) a pickled whole module."""
from __future__ import annotations

import dataclasses
import functools
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import arch as arch_mod
from .artifact import Artifact, load_run_dir
from .checkpoints import check_finite, check_zip, read_state_dict
from .errors import CompressError, first_line
from .inputs import InputSpec, parse_input_shapes
from .manifest import MANIFEST

@dataclass(frozen=True)
class ModelSpec:
    """A SOURCE and the model options, parsed once: what :func:`load_model` loads."""
    source: str
    arch: str | None = None
    arch_args: dict = field(default_factory=dict)
    inputs: tuple[InputSpec, ...] = ()     # from --input-shape or --example-input; empty: read from the source
    static_shapes: bool = False
    trust_pickle: bool = False
    verify: bool = True                     # check files against their checksums (zip CRC-32s, a run directory's SHA-256s)
    allow_nonfinite: bool = False           # load weights holding NaN or Inf

    @classmethod
    def parse(cls, source, arch: str | None = None, arch_args: str | dict | None = None, input_shape=(),
              example_input: str | None = None, static_shapes: bool = False, trust_pickle: bool = False,
              verify: bool = True, allow_nonfinite: bool = False) -> "ModelSpec":
        """The model options as the CLI, a YAML file or a notebook give them (strings), parsed; raises CompressError."""
        from .arch import parse_arch_args

        if isinstance(input_shape, str):
            input_shape = [input_shape]
        if example_input:
            from .checkpoints import read_example_input
            from .inputs import CANONICAL

            tensors = read_example_input(Path(example_input))
            names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
            inputs = [InputSpec(n, tuple(t.shape), CANONICAL.get(t.dtype, "float32"), () if static_shapes else (0,)) for n, t in zip(names, tensors)]
        else:
            inputs = parse_input_shapes([str(s) for s in input_shape or ()], static=static_shapes)
        return cls(str(source), arch or None, parse_arch_args(arch_args), tuple(inputs), bool(static_shapes), bool(trust_pickle),
                   bool(verify), bool(allow_nonfinite))

    @functools.cached_property
    def format(self) -> str:
        """The format the source holds, read from its name, manifest or content ("?" when it cannot be told yet)."""
        if self.source.startswith("zoo:"):
            return "torch"
        p = Path(self.source)
        if p.is_dir() and (p / MANIFEST).exists():
            try:
                return json.loads((p / MANIFEST).read_text()).get("format", "?")
            except (OSError, ValueError):
                return "?"
        from .formats import of_file

        return of_file(p) or ("torch" if p.exists() else "?")


def load(source: str | Path, arch: str | None = None, arch_args=None, input_shape=(), static_shapes: bool = False,
         trust_pickle: bool = False, example_input: str | None = None) -> Artifact:
    """Turn a SOURCE (see the CLI contract) and its model options, as a user writes them, into an Artifact."""
    return load_model(ModelSpec.parse(source, arch, arch_args, input_shape, example_input, static_shapes, trust_pickle))


def load_model(spec: ModelSpec) -> Artifact:
    """Load a parsed SOURCE into an Artifact with a known input spec."""
    if spec.source.startswith("zoo:"):
        from .zoo import resolve

        entry = resolve(spec.source[4:])
        inner = dataclasses.replace(spec, source=entry["source"], arch=spec.arch or entry["arch"],
                                    arch_args=spec.arch_args or entry.get("arch_args") or {}, inputs=spec.inputs or entry.get("inputs", ()))
        return load_model(inner).evolve(source=spec.source)
    path, arch, args, specs = Path(spec.source), spec.arch, spec.arch_args, list(spec.inputs)
    if not path.exists():
        raise CompressError(f"source {path} does not exist", "Check the path (or use zoo:NAME for a built-in model; see 'compress ls')")
    if path.is_dir():
        if (path / MANIFEST).exists():
            art = load_run_dir(path, spec.trust_pickle, spec.verify, spec.allow_nonfinite)
            if specs and art.model is not None:
                check_input_spec(art.model, specs)
            return art.evolve(input_spec=specs or art.input_spec)
        if (path / "config.json").exists() or arch and arch.startswith("hf:") and not (path / "model.safetensors").exists():
            model = arch_mod.HFModel.from_spec(str(path), args, pretrained=True)
            return _torch_artifact(model, f"hf:{path}", args, specs, str(path))
        raise CompressError(f"{path} is a directory but neither a compress run directory nor a transformers model folder",
                            "Give a model file, a run directory (with manifest.json) or a folder with config.json")
    if path.stat().st_size == 0:
        raise CompressError(f"{path} is empty", "The file was not written completely; recreate it")
    fmt = spec.format
    if spec.verify and fmt in ("torchscript", "pt2"):
        check_zip(path)
    if fmt == "onnx":
        return _onnx_artifact(path, specs, spec.allow_nonfinite)
    if fmt == "pt2":
        return _pt2_artifact(path, specs)
    if fmt == "openvino":
        return _openvino_artifact(path, specs)
    if fmt in ("tensorrt", "torchscript"):
        if not specs:
            raise CompressError(f"{path} is a {'TorchScript archive' if fmt == 'torchscript' else 'TensorRT engine'}, whose input "
                                "shape cannot be read from it", "Give --input-shape (e.g. 1x3x224x224)")
        return Artifact(fmt, specs, str(path), path=path)
    state = read_state_dict(path, trust_pickle=spec.trust_pickle, verify=spec.verify)
    if isinstance(state, dict):
        check_finite(state, path, spec.allow_nonfinite)
    if isinstance(state, nn.Module):
        if not specs:
            raise CompressError(f"{path} holds a whole module whose input shape is unknown", "Give --input-shape")
        return Artifact("torch", specs, str(path), model=state.eval(), arch=None)
    if not arch:
        raise CompressError(f"{path} is a state dict (weights only), so compress needs the architecture",
                            "Give --arch (torchvision:NAME, timm:NAME, hf:PATH, file.py:Callable or package.module:Callable)")
    model = arch_mod.build(arch, args)
    arch_mod.load_state_dict(model, state, arch)
    return _torch_artifact(model.eval(), arch, args, specs, str(path))


def check_input_spec(model, specs: list[InputSpec]) -> None:
    """Run one example through a torch model so that a wrong --input-shape is one clear error, not a crash later."""
    try:
        with torch.no_grad():
            model(*(s.example(1) for s in specs))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on a wrong shape or dtype
        shown = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}:{s.dtype}" for s in specs)
        raise CompressError(f"the model does not accept {shown} ({type(exc).__name__}: {first_line(exc, 160)})",
                            "Fix --input-shape (dimensions and :DTYPE) to what the model takes") from None


def _torch_artifact(model: nn.Module, spec: str, args: dict, specs: list[InputSpec], source: str) -> Artifact:
    if specs:
        check_input_spec(model, specs)
    specs = specs or arch_mod.default_input_spec(spec, model)
    if not specs:
        raise CompressError(f"the input shape of {spec} is not known", "Give --input-shape, e.g. --input-shape 1x3x32x32")
    if isinstance(model, arch_mod.HFModel):
        spec = f"hf:{Path(model.path).resolve()}"
        args = {**args, "task": model.task, "pooling": model.pooling, "normalize": model.normalize}
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):  # the manifest must rebuild the model from any working directory
        spec = f"{Path(target).resolve()}:{attr}"
    return Artifact("torch", specs, source, model=model, arch={"spec": spec, "args": args})


def _onnx_artifact(path: Path, specs: list[InputSpec], allow_nonfinite: bool = False) -> Artifact:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises many types
        raise CompressError(f"{path} is not a readable ONNX model ({first_line(exc, 160)})", "The file is corrupt or of another type") from None
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    check_finite({i.name: torch.from_numpy(numpy_helper.to_array(i).astype("float32")) for i in model.graph.initializer
                  if i.data_type in floats and i.data_location != onnx.TensorProto.EXTERNAL}, path, allow_nonfinite)
    init = {i.name for i in model.graph.initializer}
    graph_specs = []
    for inp in model.graph.input:
        if inp.name in init:
            continue
        t = inp.type.tensor_type
        dims, dynamic = [], []
        for i, d in enumerate(t.shape.dim):
            if d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dynamic.append(i)
                dims.append(1 if i == 0 else 128)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "float32"
        graph_specs.append(InputSpec(inp.name, tuple(dims), dtype if dtype != "float64" else "float64", tuple(dynamic)))
    if specs:
        if len(specs) != len(graph_specs):
            raise CompressError(f"{path} takes {len(graph_specs)} input(s) but {len(specs)} --input-shape were given", "Give one per input")
        specs = [InputSpec(g.name, s.shape, s.dtype, g.dynamic_axes) for g, s in zip(graph_specs, specs)]
    return Artifact("onnx", specs or graph_specs, str(path), path=path)


def _pt2_artifact(path: Path, specs: list[InputSpec]) -> Artifact:
    if zipfile.is_zipfile(path) and not specs:
        try:
            ep = torch.export.load(str(path))
            ex = getattr(ep, "example_inputs", None)
            if ex:
                args = ex[0]
                from .inputs import CANONICAL

                specs = [InputSpec(f"input_{i}" if len(args) > 1 else "input", tuple(a.shape), CANONICAL.get(a.dtype, "float32"), (0,))
                         for i, a in enumerate(args)]
        except Exception:  # noqa: BLE001 - an AOTInductor package is not an ExportedProgram
            pass
    if not specs:
        raise CompressError(f"the input shape of {path} cannot be read from it", "Give --input-shape")
    return Artifact("pt2", specs, str(path), path=path)


def _openvino_artifact(path: Path, specs: list[InputSpec]) -> Artifact:
    """An OpenVINO IR file (model.xml, its weights in model.bin beside it): input names, shapes and types read from the graph."""
    from .openvino_model import openvino

    ov = openvino()
    if not path.with_suffix(".bin").is_file():
        raise CompressError(f"{path} is an OpenVINO graph whose weights file {path.with_suffix('.bin').name} is missing",
                            "Keep model.xml and model.bin together")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"OpenVINO cannot read {path} ({first_line(exc)})", "Give an OpenVINO IR written by ov.save_model or compress export --target openvino") from None
    if specs:
        return Artifact("openvino", specs, str(path), path=path)
    graph_specs = []
    for i, inp in enumerate(model.inputs):
        shape = inp.get_partial_shape()
        dims = [d.get_length() if d.is_static else -1 for d in shape]
        dynamic = tuple(j for j, d in enumerate(dims) if d < 0)
        # dynamic sizes take 1 for the batch and 128 for other axes (a sequence length), as for ONNX files
        concrete = tuple(d if d >= 0 else (1 if j == 0 else 128) for j, d in enumerate(dims))
        name = next(iter(inp.get_names()), f"input_{i}")
        graph_specs.append(InputSpec(name, concrete, str(inp.get_element_type().to_dtype()), dynamic))
    return Artifact("openvino", graph_specs, str(path), path=path)
