"""Structural channel pruning on Torch-Pruning's dependency graph: layers physically shrink, and every
coupled layer (residual additions, concatenations, depthwise/grouped convolutions, BatchNorm) stays
consistent. The classifier head is kept by default.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressError, first_line, require
from ..config import option
from ..registry import register
from . import shapes
from .distill import finetune
from .magnitude import prunable_layers

IMPORTANCE = ("l1", "l2", "bn_scale", "taylor", "random")


@dataclass(frozen=True)
class StructuredConfig:
    amount: float = option(0.3, "fraction of channels to remove from each prunable group", range=(0.0, 0.95))
    importance: str = option("l1", "channel importance: weight magnitude (l1/l2), BatchNorm scale, Taylor (needs data) or random", choices=IMPORTANCE)
    scope: str = option("layer", "same ratio in every layer, or rank channels across the model (global)", choices=("layer", "global"))
    ignore: tuple[str, ...] = option((), "module-name patterns to keep whole (fnmatch); the classifier head is always kept")
    round_to: int | None = option(8, "keep channel counts a multiple of this for fast kernels (null to disable)", range=(1, 256))
    max_layer_amount: float = option(0.9, "never remove more than this fraction from one layer (global scope)", range=(0.0, 1.0))
    taylor_batches: int = option(4, "data batches used to estimate Taylor importance", range=(1, 1000))
    steps: int = option(1, "prune in this many steps (fine-tuning between them when finetune_epochs > 0)", range=(1, 100))
    schedule: str = option("cubic", "how the amount grows over the steps", choices=("one-shot", "linear", "cubic"))
    finetune_epochs: float = option(0.0, "epochs of fine-tuning on --data after each step (0: none)", range=(0.0, 100.0))
    finetune: str = option("distill", "fine-tuning loss: distillation from the unpruned model, or labels only", choices=("distill", "labels"))
    finetune_limit: int | None = option(None, "fine-tune on the first N training samples only", range=(1, None))
    finetune_lr: float | None = option(None, "fine-tuning learning rate (default: the distill stage's)", range=(0.0, None))


def _importance(tp, name: str):
    imp = tp.importance
    if name == "l1":
        return imp.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return imp.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return imp.BNScaleImportance()
    if name == "taylor":
        return imp.GroupTaylorImportance()
    return imp.RandomImportance()


def head_layers(model: nn.Module, example: tuple) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs (the classifier head), found by shape."""
    with torch.no_grad():
        out = model(*example)
    out = out[0] if isinstance(out, (tuple, list)) else out
    width = out.shape[-1] if out.dim() == 2 else out.shape[1]
    cands = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == width)
             or (isinstance(m, nn.Conv2d) and m.out_channels == width)]
    return cands[-1:]


def count(tp, model, example) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


@register("prune", "structured", StructuredConfig, accepts=("torch",), produces="torch",
          requires=(("torch_pruning", "prune"),), needs_data=lambda c: c.importance == "taylor" or c.finetune_epochs > 0,
          summary="channel pruning with Torch-Pruning's dependency graph (really smaller and faster); iterative with fine-tuning")
def structured(artifact, config: StructuredConfig, ctx):
    tp = require("torch_pruning", "prune", "structured pruning")
    if not artifact.arch:
        raise CompressError("structured pruning needs a model with a known architecture spec (it is saved as spec + layer shapes)",
                            "Load the model from a state dict with --arch")
    example = tuple(s.example(1) for s in artifact.input_spec)
    _refuse_transformers(artifact.model)     # first: GPT-2's projections are Conv1D, yet its answer is --method heads
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in artifact.model.modules()):
        raise CompressError("the model has no Conv2d or Linear layers to prune structurally", "Use a CNN or MLP, or the magnitude method")
    _refuse_channel_shuffle(artifact.model)
    macs0, params0 = count(tp, artifact.model, example)
    model = copy.deepcopy(artifact.model).eval()
    pruner = _pruner(tp, model, example, config, artifact, ctx)
    log = []
    for k in range(config.steps):
        # Torch-Pruning steps the ratio along the schedule; fine-tuning copies its weights back into the same
        # model object, so the pruner's dependency graph stays valid between steps.
        try:
            if config.importance == "taylor":
                _taylor_gradients(model, artifact, config, ctx)
            pruner.step()
        except CompressError:
            raise
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning raises plain errors on graphs it cannot trace
            raise CompressError(f"Torch-Pruning could not prune this model ({type(exc).__name__}: {first_line(exc, 160)})",
                                "Add the offending layers to --set ignore=..., or use --method magnitude") from None
        model.eval()
        entry = {"step": k + 1, "params": count(tp, model, example)[1]}
        if config.finetune_epochs > 0:
            tuned, entry["finetune"] = finetune(artifact.evolve(model=model), ctx, epochs=config.finetune_epochs,
                                                limit=config.finetune_limit, labels_only=config.finetune == "labels", lr=config.finetune_lr)
            model.load_state_dict(tuned.model.state_dict())
            model.eval()
        log.append(entry)
    macs1, params1 = count(tp, model, example)
    ctx.metrics.update({"params_before": params0, "params_after": params1, "macs_before": macs0, "macs_after": macs1,
                        "params_ratio": params1 / params0, "macs_ratio": macs1 / max(macs0, 1)})
    if len(log) > 1 or config.finetune_epochs > 0:
        ctx.metrics["steps"] = log
    return artifact.evolve(model=model, rebuild=[*artifact.rebuild, shapes.record(model)])


