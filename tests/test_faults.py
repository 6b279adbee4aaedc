"""Faults: every bad input through the real CLI is one clean line that writes nothing; fuzzed files never crash
the loader; a pipeline killed at random points (SIGTERM, SIGINT, SIGKILL) leaves OUT whole or absent and its input
intact, and the next run removes what a SIGKILL left; a full disk is one clean line; same seed, same bytes; memory
stays flat; property-based checks over YAML pipelines, --set overrides, shape strings and data specs.

The fuzz and kill tests are bounded (FUZZ_CASES and FUZZ_BUDGET_S per format, KILLS runs) and print what they tried
(run pytest with -s, or read the junit properties)."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress import sources
from compress.errors import CompressError, is_installed
from compress.plan import apply_sets
from compress.inputs import parse_input_shape

from . import models
from .conftest import ROOT, subprocess_env

FUZZ_CASES = 60          # random mutations per format, after 3 fixed ones (two truncations, a flipped first byte)
FUZZ_BUDGET_S = 25.0     # per format: the loop stops early on a slow machine, and says how many it tried
FUZZ_FORMATS = (".pt", ".safetensors", ".onnx", ".torchscript.pt", "run-dir")


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


def _good_file(tmp_path: Path, fmt: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[Path, Path]:
    """(the file to mutate, the SOURCE to load): for a run directory, its model file is mutated."""
    if fmt == ".pt":
        torch.save(model.state_dict(), tmp_path / "good.pt")
    elif fmt == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(tmp_path / "good.safetensors"))
    elif fmt == ".onnx":
        torch.onnx.export(model, (x,), str(tmp_path / "good.onnx"), dynamo=False, input_names=["input"])
    elif fmt == ".torchscript.pt":
        torch.jit.trace(model, x).save(str(tmp_path / "good.torchscript.pt"))
    else:
        from compress.artifact import Artifact, save
        from compress.inputs import InputSpec

        save(Artifact("torch", [InputSpec("input", (1, 3, 16, 16))], "x", model=model,
                      arch={"spec": "tests.models:tiny_cnn", "args": {"num_classes": 5}}), tmp_path / "run")
        return tmp_path / "run" / "model.safetensors", tmp_path / "run"
    good = tmp_path / f"good{fmt}"
    return good, good


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_fuzzed_checkpoints_load_or_fail_cleanly(tmp_path, fmt, record_property):
    """Every truncated or bit-flipped file either loads and runs, or raises one CompressError: nothing else, no crash."""
    from compress.runners import load_runner

    model = models.tiny_cnn(num_classes=5)
    x = torch.randn(1, 3, 16, 16)
    target, source = _good_file(tmp_path, fmt, model, x)
    data = target.read_bytes()
    arch = {} if fmt in (".onnx", ".torchscript.pt", "run-dir") else {"arch": "tests.models:tiny_cnn", "arch_args": '{"num_classes": 5}'}
    outcomes = {"tried": 0, "loaded": 0, "silent": 0, "clean_error": 0, "crash": 0}
    with torch.no_grad():
        expected = model.eval()(x)
    crashes = []
    started = time.monotonic()
    for name, blob in _mutations(data, random.Random(0)):
        if time.monotonic() - started > FUZZ_BUDGET_S:
            break
        target.write_bytes(blob)
        outcomes["tried"] += 1
        try:
            art = sources.load(source, input_shape=["1x3x16x16"], **arch)
            got = load_runner(art)(x)[0]
            outcomes["loaded"] += 1
            # loaded with other outputs than the file it came from: a corruption that passed silently
            outcomes["silent"] += not torch.allclose(got, expected, atol=1e-4, equal_nan=False)
        except CompressError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, (name, str(exc))
            outcomes["clean_error"] += 1
        except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
            outcomes["crash"] += 1
            crashes.append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
    print(f"fuzz {fmt}: {outcomes} in {time.monotonic() - started:.1f}s")
    record_property(f"fuzz{fmt}", json.dumps(outcomes))
    assert crashes == [], f"{len(crashes)} mutation(s) raised something other than CompressError: {crashes[:5]}"
    assert outcomes["tried"] >= min(FUZZ_CASES + 3, 20), "the time budget let too few mutations run to mean anything"
    assert outcomes["clean_error"] >= 3  # truncations at least are caught
    if fmt in (".pt", ".torchscript.pt", "run-dir"):   # zip CRC-32s and the manifest's SHA-256s leave nothing unnoticed
        assert outcomes["silent"] == 0, outcomes


PIPELINE = """
model: {{source: {src}, arch: "tests.models:tiny_cnn", arch_args: {{num_classes: 5, channels: 32}}, input_shape: ["1x3x32x32"]}}
stages:
  - prune: {{method: magnitude, amount: 0.5}}
  - prune: {{method: structured, amount: 0.25, round_to: null}}
