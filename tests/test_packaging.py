"""The wheel a user would `pip install .`: built, installed into a throw-away venv and run outside the checkout.

The throw-away venv sees the test venv's third-party packages through a .pth line (installing torch again would take
minutes), but compress itself comes only from the wheel: the checkout is neither on the path nor the working folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from .conftest import ROOT


def _run(cmd, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMPRESS_RERUN")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding compress installed from a freshly built wheel; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tree git knows (not .venv, runs/...): a build writes build/ and *.egg-info beside the sources.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp / "src" / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", tmp / "src"], tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    warnings = [ln for ln in (built.stdout + built.stderr).splitlines()
                if "warning" in ln.lower() and "Location 'file:" not in ln and "Editable" not in ln]
    assert not warnings, "the build printed warnings:\n" + "\n".join(warnings)
    (wheel,) = (tmp / "dist").glob("compress-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    (site / "test-venv-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    inst = _run([sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python", "install", "-q", "--no-deps", wheel], tmp)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return env_dir / "bin"


def test_the_installed_wheel_runs_outside_the_checkout(installed, tmp_path):
    where = _run([installed / "python", "-c", "import compress, json; print(json.dumps(compress.__file__))"], tmp_path)
    assert where.returncode == 0, where.stderr
    path = Path(json.loads(where.stdout))
    assert ROOT not in path.parents and installed.parent in path.parents, path

    ls = _run([installed / "compress", "ls"], tmp_path)
    assert ls.returncode == 0, ls.stderr
    for word in ("demo", "configs/demo.yaml", "zoo:fmnist-resnet", "zoo:mobilenet_v2", "fashion-mnist", "structured", "onnx"):
        assert word in ls.stdout, word

    ok = _run([installed / "compress", "validate", "demo", "--set", "data=digits"], tmp_path)   # a shipped pipeline by name
    assert ok.returncode == 0 and "demo: ok" in ok.stdout, ok.stdout + ok.stderr

    out = tmp_path / "fm-onnx"
    export = _run([installed / "compress", "--quiet", "export", "zoo:fmnist-resnet", "--target", "onnx", "-o", out], tmp_path)
    assert export.returncode == 0, export.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and (out / manifest["model_file"]).stat().st_size > 100_000

    bad = _run([installed / "compress", "export", "zoo:nope", "--target", "onnx", "-o", tmp_path / "x"], tmp_path)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 1 and len(lines) == 1 and "zoo:nope" in lines[0] and not (tmp_path / "x").exists()
