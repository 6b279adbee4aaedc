"""What every command shares: the global flags, the terminal (messages on stderr, tables on stdout, rich progress)
and the model options."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import click
from rich.console import Console
from rich.markup import escape

from compress.progress import Progress, Task

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@dataclass
class Flags:
    """The global flags of one invocation (they may stand before or after the command)."""
    debug: bool = False
    force: bool = False
    quiet: bool = False
    max_memory: str | None = None


def flags() -> Flags:
    return click.get_current_context().find_object(Flags) or Flags()


def _flag(name: str, help: str):
    def callback(ctx, param, value):
        if value:
            setattr(ctx.ensure_object(Flags), name, True)
        return value
    return click.option(f"--{name}", is_flag=True, expose_value=False, is_eager=True, callback=callback, help=help)


def _max_memory(ctx, param, value):
    if value:
        ctx.ensure_object(Flags).max_memory = value
    return value


def global_flags(fn):
    fn = click.option("--max-memory", expose_value=False, is_eager=True, callback=_max_memory, metavar="SIZE",
                      help="Stop a run whose memory grows past SIZE (12G, 800M, or 0.5 of this machine; default 0.8).")(fn)
    fn = _flag("quiet", "Print only results and errors.")(fn)
    fn = _flag("force", "Allow replacing an existing OUT.")(fn)
    fn = _flag("debug", "Show tracebacks for errors.")(fn)
    return fn


# ---------------------------------------------------------------- the terminal: messages on stderr, tables on stdout
def console() -> Console:
    # soft_wrap: a message is never broken at the terminal's width, so a path in it stays one piece to copy
    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    return Console(highlight=False, width=200 if not sys.stdout.isatty() else None)


class _RichTask(Task):
    def __init__(self, bar, task_id):
        self.bar, self.id = bar, task_id

    def advance(self, steps: int = 1, info: str = "") -> None:
        self.bar.update(self.id, advance=steps, **({"info": info} if info else {}))


class RichProgress(Progress):
    """Progress bars and spinners on stderr (only on a terminal), a line per finished stage (unless --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet, self.con = quiet, console()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None, completed: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        with Bars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.con, transient=True,
                  disable=self.quiet or not self.con.is_terminal) as bar:
            yield _RichTask(bar, bar.add_task(description, total=total, completed=completed, info=""))

    @contextlib.contextmanager
    def stage(self, description: str):
        if self.quiet or not self.con.is_terminal:
            yield
            return
        with self.con.status(description):
            yield

    def done(self, description: str, seconds: float) -> None:
        if not self.quiet:
            self.con.print(f"[green]✓[/green] {escape(description)} in {seconds:.1f}s")


def model_options(fn):
    opts = [
        click.option("--arch", help="Where the architecture comes from: torchvision:NAME, timm:NAME, hf:PATH, file.py:Callable, package.module:Callable."),
        click.option("--arch-args", help="JSON keyword arguments for the architecture, e.g. '{\"num_classes\": 10}'."),
        click.option("--input-shape", "input_shape", multiple=True, help="Model input as 1x3x224x224[:DTYPE]; repeat for several inputs."),
        click.option("--example-input", type=click.Path(), help="A .pt file holding an example input tensor (or a list of them)."),
        click.option("--static-shapes", is_flag=True, help="Do not make the batch dimension dynamic in exports."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading pickled modules (this runs code from the file)."),
        click.option("--no-verify", "no_verify", is_flag=True, help="Skip the checksum checks of the SOURCE's files (zip CRC-32s, a run directory's SHA-256s)."),
        click.option("--allow-nonfinite", is_flag=True, help="Load weights that hold NaN or Inf (refused by default)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn
