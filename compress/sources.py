"""Load a SOURCE: a state dict plus --arch, a run directory, a TorchScript/ONNX/pt2 file, a built-in model,
or (only with --trust-pickle) a pickled whole module."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import arch as arch_mod
from .artifact import Artifact, load_run_dir
from .errors import CompressError
from .manifest import MANIFEST
from .specs import InputSpec, parse_input_shapes

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
PICKLE_WHY = "unpickling runs whatever code the file contains"


def load(source: str | Path, arch: str | None = None, arch_args=None, input_shapes=(), static_shapes: bool = False,
         trust_pickle: bool = False, example_input: str | None = None) -> Artifact:
    """Turn a SOURCE (see the CLI contract) into an Artifact with a known input spec."""
    args = arch_mod.parse_arch_args(arch_args)
    src = str(source)
    if src.startswith("zoo:"):
        from .zoo import resolve

        entry = resolve(src[4:])
        return load(entry["source"], arch or entry["arch"], args or entry.get("arch_args"), input_shapes or entry.get("input_shape", ()),
                    static_shapes, trust_pickle, example_input).evolve(source=src)
    path = Path(src)
    specs = _user_specs(input_shapes, example_input, static_shapes)
    if not path.exists():
        raise CompressError(f"source {path} does not exist", "Check the path (or use zoo:NAME for a built-in model; see 'compress ls')")
    if path.is_dir():
        if (path / MANIFEST).exists():
            art = load_run_dir(path, trust_pickle)
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
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _onnx_artifact(path, specs)
    if suffix in (".engine", ".plan", ".trt"):
        if not specs:
            raise CompressError(f"a TensorRT engine needs its input shape", "Give --input-shape")
        return Artifact("tensorrt", specs, str(path), path=path)
    if suffix == ".pt2":
        return _pt2_artifact(path, specs)
    if _is_torchscript(path):
        if not specs:
            raise CompressError(f"{path} is a TorchScript archive, whose input shape cannot be read from it",
                                "Give --input-shape (e.g. 1x3x224x224)")
        return Artifact("torchscript", specs, str(path), path=path)
    state = read_state_dict(path, trust_pickle=trust_pickle)
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
        raise CompressError(f"the model does not accept {shown} ({type(exc).__name__}: {_short(exc)})",
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


def _user_specs(input_shapes, example_input, static: bool) -> list[InputSpec]:
    if example_input:
        tensors = read_example_input(Path(example_input))
        names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
        from .specs import CANONICAL

        return [InputSpec(n, tuple(t.shape), CANONICAL.get(t.dtype, "float32"), () if static else (0,)) for n, t in zip(names, tensors)]
    if isinstance(input_shapes, str):
        input_shapes = [input_shapes]
    return parse_input_shapes(list(input_shapes or ()), static=static)


def read_example_input(path: Path) -> tuple[torch.Tensor, ...]:
    state = read_state_dict(path)
    if isinstance(state, torch.Tensor):
        return (state,)
    if isinstance(state, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in state):
        return tuple(state)
    if isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values()):
        return tuple(state.values())
    raise CompressError(f"{path} does not hold a tensor or a list of tensors", "Save the example input with torch.save(tensor, path)")


def read_state_dict(path: Path, trust_pickle: bool = False):
    """Read weights safely: safetensors, or torch.load(weights_only=True); pickles only when trusted."""
    path = Path(path)
    if not path.exists():
        raise CompressError(f"{path} does not exist", "Check the path")
    if path.stat().st_size == 0:
        raise CompressError(f"{path} is empty", "The file was not written completely; recreate it")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CompressError(f"{path} is not a readable safetensors file ({_short(exc)})", "The file is corrupt or truncated; recreate it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_like_pickle(path):
            raise CompressError(f"{path} is not a PyTorch checkpoint ({_pickle_problem(exc)})", "Give a .pt/.pth/.safetensors state dict, an .onnx, a .pt2 or a TorchScript file") from None
        if "global" not in str(exc).lower():  # the safe unpickler choked on the bytes themselves, not on code
            raise CompressError(f"{path} could not be read as a PyTorch checkpoint ({_pickle_problem(exc)})",
                                "The file is corrupt, truncated or of another type; recreate it") from None
        if not trust_pickle:
            raise CompressError(f"{path} holds pickled Python objects, not only weights, and {PICKLE_WHY}",
                                "Save a state dict instead (torch.save(model.state_dict(), path)), or pass --trust-pickle if you trust the file") from None
        return load_pickled_module(path, True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path} could not be read as a PyTorch checkpoint ({_short(exc)})", "The file is corrupt, truncated or of another type; recreate it") from None
    return _unwrap_state(obj, path)


def load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise CompressError(f"{path} is a pickled module and {PICKLE_WHY}", "Pass --trust-pickle if you trust the file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - arbitrary pickles fail arbitrarily
        raise CompressError(f"{path} could not be unpickled ({_short(exc)})", "Make sure the classes it needs are importable") from None
    if isinstance(obj, nn.Module):
        return obj.eval()
    return _unwrap_state(obj, path)


def _unwrap_state(obj, path: Path):
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        # Quantized state dicts also hold dtypes and packed (tensor, bias) tuples: keep every entry.
        # (obj is returned as is: its _metadata carries the layer versions quantized modules need to load.)
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
                obj = {k[len("module."):]: v for k, v in obj.items()}
            return obj
    if isinstance(obj, (torch.Tensor, list, tuple)):
        return obj
    raise CompressError(f"{path} holds a {type(obj).__name__} without tensors, not a state dict", "Save model.state_dict()")


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError, EOFError, NotImplementedError):
        return False  # a damaged archive is not TorchScript; torch.load below says what is wrong
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _onnx_artifact(path: Path, specs: list[InputSpec]) -> Artifact:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises many types
        raise CompressError(f"{path} is not a readable ONNX model ({_short(exc)})", "The file is corrupt or of another type") from None
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
                from .specs import CANONICAL

                specs = [InputSpec(f"input_{i}" if len(args) > 1 else "input", tuple(a.shape), CANONICAL.get(a.dtype, "float32"), (0,))
                         for i, a in enumerate(args)]
        except Exception:  # noqa: BLE001 - an AOTInductor package is not an ExportedProgram
            pass
    if not specs:
        raise CompressError(f"the input shape of {path} cannot be read from it", "Give --input-shape")
    return Artifact("pt2", specs, str(path), path=path)


def _pickle_problem(exc: BaseException) -> str:
    """The useful line of torch's long 'Weights only load failed' message."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    useful = [l for l in lines if not l.startswith(("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch"))]
    return (useful[0] if useful else _short(exc))[:160]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
