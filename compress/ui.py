"""Terminal output: one rich console on stderr for messages and progress, tables on stdout."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_err = None
_out = None


def console() -> Console:
    global _err
    if _err is None or _err.file is not sys.stderr:
        _err = Console(stderr=True, highlight=False)
    return _err


def out_console() -> Console:
    global _out
    if _out is None or _out.file is not sys.stdout:
        _out = Console(highlight=False, width=200 if not sys.stdout.isatty() else None)
    return _out


@contextlib.contextmanager
def status(message: str, quiet: bool = False):
    if quiet or not console().is_terminal:
        yield
        return
    with console().status(message):
        yield


def progress(quiet: bool = False) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console(), transient=True, disable=quiet)
