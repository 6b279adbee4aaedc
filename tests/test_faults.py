"""Faults: fuzzed checkpoints never crash the loader, a killed pipeline leaves OUT complete or absent and its
input intact, and property-based checks over shape strings, overrides and data specs."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress import sources
from compress.errors import CompressError
from compress.pipeline import apply_sets
from compress.specs import parse_input_shape

from . import models
from .conftest import ROOT, subprocess_env

FUZZ_CASES = 60


def _mutations(data: bytes, rng: random.Random):
    yield "truncated-half", data[: len(data) // 2]
    yield "truncated-1", data[:-1]
    yield "first-byte", bytes([data[0] ^ 0xFF]) + data[1:]
    for i in range(FUZZ_CASES):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        if rng.random() < 0.3:
            b = b[: rng.randrange(1, len(b))]
        yield f"flip-{i}", bytes(b)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_fuzzed_checkpoints_load_or_fail_cleanly(tmp_path, suffix):
    """Every truncated or bit-flipped checkpoint either loads (and fits) or raises one CompressError."""
    model = models.tiny_cnn(num_classes=5)
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), good)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(good))
    rng = random.Random(0)
    outcomes = {"loaded": 0, "clean_error": 0}
    for name, blob in _mutations(good.read_bytes(), rng):
        bad = tmp_path / f"{name}{suffix}"
        bad.write_bytes(blob)
        try:
            art = sources.load(bad, "tests.models:tiny_cnn", '{"num_classes": 5}', ["1x3x16x16"])
            art.model(torch.randn(1, 3, 16, 16))
            outcomes["loaded"] += 1
        except CompressError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600
            outcomes["clean_error"] += 1
    total = sum(outcomes.values())
    assert total == FUZZ_CASES + 3
    assert outcomes["clean_error"] >= 3  # truncations at least are caught
    print(f"fuzz {suffix}: {outcomes}")


PIPELINE = """
model: {{source: {src}, arch: "tests.models:tiny_cnn", arch_args: {{num_classes: 5, channels: 32}}, input_shape: ["1x3x32x32"]}}
stages:
  - prune: {{method: magnitude, amount: 0.5}}
  - prune: {{method: structured, amount: 0.25, round_to: null}}
bench: {{batch_size: [1], threads: [1], budget_s: 1.5}}
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_killed_pipeline_leaves_out_complete_or_absent(tmp_path, seed):
    src = tmp_path / "model.pt"
    torch.save(models.tiny_cnn(num_classes=5, channels=32).state_dict(), src)
    before = _digest(src)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPELINE.format(src=src))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "--quiet", "run", str(pipe), "-o", str(out)],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    delay = random.Random(seed).uniform(1.0, 9.0)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM if seed % 2 == 0 else signal.SIGINT)
    rc = proc.wait(timeout=60)
    assert _digest(src) == before, "the input checkpoint was modified"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    mf = json.loads((out / "manifest.json").read_text()) if out.exists() else None
    if rc == 0 or (mf is not None and mf.get("status") != "failed"):
        # Finished (the signal may land after OUT was committed, while exiting): OUT is complete.
        assert (out / mf["model_file"]).exists() and (out / "report.json").exists()
    elif out.exists():
        # Interrupted after a completed stage: what is there is whole and says it failed.
        assert (out / mf["model_file"]).exists()
        assert not list((out / "stages").glob(".*"))
        art = sources.load(out / Path(mf["model_file"]).parent)
        assert art.model is not None
    else:
        assert rc in (130, 1, -signal.SIGINT, -signal.SIGTERM), proc.stderr.read().decode()[-500:]


# ---------------------------------------------------------------- property-based
@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_shape_strings_parse_or_fail_cleanly(text):
    try:
        spec = parse_input_shape(text)
    except CompressError:
        return
    assert all(d >= 1 for d in spec.shape)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=5), st.sampled_from(["float32", "int64", "float16", "int32"]))
def test_shape_strings_round_trip(dims, dtype):
    spec = parse_input_shape("x".join(map(str, dims)) + f":{dtype}")
    assert spec.shape == tuple(dims) and spec.dtype == dtype
    assert tuple(spec.example().shape) == tuple(dims)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=25), max_size=3))
def test_set_overrides_apply_or_fail_cleanly(sets):
    doc = {"model": {"source": "m.pt"}, "stages": [{"prune": {"method": "magnitude"}}], "bench": {"threads": [1]}}
    try:
        out = apply_sets(doc, sets)
    except CompressError:
        return
    assert isinstance(out, dict)
    assert doc["stages"][0] == {"prune": {"method": "magnitude"}}  # the input document is never mutated


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=40))
def test_data_specs_load_or_fail_cleanly(spec):
    from compress.data import BUILTIN, load_data

    if spec.strip() in BUILTIN or spec.strip().startswith("python:"):
        return  # real sets and code execution are covered elsewhere
    try:
        load_data(spec)
    except CompressError:
        pass


