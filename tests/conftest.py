"""Shared fixtures: run the CLI in-process, tiny saved models, and throw-away registered methods."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from compress import registry
from compress.artifact import Artifact
from compress.errors import CompressError
from compress.manifest import FORMATS
from compress.config import option
from compress.registry import register

from . import models

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys):
    """Run ``compress ARGS`` in-process through the real entry point; returns exit code, stdout and stderr."""
    from cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)
    return run


def needs_fashion_mnist() -> None:
    """Skip, saying how to install it, where Fashion-MNIST is missing (``make test`` installs it first)."""
    from compress.data import _fashion_mnist_missing

    why = _fashion_mnist_missing()
    if why:
        pytest.skip(why)


def subprocess_env() -> dict:
    """Environment for running the real ``compress`` executable: the repository root importable (tests.models)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def tiny_state(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A TinyCNN(num_classes=5) state dict saved with torch.save, and the model it came from."""
    model = models.tiny_cnn(num_classes=5)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


# ---------------------------------------------------------------- throw-away methods
CALLS: list[str] = []


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = option(0.5, "multiply every weight by this", range=(0.0, 1.0))
    mode: str = option("all", "which weights", choices=("all", "linear"))
    fail: bool = option(False, "raise instead of scaling")


@dataclass(frozen=True)
class TraceConfig:
    pass


@dataclass(frozen=True)
class NeedsConfig:
    epochs: int = option(1, "", range=(1, None))


def _scale(artifact: Artifact, config: ScaleConfig, ctx) -> Artifact:
    """Scale weights (a stand-in for a real prune method)."""
    CALLS.append(f"scale:{config.factor}")
    if config.fail:
        raise CompressError("the test method was told to fail", "Set fail=false")
    import copy

    model = copy.deepcopy(artifact.model)
    with torch.no_grad():
        for module in model.modules():
            if config.mode == "all" or isinstance(module, torch.nn.Linear):
                for p in module.parameters(recurse=False):
                    p.mul_(config.factor)
    ctx.metrics["factor"] = config.factor
    ctx.metrics["params"] = sum(p.numel() for p in model.parameters())
    return artifact.evolve(model=model)


def _trace(artifact: Artifact, config: TraceConfig, ctx) -> Artifact:
    """Trace to TorchScript (a stand-in for a real export method)."""
    from compress.inputs import examples

    CALLS.append("trace")
    traced = torch.jit.trace(artifact.model, examples(artifact.input_spec))
    path = ctx.workdir / "model.torchscript.pt"
    traced.save(str(path))
    ctx.metrics["traced"] = True
    return Artifact("torchscript", artifact.input_spec, artifact.source, path=path, stages=artifact.stages)


def _passthrough(artifact: Artifact, config: TraceConfig, ctx) -> Artifact:
    """Return the model unchanged, whatever its format (lets CLI tests load every SOURCE kind)."""
    CALLS.append(f"passthrough:{artifact.format}")
    ctx.metrics["format_in"] = artifact.format
    return artifact


def _never(artifact, config, ctx):
    """Never runs in the tests that use it."""
    raise AssertionError("this throw-away method must not run")


@pytest.fixture
def fake_methods():
    """Register throw-away methods named test-*, and remove them from the registry afterwards."""
    registry.load_all()  # let real methods register first, so the cleanup below only removes ours
    before = dict(registry._METHODS)
    CALLS.clear()
    register("prune", "test-scale", ScaleConfig, accepts=("torch",), produces="torch")(_scale)
    register("export", "test-trace", TraceConfig, accepts=("torch",), produces="torchscript")(_trace)
    register("quantize", "test-passthrough", TraceConfig, accepts=FORMATS, produces="torch")(_passthrough)
    register("distill", "test-needs", NeedsConfig, accepts=("torch",), produces="torch",
             requires=(("not_a_real_module_xyz", "fake-extra"),), needs_data=True)(_never)
    yield CALLS
    for key in [k for k in registry._METHODS if k not in before]:
        del registry._METHODS[key]
    registry._METHODS.update(before)


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "cli"]
