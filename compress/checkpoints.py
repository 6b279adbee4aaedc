"""Reading weights safely: safetensors, or ``torch.load(weights_only=True)``; pickles only when the user trusts them."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import CompressError, first_line

PICKLE_WHY = "unpickling runs whatever code the file contains"


def read_example_input(path: Path) -> tuple[torch.Tensor, ...]:
    state = read_state_dict(path)
    if isinstance(state, torch.Tensor):
        return (state,)
    if isinstance(state, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in state):
        return tuple(state)
    if isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values()):
        return tuple(state.values())
    raise CompressError(f"{path} does not hold a tensor or a list of tensors", "Save the example input with torch.save(tensor, path)")


def check_zip(path: Path) -> None:
    """A zip-based file (torch.save's .pt/.pth, TorchScript, .pt2) checked against the CRC-32 of every entry, which
    torch.load does not do: flipped bytes in tensor data would otherwise load as garbage weights. Files that are not
    zips (safetensors, the legacy pickle format, ONNX) pass; what they are is judged by their own loaders."""
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        return
    except (OSError, EOFError, ValueError, NotImplementedError, zlib.error, RuntimeError) as exc:
        raise CompressError(f"{path} is damaged: its zip archive cannot be read ({first_line(exc, 160)})",
                            "Restore it from a good copy or re-create it; nothing was written") from None
    if bad is not None:
        raise CompressError(f"{path} is damaged: its entry {bad} fails its CRC-32 check",
                            "Restore it from a good copy or re-create it; nothing was written")


def check_finite(state: dict, what, allow: bool = False) -> None:
    """Refuse weights holding NaN or Inf (a diverged training, a damaged file) unless ``allow``."""
    if allow:
        return
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CompressError(f"{what} holds {bad} NaN/Inf value(s) in '{name}'",
                                "Check the training that wrote it, or pass --allow-nonfinite if the model means it")


def read_state_dict(path: Path, trust_pickle: bool = False, verify: bool = True):
    """Read weights safely: safetensors, or torch.load(weights_only=True) after the zip's CRC-32 check; pickles only
    when trusted."""
    path = Path(path)
    if not path.exists():
        raise CompressError(f"{path} does not exist", "Check the path")
    if path.stat().st_size == 0:
        raise CompressError(f"{path} is empty", "The file was not written completely; recreate it")
    if verify:
        check_zip(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CompressError(f"{path} is not a readable safetensors file ({first_line(exc, 160)})", "The file is corrupt or truncated; recreate it") from None
    try:
        with warnings.catch_warnings():     # torch's own unpickler of quantized tensors trips its TypedStorage deprecation
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
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
        raise CompressError(f"{path} could not be read as a PyTorch checkpoint ({first_line(exc, 160)})", "The file is corrupt, truncated or of another type; recreate it") from None
    return _unwrap_state(obj, path)


def load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise CompressError(f"{path} is a pickled module and {PICKLE_WHY}", "Pass --trust-pickle if you trust the file")
    check_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - arbitrary pickles fail arbitrarily
        raise CompressError(f"{path} could not be unpickled ({first_line(exc, 160)})", "Make sure the classes it needs are importable") from None
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


def _pickle_problem(exc: BaseException) -> str:
    """The useful line of torch's long 'Weights only load failed' message."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    useful = [l for l in lines if not l.startswith(("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch"))]
    return (useful[0] if useful else first_line(exc, 160))[:160]


