"""Tiny models and data sets built in code, for fast tests.

Importable as ``tests.models`` (so ``--arch tests.models:TinyCNN`` and ``--data python:tests.models:labelled_set``
work from the repository root).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from compress.data import TensorData


class TinyCNN(nn.Module):
    """Conv + BN + a residual block + pooling + a linear head: the shapes of a real CNN, in a few thousand weights."""

    def __init__(self, num_classes: int = 10, channels: int = 8, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.pool(x).flatten(1))


def tiny_cnn(num_classes: int = 10, channels: int = 8, seed: int = 0) -> TinyCNN:
    """A TinyCNN with deterministic, non-trivial weights (BN statistics included)."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes, channels)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def tiny_mlp(in_features: int = 4, out_features: int = 3, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class Picky(nn.Module):
    """A tiny MLP that fails on any input over 100 (a model error a server must survive), takes 1.5 s on an input
    of all -7 (a request still in flight when the server is told to stop) and answers NaN to an input of all -9."""

    def __init__(self, in_features: int = 4, out_features: int = 3):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x):
        if bool((x.abs() > 100).any()):
            raise ValueError("an input over 100: this model cannot take it")
        if bool((x == -7).all()):
            import time

            time.sleep(1.5)
        if bool((x == -9).all()):
            return self.fc(x) * float("nan")
        return self.fc(x)


class Argmax(nn.Module):
    """Returns its input as logits: an 'oracle' whose accuracy on data labelled by argmax is exactly 1."""

    def __init__(self, features: int = 4):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * self.scale


def argmax_data(n: int = 40, features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with labels equal to their argmax."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, x.argmax(1)


def labelled_set() -> Dataset:
    """For ``--data python:tests.models:labelled_set``: one Dataset of (x, label)."""
    x, y = argmax_data(50)
    return TensorData(x, y)


def split_sets():
    """For ``--data python:tests.models:split_sets``: a (train, eval) pair."""
    x, y = argmax_data(30, seed=1)
    return TensorData(x[:20], y[:20]), TensorData(x[20:], y[20:])


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny_vit(num_classes: int = 10):
    """torchvision's VisionTransformer at 32x32 (two layers of width 32): nn.MultiheadAttention inside."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes)


def tiny_swin(num_classes: int = 10):
    """torchvision's SwinTransformer at 32x32: its shifted-window attention reads qkv.weight itself."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=num_classes)
