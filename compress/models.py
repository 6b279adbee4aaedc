"""Small architectures that ship with compress (their trained weights are built-in models: see zoo.py)."""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionResNet(nn.Module):
    """A residual CNN for 28x28 grey images: three stages (width, 2x, 4x) of one basic block each."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stage1 = BasicBlock(width)
        self.down2, self.stage2 = _down(width, 2 * width), BasicBlock(2 * width)
        self.down3, self.stage3 = _down(2 * width, 4 * width), BasicBlock(4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        x = self.stage3(self.down3(x))
        return self.fc(self.pool(x).flatten(1))


def fashion_resnet(width: int = 16, num_classes: int = 10, in_channels: int = 1) -> FashionResNet:
    return FashionResNet(width, num_classes, in_channels)