bench: {{batch_size: [1], threads: [1], budget_s: 0.5}}
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start_pipeline(tmp_path: Path, out: Path, *extra: str, pipeline: str = PIPELINE) -> tuple[subprocess.Popen, Path, str]:
    """Start ``compress run`` of a two-stage pipeline (about 3 s of work after start-up) in a real subprocess."""
    src = tmp_path / "model.pt"
    if not src.exists():
        torch.save(models.tiny_cnn(num_classes=5, channels=32).state_dict(), src)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(pipeline.format(src=src))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--quiet", *extra, "run", str(pipe), "-o", str(out)],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, pipe, _digest(src)


def _wait_for_partial(folder: Path, proc: subprocess.Popen, timeout: float = 90) -> Path | None:
    """The partial output a running compress process made in ``folder`` (None when it finished first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in folder.glob(f".*.pid{proc.pid}-*.partial")]
        if found:
            return found[0]
        time.sleep(0.02)
    return None


def _dot_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _check_out(out: Path) -> str:
    """OUT is absent, complete, or a stopped run that kept whole completed stages; returns which."""
    if not out.exists():
        return "absent"
    mf = json.loads((out / "manifest.json").read_text())
    assert (out / mf["model_file"]).exists()
    # no stage folder is half-written: only a killed process's own hidden work folder may be there (the next run removes it)
    leftovers = [p.name for p in (out / "stages").glob(".*")]
    assert all(re.match(r"^\..*\.pid\d+-[0-9a-f]{8}\..*\.partial$", n) for n in leftovers), leftovers
    art = sources.load(out / Path(mf["model_file"]).parent)
    assert art.model is not None
    if mf.get("status") in ("failed", "incomplete"):     # incomplete: killed outright after a stage was committed
        return "kept-completed-stages"
    assert (out / "report.json").exists()
    return "complete"


KILLS = 6


def test_kills_at_random_points_leave_out_whole_or_absent_and_the_input_intact(tmp_path, record_property):
    """SIGTERM, SIGINT and SIGKILL at random moments of a real run, again and again into the same OUT (--force).

    After every kill: the input checkpoint is unchanged; OUT is absent, complete, or keeps only whole stages;
    the only hidden leftover is the partial folder of a SIGKILLed process, and the next run removes it.
    """
    out = tmp_path / "out"
    rng = random.Random(1234)
    counts = {"kills": 0, "SIGTERM": 0, "SIGINT": 0, "SIGKILL": 0, "finished_first": 0, "stale_removed_by_next_run": 0,
              "absent": 0, "complete": 0, "kept-completed-stages": 0}
    stale: list[str] = []
    for i in range(KILLS):
        sig = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)[i % 3]
        started = time.time()
        proc, _, before = _start_pipeline(tmp_path, out, "--force")
        partial = _wait_for_partial(tmp_path, proc)
        if partial is not None:
            time.sleep(rng.uniform(0.0, 5.0))       # somewhere in: the stages, the bench, the reports, the commit, or after
        if proc.poll() is None:
            proc.send_signal(sig)
            counts["kills"] += 1
            counts[sig.name] += 1
        else:
            counts["finished_first"] += 1
        rc = proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err[-2000:]
        assert _digest(tmp_path / "model.pt") == before, "the input checkpoint was modified"
        if stale:
            assert not set(stale) & set(_dot_entries(tmp_path)), "the next run did not remove the stale partial output"
            assert "stale partial output" in err, err[-1000:]
            counts["stale_removed_by_next_run"] += len(stale)
        stale = [n for n in _dot_entries(tmp_path) if n != ".out.lock"]   # the lock file is reused by the next run
        if stale:   # only a SIGKILLed process may leave something, and only its own partial output
            assert rc == -signal.SIGKILL and all(f".pid{proc.pid}-" in name for name in stale), (rc, stale)
        else:
            # 130 after Ctrl-C; -SIGINT too: CPython re-raises SIGINT at exit when a KeyboardInterrupt passed through
            # C code (PyRun_*) on its way to our handler, even though the handler ran and cleaned up.
            assert rc in (0, 1, 130, -signal.SIGINT, -signal.SIGKILL, -signal.SIGTERM), (rc, err[-1000:])
        outcome = _check_out(out)
        counts[outcome] += 1
        if outcome == "kept-completed-stages" and (out / "manifest.json").stat().st_mtime >= started and rc != -signal.SIGKILL:
            assert "--resume" in err, err[-1000:]          # this run was interrupted after a stage: it says how to go on
    print(f"kill test: {counts}")
    record_property("kills", json.dumps(counts))
    from compress.rundir import clean_stale

    clean_stale(tmp_path)
    assert [n for n in _dot_entries(tmp_path) if n != ".out.lock"] == []


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "cli.Terminated"])
def test_an_interrupt_inside_a_callback_is_delivered_again_not_printed_or_lost(exc):
    """Ctrl-C or SIGTERM landing in a callback Python cannot raise from (a weakref callback of the import machinery, a
    ``__del__``) printed "Exception ignored … Traceback" and the run went on; now it stops the run in its own code."""
    script = f"""