def schedule(kind: str):
    """Torch-Pruning scheduler: cumulative ratios over the steps, one-shot, linear, or cubic (AGP: big steps first)."""
    def fn(ratio: float, steps: int) -> list[float]:
        if kind == "one-shot":
            return [0.0] + [ratio] * steps
        if kind == "linear":
            return [ratio * i / steps for i in range(steps + 1)]
        return [ratio * (1 - (1 - i / steps) ** 3) for i in range(steps + 1)]
    return fn


def _refuse_transformers(model: nn.Module) -> None:
    """Channel pruning through a whole transformer (its residual width, every attention's bookkeeping) is what
    Torch-Pruning cannot keep consistent for most families — torchvision's Swin grew to all of the machine's memory —
    so transformers are sent, within a second, to the method made for them."""
    from . import attention as att

    try:
        family = att.blocks(model)[0].layout.family
    except CompressError:
        family = next((type(m).__name__ for m in model.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if family:
        raise CompressError(f"structured pruning removes channels across the whole network, which it cannot keep consistent with "
                            f"the attention of a transformer ({family})",
                            "Use --method heads: it removes attention heads and feed-forward width (-s mlp_amount=0.5)")


def _refuse_channel_shuffle(model: nn.Module) -> None:
    """A channel shuffle (ShuffleNet) interleaves the channels of two branches; Torch-Pruning 1.6 fails on its 5-D view
    and on the chunk and concatenation around it (and keeping the shuffled layers whole leaves nothing to prune)."""
    if any(hasattr(m, "branch2") and "shufflenet" in type(m).__module__ for m in model.modules()) or \
            any(isinstance(m, nn.ChannelShuffle) for m in model.modules()):
        raise CompressError("structured pruning cannot follow a channel shuffle (ShuffleNet's blocks interleave the channels of "
                            "their two branches)", "Distill it into a narrower ShuffleNet instead (a torchvision:shufflenet_v2_x0_5 "
                            "student with compress distill), or use --method magnitude")


def _pruner(tp, model, example, config: StructuredConfig, artifact, ctx):
    keep = set(head_layers(model, example))
    ignored_names = {n for n, m in model.named_modules() if m in keep}
    if config.ignore:
        kept = {n for n, _ in prunable_layers(model, config.ignore, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM))}
        all_layers = {n for n, _ in prunable_layers(model, (), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM))}
        ignored_names |= all_layers - kept
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in sorted(ignored_names)]
    try:
        return tp.pruner.MetaPruner(model, example, importance=_importance(tp, config.importance),
                                    global_pruning=config.scope == "global", pruning_ratio=config.amount,
                                    max_pruning_ratio=config.max_layer_amount, ignored_layers=ignored,
                                    round_to=config.round_to, iterative_steps=config.steps,
                                    iterative_pruning_ratio_scheduler=schedule(config.schedule))
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"Torch-Pruning could not trace this model ({type(exc).__name__}: {first_line(exc, 160)})",
                            "Add the offending layers to --set ignore=..., or use --method magnitude") from None


def _taylor_gradients(model, artifact, config, ctx):
    from ..data import batches, tokenizer_for

    bundle = ctx.data()
    if not bundle.labelled or bundle.train is None:
        raise CompressError("Taylor importance needs labelled training data", "Use --data with labels, or --set importance=l1")
    model.zero_grad()
    for i, (inputs, labels) in enumerate(batches(bundle.train, artifact.input_spec, 32, 32 * config.taylor_batches, tokenizer_for(artifact))):
        loss = nn.functional.cross_entropy(model(*inputs), labels)
        loss.backward()
