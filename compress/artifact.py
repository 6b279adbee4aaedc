"""An artifact is a model in one format plus what is needed to run and rebuild it; saving and loading them.

Torch models are saved as a state dict (safetensors) next to an architecture spec and replayable rebuild
steps (e.g. pruned layer shapes), so reloading never unpickles code.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CompressError
from .formats import FORMATS, TORCH_FORMATS
from .manifest import MANIFEST, Manifest
from .inputs import InputSpec


@dataclass
class Artifact:
    format: str
    input_spec: list[InputSpec]
    source: str
    model: Any = None                  # nn.Module for torch formats
    path: Path | None = None           # the model file, for file formats (and saved torch artifacts)
    arch: dict | None = None           # {"spec": ..., "args": {...}}
    rebuild: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    # The float model a torch-quantized model came from: saved instead when the int8 state cannot be
    # stored without pickling (dynamic-quantized LSTM/GRU), and re-quantized on load.
    float_model: Any = field(default=None, repr=False, compare=False)

    def evolve(self, **changes) -> "Artifact":
        return replace(self, **changes)

    @property
    def is_torch(self) -> bool:
        return self.format in TORCH_FORMATS

    def manifest(self, model_file: str) -> Manifest:
        return Manifest(format=self.format, model_file=model_file, source=self.source, input_spec=self.input_spec,
                        stages=self.stages, arch=self.arch, rebuild=self.rebuild, extra=dict(self.extra))

    def size_bytes(self) -> int | None:
        if self.path is None or not Path(self.path).exists():
            return None
        p = Path(self.path)
        files = [p, *_companions(p)] if p.is_file() else list(p.rglob("*"))
        return sum(f.stat().st_size for f in files if f.is_file())


def save(artifact: Artifact, directory: Path, manifest: bool = True) -> Artifact:
    """Write the artifact's model file (and, unless ``manifest`` is False, its manifest) into ``directory``; returns the
    artifact pointing there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extra = dict(artifact.extra)
    if artifact.is_torch:
        model_file = FORMATS[artifact.format].model_file
        if artifact.arch is None:
            model_file = "model.pickle.pt"
            extra["pickled"] = True
            torch.save(artifact.model, directory / model_file)
        elif artifact.format == "torch":
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().clone() for k, v in artifact.model.state_dict().items()}
            save_file(state, str(directory / model_file))
        else:
            state = artifact.model.state_dict()
            if _loads_without_pickle(state):
                torch.save(state, directory / model_file)
            elif artifact.float_model is not None:
                from safetensors.torch import save_file

                model_file = "model.float.safetensors"
                extra["requantize_on_load"] = True
                save_file({k: v.detach().contiguous().clone() for k, v in artifact.float_model.state_dict().items()}, str(directory / model_file))
            else:
                raise CompressError("this quantized model cannot be saved without pickling", "Quantize from a float model in the same command")
    else:
        if artifact.path is None:
            raise CompressError(f"a {artifact.format} artifact has no file to save", "This is a bug; run with --debug")
        src = Path(artifact.path)
        model_file = src.name
        if src.resolve().parent != directory.resolve():
            for f in [src, *_companions(src)]:
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, directory / f.name)
    out = artifact.evolve(path=directory / model_file, extra=extra)
    if manifest:
        out.manifest(model_file).write(directory)
    return out


def _companions(model_file: Path) -> list[Path]:
    """Files that travel with a model file: an OpenVINO graph's weights (.bin), the external-data files an ONNX model names."""
    if model_file.suffix == ".xml":
        return [b] if (b := model_file.with_suffix(".bin")).is_file() else []
    if model_file.suffix != ".onnx":
        return []
    import onnx

    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - an unreadable file has no companions to count
        return []
    names = {e.value for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    return [model_file.parent / n for n in sorted(names) if (model_file.parent / n).is_file()]


# Manifest keys that describe one run directory (its outcome, its stage folders), not the model: never inherited.
RUN_KEYS = ("status", "error", "pipeline")


def load_run_dir(directory: Path, trust_pickle: bool = False, verify: bool = True, allow_nonfinite: bool = False) -> Artifact:
    """A run directory's artifact; with ``verify``, its files are checked against the SHA-256s its manifest recorded."""
    manifest = Manifest.read(directory)
    path = Path(directory) / manifest.model_file
    if not path.exists():
        raise CompressError(f"{directory} names the model file {manifest.model_file}, which is missing", "Rerun the command that wrote it")
    if verify:
        manifest.verify(directory)
        if path.parent != Path(directory) and (path.parent / MANIFEST).is_file():   # a failed run's model, in its stage folder
            Manifest.read(path.parent).verify(path.parent)
    art = Artifact(format=manifest.format, input_spec=manifest.input_spec, source=manifest.source, path=path,
                   arch=_local_arch(manifest.arch, Path(directory)), rebuild=manifest.rebuild, stages=manifest.stages,
                   extra={k: v for k, v in manifest.extra.items() if k not in RUN_KEYS})
    if art.is_torch:
        art.model = rebuild_torch(art, path, trust_pickle, allow_nonfinite)
    return art


def _local_arch(arch: dict | None, directory: Path) -> dict | None:
    """A relative ``hf:FOLDER`` or ``FILE.py:Callable`` spec that names something inside the run directory (as
    ``compress package`` writes them, so the directory serves wherever it is copied) resolved against it."""
    spec = str((arch or {}).get("spec") or "")
    kind, ref = ("hf:", spec[3:]) if spec.startswith("hf:") else ("", spec.rpartition(":")[0]) if ".py:" in spec else ("", "")
    if not ref or Path(ref).is_absolute() or not (directory / ref).exists():
        return arch
    return {**arch, "spec": kind + str((directory / ref).resolve()) + spec[len(kind) + len(ref):]}


def rebuild_torch(art: Artifact, path: Path, trust_pickle: bool, allow_nonfinite: bool = False) -> nn.Module:
    from . import arch as arch_mod
    from .checkpoints import check_finite, load_pickled_module, read_state_dict

    if art.extra.get("pickled") or art.arch is None:
        return load_pickled_module(path, trust_pickle)
    model = arch_mod.build(art.arch["spec"], art.arch.get("args"))
    # Float weights saved for a quantized model: quantization steps replay after the weights are loaded.
    after = [s for s in art.rebuild if art.extra.get("requantize_on_load") and str(s.get("op", "")).startswith("quantize")]
    for step in [s for s in art.rebuild if s not in after]:
        model = _replay(model, step, path)
    state = read_state_dict(path)
    check_finite(state, path, allow_nonfinite)
    arch_mod.load_state_dict(model, state, f"{art.arch['spec']} (rebuilt from {path.parent})")
    for step in after:
        model = _replay(model, step, path)
    return model.eval()


def _replay(model: nn.Module, step: dict, path: Path) -> nn.Module:
    from .registry import rebuild_step

    try:
        fn = rebuild_step(step.get("op"))
    except KeyError:
        raise CompressError(f"{path.parent} needs the rebuild step '{step.get('op')}', which this version does not know",
                            "Upgrade compress, or re-create the run directory")
    return fn(model, step)


def _loads_without_pickle(state: dict) -> bool:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - weights_only refuses ScriptObjects (packed LSTM weights)
        return False
