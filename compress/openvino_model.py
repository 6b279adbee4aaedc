"""OpenVINO models: a torch or ONNX artifact converted to an ``ov.Model`` (OpenVINO's documented ``convert_model``), and IR
files written and read. The export target and runner live in ``exporters/openvino.py``; NNCF quantization in
``compress/methods/quantize_ov.py``; both convert through here.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from .artifact import Artifact
from .errors import CompressError, first_line, require

EXTRA = "openvino"
# compress's precision names → OpenVINO's INFERENCE_PRECISION_HINT values
PRECISIONS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def openvino():
    return require("openvino", EXTRA, "OpenVINO export and inference")


@contextlib.contextmanager
def quiet():
    """OpenVINO's and NNCF's conversion chatter (tracer warnings, progress bars) off the user's terminal."""
    level = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("nncf").setLevel(level)


def partial_shapes(artifact: Artifact) -> list:
    """One ``ov.PartialShape`` per input: the input spec's dynamic axes open (-1), the others fixed."""
    ov = openvino()
    return [ov.PartialShape([-1 if i in s.dynamic_axes else d for i, d in enumerate(s.shape)]) for s in artifact.input_spec]


def convert(artifact: Artifact, via: str = "auto"):
    """``artifact`` as an ``ov.Model``: an ONNX file read by OpenVINO's ONNX frontend; a torch model converted by its PyTorch
    frontend from example inputs (``via="torch"``) or through a verified-shape ONNX export (``via="onnx"``); ``auto`` tries
    torch first and ONNX when that fails. Returns (model, how)."""
    ov = openvino()
    if artifact.format == "onnx":
        try:
            with quiet():
                return ov.convert_model(str(artifact.path)), "onnx frontend"
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
            raise CompressError(f"OpenVINO cannot convert {artifact.path} ({first_line(exc)})", "Re-export the ONNX model (another opset), or convert from the torch model") from None
    if artifact.format != "torch":
        raise CompressError(f"OpenVINO converts torch and ONNX models, not {artifact.format}", "Convert before quantizing with another backend")
    errors = []
    for route in (("torch", "onnx") if via == "auto" else (via,)):
        try:
            return (_from_torch(artifact) if route == "torch" else _via_onnx(artifact)), f"{route} frontend"
        except CompressError as exc:
            errors.append(f"{route}: {exc.what}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{route}: {first_line(exc)}")
    raise CompressError("OpenVINO could not convert the model (" + "; ".join(errors) + ")", "Try -s via=onnx, or export to ONNX first and convert that")


def _from_torch(artifact: Artifact):
    import torch

    from .inputs import example_inputs, export_batch

    ov = openvino()
    inputs = example_inputs(artifact.input_spec, export_batch(artifact.input_spec))
    with quiet(), torch.no_grad():
        return ov.convert_model(artifact.model.eval(), example_input=inputs, input=partial_shapes(artifact))


def _via_onnx(artifact: Artifact):
    import tempfile

    from .onnx_export import export_file

    ov = openvino()
    with tempfile.TemporaryDirectory(prefix="compress-ov-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_file(artifact.model, artifact.input_spec, path, arch=artifact.arch)
        with quiet():
            model = ov.convert_model(str(path))
            # the converted model reads its weights from the ONNX file: read back from our own IR, which OpenVINO maps
            # into memory (still valid once the folder is removed)
            return ov.Core().read_model(_save(model, Path(tmp) / "ir.xml", False))


def _save(model, path: Path, fp16_weights: bool) -> str:
    openvino().save_model(model, str(path), compress_to_fp16=fp16_weights)
    return str(path)


def save(model, path: Path, fp16_weights: bool = False) -> Path:
    """Write ``model`` as IR: ``path`` (.xml, the graph) and its .bin (the weights), fp16-compressed weights on request.
    (OpenVINO's own default compresses to fp16; compress keeps f32 weights unless asked, so fp32 exports match their source.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save(model, path, fp16_weights)
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"OpenVINO could not write {path} ({first_line(exc)})", "Check the disk space and the folder's permissions") from None
    return path