import signal, time, cli
signal.signal(signal.SIGINT, signal.default_int_handler)   # a background job (nohup, CI) may start with SIGINT ignored
cli.install_signal_handlers()
class Bomb:
    def __del__(self):
        raise {exc}()
try:
    Bomb()
    time.sleep(10)
    print("went on")
except (KeyboardInterrupt, cli.Terminated) as e:
    print("stopped by", type(e).__name__)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"stopped by {exc.split('.')[-1]}", (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_sigkill_mid_run_keeps_the_committed_stages_and_the_next_run_removes_the_partial(tmp_path, cli):
    """kill -9 cannot be caught: the stages committed so far stay whole in OUT (its manifest says "incomplete" and names
    the last one), the stage being written stays hidden, marked with the dead pid, and --resume removes it and goes on."""
    out = tmp_path / "out"
    slow_second = PIPELINE.replace("prune: {{method: structured, amount: 0.25, round_to: null}}",   # a few seconds of training
                                   "distill: {{epochs: 2, limit: 512, data: digits}}")
    assert slow_second != PIPELINE
    proc, pipe, before = _start_pipeline(tmp_path, out, pipeline=slow_second)
    assert _wait_for_partial(tmp_path, proc) is not None, proc.stderr.read().decode()[-2000:]
    def names_first_stage() -> bool:          # the first stage committed and OUT's manifest naming it (written just after)
        try:
            return json.loads((out / "manifest.json").read_text())["model_file"].startswith("stages/01-prune-magnitude/")
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.monotonic() + 60
    while not names_first_stage() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)                     # mid-run: the first stage is committed, the second is being written
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _digest(tmp_path / "model.pt") == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["model_file"].startswith("stages/01-prune-magnitude/")
    assert sources.load(out).model is not None                     # loadable: its last completed stage
    # the stage being written, and OUT's manifest when the kill landed while it was being rewritten
    hidden = [p.name for p in [*(out / "stages").glob(".*.partial"), *out.glob(".*.partial")]]
    assert all(f".pid{proc.pid}-" in name for name in hidden), hidden

    r = cli("run", pipe, "-o", out, "--resume", "--set", "bench.budget_s=0.2")
    assert r.rc == 0, r.err
    assert any("reusing 01-prune-magnitude" in line for line in r.err_lines), r.err
    notes = [line for line in r.err_lines if "stale partial output" in line]
    assert len(notes) == len(hidden) and all(f"(pid {proc.pid})" in n for n in notes), (hidden, r.err)
    assert not list((out / "stages").glob(".*")) and not list(out.glob(".*.partial")) and _check_out(out) == "complete"
    assert [n for n in _dot_entries(tmp_path) if n != ".out.lock"] == []
    assert _digest(tmp_path / "model.pt") == before


