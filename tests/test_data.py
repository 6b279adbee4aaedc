"""DATA specs load real samples, evaluation measures what it says, and bad specs fail with one clear line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress import data, evaluate
from compress.artifact import Artifact
from compress.data import batches, load_data
from compress.errors import CompressError
from compress.runners import load_runner
from compress.inputs import InputSpec

from . import models
from .conftest import ROOT, needs_fashion_mnist


def runner_for(model: nn.Module, *shape: int, dtype: str = "float32"):
    return load_runner(Artifact("torch", [InputSpec("input", tuple(shape), dtype)], "test", model=model.eval()))


# ---------------------------------------------------------------- imagefolder
def _png_folder(root, per_class: int = 6, size: int = 12):
    from PIL import Image

    colours = {"blue": (20, 30, 220), "red": (230, 20, 10)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noisy = np.clip(np.array(rgb)[None, None] + np.random.default_rng(i).integers(-15, 15, (size, size, 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


class RedOrBlue(nn.Module):
    """Class 0 = blue, class 1 = red (imagefolder sorts class folders by name)."""

    def forward(self, x):
        means = x.mean((2, 3))
        return torch.stack([means[:, 2], means[:, 0]], 1)


def test_imagefolder_with_class_folders(tmp_path):
    root = _png_folder(tmp_path / "imgs")
    bundle = load_data(f"imagefolder:{root}")
    assert bundle.kind == "image" and bundle.labelled and bundle.num_classes == 2
    assert len(bundle.train) + len(bundle.eval) == 12
    x, y = bundle.eval[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y in (0, 1)
    assert float(x.mean()) < 1.5   # ImageNet-normalised, not raw 0..255
    result = evaluate.accuracy(runner_for(RedOrBlue(), 1, 3, 12, 12), bundle)
    assert result == {"accuracy": 1.0, "samples": len(bundle.eval)}
    flipped = runner_for(nn.Sequential(RedOrBlue(), nn.Flatten(), nn.Linear(2, 2, bias=False)), 1, 3, 12, 12)
    with torch.no_grad():
        flipped.module[2].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert evaluate.accuracy(flipped, bundle)["accuracy"] == 0.0


def test_imagefolder_flat_folder_has_no_labels(tmp_path):
    root = _png_folder(tmp_path / "imgs")
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (root / "red").iterdir():
        p.rename(flat / p.name)
    bundle = load_data(f"imagefolder:{flat}")
    assert not bundle.labelled
    with pytest.raises(CompressError, match="has no labels"):
        evaluate.accuracy(runner_for(RedOrBlue(), 1, 3, 12, 12), bundle)
    fid = evaluate.fidelity(runner_for(RedOrBlue(), 1, 3, 12, 12), runner_for(RedOrBlue(), 1, 3, 12, 12), bundle)
    assert fid == {"max_abs_diff": 0.0, "cosine": pytest.approx(1.0), "top1_agreement": 1.0, "samples": len(bundle.eval)}


def test_imagefolder_errors(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(CompressError, match="holds no images"):
        load_data(f"imagefolder:{empty}")
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "bad.png").write_bytes(b"not a png")
    bundle = load_data(f"imagefolder:{broken.parent}")
    with pytest.raises(CompressError, match="cannot read image .*bad.png"):
        bundle.eval[0]


# ---------------------------------------------------------------- tensors: and python:
def test_tensors_pt_and_npz_give_exact_accuracy(tmp_path):
    x, y = models.argmax_data(40)
    pt = tmp_path / "set.pt"
    torch.save({"inputs": x, "labels": y}, pt)
    npz = tmp_path / "set.npz"
    np.savez(npz, inputs=x.double().numpy(), labels=y.numpy())
    oracle = runner_for(models.Argmax(4), 1, 4)
    for spec in (f"tensors:{pt}", f"tensors:{npz}"):
        bundle = load_data(spec)
        assert bundle.labelled and bundle.num_classes == 4 and bundle.kind == "tensor"
        assert len(bundle.eval) == 8 and len(bundle.train) == 32
        assert bundle.eval[0][0].dtype == torch.float32    # float64 .npz arrays become float32
        assert evaluate.accuracy(oracle, bundle) == {"accuracy": 1.0, "samples": 8}
    # a constant classifier scores exactly the share of its class
    const = models.Argmax(4)
    with torch.no_grad():
        const.scale.zero_()
    bundle = load_data(f"tensors:{pt}")
    labels = torch.tensor([bundle.eval[i][1] for i in range(len(bundle.eval))])
    assert evaluate.accuracy(runner_for(const, 1, 4), bundle)["accuracy"] == pytest.approx(float((labels == 0).float().mean()))


def test_tensors_without_labels_measure_fidelity(tmp_path):
    x, _ = models.argmax_data(20)
    path = tmp_path / "unlabelled.pt"
    torch.save({"inputs": x}, path)
    bundle = load_data(f"tensors:{path}")
    assert not bundle.labelled and bundle.num_classes is None
    ref = models.Argmax(4)
    other = models.Argmax(4)
    with torch.no_grad():
        other.scale.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0]))
    with pytest.raises(CompressError, match="has no labels"):
        evaluate.accuracy(runner_for(ref, 1, 4), bundle)
    same = evaluate.fidelity(runner_for(ref, 1, 4), runner_for(models.Argmax(4), 1, 4), bundle)
    assert same["max_abs_diff"] == 0.0 and same["cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    diff = evaluate.fidelity(runner_for(other, 1, 4), runner_for(ref, 1, 4), bundle)
    ev = torch.stack([bundle.eval[i][0] for i in range(len(bundle.eval))])
    assert diff["max_abs_diff"] == pytest.approx(float((2 * ev[:, 3]).abs().max()))
    assert diff["cosine"] < 1.0
    expected_agree = float(((ev * torch.tensor([1.0, 1, 1, -1])).argmax(1) == ev.argmax(1)).float().mean())
    assert diff["top1_agreement"] == pytest.approx(expected_agree) and expected_agree < 1.0
    assert diff["samples"] == len(bundle.eval)


def test_compare_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.5], [0.0, -2.0]])
    d = evaluate.compare(a, b)
    assert d["max_abs_diff"] == 4.0
    assert d["cosine"] == pytest.approx((float(torch.nn.functional.cosine_similarity(a[:1], b[:1])) + -1.0) / 2)
    assert d["top1_agreement"] == 0.5


def test_tensors_errors(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_data(f"tensors:{tmp_path / 'nope.pt'}")
    empty = tmp_path / "empty.pt"
    torch.save({"inputs": torch.zeros(0, 4)}, empty)
    with pytest.raises(CompressError, match="holds no samples"):
        load_data(f"tensors:{empty}")
    empty_npz = tmp_path / "empty.npz"
    np.savez(empty_npz, inputs=np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(CompressError, match="holds no samples"):
        load_data(f"tensors:{empty_npz}")
    no_inputs = tmp_path / "x.npz"
    np.savez(no_inputs, data=np.zeros((3, 3)))
    with pytest.raises(CompressError, match="no array named 'inputs'.*data"):
        load_data(f"tensors:{no_inputs}")
    wrong = tmp_path / "wrong.pt"
    torch.save({"x": torch.zeros(3)}, wrong)
    with pytest.raises(CompressError, match="does not hold a dict with 'inputs'"):
        load_data(f"tensors:{wrong}")
    uneven = tmp_path / "uneven.pt"
    torch.save({"inputs": torch.zeros(6, 2), "labels": torch.zeros(5, dtype=torch.long)}, uneven)
    with pytest.raises(CompressError, match="6 inputs but 5 labels"):
        load_data(f"tensors:{uneven}")
    zero_byte = tmp_path / "zero.pt"
    zero_byte.write_bytes(b"")
    with pytest.raises(CompressError, match="is empty"):
        load_data(f"tensors:{zero_byte}")


def test_python_specs():
    one = load_data("python:tests.models:labelled_set")
    assert one.labelled and len(one.train) + len(one.eval) == 50
    pair = load_data("python:tests.models:split_sets")
    assert len(pair.train) == 20 and len(pair.eval) == 10 and pair.labelled
    assert evaluate.accuracy(runner_for(models.Argmax(4), 1, 4), pair) == {"accuracy": 1.0, "samples": 10}
    with pytest.raises(CompressError, match="cannot import 'tests.nowhere'"):
        load_data("python:tests.nowhere:fn")
    with pytest.raises(CompressError, match="has no function 'nope'"):
        load_data("python:tests.models:nope")
    with pytest.raises(CompressError, match="needs 'module:function'"):
        load_data("python:justafunction")


def test_unknown_specs_suggest():
    with pytest.raises(CompressError, match="'fashion_mnist' is not a built-in data set.*Did you mean 'fashion-mnist'"):
        load_data("fashion_mnist")
    with pytest.raises(CompressError, match="not a built-in data set.*imagefolder:DIR"):
        load_data("zzzz")
    with pytest.raises(CompressError, match="kind 'folder:' is not known"):
        load_data("folder:/tmp")


# ---------------------------------------------------------------- batching
def test_batches_adapt_grey_28x28_to_rgb_224():
    x = torch.rand(5, 1, 28, 28)
    ds = data.TensorData(x, torch.arange(5))
    spec = [InputSpec("input", (1, 3, 224, 224))]
    got = list(batches(ds, spec, batch_size=2))
    assert [b[0][0].shape for b in got] == [(2, 3, 224, 224), (2, 3, 224, 224), (1, 3, 224, 224)]
    first = got[0][0][0]
    assert torch.equal(first[:, 0], first[:, 1]) and torch.equal(first[:, 1], first[:, 2])   # grey repeated
    assert torch.equal(got[0][1], torch.tensor([0, 1]))
    resized = torch.nn.functional.interpolate(x[:2], size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(first[:, :1], resized)
    # a limit and integer dtypes are honoured
    ids = data.TensorData(torch.randint(0, 9, (7, 6)), None)
    out = list(batches(ids, [InputSpec("ids", (1, 6), "int64")], batch_size=4, limit=5))
    assert [b[0][0].shape for b in out] == [(4, 6), (1, 6)] and out[0][0][0].dtype == torch.int64
    assert torch.equal(out[0][1], torch.full((4,), -1))


def test_batches_refuse_data_that_does_not_fit():
    ds = data.TensorData(torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(CompressError, match=r"shape \(4,\) but input 'input' is \(3, 32, 32\)"):
        next(batches(ds, [InputSpec("input", (1, 3, 32, 32))]))
    with pytest.raises(CompressError, match="needs a tokenizer"):
        next(batches(data.ListData(["some text"], [1]), [InputSpec("input_ids", (1, 16), "int64")]))


# ---------------------------------------------------------------- built-in real data sets
class NearestCentroid(nn.Module):
    """Scores each class by minus the distance to its mean training image: a real, cheap classifier."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("centroids", centroids)

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.centroids)


