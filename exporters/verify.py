"""Every export is loaded back through the runner ``bench`` uses and compared with its source.

The check runs on example inputs at the export batch and, for each dynamic axis, at another size (so a
batch or sequence length baked in by the exporter is caught), and on real data when the stage has some.
A miss raises :class:`ExportVerificationError`, which lists the worst difference of every output.
"""
from __future__ import annotations

import warnings

import torch

from compress.artifact import Artifact
from compress.errors import CompressError
from compress.inputs import InputSpec, example_inputs, export_batch

# Allowed max abs difference, relative to the output's scale (max |reference|, at least 1).
TOLERANCES = {
    ("torchscript", "fp32"): 1e-5,
    ("torchscript-frozen", "fp32"): 1e-4,   # freezing folds batch norm into convolutions, which rounds differently
    ("pt2", "fp32"): 1e-5,
    ("pt2-aoti", "fp32"): 1e-4,
    ("onnx", "fp32"): 1e-4,
    ("onnx", "fp16"): 2e-2,
    ("openvino", "fp32"): 1e-4,
    ("openvino", "fp16"): 5e-2,
    ("openvino", "bf16"): 5e-2,
    ("tensorrt", "fp32"): 5e-3,     # TensorRT uses TF32 kernels for fp32 by default on Ampere and newer
    ("tensorrt", "fp16"): 3e-2,
    ("tensorrt", "int8"): 0.25,     # int8 is judged by top-1 agreement / cosine as well (MIN_TOP1, MIN_COSINE)
}
MIN_TOP1 = {"fp32": 0.99, "fp16": 0.97, "bf16": 0.95, "int8": 0.9}
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.998, "int8": 0.98}
DATA_LIMIT = 128
# bf16 keeps 8 bits of mantissa: its logits differ from fp32 by more than any fixed fraction of their scale on some
# inputs, so like int8 it is judged by cosine similarity and top-1 agreement, not by the largest difference
JUDGED_BY_COSINE = ("int8", "bf16")


class ExportVerificationError(CompressError):
    """The exported model does not reproduce its source within tolerance."""

    def __init__(self, target: str, failures: list[str], tolerance: float):
        self.failures = failures
        super().__init__(f"the {target} export does not match its source (allowed {tolerance:g} x output scale): " + "; ".join(failures),
                         "Nothing was written. Loosen the check with -s atol=..., or try another target or exporter (e.g. -s exporter=legacy)")


def tolerance(target: str, precision: str = "fp32", atol: float | None = None) -> float:
    if atol is not None:
        return atol
    return TOLERANCES.get((target, precision), TOLERANCES.get((target.split("-")[0], precision), 1e-3))


