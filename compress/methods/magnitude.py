"""Unstructured magnitude pruning: zero the smallest weights, globally or per layer, made permanent.

Zeros alone make dense kernels no faster: this shrinks compressed size and prepares for sparse
runtimes, but for CPU/GPU speed use ``structured``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import prune as tprune

from ..errors import CompressError
from ..config import option
from ..registry import register

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class MagnitudeConfig:
    amount: float = option(0.5, "fraction of weights to zero", range=(0.0, 0.99))
    scope: str = option("global", "rank weights across all layers (global) or within each layer", choices=("global", "layer"))
    norm: str = option("l1", "importance of a weight", choices=("l1",))
    ignore: tuple[str, ...] = option((), "module-name patterns to leave alone (fnmatch), e.g. 'classifier*'")


def prunable_layers(model: nn.Module, ignore: tuple[str, ...], types=PRUNABLE) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    for pat in ignore:
        if not any(fnmatch.fnmatch(n, pat) for n, _ in layers):
            raise CompressError(f"the ignore pattern '{pat}' matches no prunable layer",
                                f"Layer names look like: {', '.join(n for n, _ in layers[:4])}")
    return [(n, m) for n, m in layers if not any(fnmatch.fnmatch(n, p) for p in ignore)]


def sparsity(model: nn.Module) -> dict:
    per_layer, zeros, total = {}, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE):
            w = m.weight.detach()
            z = int((w == 0).sum())
            per_layer[name] = round(z / w.numel(), 4)
            zeros, total = zeros + z, total + w.numel()
    return {"sparsity": zeros / max(total, 1), "sparsity_per_layer": per_layer}


@register("prune", "magnitude", MagnitudeConfig, accepts=("torch",), produces="torch",
          summary="unstructured L1 magnitude (zeros weights; smaller when compressed, not faster on dense kernels)")
def magnitude(artifact, config: MagnitudeConfig, ctx):
    import copy

    model = copy.deepcopy(artifact.model).eval()
    layers = prunable_layers(model, config.ignore)
    if not layers:
        raise CompressError("the model has no Conv or Linear layers to prune", "Unstructured pruning works on Conv/Linear weights")
    params = [(m, "weight") for _, m in layers]
    if config.scope == "global":
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=config.amount)
    else:
        for m, p in params:
            tprune.l1_unstructured(m, p, amount=config.amount)
    for m, p in params:
        tprune.remove(m, p)  # make it permanent: no masks or hooks remain
    ctx.metrics.update(sparsity(model))
    ctx.metrics["note"] = "zeros alone make dense kernels no faster"
    return artifact.evolve(model=model)
