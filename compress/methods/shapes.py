"""Record a model's changed layer shapes, and rebuild them on load (the ``reshape`` rebuild step).

A structurally pruned model is stored as its base architecture spec plus this record, so reloading
builds the architecture, resizes its layers, then loads the state dict: no pickle involved.
"""
from __future__ import annotations

import torch
from torch import nn


ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "normalized_shape",
         "embedding_dim", "num_attention_heads", "attention_head_size", "all_head_size", "hidden_size", "num_heads",
         "head_dim", "embed_dim", "intermediate_size", "n_heads", "split_size", "nf", "attn_dim", "hidden_dim")


def record(model: nn.Module) -> dict:
    """The ``reshape`` step: every parameter/buffer shape and the size attributes of every module."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if hasattr(v, "shape")}
    attrs = {}
    for name, m in model.named_modules():
        found = {a: _plain(getattr(m, a)) for a in ATTRS if isinstance(getattr(m, a, None), (int, tuple, list)) and not isinstance(getattr(m, a), bool)}
        if found:
            attrs[name] = found
    return {"op": "reshape", "shapes": shapes, "attrs": attrs}


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def apply(model: nn.Module, step: dict) -> nn.Module:
    modules = dict(model.named_modules())
    for name, values in step.get("attrs", {}).items():
        m = modules.get(name)
        if m is None:
            continue
        for a, v in values.items():
            if hasattr(m, a) and not isinstance(getattr(type(m), a, None), property):   # a derived property follows the rest
                setattr(m, a, tuple(v) if isinstance(v, list) else v)
    for key, shape in step.get("shapes", {}).items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        current = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        if current is None or list(current.shape) == list(shape):
            continue
        fresh = torch.zeros(shape, dtype=current.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(fresh, requires_grad=current.requires_grad)
        else:
            owner._buffers[leaf] = fresh
    return model
