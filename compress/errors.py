"""The one exception type for user errors: printed as one line, exit code 1, no traceback."""
from __future__ import annotations


class CompressError(Exception):
    """Something the user can fix. ``what`` says what is wrong, ``fix`` what to do about it."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what.rstrip(".")
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.what}. {self.fix}" if self.fix else f"{self.what}."


class StagesKept(CompressError):
    """A pipeline stage failed after earlier stages completed: those are kept in ``out`` for a resumed run."""

    def __init__(self, failed: str, why: str, kept: int, out):
        self.failed, self.why, self.kept, self.out = failed, why.rstrip("."), kept, out
        super().__init__(f"stage {failed} failed: {self.why}; the {kept} completed stage(s) are kept in {out}/stages",
                         "Fix the problem and rerun the same command with --resume to continue from them")


def install_hint(package: str, extra: str | None) -> str:
    """How to install an optional package: compress's pip extra for it, else the package itself."""
    return f"pip install 'compress[{extra}]'" if extra else f"pip install {package}"


class MissingPackage(CompressError):
    """An optional backend is not installed."""

    def __init__(self, package: str, extra: str | None, purpose: str):
        super().__init__(f"{purpose} needs the package '{package}', which is not installed", f"Install it with: {install_hint(package, extra)}")
        self.package = package
        self.extra = extra


def chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or while handling, outermost first (each once: chains can loop)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (terminal colour codes removed), or its type's name: how
    an error from a library is quoted inside one of compress's one-line messages."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def require(module: str, extra: str | None, purpose: str):
    """Import an optional module lazily, or raise MissingPackage with the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0].replace("_", "-")
        raise MissingPackage(package, extra, purpose) from exc


def is_installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