def test_force_never_replaces_a_folder_compress_did_not_write(tmp_path, cli):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    src = tmp_path / "m.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), src)
    r = cli("--force", "prune", src, "--arch", "tests.models:tiny_cnn", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x16x16",
            "--method", "magnitude", "-o", precious)
    assert r.rc == 1 and "did not write" in r.err
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("shape", ["1x3x16", "1x3x16x16:int64", "1x5x16x16"])
@pytest.mark.parametrize("command", ["bench", "export"])
def test_wrong_input_shape_or_dtype_is_one_clean_line(tmp_path, cli, shape, command):
    src = tmp_path / "m.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), src)
    args = [command, src, "--arch", "tests.models:tiny_cnn", "--arch-args", '{"num_classes": 5}', "--input-shape", shape]
    if command == "export":
        args += ["--target", "onnx", "-o", tmp_path / "o"]
    r = cli(*args)
    assert r.rc == 1 and "does not accept" in r.err and "Traceback" not in r.err
    assert len(r.err_lines) == 1
    assert not (tmp_path / "o").exists()


def test_same_inputs_and_seed_give_bit_identical_outputs(tmp_path):
    """Pruning, export and int8 calibration are deterministic on CPU: two runs write the same bytes."""
    src = tmp_path / "m.pt"
    torch.save(models.tiny_cnn(num_classes=5, channels=16).state_dict(), src)
    doc = {"model": {"source": str(src), "arch": "tests.models:tiny_cnn", "arch_args": {"num_classes": 5, "channels": 16},
                     "input_shape": ["1x3x16x16"]},
           "data": "digits", "seed": 3,
           "stages": [{"prune": {"method": "structured", "amount": 0.5, "round_to": None}},
                      {"quantize": {"method": "static", "samples": 32, "check_speed": False}}]}
    from compress.pipeline import run

    digests = []
    for name in ("a", "b"):
        run(doc, tmp_path / name, quiet=True)
        files = sorted(p for p in (tmp_path / name / "stages").rglob("*") if p.suffix in (".onnx", ".safetensors"))
        digests.append({p.relative_to(tmp_path / name).as_posix(): _digest(p) for p in files})
    assert digests[0] and digests[0] == digests[1]


def test_no_space_left_is_one_clean_line_and_leaves_nothing(tmp_path, cli, monkeypatch):
    import errno
    import os as os_mod

    src = tmp_path / "m.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), src)
    real_rename = os_mod.rename

    def full_disk(a, b):
        if ".partial" in str(a):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(a, b)
    monkeypatch.setattr("compress.outputs.os.rename", full_disk)
    r = cli("prune", src, "--arch", "tests.models:tiny_cnn", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x16x16",
            "--method", "magnitude", "-o", tmp_path / "o")
    assert r.rc == 1 and "no space left" in r.err.lower() and "Traceback" not in r.err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unwritable_output_place_is_one_clean_line(tmp_path, cli):
    src = tmp_path / "m.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), src)
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # a file where a directory should be: cannot create OUT below it, even as root
    r = cli("prune", src, "--arch", "tests.models:tiny_cnn", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x16x16",
            "--method", "magnitude", "-o", blocker / "out")
    assert r.rc == 1 and "Traceback" not in r.err and len(r.err_lines) == 1
    assert blocker.read_text() == "x"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_long_distillation_keeps_memory_flat(tmp_path, monkeypatch):
    """Ten times more training steps must not grow resident memory: nothing accumulates per step."""
    import gc

    from compress.pipeline import run

    from .trained import trained_digits_cnn

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    teacher = tmp_path / "t.pt"
    torch.save(trained_digits_cnn(), teacher)
    src = {"source": str(teacher), "arch": "tests.trained:digits_cnn", "input_shape": ["1x1x8x8"]}

    def distill(steps: int, name: str) -> float:
        run({"model": src, "data": "digits", "stages": [{"distill": {"steps": steps, "batch_size": 32, "student_init": "random"}}]},
            tmp_path / name, quiet=True)
        gc.collect()
        return _rss_mb()
    distill(30, "warm")                 # first use: imports, allocator pools, data set caches
    short = distill(40, "short")
    long = distill(400, "long")
    assert long - short < 40, f"resident memory grew by {long - short:.0f} MiB over 360 more steps"
