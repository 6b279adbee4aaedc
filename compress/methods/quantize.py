"""Quantization: ``dynamic``, ``static`` and ``auto``, each with a ``backend`` (torch or onnxruntime).

torch dynamic int8 quantizes Linear/LSTM/GRU weights (activations quantized on the fly); it runs
eagerly and exports to TorchScript, and helps Linear/LSTM-heavy models (transformers) on CPU.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..artifact import rebuilder
from ..errors import CompressError
from ..registry import option, register

DYNAMIC_LAYERS = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}


@dataclass(frozen=True)
class DynamicConfig:
    backend: str = option("torch", "torch (eager int8 Linear/LSTM/GRU)", choices=("torch",))
    layers: tuple[str, ...] = option(("Linear", "LSTM", "GRU"), "layer types to quantize")
    per_channel: bool = option(True, "per-output-channel weight scales (Linear only)")
    dtype: str = option("qint8", "weight dtype", choices=("qint8", "float16"))


def quantize_dynamic(model: nn.Module, layers, per_channel: bool, dtype: str) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, per_channel_dynamic_qconfig

    unknown = [l for l in layers if l not in DYNAMIC_LAYERS]
    if unknown:
        raise CompressError(f"cannot dynamically quantize layer type(s) {', '.join(unknown)}", f"Supported: {', '.join(DYNAMIC_LAYERS)}")
    if dtype == "float16":
        spec = {DYNAMIC_LAYERS[l]: float16_dynamic_qconfig for l in layers}
    else:
        spec = {DYNAMIC_LAYERS[l]: (per_channel_dynamic_qconfig if per_channel and l == "Linear" else default_dynamic_qconfig) for l in layers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else torch.backends.quantized.engine
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.float16 if dtype == "float16" else torch.qint8)


@rebuilder("quantize_dynamic")
def _rebuild_dynamic(model: nn.Module, step: dict) -> nn.Module:
    return quantize_dynamic(model, step["layers"], step["per_channel"], step["dtype"])


@register("quantize", "dynamic", DynamicConfig, accepts=("torch",), produces="torch-quantized",
          summary="int8 weights, activations quantized on the fly (Linear/LSTM/GRU; best for transformers and RNNs on CPU)")
def dynamic(artifact, config: DynamicConfig, ctx):
    model = copy.deepcopy(artifact.model).eval()
    present = {l for l, cls in DYNAMIC_LAYERS.items() if l in config.layers and any(isinstance(m, cls) for m in model.modules())}
    if not present:
        raise CompressError(f"the model has no {'/'.join(config.layers)} layers, so dynamic quantization would change nothing",
                            "Use --method static for convolutional models")
    q = quantize_dynamic(model, tuple(config.layers), config.per_channel, config.dtype)
    from torch.ao.nn.quantized import dynamic as qd

    n = sum(1 for m in q.modules() if isinstance(m, (qd.Linear, qd.LSTM, qd.GRU)))
    ctx.metrics["quantized_layers"] = n
    _fidelity(artifact, q, ctx)
    step = {"op": "quantize_dynamic", "layers": list(config.layers), "per_channel": config.per_channel, "dtype": config.dtype}
    return artifact.evolve(format="torch-quantized", model=q, rebuild=[*artifact.rebuild, step], float_model=artifact.model)


def _fidelity(artifact, quantized: nn.Module, ctx) -> None:
    """Record fidelity (or accuracy) of the quantized model against its input on real data when given."""
    from ..evaluate import accuracy, compare, fidelity
    from ..runners import TorchRunner

    ref = TorchRunner(artifact)
    new = TorchRunner(artifact.evolve(format="torch-quantized", model=quantized))
    if ctx.data_spec:
        bundle = ctx.data()
        ctx.metrics.update({f"{k}": v for k, v in fidelity(new, ref, bundle, limit=256).items() if k != "samples"})
        if bundle.labelled:
            try:
                ctx.metrics["accuracy"] = accuracy(new, bundle, limit=1000)["accuracy"]
                ctx.metrics["accuracy_before"] = accuracy(ref, bundle, limit=1000)["accuracy"]
            except CompressError:
                pass
    else:
        x = tuple(s.example(4) for s in artifact.input_spec)
        ctx.metrics.update(compare(new(*x)[0], ref(*x)[0]))