def test_stale_partials_are_removed_only_when_their_owner_is_gone(tmp_path):
    from compress.rundir import _owner_tag, clean_stale

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = int(done.stdout)                               # a process that has exited (and was reaped)
    live_tag, host = _owner_tag(), _owner_tag().split("-")[1]
    (tmp_path / f".out.pid{dead}-{host}.abc123.partial" / "stages").mkdir(parents=True)   # a killed run's folder
    (tmp_path / f".bench.json.pid{dead}-{host}.x1y2.partial").write_text("{")            # a killed report write
    (tmp_path / f".out.{live_tag}.abc123.partial").mkdir()                                 # a run in progress: ours
    (tmp_path / f".out.pid{dead}-00000000.abc123.partial").mkdir()                         # another host's (NFS)
    (tmp_path / ".unrelated.partial").mkdir()                                              # not a name compress makes
    # a --force replacement killed between its two renames: the old OUT is put back, not deleted
    (tmp_path / f".prev.pid{dead}-{host}.q9.old").mkdir()
    (tmp_path / f".prev.pid{dead}-{host}.q9.old" / "manifest.json").write_text("{}")
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".out.pid{dead}-{host}.abc123.partial", f".bench.json.pid{dead}-{host}.x1y2.partial"])
    assert (tmp_path / "prev" / "manifest.json").read_text() == "{}"
    assert _dot_entries(tmp_path) == sorted([f".out.{live_tag}.abc123.partial", f".out.pid{dead}-00000000.abc123.partial", ".unrelated.partial"])


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
    if math.prod(dims) <= 1 << 16:   # build the example only when it is small: 64^5 floats are 4 GB
        example = spec.example()
        assert tuple(example.shape) == tuple(dims) and str(example.dtype) == f"torch.{dtype}"


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
        run(doc, tmp_path / name)
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
    monkeypatch.setattr("compress.rundir.os.rename", full_disk)
    r = cli("prune", src, "--arch", "tests.models:tiny_cnn", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x16x16",
            "--method", "magnitude", "-o", tmp_path / "o")
    assert r.rc == 1 and "no space left" in r.err.lower() and "Traceback" not in r.err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_long_distillation_keeps_memory_flat(tmp_path, monkeypatch):
    """Ten times more training steps must not grow resident memory: nothing accumulates per step."""
    import gc

    from compress.pipeline import run

    from .trained import digits_cnn

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    teacher = tmp_path / "t.pt"
    torch.manual_seed(0)
    torch.save(digits_cnn().state_dict(), teacher)   # memory does not depend on how good the teacher is
    src = {"source": str(teacher), "arch": "tests.trained:digits_cnn", "input_shape": ["1x1x8x8"]}

    def distill(steps: int, name: str) -> float:
        run({"model": src, "data": "digits", "stages": [{"distill": {"steps": steps, "batch_size": 32, "student_init": "random"}}]},
            tmp_path / name)
        gc.collect()
        return _rss_mb()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a 3k-weight CNN: extra threads only fight over a shared machine (40x slower)
    try:
        distill(30, "warm")             # first use: imports, allocator pools, data set caches
        short = distill(40, "short")
        long = distill(400, "long")
    finally:
        torch.set_num_threads(threads)
    print(f"distill RSS: {short:.0f} MiB after 40 steps, {long:.0f} MiB after 400 (bound: +40 MiB)")
    assert long - short < 40, f"resident memory grew by {long - short:.0f} MiB over 360 more steps"


# ---------------------------------------------------------------- every bad input, through the real CLI
TINY = ["--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32"]

CUSTOM_OP_ARCH = '''
import torch
from torch import nn

if not hasattr(torch.ops.compress_faults, "mystery"):
    @torch.library.custom_op("compress_faults::mystery", mutates_args=())
    def _mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @_mystery.register_fake
    def _(x):
        return torch.empty_like(x)


class Net(nn.Module):
    """Calls an operator that no ONNX exporter knows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.compress_faults.mystery(self.lin(x))
'''


