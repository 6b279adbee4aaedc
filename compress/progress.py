"""How the library tells its caller what it is doing, without printing: a :class:`Progress` object.

Long steps open a task (``with progress.task("distill", total=steps) as task: task.advance(1, "loss 0.31")``) and
stages announce themselves (``with progress.stage("prune structured")``). The default does nothing; the CLI passes
one that draws rich progress bars. Notes and warnings go through :mod:`logging` (loggers named ``compress.*``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class Task:
    def advance(self, steps: int = 1, info: str = "") -> None:
        """``steps`` more done (0: only a new ``info`` line)."""


class Progress:
    """The silent default: subclass it to show progress (the CLI does)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None, completed: int = 0) -> Iterator[Task]:
        yield Task()

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        """A step without a count (loading a model, running one stage): a spinner in the CLI."""
        yield

    def done(self, description: str, seconds: float) -> None:
        """A stage finished."""


SILENT = Progress()
