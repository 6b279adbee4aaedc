"""The command line: help and examples, exit codes, one-line errors, validate, run, and the real executable."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress import registry, sources

from . import models

from .conftest import ROOT, VENV_BIN, needs_fashion_mnist, python_cmd, subprocess_env

COMMANDS = ("prune", "distill", "quantize", "export", "bench", "run", "validate", "ls")
MODEL = ["--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32"]


def _pipeline_file(tmp_path: Path, source: Path, *stages, name: str = "p.yaml", **top) -> Path:
    doc = {"model": {"source": str(source), "arch": "tests.models:TinyCNN", "arch_args": {"num_classes": 5},
                     "input_shape": ["1x3x32x32"]}, "stages": list(stages), **top}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------- help
def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.rc == 0
    listed = [line.split()[0] for line in r.out.split("Commands:")[1].splitlines() if line.startswith("  ") and line.split()]
    assert set(COMMANDS) <= set(listed)
    assert "Examples:" in r.out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(cli, command):
    r = cli(command, "--help")
    assert r.rc == 0 and r.err == ""
    examples = r.out.split("Examples:", 1)[1].strip().splitlines()
    assert examples and all(line.strip().startswith("compress ") for line in examples[:2])
    assert f"compress {command}" in r.out


def test_version_and_usage_errors(cli):
    r = cli("--version")
    assert r.rc == 0 and "compress" in r.out
    assert cli("frobnicate").rc == 2
    r = cli("prune", "model.pt")            # -o is required
    assert r.rc == 2 and "--out" in r.err
    assert cli("validate", "x.yaml", "--no-such-flag").rc == 2


@pytest.mark.parametrize("stage", registry.STAGES)
def test_a_stage_whose_methods_could_not_load_says_so_in_one_line(cli, tmp_path, tiny_state, stage, monkeypatch):
    real = registry.methods
    monkeypatch.setattr(registry, "methods", lambda st: [] if st == stage else real(st))
    extra = ["--target", "onnx"] if stage == "export" else []
    r = cli(stage, tiny_state[0], *MODEL, *extra, "-o", tmp_path / "out")
    assert r.rc == 1
    assert len(r.err_lines) == 1 and f"no {stage} method could be loaded" in r.err, r.err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- stage commands and errors
def test_stage_command_with_set_options(cli, tmp_path, tiny_state, fake_methods):
    out = tmp_path / "out"
    r = cli("prune", tiny_state[0], *MODEL, "--method", "test-scale", "-s", "factor=0.25", "-s", "mode=linear", "-o", out)
    assert r.rc == 0, r.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][0]["config"] == {"factor": 0.25, "mode": "linear", "fail": False}
    assert f"wrote {out}/" in r.err and "0.25" in r.out           # messages on stderr, the metrics table on stdout
    # the same OUT again: refused without --force, replaced with it (global flags go anywhere)
    r = cli("prune", tiny_state[0], *MODEL, "--method", "test-scale", "-o", out)
    assert r.rc == 1 and "already exists" in r.err and "--force" in r.err
    assert json.loads((out / "manifest.json").read_text())["stages"][0]["config"]["factor"] == 0.25
    assert cli("--force", "prune", tiny_state[0], *MODEL, "--method", "test-scale", "-o", out).rc == 0
    assert json.loads((out / "manifest.json").read_text())["stages"][0]["config"]["factor"] == 0.5
    assert cli("prune", tiny_state[0], *MODEL, "--method", "test-scale", "-s", "factor=0.1", "-o", out, "--force", "--quiet").rc == 0
    assert json.loads((out / "manifest.json").read_text())["stages"][0]["config"]["factor"] == 0.1


def test_bad_options_are_one_line_errors(cli, tmp_path, tiny_state, fake_methods):
    r = cli("prune", tiny_state[0], *MODEL, "--method", "test-scale", "-s", "factr=0.2", "-s", "mode=lineer", "-o", tmp_path / "o")
    assert r.rc == 1 and len(r.err_lines) == 1
    assert "unknown key 'factr' (did you mean 'factor'?)" in r.err and "did you mean 'linear'?" in r.err
    r = cli("prune", tiny_state[0], *MODEL, "--method", "test-scal", "-o", tmp_path / "o")
    assert r.rc == 1 and "'test-scal' is not known (did you mean 'test-scale'?)" in r.err
    r = cli("distill", tiny_state[0], *MODEL, "--method", "test-needs", "-o", tmp_path / "o")
    assert r.rc == 1 and len(r.err_lines) == 1
    assert "pip install 'compress[fake-extra]'" in r.err          # brackets survive the terminal markup
    assert "needs data" in r.err
    assert not (tmp_path / "o").exists() and fake_methods == []


def test_debug_shows_the_traceback(cli, tmp_path):
    r = cli("--debug", "validate", tmp_path / "missing.yaml")
    assert r.rc == 1 and "Traceback" in r.err and "does not exist" in r.err
    r = cli("validate", tmp_path / "missing.yaml")
    assert r.rc == 1 and "Traceback" not in r.err and len(r.err_lines) == 1


# ---------------------------------------------------------------- validate
def test_validate_ok(cli, tmp_path, tiny_state, fake_methods):
    path = _pipeline_file(tmp_path, tiny_state[0], {"prune": {"method": "test-scale"}}, {"export": {"target": "test-trace"}},
                          bench={"batch_size": [1]})
    r = cli("validate", path)
    assert r.rc == 0 and r.out.strip() == f"{path}: ok (prune test-scale, export test-trace; bench)"
    assert fake_methods == []


def test_validate_reports_every_problem(cli, tmp_path, tiny_state, fake_methods):
    path = _pipeline_file(tmp_path, tiny_state[0], {"prune": {"method": "test-scale", "factr": 0.2}},
                          {"export": {"target": "test-trace"}}, {"prune": {"method": "test-scale"}}, {"prun": {}},
                          bench={"treads": [1]})
    r = cli("validate", path)
    assert r.rc == 1
    assert r.err_lines[0] == f"error: {path} has 4 problem(s):"
    items = [line.strip() for line in r.err_lines[1:]]
    assert len(items) == 4 and all(i.startswith("- ") for i in items)
    assert "did you mean 'factor'?" in items[0] and "but gets torchscript" in items[1]
    assert "unknown stage 'prun' (did you mean 'prune'?)" in items[2] and "did you mean 'threads'?" in items[3]
    # --set fixes and breaks things before checking
    r = cli("validate", path, "--set", "stages.0.factor=2", "--set", "stages.0.factr=0.1")
    assert r.rc == 1 and "out of range" in r.err


def test_validate_catches_options_that_contradict_each_other(cli, tmp_path, tiny_state):
    # int4 embedding tables exist only in the onnxruntime backend: refused by validate, before any model is loaded.
    path = _pipeline_file(tmp_path, tiny_state[0], {"quantize": {"method": "dynamic", "backend": "torch", "embedding_bits": 4}})
    r = cli("validate", path)
    assert r.rc == 1 and "embedding_bits=4 is an onnxruntime option" in r.err and "Traceback" not in r.err, r.err
    path = _pipeline_file(tmp_path, tiny_state[0], {"quantize": {"method": "dynamic", "backend": "onnxruntime", "embedding_bits": 4}})
    assert cli("validate", path).rc == 0


def test_validate_yaml_syntax_error_gives_line_and_column(cli, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  source: m.pt\nstages:\n  - prune: {method: magnitude\n  - export: {}\n")
    r = cli("validate", path)
    assert r.rc == 1 and len(r.err_lines) == 1
    assert "is not valid YAML at line 5, column" in r.err
    path.write_text("model: {source: m.pt}\n\tstages: []\n")
    r = cli("validate", path)
    assert r.rc == 1 and "at line 2, column 1" in r.err
    path.write_text("- just\n- a list\n")
    r = cli("validate", path)
    assert r.rc == 1 and "must hold a mapping" in r.err
    path.write_bytes(b"\x00\xff\xfe binary")
    r = cli("validate", path)
    assert r.rc == 1 and "not a text file" in r.err
    r = cli("validate", tmp_path)
    assert r.rc == 1 and "is a directory, not a pipeline file" in r.err


def test_every_shipped_config_validates(cli):
    needs_fashion_mnist()        # the demo's data: without it, validate rightly says it is missing
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        r = cli("validate", path)
        assert r.rc == 0, r.err


# ---------------------------------------------------------------- run
def test_run_with_set_force_and_resume(cli, tmp_path, tiny_state, fake_methods):
    path = _pipeline_file(tmp_path, tiny_state[0], {"prune": {"method": "test-scale"}}, {"prune": {"method": "test-scale", "fail": True}})
    out = tmp_path / "out"
    r = cli("run", path, "-o", out, "--set", "stages.0.factor=0.75")
    assert r.rc == 1 and r.err_lines[0].startswith("✓ prune test-scale in ")
    assert len(r.err_lines) == 2 and r.err_lines[1].startswith("error:") and "told to fail" in r.err and "--resume" in r.err
    assert (out / "stages" / "01-prune-test-scale" / "model.safetensors").is_file()
    fake_methods.clear()
    r = cli("run", path, "-o", out, "--set", "stages.0.factor=0.75", "--set", "stages.1.fail=false", "--resume")
    assert r.rc == 0, r.err
    assert fake_methods == ["scale:0.5"] and "reusing 01-prune-test-scale" in r.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["config"]["factor"] for s in manifest["stages"]] == [0.75, 0.5]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_run_default_out_is_under_runs(cli, tmp_path, tiny_state, fake_methods, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _pipeline_file(tmp_path, tiny_state[0], {"prune": {"method": "test-scale"}}, name="mine.yaml")
    assert cli("--quiet", "run", path).rc == 0
    assert (tmp_path / "runs" / "mine" / "manifest.json").is_file()


# ---------------------------------------------------------------- ls
def test_ls(cli, fake_methods):
    r = cli("ls")
    assert r.rc == 0
    for word in ("test-scale", "zoo:mobilenet_v2", "zoo:minilm-l6", "fashion-mnist", "digits", "photos", "configs/demo.yaml"):
        assert word in r.out, word
    assert "compress[fake-extra]" in r.out
    r = cli("ls", "export")
    assert r.rc == 0 and "test-trace" in r.out and "test-scale" not in r.out
    r = cli("ls", "prunee")
    assert r.rc == 1 and "is not a stage" in r.err


# ---------------------------------------------------------------- the real executable
def test_real_executable(tmp_path, tiny_state):
    exe = VENV_BIN / "compress"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (run make venv)")
    env = subprocess_env()
    help_ = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert help_.returncode == 0 and all(c in help_.stdout for c in COMMANDS)
    pipeline = tmp_path / "bench-only.yaml"
    pipeline.write_text(f"model: {{source: {tmp_path / 'nope.pt'}, arch: 'tests.models:TinyCNN'}}\nbench: {{threads: [1]}}\n")
    missing = subprocess.run([str(exe), "run", str(pipeline), "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1, missing.stderr
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.pt does not exist" in lines[0] and "Traceback" not in missing.stderr
    assert not (tmp_path / "o").exists()
    usage = subprocess.run([str(exe), "prune"], capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 2


def test_python_dash_m_validate(tmp_path, tiny_state):
    path = _pipeline_file(tmp_path, tiny_state[0], {"prne": {}})
    proc = subprocess.run([*python_cmd(), "validate", str(path)], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 1
    assert "unknown stage 'prne' (did you mean 'prune'?)" in proc.stderr


def test_an_error_echoing_a_newline_stays_one_line(cli, tmp_path):
    """User input echoed in a message (a path, a --set item) is shown escaped, so the error is still one line."""
    r = cli("validate", tmp_path / "two\nlines.yaml")
    assert r.rc == 1 and len(r.err_lines) == 1 and "two\\nlines.yaml does not exist" in r.err
    path = tmp_path / "p.yaml"
    path.write_text("model: {source: m.pt}\nstages: []\n")
    r = cli("validate", path, "--set=no\nequals\tsign")
    assert r.rc == 1 and len(r.err_lines) == 1 and "--set 'no\\nequals\\tsign' is not KEY=VALUE" in r.err


def test_a_failed_stage_names_itself_and_the_exact_command_that_continues(cli, tmp_path, tiny_state, fake_methods, monkeypatch):
    """One line: which stage failed and why, what was kept, and the command to run again (make demo names itself)."""
    monkeypatch.delenv("COMPRESS_RERUN", raising=False)
    path = _pipeline_file(tmp_path, tiny_state[0], {"prune": {"method": "test-scale"}}, {"prune": {"method": "test-scale", "fail": True}})
    out = tmp_path / "out"
    r = cli("run", path, "-o", out)
    assert r.rc == 1 and len(r.err_lines) == 2 and r.err_lines[0].startswith("✓ prune test-scale"), r.err
    line = r.err_lines[1]
    assert "stage 02 (prune test-scale) failed: the test method was told to fail" in line
    assert f"the 1 completed stage(s) are kept in {out}/stages" in line
    assert f"rerun compress run {path} -o {out} --resume to continue" in line
    monkeypatch.setenv("COMPRESS_RERUN", "make demo")
    r = cli("run", path, "-o", out, "--resume")
    assert r.rc == 1 and "reusing 01-prune-test-scale" in r.err and "rerun make demo to continue" in r.err_lines[-1]
    # the command it names continues: only the failed stage runs again
    fake_methods.clear()
    r = cli("run", path, "-o", out, "--resume", "--set", "stages.1.fail=false")
    assert r.rc == 0 and fake_methods == ["scale:0.5"], r.err


# ---------------------------------------------------------------- sweep: an option of every method with an amount
def test_sweep_measures_each_amount_and_is_checked_before_running(cli, tmp_path, tiny_state):
    tiny = ["--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32"]
    out = tmp_path / "sweep"
    r = cli("prune", tiny_state[0], *tiny, "--method", "magnitude", "--sweep", "0.5,0.25", "-o", out)
    assert r.rc == 0, r.err
    rows = json.loads((out / "sweep.json").read_text())
    assert [row["amount"] for row in rows] == [0.0, 0.25, 0.5]                      # the input, then each amount, sorted
    assert rows[0]["sparsity"] is None and rows[2]["sparsity"] > rows[1]["sparsity"] > 0.2
    assert "pruning sensitivity sweep" in r.out and "0.25" in r.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][-1]["sweep"] == [0.25, 0.5] and "sweep" not in manifest["stages"][-1]["config"]
    # the model is the input, unchanged: a sweep measures, it does not prune
    assert models.same_weights(sources.load(out).model, tiny_state[1])
    for bad, why in (("abc", "is not a comma-separated list of amounts"), ("0.5,1.5", "amounts must lie in [0, 1)")):
        r = cli("prune", tiny_state[0], *tiny, "--method", "magnitude", "--sweep", bad, "-o", tmp_path / "bad")
        assert r.rc == 1 and len(r.err_lines) == 1 and why in r.err and not (tmp_path / "bad").exists(), r.err
    r = cli("distill", tiny_state[0], *tiny, "--teacher", tiny_state[0], "-s", "sweep=0.5", "--data", "digits", "-o", tmp_path / "kd")
    assert r.rc == 1 and "distill kd has no amount to sweep" in r.err


def test_torch_chatter_stays_out_of_a_users_output():
    """torch's "No CUDA runtime is found, using CUDA_HOME=…" (logged when an AOTInductor candidate is built on a CPU
    machine, e.g. in compress optimize) is not shown without --debug."""
    script = ("import sys, cli\n"
              "cli.main(['--quiet', 'ls'])\n"
              "import torch.utils.cpp_extension\n"
              "import logging; logging.getLogger('torch.utils.cpp_extension').warning('No CUDA runtime is found (test)')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "No CUDA runtime" not in r.stderr, r.stderr