def _centroid_runner(bundle, n_train: int = 4000):
    n = min(n_train, len(bundle.train))
    xs = torch.stack([bundle.train[i][0] for i in range(n)])
    ys = torch.tensor([bundle.train[i][1] for i in range(n)])
    centroids = torch.stack([xs[ys == c].flatten(1).mean(0) for c in range(bundle.num_classes)])
    return runner_for(NearestCentroid(centroids), 1, *xs.shape[1:])


@pytest.mark.parametrize("name, shape, threshold", [("digits", (1, 8, 8), 0.8), ("mnist", (1, 28, 28), 0.7),
                                                     ("fashion-mnist", (1, 28, 28), 0.6), ("lfw-faces", (1, 25, 25), 0.6)])
def test_builtin_image_sets_are_real_and_labelled(name, shape, threshold):
    if name == "fashion-mnist":
        needs_fashion_mnist()
    bundle = load_data(name)
    assert bundle.kind == "image" and bundle.labelled
    x, y = bundle.eval[0]
    assert tuple(x.shape) == shape and isinstance(y, int)
    labels = {bundle.eval[i][1] for i in range(min(len(bundle.eval), 300))}
    assert labels == set(range(bundle.num_classes))
    result = evaluate.accuracy(_centroid_runner(bundle), bundle, limit=1000)
    chance = 1 / bundle.num_classes
    assert result["accuracy"] > max(threshold, chance + 0.1), result
    assert result["samples"] == min(1000, len(bundle.eval))


