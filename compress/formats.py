"""The one table of model formats: the file compress writes for each, and how a file given as SOURCE is recognised.

Runners and exporters for the file formats live with their export target (``exporters/``) and are found through
:mod:`compress.registry` by format name.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Format:
    name: str
    model_file: str                   # the file name compress writes
    suffixes: tuple[str, ...] = ()    # file suffixes that name this format when given as a SOURCE
    in_memory: bool = False           # held as a torch module (saved as a state dict plus rebuild steps)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("torch", "model.safetensors", in_memory=True),
    Format("torch-quantized", "model.pt", in_memory=True),
    Format("torchscript", "model.torchscript.pt"),                      # a zip archive, recognised by its content
    Format("onnx", "model.onnx", (".onnx",)),
    Format("pt2", "model.pt2", (".pt2",)),
    Format("tensorrt", "model.engine", (".engine", ".plan", ".trt")),
    Format("openvino", "model.xml", (".xml",)),                         # OpenVINO IR: the graph, its weights in model.bin
)}
TORCH_FORMATS = tuple(n for n, f in FORMATS.items() if f.in_memory)
# Weights of a torch model: they need the architecture (--arch) to become a model.
STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def by_suffix(path: str | Path) -> str | None:
    """The format a file's suffix names (``.onnx``, ``.pt2``, ``.engine``/``.plan``/``.trt``), or None."""
    suffix = Path(path).suffix.lower()
    return next((f.name for f in FORMATS.values() if suffix in f.suffixes), None)


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive: a zip holding ``constants.pkl`` and ``code/`` (a damaged archive is not one)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError, EOFError, NotImplementedError):
        return False
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def of_file(path: str | Path) -> str | None:
    """The format of a model file: by suffix, TorchScript by content, else None (a state dict or a pickle)."""
    p = Path(path)
    named = by_suffix(p)
    if named or p.suffix.lower() == ".safetensors":
        return named
    return "torchscript" if p.is_file() and is_torchscript(p) else None
