"""Atomic outputs: everything is written into a hidden temporary sibling and renamed into place.

An existing output is never touched without ``force``; an interrupted or failed write leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CompressError


def check_destination(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Path:
    """Refuse an existing OUT without --force, an OUT that is (or holds) an input, and unwritable places."""
    out = Path(out)
    if out.exists() and not force:
        raise CompressError(f"output {out} already exists", "Pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output {out} exists and is a file, not a directory", "Choose another -o")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
        # --force replaces a compress output, never an arbitrary folder (think -o ~ or -o /tmp).
        raise CompressError(f"output {out} is a non-empty folder that compress did not write, so it is not replaced even with --force",
                            "Choose a new -o, or an earlier compress output")
    resolved = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise CompressError(f"output {out} would overwrite the input {p}", "Choose an -o outside the input")
    parent = resolved.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CompressError(f"cannot write to {parent}: permission denied", "Choose an -o in a writable directory")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds, and vanishes when it fails."""
    out = check_destination(Path(out), force, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        commit_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, out) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place, replacing ``out`` only once ``tmp`` is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}.old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_file_atomic(path: Path, data: bytes | str, force: bool = True) -> Path:
    """Write one file through a temporary sibling and an atomic rename."""
    path = Path(path)
    if path.exists() and not force:
        raise CompressError(f"{path} already exists", "Pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _os_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _os_error(exc: OSError, where: Path) -> CompressError:
    if exc.errno == errno.ENOSPC:
        return CompressError(f"no space left on the device while writing {where}", "Free some disk space or choose another -o")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CompressError(f"cannot write {where}: {exc.strerror}", "Choose an -o in a writable directory")
    return CompressError(f"could not write {where}: {exc.strerror or exc}", "Check the path and the disk")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
