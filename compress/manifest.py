"""``manifest.json``: how an artifact was made (its whole stage history) and how to load it again."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CompressError
from .formats import FORMATS
from .rundir import write_file_atomic
from .inputs import InputSpec

MANIFEST = "manifest.json"


def environment() -> dict:
    import torch

    from .version import __version__

    env = {"compress": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": _cpu_name(), "platform": platform.platform()}
    for mod in ("onnx", "onnxruntime", "torchvision", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Manifest:
    format: str
    model_file: str
    source: str
    input_spec: list[InputSpec]
    stages: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    # How to rebuild a torch model without unpickling: architecture spec plus replayable steps.
    arch: dict | None = None
    rebuild: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    # Every file of the directory (not its subfolders) as written: {name: {"size": bytes, "sha256": hex}}.
    files: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "format": self.format, "model_file": self.model_file, "source": self.source,
            "input_spec": [s.to_json() for s in self.input_spec], "stages": self.stages,
            "env": self.env or environment(),
        }
        if self.arch is not None:
            d["arch"] = self.arch
        if self.rebuild:
            d["rebuild"] = self.rebuild
        d.update(self.extra)
        if self.files:
            d["files"] = self.files
        return d

    def write(self, directory: Path) -> Path:
        """Write manifest.json into ``directory``, recording the size and SHA-256 of every file beside it."""
        self.files = {f.name: {"size": f.stat().st_size, "sha256": sha256(f)} for f in sorted(Path(directory).iterdir())
                      if f.is_file() and f.name != MANIFEST and not f.name.startswith(".")}
        return write_file_atomic(Path(directory) / MANIFEST, json.dumps(self.to_json(), indent=2, default=_jsonable) + "\n")

    def verify(self, directory: Path) -> None:
        """Refuse a file the manifest lists that is missing, truncated or changed since it was written (one line naming it)."""
        fix = "Re-create it with the command that wrote it, or pass --no-verify to load it anyway"
        for name, want in self.files.items():
            f = Path(directory) / name
            if not f.is_file():
                raise CompressError(f"{f} is missing (the run directory's manifest lists it)", fix)
            size = f.stat().st_size
            if size != want.get("size"):
                raise CompressError(f"{f} was {'truncated' if size < want.get('size', 0) else 'changed'} after compress wrote it "
                                    f"({size} bytes, the manifest says {want.get('size')})", fix)
            if sha256(f) != want.get("sha256"):
                raise CompressError(f"{f} was modified after compress wrote it (its SHA-256 differs from the manifest's)", fix)

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompressError(f"{directory} is not a compress run directory (no {MANIFEST})", "Give a model file or a directory written by compress") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompressError(f"{path} is not valid JSON ({exc})", "Restore it, or rerun the command that wrote it") from None
        if not isinstance(d, dict):
            raise CompressError(f"{path} is not a valid manifest (not a JSON object)", "Rerun the command that wrote it")
        missing = [k for k in ("format", "model_file", "input_spec") if k not in d]
        if missing or d.get("format") not in FORMATS:
            raise CompressError(f"{path} is not a valid manifest (missing or bad: {', '.join(missing) or 'format'})",
                                "Rerun the command that wrote it")
        known = {"format", "model_file", "source", "input_spec", "stages", "env", "arch", "rebuild", "files"}
        files = d.get("files") if isinstance(d.get("files"), dict) else {}
        return cls(format=d["format"], model_file=d["model_file"], source=d.get("source", str(directory)),
                   input_spec=[InputSpec.from_json(s) for s in d["input_spec"]], stages=list(d.get("stages", [])),
                   env=d.get("env", {}), arch=d.get("arch"), rebuild=list(d.get("rebuild", [])),
                   extra={k: v for k, v in d.items() if k not in known}, files=files)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