def _pipeline_yaml(d: Path, stages: str, top: str = "") -> Path:
    path = d / "p.yaml"
    path.write_text(f"model: {{source: {d / 'm.pt'}, arch: 'tests.models:TinyCNN', arch_args: {{num_classes: 5}}, "
                    f"input_shape: ['1x3x32x32']}}\n{top}stages:\n{stages}")
    return path


def _no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here: this case checks the message shown without one")


def _case(name: str, d: Path, out: Path, monkeypatch) -> tuple[list, str]:
    """(argv after 'compress', a fragment the one error line must hold) for one bad input made under ``d``."""
    src = d / "m.pt"
    good = src.read_bytes()
    if name == "missing file":
        return ["prune", d / "nope.pt", *TINY, "--method", "magnitude", "-o", out], "does not exist"
    if name == "empty file":
        (d / "empty.pt").write_bytes(b"")
        return ["prune", d / "empty.pt", *TINY, "--method", "magnitude", "-o", out], "is empty"
    if name == "truncated checkpoint":
        (d / "cut.pt").write_bytes(good[: len(good) // 2])
        return ["prune", d / "cut.pt", *TINY, "--method", "magnitude", "-o", out], "could not be read as a PyTorch checkpoint"
    if name == "corrupt checkpoint":
        bad = bytearray(good)
        bad[100:400] = b"\x00" * 300
        (d / "corrupt.pt").write_bytes(bytes(bad))
        return ["export", d / "corrupt.pt", *TINY, "--target", "onnx", "-o", out], "corrupt.pt"
    if name == "corrupt safetensors":
        from safetensors.torch import save_file

        save_file(models.tiny_cnn(num_classes=5).state_dict(), str(d / "m.safetensors"))
        (d / "m.safetensors").write_bytes((d / "m.safetensors").read_bytes()[:300])
        return ["prune", d / "m.safetensors", *TINY, "--method", "magnitude", "-o", out], "not a readable safetensors"
    if name == "wrong file type (image as checkpoint)":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(d / "picture.png")
        (d / "picture.pth").write_bytes((d / "picture.png").read_bytes())
        return ["prune", d / "picture.pth", *TINY, "--method", "magnitude", "-o", out], "is not a PyTorch checkpoint"
    if name == "wrong file type (checkpoint as pipeline)":
        return ["run", src, "-o", out], "is not a text file"
    if name == "state dict for another architecture":
        torch.save(models.tiny_mlp().state_dict(), d / "mlp.pt")
        return ["prune", d / "mlp.pt", *TINY, "--method", "magnitude", "-o", out], "the state dict does not fit tests.models:TinyCNN"
    if name == "state dict for another torchvision architecture":
        return (["export", src, "--arch", "torchvision:resnet18", "--input-shape", "1x3x32x32", "--target", "onnx", "-o", out],
                "does not fit torchvision:resnet18")
    if name == "wrong input shape":
        return ["export", src, *TINY[:4], "--input-shape", "1x5x32x32", "--target", "onnx", "-o", out], "does not accept input 1x5x32x32"
    if name == "wrong input dtype":
        return ["export", src, *TINY[:4], "--input-shape", "1x3x32x32:int64", "--target", "onnx", "-o", out], "does not accept input 1x3x32x32:int64"
    if name == "unsupported operator in export":
        (d / "custom_op_net.py").write_text(CUSTOM_OP_ARCH)
        torch.save({"lin.weight": torch.eye(4), "lin.bias": torch.zeros(4)}, d / "lin.pt")
        return (["export", d / "lin.pt", "--arch", f"{d / 'custom_op_net.py'}:Net", "--input-shape", "1x4", "--target", "onnx", "-o", out],
                "operator compress_faults.mystery is not supported")
    if name == "export verification failure":
        monkeypatch.setattr("exporters.torchscript.TorchScriptRunner.run", lambda self, p: (torch.full((len(p[0]), 5), 7.0),))
        return ["export", src, *TINY, "--target", "torchscript", "-o", out], "does not match its source"
    if name == "calibration set empty":
        np.savez(d / "empty.npz", inputs=np.zeros((0, 3, 32, 32), dtype=np.float32))
        return ["quantize", src, *TINY, "--method", "static", "--data", f"tensors:{d / 'empty.npz'}", "-o", out], "holds no samples"
    if name == "data folder with no images":
        (d / "images" / "cat").mkdir(parents=True)
        (d / "images" / "cat" / "notes.txt").write_text("no pictures here")
        return (["quantize", src, *TINY, "--method", "static", "--data", f"imagefolder:{d / 'images'}", "-o", out],
                "holds no images")
    if name == "data folder that does not exist":
        return (["quantize", src, *TINY, "--method", "static", "--data", f"imagefolder:{d / 'nowhere'}", "-o", out],
                "image folder")
    if name == "YAML syntax error":
        path = d / "broken.yaml"
        path.write_text("model:\n  source: m.pt\nstages:\n  - prune: {method: magnitude\n  - export: {}\n")
        return ["run", path, "-o", out], "is not valid YAML at line 5, column"
    if name == "unknown stage":
        return ["run", _pipeline_yaml(d, "  - prun: {method: magnitude}\n"), "-o", out], "unknown stage 'prun' (did you mean 'prune'?)"
    if name == "unknown key":
        return (["run", _pipeline_yaml(d, "  - prune: {method: magnitude, amont: 0.3}\n"), "-o", out],
                "unknown key 'amont' (did you mean 'amount'?)")
    if name == "unknown key (-s)":
        return ["prune", src, *TINY, "--method", "magnitude", "-s", "scpoe=global", "-o", out], "unknown key 'scpoe' (did you mean 'scope'?)"
    if name == "value out of range":
        return ["prune", src, *TINY, "--method", "magnitude", "--amount", "1.5", "-o", out], "1.5 is out of range"
    if name == "value out of range (--set)":
        return (["run", _pipeline_yaml(d, "  - prune: {method: magnitude}\n"), "--set", "stages.0.amount=-2", "-o", out],
                "stages[0].prune.amount: -2.0 is out of range")
    if name == "impossible stage order":
        return (["run", _pipeline_yaml(d, "  - export: {target: onnx}\n  - prune: {method: magnitude}\n"), "-o", out],
                "prune magnitude takes a torch model, but gets onnx")
    if name == "missing optional package":
        return (["distill", src, *TINY, "--method", "test-needs", "--data", "digits", "-o", out],
                "needs the package 'not-a-real-module-xyz': pip install 'compress[fake-extra]'")
    if name == "no GPU for --target trt":
        _no_gpu()
        return ["export", src, *TINY, "--target", "trt", "-o", out], "tensorrt" if not is_installed("tensorrt") else "NVIDIA GPU"
    if name == "no GPU for bench --device cuda":
        _no_gpu()
        return ["bench", src, *TINY, "--device", "cuda", "--budget", "0.01", "--json", out], "no CUDA GPU is visible"
    if name == "no GPU for a pipeline on cuda":
        _no_gpu()
        return ["run", _pipeline_yaml(d, "  - prune: {method: magnitude}\n", top="device: cuda\n"), "-o", out], "no CUDA GPU is visible"
    if name == "no GPU for distill device=cuda":
        _no_gpu()
        return (["distill", src, *TINY, "--teacher", src, "--data", "digits", "-s", "device=cuda", "-o", out],
                "no CUDA GPU is visible")
    if name == "unwritable OUT":
        (d / "afile").write_text("x")      # a file where a folder should be: even root cannot create OUT below it
        return ["prune", src, *TINY, "--method", "magnitude", "-o", d / "afile" / "out"], "afile is a file, not a folder"
    if name == "--force onto the input run directory":
        from compress.pipeline import run

        run({"model": {"source": str(src), "arch": TINY[1], "arch_args": TINY[3], "input_shape": [TINY[5]]},
             "stages": [{"prune": {"method": "magnitude"}}]}, d / "run")
        return ["--force", "prune", d / "run", "--method", "magnitude", "-o", d / "run"], "would overwrite the input"
    if name == "untrusted pickle":
        torch.save(models.tiny_cnn(num_classes=5), d / "whole.pt")
        return ["prune", d / "whole.pt", "--input-shape", "1x3x32x32", "--method", "magnitude", "-o", out], "--trust-pickle"
    raise AssertionError(name)


BAD_INPUTS = [
    "missing file", "empty file", "truncated checkpoint", "corrupt checkpoint", "corrupt safetensors",
    "wrong file type (image as checkpoint)", "wrong file type (checkpoint as pipeline)",
    "state dict for another architecture", "state dict for another torchvision architecture",
    "wrong input shape", "wrong input dtype", "unsupported operator in export", "export verification failure",
    "calibration set empty", "data folder with no images", "data folder that does not exist",
    "YAML syntax error", "unknown stage", "unknown key", "unknown key (-s)", "value out of range", "value out of range (--set)",
    "impossible stage order", "missing optional package", "no GPU for --target trt", "no GPU for bench --device cuda",
    "no GPU for a pipeline on cuda", "no GPU for distill device=cuda", "unwritable OUT", "--force onto the input run directory", "untrusted pickle",
]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_clean_line(r, fragment: str) -> None:
    """Exit 1, exactly one line on stderr saying what is wrong and what to do, no traceback."""
    assert r.rc == 1, (r.rc, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("error: ") and fragment in line, line
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert "please report it" not in line, f"an unexpected exception reached the user: {line}"
    assert re.search(r"\w.*\. [A-Z]", line[len("error: "):]), f"the message has no 'what. Fix' form: {line}"


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_through_the_cli_is_one_clean_line_and_writes_nothing(tmp_path, cli, fake_methods, monkeypatch, name):
    d = tmp_path / "in"
    d.mkdir()
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), d / "m.pt")
    out = tmp_path / "out"
    argv, fragment = _case(name, d, out, monkeypatch)
    before = _tree_digest(d)
    r = cli(*argv)
    _assert_one_clean_line(r, fragment)
    assert not out.exists(), "OUT was written"
    assert _dot_entries(tmp_path) == [] and not [p for p in d.rglob(".*") if ".partial" in p.name], "a partial output was left"
    after = _tree_digest(d)
    assert {k: v for k, v in after.items() if k in before} == before, "an input file was changed"
    assert fake_methods == []                                  # nothing reached a method that should not run


def test_existing_out_without_force_is_one_clean_line_and_untouched(tmp_path, cli):
    src = tmp_path / "m.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), src)
    out = tmp_path / "out"
    assert cli("--quiet", "prune", src, *TINY, "--method", "magnitude", "-o", out).rc == 0
    before = _tree_digest(out)
    for argv in (["prune", src, *TINY, "--method", "magnitude", "--amount", "0.9", "-o", out],
                 ["run", _pipeline_yaml(tmp_path, "  - prune: {method: magnitude}\n"), "-o", out]):
        r = cli(*argv)
        _assert_one_clean_line(r, "already exists")
        assert "--force" in r.err
        assert _tree_digest(out) == before


def test_debug_shows_the_traceback_of_a_stage_error(tmp_path, cli):
    src = tmp_path / "cut.pt"
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), tmp_path / "m.pt")
    src.write_bytes((tmp_path / "m.pt").read_bytes()[:300])
    r = cli("--debug", "prune", src, *TINY, "--method", "magnitude", "-o", tmp_path / "out")
    assert r.rc == 1 and "Traceback (most recent call last)" in r.err and "CompressError" in r.err
    assert r.err_lines[-1].startswith("error: ") and "could not be read" in r.err_lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, "Terminated"])
