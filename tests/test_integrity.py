"""Nothing corrupted passes silently, nothing finished is lost: checksums (zip CRC-32s, a run directory's SHA-256s),
non-finite weights refused, durable stages that a SIGKILL cannot lose, one writer per OUT, and teachers of any format."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from . import models
from .conftest import ROOT, subprocess_env
from .trained import DIGITS, trained_digits_cnn

TINY = ["--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32"]


def _flip(path: Path, at: float = 0.5, n: int = 64, seed: int = 0) -> None:
    """Overwrite ``n`` bytes in the middle of a file with random ones (the tensor data of a checkpoint)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = random.Random(seed).randbytes(n)
    path.write_bytes(bytes(data))


def _one_error(r, *words) -> None:
    assert r.rc == 1 and len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    for w in words:
        assert w in r.err, (w, r.err)


# ---------------------------------------------------------------- checksums
def test_flipped_bytes_in_a_state_dict_or_torchscript_archive_are_refused(cli, tmp_path, tiny_state):
    path, model = tiny_state
    assert cli("export", path, *TINY, "--target", "onnx", "-o", tmp_path / "ok").rc == 0       # the clean file loads
    _flip(path)
    r = cli("export", path, *TINY, "--target", "onnx", "-o", tmp_path / "bad")
    _one_error(r, str(path), "fails its CRC-32 check", "tiny/data/")
    assert not (tmp_path / "bad").exists()

    ts = tmp_path / "model.ts"
    torch.jit.trace(model.eval(), torch.randn(1, 3, 32, 32)).save(str(ts))
    assert cli("--quiet", "bench", ts, "--input-shape", "1x3x32x32", "--budget", "0.02").rc == 0
    _flip(ts, at=0.6)
    _one_error(cli("bench", ts, "--input-shape", "1x3x32x32", "--budget", "0.02"), str(ts), "is damaged")
    torch.save(model.state_dict(), tmp_path / "student.pt")
    _one_error(cli("distill", tmp_path / "student.pt", *TINY, "--teacher", ts, "--data", "digits", "-o", tmp_path / "kd"), "is damaged")


