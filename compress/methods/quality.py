"""The quality gate every quantize method embeds: what its result must keep (accuracy, fidelity) and gain (speed),
checked on real data against its input before anything is written."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..artifact import Artifact
from ..config import option
from ..errors import CompressError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityGate:
    max_accuracy_drop: float | None = option(None, "fail (or, where the method can, retry less aggressively) when accuracy on --data "
                                             "drops more than this", range=(0.0, 1.0))
    min_cosine: float | None = option(None, "fidelity floor (output cosine to the input model; needs no labels): fail when the result "
                                      "is below it (torch dynamic first keeps the most sensitive layers in float until it holds)", range=(0.0, 1.0))
    require_speedup: bool = option(False, "fail when the result is not faster than its input (batch 1, 1 thread)")
    check_speed: bool = option(True, "time input and result briefly and warn when it is not faster")


def check(before: Artifact, after: Artifact, config, ctx, retry=None) -> Artifact:
    """Fidelity/accuracy on real data (with --max-accuracy-drop) and a quick speed check (with --require-speedup)."""
    from ..runners import load_runner

    ref, new = load_runner(before), load_runner(after)
    quality = _quality(ref, new, ctx, before)
    drop = quality.get("accuracy_drop")
    limit = config.max_accuracy_drop
    if limit is not None and drop is not None and drop > limit:
        if retry is not None:
            ctx.metrics["first_attempt_accuracy_drop"] = drop
            after = retry()
            new = load_runner(after)
            quality = _quality(ref, new, ctx, before)
            drop = quality.get("accuracy_drop")
        if drop is not None and drop > limit:
            raise CompressError(f"quantization dropped accuracy by {drop:.2%}, more than --max-accuracy-drop {limit:.2%}",
                                "Nothing was written. Try -s calibration=entropy, more samples, or keep more layers in float (-s exclude=...)")
    floor = config.min_cosine
    if floor is not None and quality.get("cosine", 1.0) < floor:
        raise CompressError(f"the result's output cosine to its input is {quality['cosine']:.4f}, below --min-cosine {floor}",
                            "Nothing was written. Keep sensitive layers in float (-s exclude=...), or use --backend torch, which does so itself")
    ctx.metrics.update(quality)
    ctx.metrics["size_bytes_before"], ctx.metrics["size_bytes_after"] = size_of(before), size_of(after)
    if config.check_speed:
        speed = speed_ratio(before, after)
        ctx.metrics["speedup_check"] = speed
        if speed < 1.0:
            msg = f"the quantized model is slower than its input ({speed:.2f}x at batch 1, 1 thread)"
            if config.require_speedup:
                raise CompressError(msg, "Nothing was written. Try --method auto, or static int8 for convolutional models")
            log.warning(msg)
            ctx.metrics["warning"] = msg
    return after


def _quality(ref, new, ctx, before: Artifact) -> dict:
    from ..evaluate import accuracy, compare, fidelity

    if not ctx.data_spec:
        x = tuple(s.example(4) for s in before.input_spec)
        return compare(new(*x)[0], ref(*x)[0])
    bundle = ctx.data()
    out = {k: v for k, v in fidelity(new, ref, bundle, limit=256).items() if k != "samples"}
    if bundle.labelled:
        try:
            acc_new = accuracy(new, bundle, limit=2000)["accuracy"]
            acc_ref = accuracy(ref, bundle, limit=2000)["accuracy"]
            out.update({"accuracy": acc_new, "accuracy_before": acc_ref, "accuracy_drop": acc_ref - acc_new})
        except CompressError:
            pass
    return out


def speed_ratio(before: Artifact, after: Artifact) -> float:
    """p50 latency of ``before`` over ``after`` at batch 1, both on one thread. The runners are loaded here with
    threads=1: an onnxruntime session's thread pool is fixed when the session is made."""
    from ..timing import time_runner
    from ..runners import load_runner

    inputs = tuple(s.example(1) for s in before.input_spec)
    ref, new = load_runner(before, threads=1), load_runner(after, threads=1)
    a = time_runner(ref, inputs, budget_s=0.4, min_runs=5, max_runs=200).stats(1)["p50_ms"]
    b = time_runner(new, inputs, budget_s=0.4, min_runs=5, max_runs=200).stats(1)["p50_ms"]
    return a / b if b else 0.0


def size_of(art: Artifact) -> int | None:
    if art.path is not None:
        return art.size_bytes()
    if art.model is None:
        return None
    import io

    buf = io.BytesIO()
    torch.save(art.model.state_dict(), buf)
    return buf.tell()