def test_an_error_raised_after_ctrl_c_reports_the_interrupt_not_a_bug(tmp_path, cli, monkeypatch, interrupt):
    """Ctrl-C in the middle of an import leaves the module half-loaded, and the cleanup after it may fail on it (numpy's
    "cannot load module more than once per process"): that was printed as an unexpected error to report, exit 1."""
    import compress.measure
    from cli import Terminated

    stop = Terminated if interrupt == "Terminated" else interrupt

    def half_loaded(*args, **kwargs):
        try:
            raise stop()
        except BaseException:
            raise ImportError("cannot load module more than once per process")

    monkeypatch.setattr(compress.measure, "bench_sources", half_loaded)
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), tmp_path / "m.pt")
    r = cli("bench", tmp_path / "m.pt", *TINY)
    assert r.rc == 130 and r.err_lines[-1].startswith("interrupted: "), r.err
    assert "unexpected" not in r.err and "report" not in r.err


# ---------------------------------------------------------------- a full disk, for real
BIG = ["--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5, "channels": 64}', "--input-shape", "1x3x32x32"]


def _big_source(tmp_path: Path) -> Path:
    src = tmp_path / "big.pt"   # about 300 KB of weights: more than the 64 KiB disk below holds
    torch.save(models.tiny_cnn(num_classes=5, channels=64).state_dict(), src)
    return src


def test_a_full_disk_is_one_clean_line_and_leaves_nothing(tmp_path):
    """A real 64 KiB tmpfs (mounted in a user namespace, no root needed where those are allowed) fills up mid-write."""
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no 'unshare -rm': user namespaces are disabled); the ulimit test covers the path")
    src = _big_source(tmp_path)
    before = _digest(src)
    disk = tmp_path / "disk"
    disk.mkdir()
    for argv in (["prune", src, *BIG, "--method", "magnitude", "-o", disk / "out"],):   # safetensors' Rust writer fails
        cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "cli", *map(str, argv)])
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{disk}' && {cmd}; "
                               f"rc=$?; ls -A '{disk}'; exit $rc"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        if "mount" in proc.stderr and proc.returncode != 1:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: no space left on the device while writing") and "Traceback" not in proc.stderr, lines
        assert proc.stdout.strip() == "" or "Torch IR" in proc.stdout, f"left on the full disk: {proc.stdout}"
    assert _digest(src) == before


