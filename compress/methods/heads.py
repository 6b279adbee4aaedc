"""Attention-head and MLP-width pruning for BERT-like transformers (transformers' BertModel family).

Whole heads are removed from the query/key/value projections and the attention output projection, and
whole hidden units from the feed-forward block, ranked by weight magnitude; the same fraction in every
layer, always keeping at least one head. The model stays a transformers model: it reloads from its
architecture spec plus the recorded layer shapes, and exports to ONNX.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import HFModel
from ..errors import CompressError
from ..evaluate import run_with_hooks
from ..config import option
from ..registry import register
from . import shapes


@dataclass(frozen=True)
class HeadsConfig:
    amount: float = option(0.25, "fraction of attention heads to remove in every layer", range=(0.0, 0.95))
    mlp_amount: float = option(0.0, "fraction of feed-forward hidden units to remove in every layer", range=(0.0, 0.95))
    round_to: int = option(8, "keep the feed-forward width a multiple of this", range=(1, 256))
    importance: str = option("auto", "rank heads by weight magnitude, or by their measured output on --data (activation); "
                             "auto uses activation when data is given", choices=("auto", "magnitude", "activation"))
    samples: int = option(128, "data samples used for activation importance", range=(1, 100_000))


def _layers(model: nn.Module):
    inner = model.model if isinstance(model, HFModel) else model
    encoder = getattr(getattr(inner, "base_model", inner), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(hasattr(l, "attention") and hasattr(l.attention, "self") for l in layers):
        raise CompressError("head pruning needs a BERT-like transformers model (encoder.layer[i].attention.self)",
                            "Use --method structured for CNNs and MLPs")
    return inner, layers


def _keep_rows(linear: nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[idx].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[idx].clone())
    linear.out_features = len(idx)


def _keep_cols(linear: nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, idx].clone())
    linear.in_features = len(idx)


def magnitude_scores(layer) -> torch.Tensor:
    """Importance of a head: magnitude of its query, key, value rows and of its output-projection columns."""
    att, out = layer.attention.self, layer.attention.output.dense
    d, h = att.attention_head_size, att.num_attention_heads
    score = torch.zeros(h)
    for lin in (att.query, att.key, att.value):
        score += lin.weight.detach().view(h, d, -1).norm(dim=(1, 2))
    return score + out.weight.detach().view(out.out_features, h, d).norm(dim=(0, 2))


def activation_scores(model, layers, batches) -> list[torch.Tensor]:
    """Importance of a head: the mean norm of what it adds to the attention output, measured on real data."""
    scores = [torch.zeros(l.attention.self.num_attention_heads) for l in layers]
    hooks = []
    for i, layer in enumerate(layers):
        att, out = layer.attention.self, layer.attention.output.dense

        def hook(module, args, i=i, att=att, out=out):
            ctx = args[0]                                             # [B, T, heads * d]
            h, d = att.num_attention_heads, att.attention_head_size
            w = out.weight.detach().view(out.out_features, h, d)      # [hidden, heads, d]
            per_head = torch.einsum("btkd,okd->btko", ctx.view(*ctx.shape[:2], h, d), w)
            scores[i] += per_head.norm(dim=-1).mean(dim=(0, 1))
        hooks.append(out.register_forward_pre_hook(hook))
    run_with_hooks(model, hooks, batches)
    return scores


def prune_heads(layer, n_remove: int, score: torch.Tensor) -> int:
    att = layer.attention.self
    out = layer.attention.output.dense
    d, h = att.attention_head_size, att.num_attention_heads
    n_remove = min(n_remove, h - 1)
    if n_remove <= 0:
        return h
    keep_heads = score.argsort(descending=True)[: h - n_remove].sort().values
    idx = torch.cat([torch.arange(k * d, (k + 1) * d) for k in keep_heads.tolist()])
    for lin in (att.query, att.key, att.value):
        _keep_rows(lin, idx)
    _keep_cols(out, idx)
    att.num_attention_heads = len(keep_heads)
    att.all_head_size = len(idx)
    return len(keep_heads)


def mlp_activation_scores(model, layers, batches) -> list[torch.Tensor]:
    """Importance of a feed-forward unit: mean |activation| on real data times its output weights' norm."""
    sums = [torch.zeros(l.output.dense.in_features) for l in layers]
    hooks = [l.output.dense.register_forward_pre_hook(lambda m, a, i=i: sums[i].add_(a[0].detach().abs().mean(dim=(0, 1))))
             for i, l in enumerate(layers)]
    run_with_hooks(model, hooks, batches)
    return [s * l.output.dense.weight.detach().norm(dim=0) for s, l in zip(sums, layers)]


def prune_mlp(layer, amount: float, round_to: int, score: torch.Tensor | None = None) -> int:
    up, down = layer.intermediate.dense, layer.output.dense
    width = up.out_features
    keep = max(round_to, int(round(width * (1 - amount) / round_to)) * round_to)
    keep = min(keep, width)
    if score is None:
        score = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
    idx = score.argsort(descending=True)[:keep].sort().values
    _keep_rows(up, idx)
    _keep_cols(down, idx)
    return keep


@register("prune", "heads", HeadsConfig, accepts=("torch",), produces="torch",
          summary="remove attention heads (and feed-forward width) from BERT-like transformers")
def heads(artifact, config: HeadsConfig, ctx):
    model = copy.deepcopy(artifact.model).eval()
    inner, layers = _layers(model)
    params0 = sum(p.numel() for p in model.parameters())
    kept_heads, widths = [], []
    use_data = config.importance == "activation" or (config.importance == "auto" and ctx.data_spec)
    if use_data:
        from ..data import batches, tokenizer_for

        bundle = ctx.data()
        ds = bundle.train if bundle.train is not None else bundle.eval
        data = [x for x, _ in batches(ds, artifact.input_spec, 16, config.samples, tokenizer_for(artifact))]
        scores = activation_scores(model, layers, data)
        mlp_scores = mlp_activation_scores(model, layers, data) if config.mlp_amount > 0 else [None] * len(layers)
    else:
        scores = [magnitude_scores(layer) for layer in layers]
        mlp_scores = [None] * len(layers)
    ctx.metrics["importance"] = "activation" if use_data else "magnitude"
    for layer, score, mlp_score in zip(layers, scores, mlp_scores):
        h = layer.attention.self.num_attention_heads
        kept_heads.append(prune_heads(layer, int(round(h * config.amount)), score))
        if config.mlp_amount > 0:
            widths.append(prune_mlp(layer, config.mlp_amount, config.round_to, mlp_score))
    params1 = sum(p.numel() for p in model.parameters())
    ctx.metrics.update({"heads_per_layer": kept_heads, "params_before": params0, "params_after": params1, "params_ratio": params1 / params0})
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