def test_builtin_rotten_tomatoes_is_labelled_text():
    bundle = load_data("rotten-tomatoes")
    assert bundle.kind == "text" and bundle.num_classes == 2 and bundle.labelled
    texts = [bundle.eval[i] for i in range(50)]
    assert all(isinstance(t, str) and len(t) > 10 for t, _ in texts)
    assert {label for _, label in texts} == {0, 1}
    assert len(bundle.train) > 3000


def test_builtin_photos_are_unlabelled_imagenet_crops():
    bundle = load_data("photos")
    assert bundle.kind == "image" and not bundle.labelled and bundle.num_classes is None
    x, y = bundle.eval[0]
    assert x.shape == (3, 224, 224) and y == -1
    assert -2.5 < float(x.min()) and float(x.max()) < 2.8   # ImageNet-normalised
    a = runner_for(models.tiny_cnn(), 1, 3, 224, 224)
    b = runner_for(models.tiny_cnn(seed=1), 1, 3, 224, 224)
    fid = evaluate.fidelity(a, b, bundle, limit=8)
    assert fid["samples"] == 8 and fid["max_abs_diff"] > 0 and -1.0 <= fid["cosine"] < 1.0
    assert 0.0 <= fid["top1_agreement"] <= 1.0


def test_grey_builtin_batches_fit_an_rgb_model():
    bundle = load_data("digits")
    inputs, labels = next(batches(bundle.eval, [InputSpec("input", (1, 3, 32, 32))], batch_size=4))
    assert inputs[0].shape == (4, 3, 32, 32) and labels.shape == (4,)
    result = evaluate.accuracy(runner_for(models.tiny_cnn(), 1, 3, 32, 32), bundle, limit=64)
    assert result["samples"] == 64 and 0.0 <= result["accuracy"] <= 1.0


