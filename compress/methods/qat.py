"""Quantization-aware fine-tuning ("qat"): for when static int8 after training (PTQ) loses too much accuracy.

The maintained PyTorch path: torchao's PT2E QAT. The model is captured with torch.export, annotated by the x86
Inductor quantizer in QAT mode (fake-quantized per-channel int8 weights and uint8 per-tensor activations, with
Conv+BatchNorm fused for training), fine-tuned for a few epochs on the labelled training split, converted to int8,
and compiled by AOTInductor into the same ``model.pt2`` package as ``quantize --method static --backend torch``.
Why this path and not fake-quant + onnxruntime: the result is the very artifact torch static PTQ makes (same
runner, same speed), and the int8 numbers the training saw are the ones the package computes.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch.nn.functional as F

from ..artifact import Artifact
from ..config import option
from ..cpu import REDUCE_RANGE, REDUCE_RANGE_HELP, reduce_range
from ..errors import CompressError, require
from ..registry import register
from .quality import QualityGate, check
from .quantize_torch import pt2e_capture, pt2e_example, pt2e_package
from .training import FitSettings, Run, fit


@dataclass(frozen=True)
class QATConfig(QualityGate):
    epochs: int = option(3, "passes over the (limited) training split", range=(1, 1000))
    lr: float = option(1e-4, "learning rate (Adam); fine-tuning wants a small one", range=(0.0, 1.0))
    batch_size: int = option(32, "samples per step", range=(2, 4096))
    limit: int | None = option(None, "train on the first N training samples only", range=(2, None))
    reduce_range: bool | str = option("auto", REDUCE_RANGE_HELP + " (activations)", choices=REDUCE_RANGE)
    seed: int | None = option(None, "shuffling seed (default: the pipeline's seed)")


@register("quantize", "qat", QATConfig, accepts=("torch",), produces="pt2", needs_data=True, requires=(("torchao", "ao"),),
          summary="quantization-aware fine-tuning on labelled --data (torchao PT2E QAT, x86 int8) → AOTInductor .pt2")
def qat(artifact: Artifact, config: QATConfig, ctx) -> Artifact:
    from torch.utils.data import Subset

    from ..data import batches, tokenizer_for

    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "ao", "quantization-aware training (PT2E)")
    xiq = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "ao", "quantization-aware training (PT2E)")
    ao = require("torchao.quantization.pt2e", "ao", "quantization-aware training (PT2E)")
    if artifact.format != "torch":
        raise CompressError(f"qat fine-tunes a torch model, not {artifact.format}", "Run qat on the float torch model, before export")
    bundle = ctx.data()
    train = bundle.train if bundle.train is not None and len(bundle.train) else None
    if not bundle.labelled or train is None:
        raise CompressError(f"qat trains on labels, and data '{bundle.name}' has " + ("no labels" if not bundle.labelled else "no training split"),
                            "Give labelled data (e.g. --data digits), or use --method static, which only calibrates")
    n = min(config.limit or len(train), len(train))
    tokenizer = tokenizer_for(artifact)
    pad = artifact.input_spec[0].shape[1] if tokenizer is not None else None   # one static sequence length for export
    seed = ctx.seed if config.seed is None else config.seed

    def batch(idx: list[int]):
        return next(batches(Subset(train, idx), artifact.input_spec, len(idx), tokenizer=tokenizer, pad_to=pad))

    first, _ = batch(list(range(min(2, n))))
    example, dynamic = pt2e_example(artifact, first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = pt2e_capture(artifact, copy.deepcopy(artifact.model).train(), example, dynamic, "QAT")
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=reduce_range(config.reduce_range, ctx.metrics, False)))
        prepared = pt2e.prepare_qat_pt2e(graph, quantizer)

        def step(idx):
            inputs, labels = batch(idx)
            out = prepared(*inputs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.dim() != 2 or (bundle.num_classes and out.shape[1] != bundle.num_classes):
                raise CompressError(f"qat needs a classifier: the model's output has shape {tuple(out.shape)}, not [batch, "
                                    f"{bundle.num_classes or 'classes'}]", "Use --method static for models without class logits")
            return {"loss": (1.0, F.cross_entropy(out, labels))}

        def train_mode():    # a PT2E graph has no .train(): torchao moves it, and the observers watch again
            ao.move_exported_model_to_train(prepared)
            prepared.apply(ao.enable_observer)

        settings = FitSettings(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, optimizer="adam", weight_decay=0.0,
                               schedule="constant", grad_clip=None, seed=seed)
        res = fit(Run(prepared, step, n, train_mode=train_mode), settings, progress=ctx.progress, name="qat")
        log = [{"epoch": e["epoch"], "loss": round(e["loss"], 5)} for e in res["epochs"]]
        # Observers freeze before conversion: evaluation data must not move the activation ranges.
        ao.move_exported_model_to_eval(prepared)
        prepared.apply(ao.disable_observer)
        converted = pt2e.convert_pt2e(prepared)
        ao.move_exported_model_to_eval(converted)
    ctx.metrics.update({"flow": "torchao PT2E QAT + X86InductorQuantizer + AOTInductor", "training_samples": n,
                        "epochs": config.epochs, "log": log})
    out = pt2e_package(artifact, converted, example, dynamic, ctx, "static int8 (PT2E QAT)")
    return check(artifact, out, config, ctx, retry=None)
