"""One runner per format, with one small interface (Polygraphy-style): load once, then run inputs.

``prepare`` moves inputs to where the model runs (reported apart from compute in benchmarks), ``run``
computes, ``sync`` waits for the device. Export verification and ``bench`` use these same runners.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from .artifact import Artifact
from .errors import CompressError


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


def _flatten(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        return tuple(t for v in out.values() for t in _flatten(v))
    if hasattr(out, "to_tuple"):
        return _flatten(out.to_tuple())
    if isinstance(out, (list, tuple)):
        return tuple(t for v in out for t in _flatten(v))
    return ()


class TorchRunner(Runner):
    format = "torch"

    def __init__(self, artifact, device="cpu", threads=None, module=None):
        super().__init__(artifact, device, threads)
        self.module = (module if module is not None else artifact.model).eval()
        if artifact.format == "torch-quantized" and device != "cpu":
            raise CompressError("torch int8 (quantized) models run on CPU only", "Use --device cpu, or export to ONNX/TensorRT for GPU int8")
        self.module.to(device)

    def run(self, prepared):
        return _flatten(self.module(*prepared))


class TorchScriptRunner(TorchRunner):
    format = "torchscript"

    def __init__(self, artifact, device="cpu", threads=None):
        try:
            module = torch.jit.load(str(artifact.path), map_location=device)
        except Exception as exc:  # noqa: BLE001 - a corrupt archive raises RuntimeError, UnicodeDecodeError, ...
            raise CompressError(f"{artifact.path} could not be loaded as TorchScript ({(str(exc).splitlines() or [type(exc).__name__])[0][:200]})", "Recreate it with compress export --target torchscript") from None
        super().__init__(artifact, device, threads, module)


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
            raise CompressError(f"{path} could not be loaded as a torch.export program ({str(exc).splitlines()[0][:150]})", "Recreate it with compress export --target pt2") from None
        Runner.__init__(self, artifact, device, threads)
        self.module = module.to(device)


class _AOTIModule:
    def __init__(self, fn):
        self.fn = fn

    def eval(self):
        return self

    def __call__(self, *args):
        return self.fn(*args)


class ONNXRunner(Runner):
    format = "onnx"

    def __init__(self, artifact, device="cpu", threads=None):
        super().__init__(artifact, device, threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CompressError("onnxruntime here has no CUDA support", "pip install onnxruntime-gpu in place of onnxruntime")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(artifact.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            raise CompressError(f"onnxruntime cannot load {artifact.path} ({str(exc).splitlines()[0][:200]})", "Re-export the model, or check the opset") from None
        self.names = [i.name for i in self.session.get_inputs()]
        self.types = [i.type for i in self.session.get_inputs()]

    def prepare(self, inputs):
        if len(inputs) != len(self.names):
            raise CompressError(f"the ONNX model takes {len(self.names)} input(s) but {len(inputs)} were given", "Check --input-shape")
        feed = {}
        for name, typ, x in zip(self.names, self.types, inputs):
            arr = x.detach().cpu().numpy()
            if "int64" in typ and arr.dtype != np.int64:
                arr = arr.astype(np.int64)
            elif "float16" in typ:
                arr = arr.astype(np.float16)
            elif "float" in typ and arr.dtype != np.float32:
                arr = arr.astype(np.float32)
            feed[name] = arr
        return feed

    def run(self, prepared):
        try:
            out = self.session.run(None, prepared)
        except Exception as exc:  # noqa: BLE001
            raise CompressError(f"onnxruntime failed to run {self.artifact.path}: {str(exc).splitlines()[0][:200]}", "Check the input shapes and dtypes") from None
        return tuple(torch.from_numpy(np.asarray(o)) for o in out)


RUNNERS = {"torch": TorchRunner, "torch-quantized": TorchRunner, "torchscript": TorchScriptRunner,
           "pt2": PT2Runner, "onnx": ONNXRunner}


def load_runner(artifact: Artifact, device: str = "cpu", threads: int | None = None) -> Runner:
    if artifact.format == "tensorrt":
        from .exporters.tensorrt import TensorRTRunner

        return TensorRTRunner(artifact, device, threads)
    cls = RUNNERS.get(artifact.format)
    if cls is None:
        raise CompressError(f"no runner for format '{artifact.format}'", f"Supported: {', '.join(RUNNERS)}, tensorrt")
    return cls(artifact, device, threads)
