"""Atomic outputs: everything is written into a hidden temporary sibling and renamed into place.

An existing output is never touched without ``force``; an interrupted or failed write leaves nothing behind.
A process killed outright (SIGKILL, power loss) cannot clean up, so every temporary name carries its owner:
``.OUT.pid1234-1a2b3c4d.x7k2.partial`` (pid, a hash of the host name, a random part). The next compress
command writing in that folder removes the ones whose owner is no longer running on this host, and says so.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CompressError, chain

log = logging.getLogger(__name__)

# .NAME.pidPID-HOST.RANDOM.partial (work in progress) or .NAME.pidPID-HOST.RANDOM.old (an OUT being replaced)
_OWNED = re.compile(r"^\.(?P<name>.+)\.pid(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[^.]*\.(?P<kind>partial|old)$")


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner_tag() -> str:
    return f"pid{os.getpid()}-{_host()}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process here (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                  # someone else's live process
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def clean_stale(folder: Path) -> list[Path]:
    """Remove temporary outputs in ``folder`` left by compress processes that were killed; say so in one line each.

    Only names this module makes are considered, only when their owner ran on this host and is gone. A killed
    ``--force`` replacement (``.old``) whose OUT never reappeared is put back rather than deleted.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _OWNED.match(entry.name)
        if not m or m["host"] != _host() or _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        try:
            if m["kind"] == "old" and not target.exists():
                os.rename(entry, target)
                _say(f"restored {target} from an interrupted --force replacement (pid {m['pid']})")
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue                                 # another process cleaned it first
        except OSError:
            continue                                 # cannot remove it: leave it, it harms nothing
        removed.append(entry)
        _say(f"removed a stale partial output of {target.name} left by an interrupted run (pid {m['pid']}): {entry.name}")
    return removed


def _say(message: str) -> None:
    log.warning(message)


def partial_dir(out: Path) -> Path:
    """Create the hidden work folder that will become ``out`` (after removing stale ones next to it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    return owned_partial(out.parent, out.name)


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
    if not existing.is_dir():
        raise CompressError(f"cannot create {out}: {existing} is a file, not a folder", "Choose an -o in a writable directory")
    if not os.access(existing, os.W_OK):
        raise CompressError(f"cannot write to {parent}: permission denied", "Choose an -o in a writable directory")
    return out


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold OUT for this process (an flock on ``.OUT.lock`` beside it): a second compress command writing the same
    OUT at the same time fails at once with one line, so OUT is never a mix of two runs. The lock dies with its
    process, SIGKILL included; the file is removed on the way out."""
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CompressError(f"{out} is being written by another compress command ({holder or 'still running'})",
                                "Wait for it to finish, or choose another -o") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)          # the holder before us removed the file as we opened it: lock the one there now
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def owned_partial(folder: Path, name: str) -> Path:
    """A hidden work folder for ``name`` inside ``folder``, named for its owner (so clean_stale can remove it after a kill)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{_owner_tag()}.", suffix=".partial", dir=folder))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def sync_tree(path: Path) -> None:
    """fsync every file below ``path`` and the folders themselves: what a rename then commits is on the disk."""
    for p in sorted(Path(path).rglob("*"), key=lambda p: len(p.parts), reverse=True) + [Path(path)]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place, replacing ``out`` only once ``tmp`` is complete."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_owner_tag()}.", suffix=".old", dir=out.parent))
        os.rename(out, old)   # replaces the empty folder just made; a kill -9 before the next rename is undone by clean_stale
        try:
            os.rename(tmp, out)
        except BaseException:  # Ctrl-C or SIGTERM between the two renames: put the old OUT back
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_file_atomic(path: Path, data: bytes | str, force: bool = True) -> Path:
    """Write one file through a temporary sibling and an atomic rename."""
    path = Path(path)
    if path.exists() and not force:
        raise CompressError(f"{path} already exists", "Pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".partial", dir=path.parent)
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


_FULL = {errno.ENOSPC: ("no space left on the device", "Free some disk space or choose another -o"),
         errno.EDQUOT: ("the disk quota is exceeded", "Free some of your quota or choose another -o"),
         errno.EFBIG: ("a file reached the file size limit (ulimit -f)", "Raise the limit or choose another -o")}
_FULL_TEXT = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
              "os error 122": errno.EDQUOT, "File too large": errno.EFBIG, "os error 27": errno.EFBIG}


def write_failure(exc: BaseException, where: Path) -> CompressError | None:
    """A one-line error when ``exc``, raised while writing under ``where``, came from a full disk, or None.

    Writers in C++ and Rust (torch.save, safetensors) do not raise OSError, so the exception chain's text is
    read too, and an unexplained error counts as a full disk when less than 1 MiB is left where OUT goes.
    """
    code = None
    for e in chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL:
            code = e.errno
        else:
            code = next((c for text, c in _FULL_TEXT.items() if text in str(e)), None)
        if code is not None:
            break
    if code is None and isinstance(exc, Exception) and not isinstance(exc, CompressError):
        probe = Path(where)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            st = os.statvfs(probe)
            if st.f_bavail * st.f_frsize < 1 << 20:
                code = errno.ENOSPC
    if code is None:
        return None
    what, fix = _FULL[code]
    return CompressError(f"{what} while writing {where}; nothing was written", fix)


def _os_error(exc: OSError, where: Path) -> CompressError:
    if exc.errno in _FULL:
        what, fix = _FULL[exc.errno]
        return CompressError(f"{what} while writing {where}", fix)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CompressError(f"cannot write {where}: {exc.strerror}", "Choose an -o in a writable directory")
    return CompressError(f"could not write {where}: {exc.strerror or exc}", "Check the path and the disk")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
