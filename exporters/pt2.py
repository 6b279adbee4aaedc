"""Export a ``torch.export`` program (``model.pt2``), optionally compiled ahead of time with AOTInductor.

The batch axis (and any other axis the input spec marks) becomes a ``torch.export.Dim``; the AOTInductor
package is a shared library for the device it was compiled on, loaded with ``aoti_load_package``.
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import Artifact
from compress.errors import CompressError, first_line
from compress.inputs import axis_name, example_inputs, export_batch, with_dynamic_axes
from compress.config import option
from compress.registry import register, register_runner
from compress.runners import Runner, TorchRunner

from .verify import verified


@dataclass(frozen=True)
class PT2Config:
    aoti: bool = option(False, "compile ahead of time with AOTInductor into a package (needs a C++ compiler)")
    dynamic_axes: tuple[str, ...] | None = option(None, "axes to make dynamic: batch, sequence or axis numbers (default: the input spec's)")
    static_shapes: bool = option(False, "make no axis dynamic")
    strict: bool = option(False, "trace with TorchDynamo (strict=True) instead of the default non-strict tracing")
    atol: float | None = option(None, "allowed max abs difference vs the source, relative to output scale (default 1e-5, AOTI 1e-4)", range=(0, None))


@register("export", "pt2", PT2Config, accepts=("torch",), produces="pt2",
          summary="torch.export program (.pt2), optionally AOTInductor-compiled, dynamic batch, verified")
def export_pt2(artifact: Artifact, config: PT2Config, ctx) -> Artifact:
    """torch.export program (.pt2), optionally AOTInductor-compiled, dynamic batch, verified."""
    specs = with_dynamic_axes(artifact.input_spec, config.dynamic_axes, config.static_shapes)
    device = "cuda" if config.aoti and getattr(ctx, "device", "cpu") == "cuda" else "cpu"
    model = artifact.model.eval()
    if device != "cpu":
        model = model.to(device)
    inputs = tuple(x.to(device) for x in example_inputs(specs, export_batch(specs)))
    dims: dict[int, torch.export.Dim] = {}
    dynamic = tuple({a: dims.setdefault(a, torch.export.Dim(axis_name(a), min=1)) for a in s.dynamic_axes} or None for s in specs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic if any(dynamic) else None, strict=config.strict)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        axis = re.search(r"Constraints violated \(([\w, ]+)\)", str(exc))
        if axis:
            raise CompressError(f"torch.export cannot keep the axis '{axis.group(1)}' dynamic: the model's code fixes its size",
                                "Make only the batch dynamic (-s dynamic_axes=batch) or none (-s static_shapes=true), "
                                "or use --target onnx / torchscript") from None
        raise CompressError(f"torch.export could not capture the model: {first_line(exc)}",
                            "Try -s static_shapes=true, or --target torchscript / onnx -s exporter=legacy") from None
    path = Path(ctx.workdir) / "model.pt2"
    if config.aoti:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"AOTInductor compilation failed: {first_line(exc)}",
                                "Check that a C++ compiler (gcc) is installed, or export without -s aoti=true") from None
    else:
        torch.export.save(program, str(path))
    extra = {"aoti": True, "device": device} if config.aoti else {}
    out = artifact.evolve(format="pt2", path=path, model=None, input_spec=specs, extra=extra)
    ctx.metrics.update({"exporter": "aoti_compile_and_package" if config.aoti else "torch.export", "aoti": config.aoti,
                        "dynamic_axes": {s.name: list(s.dynamic_axes) for s in specs}})
    return verified(artifact, out, ctx, target="pt2-aoti" if config.aoti else "pt2", atol=config.atol, device=device)


@register_runner("pt2")
class PT2Runner(TorchRunner):
    format = "pt2"

    def __init__(self, artifact, device="cpu", threads=None):
        path = str(artifact.path)
        if artifact.extra.get("aoti"):
            from torch._inductor import aoti_load_package

            module = _AOTIModule(aoti_load_package(path))
            Runner.__init__(self, artifact, device, threads)
            self.module = module
            return
        try:
            module = torch.export.load(path).module()
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"{path} could not be loaded as a torch.export program ({first_line(exc, 150)})", "Recreate it with compress export --target pt2") from None
        Runner.__init__(self, artifact, device, threads)
        self.module = module.to(device)


class _AOTIModule:
    def __init__(self, fn):
        self.fn = fn

    def eval(self):
        return self

    def __call__(self, *args):
        return self.fn(*args)
