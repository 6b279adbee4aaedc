"""Train the built-in Fashion-MNIST residual CNN (zoo:fmnist-resnet) from Debian's dataset-fashion-mnist.

    python benchmarks/train_fmnist.py [--epochs 12] [--out compress/weights/fmnist_resnet.safetensors]

Deterministic on CPU for a given seed; prints the test accuracy. The committed weights came from the defaults.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from compress.data import load_data
from compress.models import fashion_resnet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="compress/weights/fmnist_resnet.safetensors")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    bundle = load_data("fashion-mnist")
    xs, ys = bundle.train.inputs, bundle.train.labels
    xt, yt = bundle.eval.inputs, bundle.eval.labels
    model = fashion_resnet(a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = a.epochs * ((len(xs) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), 128):
            idx = perm[i:i + 128]
            x = xs[idx]
            if torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(3)  # horizontal flips: clothes are left-right symmetric
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), ys[idx]).backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = sum((model(xt[i:i + 500]).argmax(1) == yt[i:i + 500]).sum().item() for i in range(0, len(xt), 500)) / len(xt)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out, metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(a.epochs)})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
