"""Pipelines: overrides, checking every problem at once, running stages into atomic, self-describing run directories."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from compress import pipeline, plan, sources
from compress.errors import CompressError
from compress.plan import ValidationError, apply_sets, check

from . import models

STAGE_KEYS = {"stage", "method", "config", "metrics", "seconds"}


def _doc(source: Path, *stages, **top) -> dict:
    return {"model": {"source": str(source), "arch": "tests.models:TinyCNN", "arch_args": {"num_classes": 5},
                      "input_shape": ["1x3x32x32"]}, "stages": list(stages), **top}


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".old")]


def _assert_scaled(out: Path, ref: torch.nn.Module, factor: float) -> None:
    loaded = sources.load(out)
    for k, v in ref.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(loaded.model.state_dict()[k], v * factor, msg=k)


# ---------------------------------------------------------------- --set
def test_apply_sets_reaches_stage_options_and_bench():
    doc = {"model": {"source": "m.pt"}, "stages": [{"prune": {"method": "magnitude"}}, {"export": None}],
           "bench": {"threads": [1]}}
    new = apply_sets(doc, ["stages.0.amount=0.3", "bench.threads=1,2", "stages.1.target=onnx", "model.arch=torchvision:resnet18",
                           "data=digits", "seed=7", "bench.device=[cpu]"])
    assert new["stages"][0] == {"prune": {"method": "magnitude", "amount": 0.3}}
    assert new["stages"][1] == {"export": {"target": "onnx"}}
    assert new["bench"]["device"] == ["cpu"] and new["model"]["arch"] == "torchvision:resnet18"
    assert new["data"] == "digits" and new["seed"] == 7
    from compress.measure import BenchSettings

    assert BenchSettings.from_options(new["bench"]).threads == (1, 2)
    assert doc["stages"][0] == {"prune": {"method": "magnitude"}} and doc["stages"][1] == {"export": None}   # input untouched


def test_apply_sets_errors():
    doc = {"stages": [{"prune": {}}]}
    with pytest.raises(CompressError, match="is not KEY=VALUE"):
        apply_sets(doc, ["stages.0.amount"])
    with pytest.raises(CompressError, match="there is no item 3 .the list has 1"):
        apply_sets(doc, ["stages.3.amount=0.1"])
    with pytest.raises(CompressError, match="cannot set an index of a list"):
        apply_sets(doc, ["stages.0=x"])
    with pytest.raises(CompressError, match="is inside a value"):
        apply_sets({"seed": 1}, ["seed.x.y=2"])


# ---------------------------------------------------------------- check
def test_check_reports_every_problem_at_once(tiny_state, fake_methods):
    doc = _doc(tiny_state[0],
               {"prune": {"method": "test-scale", "factr": 0.2}},
               {"prune": {"method": "test-scale", "factor": 1.5, "mode": "lineer", "fail": "maybe"}},
               {"prun": {}},
               {"export": {"target": "test-trace"}},
               {"prune": {"method": "test-scale"}},
               {"quantize": {"method": "no-such-method"}},
               "not-a-mapping",
               {"distill": {"method": "test-needs", "epochs": 0}},
               dat="digits", bench={"batch_sizes": [1]}, seed="x", device="tpu")
    doc["model"]["input_shap"] = "1x3"
    with pytest.raises(ValidationError) as info:
        check(doc, "p.yaml")
    problems = info.value.problems
    expected = [
        "top level: unknown key 'dat' (did you mean 'data'?)",
        "model: unknown key 'input_shap' (did you mean 'input_shape'?)",
        "stages[0].prune: unknown key 'factr' (did you mean 'factor'?)",
        "stages[1].prune.factor: 1.5 is out of range [0.0, 1.0]",
        "stages[1].prune.mode: 'lineer' is not one of all, linear (did you mean 'linear'?)",
        "stages[1].prune.fail: expected true or false, got 'maybe'",
        "stages[2]: unknown stage 'prun' (did you mean 'prune'?)",
        "stages[4].prune: prune test-scale takes a torch model, but gets torchscript — put it before the stage that makes the torchscript model",
        "stages[5].quantize.method: 'no-such-method' is not known",
        "stages[6]: expected one {STAGE: {options}} mapping",
        "stages[7].distill.epochs: 0 is out of range [1, ]",
        "stages[7].distill: distill test-needs needs the package 'not-a-real-module-xyz': pip install 'compress[fake-extra]'",
        "bench: unknown key 'batch_sizes' (did you mean 'batch_size'?)",
        "seed: expected an integer, got 'x'",
        "device: 'tpu' is not cpu or cuda",
    ]
    for e in expected:
        assert any(p.startswith(e) for p in problems), f"missing: {e}\ngot: {problems}"
    assert len(problems) == len(expected), problems
    assert str(info.value).startswith(f"p.yaml has {len(expected)} problems: ")
    assert fake_methods == []   # nothing ran


def test_check_reports_bad_data_specs(tmp_path, tiny_state, fake_methods):
    for spec, message in (("fashion_mnist", "data: 'fashion_mnist' is not a built-in data set (did you mean 'fashion-mnist'?)"),
                          (f"imagefolder:{tmp_path / 'none'}", f"data: image folder {tmp_path / 'none'} does not exist"),
                          (f"tensors:{tmp_path / 'none.pt'}", f"data: tensor file {tmp_path / 'none.pt'} does not exist"),
                          ("python:nomodule", "data: python data spec 'nomodule' needs 'module:function'"),
                          ("csv:x.csv", "data: data spec kind 'csv:' is not known")):
        with pytest.raises(ValidationError) as info:
            check(_doc(tiny_state[0], bench={}, data=spec))
        assert len(info.value.problems) == 1 and info.value.problems[0].startswith(message), info.value.problems
    with pytest.raises(ValidationError, match=r"stages\[0\]\.prune\.data: 'digit' is not a built-in data set \(did you mean 'digits'\?\)"):
        check(_doc(tiny_state[0], {"prune": {"method": "test-scale", "data": "digit"}}))
    for good in ("digits", f"imagefolder:{tmp_path}", f"tensors:{tiny_state[0]}", "python:tests.models:labelled_set"):
        assert check(_doc(tiny_state[0], bench={}, data=good)).data == good


def test_check_needs_data_and_missing_source(fake_methods, tmp_path):
    with pytest.raises(ValidationError) as info:
        check({"model": {}, "stages": [{"distill": {"method": "test-needs"}}]})
    problems = info.value.problems
    assert any(p.startswith("model: needs 'source'") for p in problems)
    assert any("distill test-needs needs data: set 'data'" in p for p in problems)
    assert any("not-a-real-module-xyz" in p for p in problems)
    # with data, only the missing package is left
    with pytest.raises(ValidationError) as info:
        check({"model": "zoo:mobilenet_v2", "data": "digits", "stages": [{"distill": {"method": "test-needs"}}]})
    assert len(info.value.problems) == 1


def test_check_knows_source_formats_from_files(tmp_path, fake_methods):
    ts = tmp_path / "scripted.pt"
    torch.jit.trace(models.tiny_cnn(), torch.randn(1, 3, 32, 32)).save(str(ts))
    with pytest.raises(ValidationError, match="prune test-scale takes a torch model, but gets torchscript"):
        check({"model": {"source": str(ts)}, "stages": [{"prune": {"method": "test-scale"}}]})
    with pytest.raises(ValidationError, match="takes a torch model, but gets onnx"):
        check({"model": {"source": str(tmp_path / "m.onnx")}, "stages": [{"prune": {"method": "test-scale"}}]})


def test_check_accepts_a_good_pipeline(tiny_state, fake_methods):
    plan = check(_doc(tiny_state[0], {"prune": {"method": "test-scale", "factor": "0.25", "mode": "linear"}},
                      {"export": {"target": "test-trace"}}, bench={"threads": "1,2", "batch_size": 1}))
    assert [(s.stage, s.method.name) for s in plan.stages] == [("prune", "test-scale"), ("export", "test-trace")]
    assert plan.stages[0].config.factor == 0.25 and plan.stages[0].config.mode == "linear"   # strings from --set coerced
    assert plan.stages[0].label == "01-prune-test-scale"


def test_nothing_to_do_is_an_error(tiny_state, tmp_path):
    with pytest.raises(CompressError, match="nothing to do"):
        pipeline.run(_doc(tiny_state[0]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- run
def test_run_writes_the_contract_manifest(tiny_state, tmp_path, fake_methods):
    path, ref = tiny_state
    out = tmp_path / "out"
    result = pipeline.run(_doc(path, {"prune": {"method": "test-scale", "factor": 0.5}}), out)
    assert result.out == out and [label for label, _ in result.artifacts] == ["source", "01-prune-test-scale"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"format", "model_file", "source", "input_spec", "stages", "env"} <= set(manifest)
    assert manifest["format"] == "torch" and manifest["source"] == str(path)
    assert (out / manifest["model_file"]).is_file() and manifest["model_file"] == "model.safetensors"
    assert manifest["input_spec"] == [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32", "dynamic_axes": [0]}]
    [stage] = manifest["stages"]
    assert set(stage) == STAGE_KEYS
    assert stage["stage"] == "prune" and stage["method"] == "test-scale"
    assert stage["config"] == {"factor": 0.5, "mode": "all", "fail": False}
    assert stage["metrics"] == {"factor": 0.5, "params": sum(p.numel() for p in ref.parameters())}
    assert isinstance(stage["seconds"], float) and stage["seconds"] >= 0
    env = manifest["env"]
    assert env["torch"] == torch.__version__ and env["compress"] and env["python"].count(".") == 2 and env["device"]
    assert manifest["arch"] == {"spec": "tests.models:TinyCNN", "args": {"num_classes": 5}}
    _assert_scaled(out, ref, 0.5)
    assert fake_methods == ["scale:0.5"] and _leftovers(tmp_path) == []


def test_stages_accumulate_across_run_directories(tiny_state, tmp_path, fake_methods):
    path, ref = tiny_state
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    pipeline.run(_doc(path, {"prune": {"method": "test-scale", "factor": 0.5}}), first)
    pipeline.run({"model": {"source": str(first)}, "stages": [{"prune": {"method": "test-scale", "factor": 0.5, "mode": "linear"}},
                                                              {"prune": {"method": "test-scale", "factor": 0.5}}]}, second)
    pipeline.run({"model": str(second), "stages": [{"export": {"target": "test-trace"}}]}, third)
    m2 = json.loads((second / "manifest.json").read_text())
    assert m2["source"] == str(path)   # what the first stage of the whole history was given
    assert [(s["stage"], s["config"]["mode"]) for s in m2["stages"]] == [("prune", "all"), ("prune", "linear"), ("prune", "all")]
    # one layout: every stage under stages/, the final model at the top (the last stage's file, hard-linked)
    assert m2["model_file"] == "model.safetensors"
    assert os.path.samefile(second / "model.safetensors", second / "stages/02-prune-test-scale/model.safetensors")
    assert m2["pipeline"] == {"stages": ["01-prune-test-scale", "02-prune-test-scale"]}
    for label in ("01-prune-test-scale", "02-prune-test-scale"):
        assert len(json.loads((second / "stages" / label / "manifest.json").read_text())["stages"]) == int(label[:2]) + 1
    m3 = json.loads((third / "manifest.json").read_text())
    assert m3["format"] == "torchscript" and (third / m3["model_file"]).is_file()
    assert [s["method"] for s in m3["stages"]] == ["test-scale", "test-scale", "test-scale", "test-trace"]
    # the final weights: everything x0.25 (two 'all' stages), the linear head x0.5 more
    loaded = sources.load(second).model.state_dict()
    torch.testing.assert_close(loaded["stem.0.weight"], ref.state_dict()["stem.0.weight"] * 0.25)
    torch.testing.assert_close(loaded["head.weight"], ref.state_dict()["head.weight"] * 0.125)
    scripted = torch.jit.load(str(third / m3["model_file"]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), sources.load(second).model(x))


def test_failed_stage_keeps_completed_ones_and_resume_reuses_them(tiny_state, tmp_path, fake_methods):
    path, ref = tiny_state
    out = tmp_path / "out"
    doc = _doc(path, {"prune": {"method": "test-scale", "factor": 0.5}}, {"prune": {"method": "test-scale", "factor": 0.5, "fail": True}})
    with pytest.raises(CompressError) as info:
        pipeline.run(doc, out)
    assert "told to fail" in str(info.value) and "--resume" in str(info.value) and "completed stage(s) are kept" in str(info.value)
    assert fake_methods == ["scale:0.5", "scale:0.5"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["01-prune-test-scale"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "told to fail" in manifest["error"]
    assert manifest["model_file"] == "stages/01-prune-test-scale/model.safetensors" and len(manifest["stages"]) == 1
    assert _leftovers(tmp_path) == []
    # without --resume or --force, OUT is not touched
    with pytest.raises(CompressError, match="already exists"):
        pipeline.run(doc, out)
    # --resume reuses the completed stage: only the second runs again
    fake_methods.clear()
    result = pipeline.run(apply_sets(doc, ["stages.1.fail=false"]), out, resume=True)
    assert fake_methods == ["scale:0.5"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "status" not in manifest and len(manifest["stages"]) == 2
    assert [label for label, _ in result.artifacts] == ["source", "01-prune-test-scale", "02-prune-test-scale"]
    _assert_scaled(out, ref, 0.25)
    # a changed config is not reused
    fake_methods.clear()
    pipeline.run(apply_sets(doc, ["stages.0.factor=1.0", "stages.1.fail=false"]), out, resume=True)
    assert fake_methods == ["scale:1.0", "scale:0.5"]
    _assert_scaled(out, ref, 0.5)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("stages", [1, 2], ids=["single-stage", "first-of-two"])
def test_failure_leaves_nothing_behind(tiny_state, tmp_path, fake_methods, stages):
    out = tmp_path / "out"
    doc = _doc(tiny_state[0], *[{"prune": {"method": "test-scale", "fail": True}}] * stages)
    with pytest.raises(CompressError, match="told to fail") as info:
        pipeline.run(doc, out)
    assert "kept" not in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [tiny_state[0]]


def test_existing_out_is_untouched_without_force(tiny_state, tmp_path, fake_methods):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    doc = _doc(tiny_state[0], {"prune": {"method": "test-scale"}})
    with pytest.raises(CompressError, match="output .*out already exists.*--force"):
        pipeline.run(doc, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert fake_methods == []
    # --force replaces compress outputs only, never a folder of the user's.
    with pytest.raises(CompressError, match="did not write"):
        pipeline.run(doc, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    pipeline.run(doc, out, force=True)
    pipeline.run(doc, out, force=True)   # and an earlier compress output is replaced
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "stages"]
    assert _leftovers(tmp_path) == []


def test_out_may_not_overwrite_its_input(tmp_path, tiny_state, fake_methods):
    first = tmp_path / "first"
    pipeline.run(_doc(tiny_state[0], {"prune": {"method": "test-scale"}}), first)
    with pytest.raises(CompressError, match="would overwrite the input"):
        pipeline.run({"model": str(first), "stages": [{"prune": {"method": "test-scale"}}]}, first, force=True)
    assert json.loads((first / "manifest.json").read_text())["stages"][0]["config"]["factor"] == 0.5


def test_yaml_pipeline_with_relative_source(tmp_path, tiny_state, fake_methods):
    """A pipeline file's relative model source is found next to the file, wherever it is run from."""
    (tmp_path / "sub").mkdir()
    tiny_state[0].rename(tmp_path / "sub" / "tiny.pt")
    text = yaml.safe_dump(_doc(Path("tiny.pt"), {"prune": {"method": "test-scale"}}))
    (tmp_path / "sub" / "p.yaml").write_text(text)
    doc = plan.read_pipeline(tmp_path / "sub" / "p.yaml")
    assert doc["model"]["source"] == str(tmp_path / "sub" / "tiny.pt")
    assert check(doc).stages[0].method.name == "test-scale"


def test_a_failed_run_used_as_source_does_not_pass_its_status_on(tiny_state, tmp_path, fake_methods):
    failed, later = tmp_path / "failed", tmp_path / "later"
    doc = _doc(tiny_state[0], {"prune": {"method": "test-scale"}}, {"prune": {"method": "test-scale", "fail": True}})
    with pytest.raises(CompressError):
        pipeline.run(doc, failed)
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"
    pipeline.run({"model": str(failed), "stages": [{"prune": {"method": "test-scale"}}]}, later)
    manifest = json.loads((later / "manifest.json").read_text())
    assert not {"status", "error"} & set(manifest), manifest
    assert manifest["pipeline"] == {"stages": ["01-prune-test-scale"]}          # its own, not the failed run's
    assert len(manifest["stages"]) == 2
