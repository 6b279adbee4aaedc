"""A wheel of the compress that is running, for images that install it (``compress package --target docker``).

Assembled from the imported packages' own files (``compress`` with its weights and shipped configs, ``exporters``,
``cli``) and the installed distribution's metadata and entry points (the export targets are plugins found through
them), so it works from a checkout, an editable install or a wheel alike, with no build step.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from pathlib import Path

from .errors import CompressError

DATA_SUFFIXES = (".py", ".safetensors", ".yaml")


def _files() -> dict[str, Path]:
    """Archive name → file, for every module and package-data file of compress."""
    out: dict[str, Path] = {}
    exporters, cli = importlib.util.find_spec("exporters"), importlib.util.find_spec("cli")   # located, not imported
    if exporters is None or cli is None:
        raise CompressError("compress's export targets or CLI cannot be found here, so its wheel cannot be assembled", "Reinstall compress")
    for name, root in (("compress", Path(__file__).resolve().parent), ("exporters", Path(exporters.origin).parent)):
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in DATA_SUFFIXES and "__pycache__" not in f.parts:
                out[f"{name}/{f.relative_to(root).as_posix()}"] = f
    configs = importlib.util.find_spec("compress.configs")
    for where in (configs.submodule_search_locations or []) if configs else []:
        for f in sorted(Path(where).glob("*.yaml")):
            out.setdefault(f"compress/configs/{f.name}", f)
    out["cli.py"] = Path(cli.origin)
    return out


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path) -> Path:
    """Write ``compress-VERSION-py3-none-any.whl`` into ``folder``; returns its path."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("compress")
    except PackageNotFoundError:
        raise CompressError("compress is not installed as a distribution here, so its wheel cannot be assembled",
                            "Install it (pip install -e . in the checkout) and package again") from None
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    entry_points = dist.read_text("entry_points.txt")
    if not metadata or not entry_points:
        raise CompressError("the installed compress has no metadata or entry points to put in a wheel", "Reinstall it: pip install -e .")
    version = dist.version
    info = f"compress-{version}.dist-info"
    path = Path(folder) / f"compress-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
            record.append(f"{name},{_record_hash(data)},{len(data)}")

        for name, f in _files().items():
            add(name, f.read_bytes())
        add(f"{info}/METADATA", metadata.encode())
        add(f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: compress package\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        add(f"{info}/entry_points.txt", entry_points.encode())
        add(f"{info}/top_level.txt", b"cli\ncompress\nexporters\n")
        record.append(f"{info}/RECORD,,")
        z.writestr(zipfile.ZipInfo(f"{info}/RECORD", date_time=(2020, 1, 1, 0, 0, 0)), "\n".join(record) + "\n")
    return path
