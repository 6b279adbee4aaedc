"""Export to TorchScript (deprecated upstream in favour of torch.export, kept fully working here).

Traced by default, scripted on request; frozen and optimized for inference. Torch dynamic-quantized models
(``torch.ao.quantization.quantize_dynamic``) export too, which no other target here takes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import Artifact
from compress.errors import CompressError, first_line
from compress.inputs import example_inputs, export_batch
from compress.config import option
from compress.registry import register, register_runner
from compress.runners import TorchRunner

from .verify import verified


@dataclass(frozen=True)
class TorchScriptConfig:
    mode: str = option("trace", "torch.jit.trace (follows one input's path) or torch.jit.script (keeps Python control flow)",
                       choices=("trace", "script"))
    freeze: bool = option(True, "inline weights and attributes as constants (torch.jit.freeze)")
    optimize: bool = option(True, "apply torch.jit.optimize_for_inference (conv-bn folding and similar) after freezing")
    atol: float | None = option(None, "allowed max abs difference vs the source, relative to output scale (default 1e-5)", range=(0, None))


@register("export", "torchscript", TorchScriptConfig, accepts=("torch", "torch-quantized"), produces="torchscript",
          summary="TorchScript (legacy, deprecated upstream; still works): traced or scripted, frozen, verified")
def export_torchscript(artifact: Artifact, config: TorchScriptConfig, ctx) -> Artifact:
    """TorchScript (legacy, deprecated upstream; still works): traced or scripted, frozen, verified."""
    model = artifact.model.eval()
    inputs = example_inputs(artifact.input_spec, export_batch(artifact.input_spec))
    with warnings.catch_warnings():
        # tracer warnings, and the tracer's own sanity check (exact re-runs, which large random-init models such as ViT-B
        # miss by float noise): the verification below, against the eager model within atol, is the real check
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.script(model) if config.mode == "script" else torch.jit.trace(model, inputs, strict=False, check_trace=False)
        except Exception as exc:  # noqa: BLE001 - the JIT raises many types
            other = "trace" if config.mode == "script" else "script"
            raise CompressError(f"torch.jit.{config.mode} failed: {first_line(exc)}",
                                f"Try -s mode={other}, or --target pt2 / onnx") from None
        module = module.eval()
        if config.freeze:
            module = torch.jit.freeze(module)   # also folds conv-bn and other frozen-graph optimizations
    path = Path(ctx.workdir) / "model.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # "torch.jit.save is deprecated": the summary says so already
        torch.jit.save(module, str(path))
    optimized = config.freeze and config.optimize and _save_optimized(path, ctx.metrics)
    out = artifact.evolve(format="torchscript", path=path, model=None,
                          extra={"mode": config.mode, "frozen": config.freeze, "deprecated": "TorchScript is deprecated upstream; prefer pt2"})
    ctx.metrics.update({"exporter": f"torch.jit.{config.mode}", "frozen": config.freeze, "optimize_for_inference": optimized})
    return verified(artifact, out, ctx, target="torchscript-frozen" if config.freeze else "torchscript", atol=config.atol)


def _save_optimized(path: Path, metrics: dict) -> bool:
    """Replace the saved frozen module by ``torch.jit.optimize_for_inference`` of it, if that survives a round trip.

    On CPU the pass may turn convolutions into MKLDNN ops whose constants TorchScript cannot serialize;
    the frozen module is kept then, and the metrics say why. (The pass changes its module in place, so it
    runs on a fresh copy loaded from the file.)
    """
    trial = path.with_name(".optimized." + path.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.optimize_for_inference(torch.jit.load(str(path))), str(trial))
            torch.jit.load(str(trial))
        trial.replace(path)
        return True
    except Exception as exc:  # noqa: BLE001
        metrics["optimize_for_inference_skipped"] = f"its graph cannot be saved and loaded back ({first_line(exc)}); kept the frozen graph"
        trial.unlink(missing_ok=True)
        return False


@register_runner("torchscript")
class TorchScriptRunner(TorchRunner):
    format = "torchscript"

    def __init__(self, artifact, device="cpu", threads=None):
        try:
            module = torch.jit.load(str(artifact.path), map_location=device)
        except Exception as exc:  # noqa: BLE001 - a corrupt archive raises RuntimeError, UnicodeDecodeError, ...
            raise CompressError(f"{artifact.path} could not be loaded as TorchScript ({first_line(exc)})", "Recreate it with compress export --target torchscript") from None
        super().__init__(artifact, device, threads, module)
