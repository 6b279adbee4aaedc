"""A watch on resident memory: a step that grows past the limit (a dependency graph gone quadratic, a batch too big)
is stopped with one clear line instead of taking the whole machine with it."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path
from typing import Iterator

from .errors import CompressError

DEFAULT_FRACTION = 0.8          # of the machine's memory, when no limit is given
POLL_S = 0.2


class MemoryLimitExceeded(CompressError):
    pass


def machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parse_size(text) -> int:
    """``12G``, ``800MB``, ``0.5`` (a fraction of the machine's memory) or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise CompressError(f"max_memory '{text}' is not a size", "Write it as 12G, 800M, or 0.5 for half of this machine's memory")
    value, unit = float(m[1]), m[2]
    if not unit and value <= 1:
        total = machine_memory()
        if total is None:
            raise CompressError("a fraction of the machine's memory cannot be used here (its size is unknown)", "Give a size such as 12G")
        return int(value * total)
    return int(value * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def memory_limit(limit: int | None, what: str = "the run") -> Iterator[None]:
    """Stop ``what`` with :class:`MemoryLimitExceeded` (in the main thread) once resident memory passes ``limit``
    (default: 80% of the machine). A watcher thread checks every 0.2 s; Python code is stopped at its next step."""
    limit = limit or (int(machine_memory() * DEFAULT_FRACTION) if machine_memory() else None)
    if limit is None or rss_bytes() is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop, seen = threading.Event(), {"rss": rss_bytes()}

    def on_signal(signum=None, frame=None):
        raise MemoryLimitExceeded(f"{what} grew past {seen['rss'] / 2**30:.1f} GiB of memory, more than the limit of "
                                  f"{limit / 2**30:.1f} GiB", "Prune fewer layers (--ignore), use another method, or raise --max-memory")

    if seen["rss"] > limit:
        on_signal()

    def watch():
        main = threading.main_thread().ident
        while not stop.wait(POLL_S):
            rss = rss_bytes()
            if rss is not None and rss > limit:
                seen["rss"] = rss
                signal.pthread_kill(main, signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, on_signal)
    watcher = threading.Thread(target=watch, name="compress-memory-guard", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
