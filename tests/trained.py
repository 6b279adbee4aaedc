"""Small models trained on the spot on real data (scikit-learn digits), for tests that check accuracy is kept."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

DIGITS = {"arch": "tests.trained:digits_cnn", "input_shape": ["1x1x8x8"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and the machine is shared). Import it into a test module to use it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class DigitsCNN(nn.Module):
    """Three convolutions with BatchNorm and a linear head: about 3k weights at width 8."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 2, 10)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def digits_cnn(width: int = 8) -> DigitsCNN:
    return DigitsCNN(width)


@functools.lru_cache(maxsize=2)
def trained_digits_cnn(width: int = 8, epochs: int = 6) -> dict:
    """A DigitsCNN trained on the digits train split (deterministic); returns its state dict."""
    from compress.data import load_data

    torch.manual_seed(0)
    bundle = load_data("digits")
    xs = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    ys = torch.tensor([bundle.train[i][1] for i in range(len(bundle.train))])
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    return {k: v.clone() for k, v in model.eval().state_dict().items()}