def test_a_file_size_limit_is_one_clean_line_and_leaves_nothing(tmp_path):
    """Portable stand-in for a full disk: RLIMIT_FSIZE makes the kernel refuse writes past 50 KB (EFBIG)."""
    src = _big_source(tmp_path)
    before = _digest(src)
    out = tmp_path / "out"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
            "from cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "prune", str(src), *BIG, "--method", "magnitude", "-o", str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "file size limit" in lines[0] and str(out) in lines[0]
    assert not out.exists() and _dot_entries(tmp_path) == []
    assert _digest(src) == before


# ---------------------------------------------------------------- property-based: YAML pipeline files
_KEYS = st.sampled_from(["model", "data", "stages", "bench", "seed", "device", "modle", "stage", ""])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=12))
_STAGE_NAMES = st.sampled_from(["prune", "distill", "quantize", "export", "prun", "bench"])
_OPTION_KEYS = st.sampled_from(["method", "target", "amount", "epochs", "scope", "backend", "data", "branch", "nope"])
_STAGE = st.dictionaries(_STAGE_NAMES, st.one_of(st.none(), st.dictionaries(_OPTION_KEYS, _SCALARS, max_size=3)), min_size=1, max_size=2)
_DOC = st.dictionaries(_KEYS, st.one_of(_SCALARS, st.lists(_STAGE, max_size=3), st.dictionaries(st.text(max_size=8), _SCALARS, max_size=3)),
                       max_size=6)


def _assert_validate_output(r) -> None:
    """``compress validate``: ok (exit 0), one error line, or a header line and one '  - ' line per problem."""
    assert r.rc in (0, 1) and "Traceback" not in r.err and "please report it" not in r.err, r.err
    if r.rc == 0:
        return
    if r.err_lines[0].endswith("problem(s):"):
        assert len(r.err_lines) > 1 and all(line.startswith("  - ") for line in r.err_lines[1:]), r.err
    else:
        assert len(r.err_lines) == 1 and r.err_lines[0].startswith("error: "), r.err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=_DOC, sets=st.lists(st.text(max_size=20), max_size=2))
def test_yaml_pipelines_validate_or_fail_cleanly(tmp_path, cli, doc, sets):
    """Any YAML mapping (well-formed or not) with any --set, through 'compress validate': ok, or clean lines only."""
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    _assert_validate_output(cli("validate", path, *[f"--set={s}" for s in sets]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("model: stages-[]{}\n\t'\",#&*!|>%@`prune0.5\x00")), max_size=80))
def test_yaml_text_reads_or_fails_cleanly(tmp_path, cli, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    _assert_validate_output(cli("validate", path))
