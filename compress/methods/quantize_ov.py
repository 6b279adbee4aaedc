"""OpenVINO int8 through NNCF: post-training quantization calibrated on real data (``nncf.quantize``, its ``performance`` or
``mixed`` preset, the transformer model type for attention models), with NNCF's accuracy control when a
``--max-accuracy-drop`` is given on labelled data (layers reverted to float until the drop holds); and int8 weight
compression (``nncf.compress_weights``, weights only), which OpenVINO recommends for transformers.

The input (torch or ONNX) is converted to OpenVINO first (:mod:`compress.openvino_model`); the result is IR.
"""
from __future__ import annotations

from pathlib import Path

from ..artifact import Artifact
from ..errors import CompressError, first_line, require
from ..openvino_model import EXTRA, convert, quiet, save
from . import quantize_ort as ort_q

PRESETS = ("auto", "performance", "mixed")
VALIDATION_LIMIT = 500


def _nncf():
    return require("nncf", EXTRA, "OpenVINO int8 quantization (NNCF)")


def is_transformer(artifact: Artifact) -> bool:
    """Attention models get NNCF's transformer model type (its documented setting for them)."""
    if artifact.model is not None:
        return any("attention" in type(m).__name__.lower() for m in artifact.model.modules())
    return str((artifact.arch or {}).get("spec", "")).startswith("hf:")


def static(artifact: Artifact, ctx, *, samples: int, preset: str, max_accuracy_drop: float | None) -> tuple[Artifact, dict]:
    """NNCF post-training int8 of ``artifact`` calibrated on ``samples`` from --data; returns the IR artifact and what ran."""
    nncf = _nncf()
    model, how = convert(artifact)
    batches = ort_q.calibration_batches(artifact, ctx, samples, batch_size=1)
    calibration = nncf.Dataset([[x.numpy() for x in inputs] for inputs in batches])
    transformer = is_transformer(artifact)
    kwargs = {"subset_size": len(batches), "model_type": nncf.ModelType.TRANSFORMER if transformer else None}
    if preset != "auto":
        kwargs["preset"] = nncf.QuantizationPreset(preset)
    info = {"quantizer": f"nncf {nncf.__version__}", "converted": how, "preset": preset if preset != "auto" else ("mixed" if transformer else "performance"),
            "model_type": "transformer" if transformer else "default", "calibration_samples": len(batches)}
    bundle = ctx.data()
    try:
        with quiet():
            if max_accuracy_drop is not None and bundle.labelled:
                validation = nncf.Dataset(_validation_items(artifact, bundle))
                quantized = nncf.quantize_with_accuracy_control(model, calibration, validation, _accuracy, max_drop=max_accuracy_drop,
                                                                drop_type=nncf.DropType.ABSOLUTE, **kwargs)
                info["accuracy_control"] = {"max_drop": max_accuracy_drop, "validation_samples": min(VALIDATION_LIMIT, len(bundle.eval))}
            else:
                quantized = nncf.quantize(model, calibration, **kwargs)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - NNCF raises many types
        raise CompressError(f"NNCF quantization failed: {first_line(exc, 200)}", "Try -s preset=mixed, or --backend onnxruntime") from None
    path = save(quantized, Path(ctx.workdir) / "model.xml")
    out = artifact.evolve(format="openvino", path=path, model=None,
                          extra={**artifact.extra, "quantization": "static int8 (NNCF)", "inference_precision": "f32"})
    return out, info


def weights(artifact: Artifact, ctx) -> tuple[Artifact, dict]:
    """int8 weights (asymmetric, per output channel), activations in float: ``nncf.compress_weights``."""
    nncf = _nncf()
    model, how = convert(artifact)
    try:
        with quiet():
            compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"NNCF weight compression failed: {first_line(exc, 200)}", "Try --backend onnxruntime") from None
    path = save(compressed, Path(ctx.workdir) / "model.xml")
    out = artifact.evolve(format="openvino", path=path, model=None,
                          extra={**artifact.extra, "quantization": "int8 weights (NNCF)", "inference_precision": "f32"})
    return out, {"quantizer": f"nncf {nncf.__version__}", "converted": how, "mode": "int8_asym weights"}


def _validation_items(artifact: Artifact, bundle) -> list:
    from ..data import batches, tokenizer_for

    tokenizer = tokenizer_for(artifact)
    return [([x.numpy() for x in inputs], labels.numpy())
            for inputs, labels in batches(bundle.eval, artifact.input_spec, 1 if tokenizer else 32, VALIDATION_LIMIT, tokenizer)]


def _accuracy(compiled, items) -> float:
    import numpy as np

    correct = total = 0
    for inputs, labels in items:
        logits = np.asarray(compiled(inputs)[compiled.outputs[0]])
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return correct / max(1, total)
