"""Attention-head and MLP-width pruning for transformers: BERT-like models, DistilBERT, DeBERTa-v2, GPT-2 and ViT, through
one attention layout per family (:mod:`.attention`).

Whole heads are removed from the query/key/value projections and the attention output projection, and whole hidden
units from the feed-forward block, ranked by weight magnitude or by their measured output on --data; the same fraction
in every layer, always keeping at least one head. The model stays a transformers model: it reloads from its
architecture spec plus the recorded layer shapes and head counts, and exports to ONNX.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import CompressError
from ..evaluate import run_with_hooks
from ..config import option
from ..registry import register
from . import attention as att
from . import shapes


@dataclass(frozen=True)
class HeadsConfig:
    amount: float = option(0.25, "fraction of attention heads to remove in every layer", range=(0.0, 0.95))
    mlp_amount: float = option(0.0, "fraction of feed-forward hidden units to remove in every layer", range=(0.0, 0.95))
    round_to: int = option(8, "keep the feed-forward width a multiple of this", range=(1, 256))
    importance: str = option("auto", "rank heads by weight magnitude, or by their measured output on --data (activation); "
                             "auto uses activation when data is given", choices=("auto", "magnitude", "activation"))
    samples: int = option(128, "data samples used for activation importance", range=(1, 100_000))


def activation_scores(model, blocks: list, batches, heads: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Importance measured on real data: a head's mean contribution to its attention output (with ``heads``), and a
    feed-forward unit's mean |activation| times its output weights' norm."""
    head_scores = [torch.zeros(b.heads) if heads else None for b in blocks]
    mlp = [torch.zeros(att.out_units(att.mlp_pair(b)[0])) for b in blocks]
    hooks = [att.context_hook(b, s) for b, s in zip(blocks, head_scores)] if heads else []

    def unit_hook(i):
        def hook(module, args):          # a pre-hook that returned a value would replace the layer's input
            mlp[i].add_(args[0].detach().abs().mean(dim=(0, 1)))
        return hook
    hooks += [att.mlp_pair(b)[1].register_forward_pre_hook(unit_hook(i)) for i, b in enumerate(blocks)]
    run_with_hooks(model, hooks, batches)
    return head_scores, [s * att.out_weight(att.mlp_pair(b)[1]).norm(dim=0) for s, b in zip(mlp, blocks)]


@register("prune", "heads", HeadsConfig, accepts=("torch",), produces="torch",
          summary="remove attention heads (and feed-forward width) from transformers: BERT-like, DistilBERT, DeBERTa-v2, GPT-2, ViT")
def heads(artifact, config: HeadsConfig, ctx):
    if config.amount <= 0 and config.mlp_amount <= 0:
        raise CompressError("amount and mlp_amount are both 0, so nothing would be pruned", "Give -s amount=... (heads) or -s mlp_amount=...")
    model = copy.deepcopy(artifact.model).eval()
    blocks = att.blocks(model)
    params0 = sum(p.numel() for p in model.parameters())
    kept_heads, widths = [], []
    use_data = config.importance == "activation" or (config.importance == "auto" and ctx.data_spec)
    if use_data:
        from ..data import batches, tokenizer_for

        bundle = ctx.data()
        ds = bundle.train if bundle.train is not None else bundle.eval
        data = [x for x, _ in batches(ds, artifact.input_spec, 16, config.samples, tokenizer_for(artifact))]
        scores, mlp_scores = activation_scores(model, blocks, data, heads=config.amount > 0)
    else:
        scores = [att.magnitude_scores(b) if config.amount > 0 else None for b in blocks]
        mlp_scores = [None] * len(blocks)
    ctx.metrics["importance"] = "activation" if use_data else "magnitude"
    ctx.metrics["layout"] = blocks[0].layout.family
    for block, score, mlp_score in zip(blocks, scores, mlp_scores):
        if config.amount > 0:
            kept_heads.append(att.prune_heads(block, int(round(block.heads * config.amount)), score))
        if config.mlp_amount > 0:
            widths.append(att.prune_mlp(block, config.mlp_amount, config.round_to, mlp_score))
    params1 = sum(p.numel() for p in model.parameters())
    ctx.metrics.update({"params_before": params0, "params_after": params1, "params_ratio": params1 / params0})
    if kept_heads:
        ctx.metrics["heads_per_layer"] = kept_heads
    if widths:
        ctx.metrics["mlp_width_per_layer"] = widths
    _fidelity(artifact, model, ctx)
    return artifact.evolve(model=model, rebuild=[*artifact.rebuild, shapes.record(model)])


def _fidelity(artifact, model, ctx) -> None:
    from ..evaluate import compare, fidelity
    from ..runners import TorchRunner

    ref, new = TorchRunner(artifact), TorchRunner(artifact.evolve(model=model))
    if ctx.data_spec:
        ctx.metrics.update({k: v for k, v in fidelity(new, ref, ctx.data(), limit=128).items() if k != "samples"})
    else:
        x = tuple(s.example(4) for s in artifact.input_spec)
        ctx.metrics.update(compare(new(*x)[0], ref(*x)[0]))