def test_a_changed_truncated_or_missing_file_in_a_run_directory_is_refused(cli, tmp_path, tiny_state):
    run = tmp_path / "run"
    assert cli("prune", tiny_state[0], *TINY, "--method", "magnitude", "--amount", "0.5", "-o", run).rc == 0
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert files["model.safetensors"]["sha256"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    good = (run / "model.safetensors").read_bytes()

    def rewrite(data: bytes) -> None:        # in place: the top file is a hard link to the stage's, so both change
        with open(run / "model.safetensors", "r+b") as f:
            f.write(data)
            f.truncate()

    rewrite(good[:-8] + bytes(8))            # a weight changed: still a valid safetensors file
    # bench loads the run's stages, export the run itself: both refuse
    for cmd in (["bench", run, "--budget", "0.02"], ["export", run, "--target", "onnx", "-o", tmp_path / "e"]):
        _one_error(cli(*cmd), "model.safetensors was modified after compress wrote it", "--no-verify")
    assert not (tmp_path / "e").exists()
    assert cli("--quiet", "bench", run, "--budget", "0.02", "--no-verify").rc == 0           # the user's choice
    rewrite(good[: len(good) // 2])
    _one_error(cli("export", run, "--target", "onnx", "-o", tmp_path / "e"), "was truncated")
    rewrite(good)
    assert cli("--quiet", "export", run, "--target", "onnx", "-o", tmp_path / "e").rc == 0     # restored: loads again
    stage = run / "stages" / "01-prune-magnitude"
    (stage / "model.safetensors").unlink()
    _one_error(cli("bench", stage, "--budget", "0.02"), "is missing")


def test_weights_holding_nan_or_inf_are_refused_unless_allowed(cli, tmp_path, tiny_state):
    path, model = tiny_state
    state = model.state_dict()
    state["head.weight"][0, 0] = float("nan")
    state["stem.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "nan.pt")
    _one_error(cli("export", tmp_path / "nan.pt", *TINY, "--target", "onnx", "-o", tmp_path / "o"), "NaN/Inf", "--allow-nonfinite")
    assert not (tmp_path / "o").exists()
    assert cli("--quiet", "prune", tmp_path / "nan.pt", *TINY, "--method", "magnitude", "--allow-nonfinite", "-o", tmp_path / "p").rc == 0
    _one_error(cli("bench", tmp_path / "p", "--budget", "0.02"), "NaN/Inf")               # a run directory is checked too
    assert cli("--quiet", "bench", tmp_path / "p", "--budget", "0.02", "--allow-nonfinite").rc == 0


# ---------------------------------------------------------------- durable stages, one writer
PIPELINE = """
model: {{source: {src}, arch: "tests.models:tiny_cnn", arch_args: {{num_classes: 5, channels: 32}}, input_shape: ["1x3x32x32"]}}
data: digits
stages:
  - prune: {{method: structured, amount: 0.25, round_to: null}}
  - distill: {{epochs: 2, limit: 256, eval_limit: 64, batch_size: 32}}
  - export: {{target: onnx}}
bench: {{batch_size: [1], threads: [1], budget_s: 0.05, limit: 32}}
"""


def _start(tmp_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    src = tmp_path / "model.pt"
    if not src.exists():
        torch.save(models.tiny_cnn(num_classes=5, channels=32).state_dict(), src)
        (tmp_path / "p.yaml").write_text(PIPELINE.format(src=src))
    env = subprocess_env() | {"COMPRESS_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "cli", "--quiet", "run", str(tmp_path / "p.yaml"), "-o", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    rc = proc.wait(timeout=300)
    return rc, proc.stderr.read().decode()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_pipeline_killed_outright_resumes_from_its_stages_to_the_same_bytes(tmp_path):
    """SIGKILL at random points (the data set's digits are tiny CNN inputs resized): whatever stages were committed are
    kept whole, and --resume ends with the same model bytes as a run that was never interrupted."""
    rc, err = _finish(_start(tmp_path, tmp_path / "straight"))
    assert rc == 0, err
    want = _digest(tmp_path / "straight" / "model.onnx")
    seen_kept = 0
    for seed in range(3):
        out = tmp_path / f"killed{seed}"
        proc = _start(tmp_path, out)
        deadline = time.monotonic() + 120
        while not (out / "stages").is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)                                  # the first stage is committed: OUT appears
        time.sleep(random.Random(seed).uniform(0.0, 4.0))
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        kept = sorted(d.name for d in (out / "stages").iterdir() if not d.name.startswith(".")) if out.exists() else []
        for name in kept:                                     # every stage folder there is whole: it loads, verified
            assert json.loads((out / "stages" / name / "manifest.json").read_text())["files"]
        seen_kept += bool(kept)
        rc, err = _finish(_start(tmp_path, out, "--resume"))
        assert rc == 0, err
        assert _digest(out / "model.onnx") == want, f"seed {seed}: resumed after {kept} to other bytes"
        assert "status" not in json.loads((out / "manifest.json").read_text())
    assert seen_kept >= 1, "no kill landed after a committed stage: the test proved nothing"


def test_two_commands_writing_one_out_one_proceeds_the_other_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    first = _start(tmp_path, out)
    lock = tmp_path / ".out.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), "the first command never took the lock"
    rc, err = _finish(_start(tmp_path, out, "--force"))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "is being written by another compress command (pid" in lines[0], err
    rc, err = _finish(first)
    assert rc == 0, err
    assert "status" not in json.loads((out / "manifest.json").read_text()) and (out / "report.json").is_file()
    assert not lock.exists()                                  # removed on the way out


# ---------------------------------------------------------------- a teacher takes the student's inputs
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_distillation_from_a_torchscript_or_onnx_teacher_needs_no_teacher_shape(cli, tmp_path, fmt):
    torch.save(trained_digits_cnn(width=16), tmp_path / "teacher.pt")
    base = ["--arch", DIGITS["arch"], "--input-shape", DIGITS["input_shape"][0]]
    assert cli("--quiet", "export", tmp_path / "teacher.pt", *base, "--arch-args", '{"width": 16}', "--target", fmt,
               "-o", tmp_path / "t").rc == 0
    teacher = next(p for p in (tmp_path / "t").iterdir() if p.suffix in (".onnx", ".pt") and p.name != "manifest.json")
    torch.save(models_digits_student(), tmp_path / "student.pt")
    r = cli("--quiet", "distill", tmp_path / "student.pt", *base, "--arch-args", '{"width": 4}', "--teacher", teacher,
            "--data", "digits", "-s", "epochs=2", "-s", "lr=0.01", "-o", tmp_path / "kd")
    assert r.rc == 0, r.err
    m = json.loads((tmp_path / "kd" / "manifest.json").read_text())["stages"][-1]["metrics"]
    assert m["teacher_format"] == fmt and m["teacher_accuracy"] > 0.9
    assert m["student_accuracy_after"] > m["student_accuracy_before"] + 0.2, m
    r = cli("distill", tmp_path / "student.pt", *base, "--arch-args", '{"width": 4}', "--teacher", teacher, "--data", "digits",
            "-s", "feature_weight=1", "-o", tmp_path / "kd2")
    _one_error(r, "feature and attention matching read a PyTorch teacher's layers")


def models_digits_student() -> dict:
    from .trained import digits_cnn

    torch.manual_seed(0)
    return digits_cnn(4).state_dict()
