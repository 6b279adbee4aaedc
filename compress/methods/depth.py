"""A shallower transformer: keep evenly spaced encoder layers (distillation's ``student_layers``), replayed on load
by the ``keep_layers`` rebuild step."""
from __future__ import annotations

from torch import nn

from ..errors import CompressError


def encoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding a transformers model's encoder layers."""
    from ..arch import HFModel

    inner = model.model if isinstance(model, HFModel) else model
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    for name, m in inner.named_modules():
        if isinstance(m, nn.ModuleList) and n and len(m) == n:
            parent, _, attr = name.rpartition(".")
            return inner.get_submodule(parent), attr, m
    raise CompressError("student_layers needs a transformers model with an encoder layer list",
                        "Use a transformers (hf:) model, or give a smaller student as SOURCE")


def spaced_layers(total: int, keep: int) -> list[int]:
    """Evenly spaced layer indices from the first to the last: 6 -> 3 keeps [0, 2, 5], 12 -> 6 keeps DistilBERT's."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def keep_layers(model: nn.Module, step: dict) -> nn.Module:
    """Replay step: keep only ``step["layers"]`` of the encoder (before the state dict loads)."""
    layers = [int(i) for i in step["layers"]]
    parent, attr, old = encoder_layers(model)
    if any(not 0 <= i < len(old) for i in layers):
        raise CompressError(f"keep_layers {layers} does not fit a model with {len(old)} layers", "Re-create the run directory")
    kept = nn.ModuleList([old[i] for i in layers])
    for new_index, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_index
    setattr(parent, attr, kept)
    inner = getattr(model, "model", model)
    inner.config.num_hidden_layers = len(layers)
    return model