def test_imagefolder_with_mixed_image_sizes(tmp_path):
    """Real folders hold photos of many sizes: each is fitted to the model's input."""
    from PIL import Image

    for name, rgb, size in (("blue", (0, 0, 255), (20, 14)), ("red", (255, 0, 0), (9, 31))):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (size[0] + i, size[1]), rgb).save(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "red" / "grey.png").parent.mkdir(exist_ok=True)
    Image.new("L", (12, 12), 90).save(tmp_path / "imgs" / "red" / "grey.png")   # greyscale files become RGB
    bundle = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    batch, labels = next(batches(bundle.train, [InputSpec("input", (1, 3, 16, 16))], batch_size=8))
    assert batch[0].shape == (len(bundle.train), 3, 16, 16)
    result = evaluate.accuracy(runner_for(RedOrBlue(), 1, 3, 16, 16), bundle)
    assert result["samples"] == len(bundle.eval) == 1


# ---------------------------------------------------------------- Fashion-MNIST: where it is looked for, and when it is missing
def _idx_files(folder, n: int) -> None:
    """Fashion-MNIST's four gzipped IDX files holding ``n`` images (label i % 10) for each split."""
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + bytes(range(256)) * (n * 784 // 256) + bytes(n * 784 % 256))
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n)))


def test_fashion_mnist_is_found_where_compress_fashion_mnist_points(tmp_path, monkeypatch):
    _idx_files(tmp_path / "fm", 20)
    monkeypatch.setenv("COMPRESS_FASHION_MNIST", str(tmp_path / "fm"))
    assert data.fashion_mnist_dir() == tmp_path / "fm" and data.spec_missing("fashion-mnist") is None
    bundle = load_data("fashion-mnist")
    assert len(bundle.train) == len(bundle.eval) == 20 and bundle.eval[13][1] == 3
    assert tuple(bundle.eval[0][0].shape) == (1, 28, 28)


def test_missing_fashion_mnist_is_one_line_before_any_stage_runs(cli, tmp_path, monkeypatch):
    """make demo on a machine where the data could not be installed: one line saying how, nothing run, nothing written."""
    monkeypatch.setattr(data, "fashion_mnist_dir", lambda: None)
    r = cli("run", ROOT / "configs" / "demo.yaml", "-o", tmp_path / "demo")
    assert r.rc == 1 and len(r.err_lines) == 1, r.err
    assert "fashion-mnist data set is not installed" in r.err and "make data" in r.err and "apt-get install dataset-fashion-mnist" in r.err
    assert "✓" not in r.err and not (tmp_path / "demo").exists() and list(tmp_path.iterdir()) == []
    # a partial set of files is as missing as none
    _idx_files(tmp_path / "fm", 4)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.undo()
    monkeypatch.setenv("COMPRESS_FASHION_MNIST", str(tmp_path / "fm"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    assert data.fashion_mnist_dir() is None


def test_the_install_script_does_nothing_without_apt_and_finds_an_existing_copy(tmp_path):
    """Without apt (not Debian) the script exits 0 having written nothing, and compress says what to install."""
    import subprocess

    script = ROOT / "requirements" / "fashion-mnist.sh"
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("sh", "mktemp", "id", "rm", "mkdir", "cp"):
        (bare / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip())
    env = {"PATH": str(bare), "COMPRESS_FASHION_MNIST": str(tmp_path / "none")}
    r = subprocess.run(["sh", str(script), str(tmp_path / "venv")], env=env, capture_output=True, text=True, timeout=60)
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        assert r.returncode == 0 and r.stdout == ""          # found the system copy: nothing to do
    else:
        assert r.returncode == 0 and not (tmp_path / "venv").exists(), r.stdout + r.stderr
    _idx_files(tmp_path / "fm", 2)
    r = subprocess.run(["sh", str(script), str(tmp_path / "venv2")], env=env | {"COMPRESS_FASHION_MNIST": str(tmp_path / "fm")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and not (tmp_path / "venv2").exists()
