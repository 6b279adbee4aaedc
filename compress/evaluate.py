"""Accuracy where labels exist, fidelity to a reference model where they do not."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import DataBundle, batches, tokenizer_for
from .errors import CompressError


def run_with_hooks(model: torch.nn.Module, hooks: list, inputs) -> None:
    """Run ``model`` without gradients on every input tuple in ``inputs`` (for what its forward hooks record), then
    remove the hook ``handles``, also when it fails."""
    try:
        with torch.no_grad():
            for x in inputs:
                model(*x)
    finally:
        for h in hooks:
            h.remove()


def _outputs(runner, bundle: DataBundle, limit: int | None, batch_size: int, tokenizer):
    for inputs, labels in batches(bundle.eval, runner.artifact.input_spec, batch_size, limit, tokenizer):
        yield runner(*inputs)[0], labels


def accuracy(runner, bundle: DataBundle, limit: int | None = None, batch_size: int = 64, tokenizer=None) -> dict:
    """Top-1 accuracy of ``runner`` on the held-out split."""
    if not bundle.labelled:
        raise CompressError(f"data '{bundle.name}' has no labels, so accuracy cannot be measured", "Give labelled data, or compare fidelity instead")
    tokenizer = tokenizer or tokenizer_for(runner.artifact)
    correct = total = 0
    for out, labels in _outputs(runner, bundle, limit, batch_size, tokenizer):
        if out.dim() != 2 or (bundle.num_classes and out.shape[1] != bundle.num_classes):
            raise CompressError(f"the model's output has shape {tuple(out.shape)}, not [batch, {bundle.num_classes or 'classes'}]",
                                "Accuracy needs a classifier for this data; fidelity is reported instead")
        correct += int((out.argmax(1) == labels).sum())
        total += len(labels)
    return {"accuracy": correct / total, "samples": total}


def compare(outputs: torch.Tensor, reference: torch.Tensor) -> dict:
    """Fidelity of one output batch to the reference: max abs diff, cosine similarity, top-1 agreement."""
    a, b = outputs.float().flatten(1) if outputs.dim() > 1 else outputs.float()[:, None], reference.float().flatten(1) if reference.dim() > 1 else reference.float()[:, None]
    d = {"max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0,
         "cosine": float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())}
    if outputs.dim() == 2 and outputs.shape[1] > 1:
        d["top1_agreement"] = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
    return d


def fidelity(runner, reference, bundle: DataBundle, limit: int | None = 256, batch_size: int = 32, tokenizer=None) -> dict:
    """Compare ``runner`` with ``reference`` on real data: worst max abs diff, mean cosine, top-1 agreement."""
    tokenizer = tokenizer or tokenizer_for(runner.artifact) or tokenizer_for(reference.artifact)
    stats, n = [], 0
    for inputs, _ in batches(bundle.eval, runner.artifact.input_spec, batch_size, limit, tokenizer):
        stats.append((len(inputs[0]), compare(runner(*inputs)[0], reference(*inputs)[0])))
        n += len(inputs[0])
    return summarize(stats) | {"samples": n}


def summarize(stats: list[tuple[int, dict]]) -> dict:
    total = sum(w for w, _ in stats)
    out = {"max_abs_diff": max(s["max_abs_diff"] for _, s in stats),
           "cosine": sum(w * s["cosine"] for w, s in stats) / total}
    if all("top1_agreement" in s for _, s in stats):
        out["top1_agreement"] = sum(w * s["top1_agreement"] for w, s in stats) / total
    return out