def shape_cases(specs: list[InputSpec]) -> list[tuple[str, int, int | None]]:
    """(label, batch, sequence length or None): the export shape, then other sizes for the dynamic axes."""
    batch = export_batch(specs)
    seq = _seq_len(specs)
    cases = [("export shape", batch, seq)]
    dyn_batch = all(0 in s.dynamic_axes for s in specs)
    dyn_seq = seq is not None and all(1 in s.dynamic_axes for s in specs if len(s.shape) in (2, 3))
    if dyn_batch or dyn_seq:
        other_seq = (max(1, seq // 2) if seq > 2 else seq + 3) if dyn_seq else seq
        cases.append(("other " + " and ".join(n for n, on in (("batch", dyn_batch), ("sequence", dyn_seq)) if on),
                      1 if dyn_batch else batch, other_seq))
    return cases


def _seq_len(specs: list[InputSpec]) -> int | None:
    seqs = [s.shape[1] for s in specs if len(s.shape) in (2, 3) and 1 in s.dynamic_axes]
    return seqs[0] if seqs else None


def verified(source: Artifact, exported: Artifact, ctx, **checks) -> Artifact:
    """``exported``, once :func:`verify` passed: its metrics and file size recorded in ``ctx.metrics``."""
    ctx.metrics.update(verify(source, exported, ctx, **checks))
    ctx.metrics["file_size_bytes"] = exported.size_bytes()
    return exported


def verify(source: Artifact, exported: Artifact, ctx, *, target: str, precision: str = "fp32", atol: float | None = None,
           device: str = "cpu", source_device: str | None = None) -> dict:
    """Compare ``exported`` with ``source`` through their runners; return metrics or raise ExportVerificationError."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit.*deprecated", FutureWarning)   # TorchScript is labelled legacy already
        return _verify(source, exported, ctx, target, precision, atol, device, source_device)


def _verify(source, exported, ctx, target, precision, atol, device, source_device) -> dict:
    from compress.runners import load_runner

    tol = tolerance(target, precision, atol)
    reference = load_runner(source, source_device or device)
    runner = load_runner(exported, device)
    failures: list[str] = []
    worst, checked, top1 = 0.0, [], []
    classifier = is_classifier(source)
    for label, batch, seq in shape_cases(exported.input_spec):
        inputs = example_inputs(exported.input_spec, batch, seq)
        ref, got = reference(*inputs), runner(*inputs)
        where = f"batch {batch}" + (f", sequence {seq}" if seq is not None else "")
        checked.append(where)
        if len(ref) != len(got):
            failures.append(f"{where}: the export gives {len(got)} output(s), the source {len(ref)}")
            continue
        for i, (r, g) in enumerate(zip(ref, got)):
            if tuple(r.shape) != tuple(g.shape):
                failures.append(f"output {i} at {where}: shape {tuple(g.shape)} vs source {tuple(r.shape)}")
                continue
            diff = float((g.float() - r.float()).abs().max()) if r.numel() else 0.0
            scale = max(1.0, float(r.float().abs().max())) if r.numel() else 1.0
            worst = max(worst, diff)
            if precision in JUDGED_BY_COSINE:
                cos = float(torch.nn.functional.cosine_similarity(g.float().flatten(), r.float().flatten(), dim=0))
                if cos < MIN_COSINE[precision]:
                    failures.append(f"output {i} at {where}: cosine similarity {cos:.4f} < {MIN_COSINE[precision]}")
            elif not diff <= tol * scale:   # NaN fails too
                failures.append(f"output {i} at {where}: max abs diff {diff:.3g} > {tol * scale:.3g}")
            if i == 0 and classifier and r.dim() == 2 and r.shape[1] > 1:
                top1.append(float((g.argmax(1) == r.argmax(1)).float().mean()))
    metrics = {"verified_shapes": checked, "max_abs_diff": worst, "tolerance": tol}
    if top1:
        metrics["top1_agreement_examples"] = min(top1)
    if ctx is not None and getattr(ctx, "data_spec", None):
        from compress.evaluate import fidelity

        fid = fidelity(runner, reference, ctx.data(), limit=DATA_LIMIT)
        metrics |= {f"{k}_data": v for k, v in fid.items()}
        if not classifier:
            fid.pop("top1_agreement", None)
        if "top1_agreement" in fid and fid["top1_agreement"] < MIN_TOP1.get(precision, 0.99):
            failures.append(f"output 0 on {fid['samples']} samples of {ctx.data_spec}: top-1 agreement {fid['top1_agreement']:.3f} < {MIN_TOP1[precision]}")
        if precision not in JUDGED_BY_COSINE and not fid["max_abs_diff"] <= tol * max(1.0, _scale_hint(reference, exported.input_spec)):
            failures.append(f"output 0 on {fid['samples']} samples of {ctx.data_spec}: max abs diff {fid['max_abs_diff']:.3g}")
    if failures:
        raise ExportVerificationError(target, failures, tol)
    return metrics


def is_classifier(artifact: Artifact) -> bool:
    """Whether a [batch, N] output holds class scores (so top-1 agreement means something): not for embedding models."""
    arch = artifact.arch or {}
    return not (str(arch.get("spec", "")).startswith("hf:") and (arch.get("args") or {}).get("task") != "classification")


def _scale_hint(reference, specs) -> float:
    out = reference(*example_inputs(specs, export_batch(specs)))
    return float(out[0].float().abs().max()) if out and out[0].numel() else 1.0
