"""One runner per format, with one small interface (Polygraphy-style): load once, then run inputs.

``prepare`` moves inputs to where the model runs (reported apart from compute in benchmarks), ``run``
computes, ``sync`` waits for the device. Export verification and ``bench`` use these same runners. The torch formats' runner is here; each export target
(``exporters/``) registers the runner of its format.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .artifact import Artifact
from .errors import CompressError
from .registry import register_runner


class Runner:
    format = "?"

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        self.artifact, self.device, self.threads = artifact, device, threads
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CompressError("--device cuda was asked for but no CUDA GPU is visible", "Run on a machine with an NVIDIA GPU, or use --device cpu")

    def prepare(self, inputs: Sequence[torch.Tensor]):
        return tuple(x.to(self.device) for x in inputs)

    def run(self, prepared) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            out = self.run(self.prepare(inputs))
        return tuple(o.detach().cpu() if isinstance(o, torch.Tensor) else torch.as_tensor(o) for o in out)

    @contextlib.contextmanager
    def threads_set(self):
        """Apply the thread count for torch while measuring, restoring it afterwards."""
        if self.threads is None:
            yield
            return
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)


def flatten(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        return tuple(t for v in out.values() for t in flatten(v))
    if hasattr(out, "to_tuple"):
        return flatten(out.to_tuple())
    if isinstance(out, (list, tuple)):
        return tuple(t for v in out for t in flatten(v))
    return ()


@register_runner("torch")
@register_runner("torch-quantized")
class TorchRunner(Runner):
    format = "torch"

    def __init__(self, artifact, device="cpu", threads=None, module=None):
        super().__init__(artifact, device, threads)
        self.module = (module if module is not None else artifact.model).eval()
        if artifact.format == "torch-quantized" and device != "cpu":
            raise CompressError("torch int8 (quantized) models run on CPU only", "Use --device cpu, or export to ONNX/TensorRT for GPU int8")
        self.module.to(device)

    def run(self, prepared):
        return flatten(self.module(*prepared))


def load_runner(artifact: Artifact, device: str = "cpu", threads: int | None = None) -> Runner:
    """A loaded runner for ``artifact``: found by its format in the registry (export targets bring their own)."""
    from .registry import runner_class

    return runner_class(artifact.format)(artifact, device, threads)
