"""compress package: a Ray Serve application started on a local Ray instance and answering like the artifact (OIP v2,
/predict, compress loadtest), Triton model repositories checked against Triton's own config schema and run as Triton
would feed them, docker files whose command serves the packaged copy, and bad input refused in one line."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from . import models
from .conftest import ROOT, subprocess_env

TINY = {"arch": "tests.models:TinyCNN", "arch_args": {"num_classes": 5}, "input_shape": ["1x3x32x32"]}


# ---------------------------------------------------------------- run directories (made once)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A torch run directory (tiny CNN, state dict), its ONNX and TorchScript exports, and inputs to compare on."""
    import compress
    from compress.artifact import save

    root = tmp_path_factory.mktemp("runs")
    torch.save(models.tiny_cnn(num_classes=5).state_dict(), root / "tiny.pt")
    model = compress.load(root / "tiny.pt", **TINY)
    save(model, root / "tiny-torch")
    compress.export(model, "onnx", out=root / "tiny-onnx")
    compress.export(model, "torchscript", out=root / "tiny-ts")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.savez(root / "data.npz", inputs=np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32), labels=np.arange(16) % 5)
    return {"root": root, "torch": root / "tiny-torch", "onnx": root / "tiny-onnx", "ts": root / "tiny-ts", "x": x,
            "data": f"tensors:{root / 'data.npz'}", "module": model.model}


def _expected(run_dir: Path, x: np.ndarray) -> np.ndarray:
    """The artifact run directly, through the runner bench uses."""
    from compress.artifact import load_run_dir
    from compress.runners import load_runner

    return load_runner(load_run_dir(run_dir), "cpu")(torch.from_numpy(x))[0].numpy()


def _post(url: str, body: dict, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _v2(x: np.ndarray, name: str = "input") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


# ---------------------------------------------------------------- ray
RAY_DRIVER = """
import signal, sys, time
import ray
ray.init(num_cpus=2, include_dashboard=False, namespace="serve")
from ray.serve.scripts import run
run.main(["serve_config.yaml", "--non-blocking"], standalone_mode=False)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    while True:
        time.sleep(0.5)
finally:
    ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_app(runs, tmp_path_factory):
    """The ONNX run directory packaged for Ray Serve (batching on) and started with serve run's own code on a local
    2-CPU Ray instance, on loopback."""
    pytest.importorskip("ray.serve")
    from cli import main
    from compress.loadtest import free_port

    out = tmp_path_factory.mktemp("ray") / "app"
    port = free_port()
    assert main(["package", str(runs["onnx"]), "--target", "ray", "--name", "tiny", "--max-batch-size", "4", "--max-wait-ms", "20",
                 "--port", str(port), "--cache-size", "0", "-o", str(out)]) == 0
    log = open(out.parent / "ray.log", "w+b")
    env = subprocess_env() | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RAY_DRIVER], cwd=out, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _get(f"{base}/v2/health/ready").get("ready"):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"Ray Serve did not start (exit {proc.poll()}):\n{log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield {"out": out, "base": base}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_ray_package_holds_an_application_serve_run_reads(ray_app):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    out = ray_app["out"]
    assert {p.name for p in out.iterdir()} >= {"app.py", "serve_config.yaml", "README.txt", "model", "package.json"}
    assert {p.name for p in (out / "model").iterdir()} == {"manifest.json", "model.onnx"}
    config = ServeDeploySchema.model_validate(yaml.safe_load((out / "serve_config.yaml").read_text()))
    dep = config.applications[0].deployments[0]
    assert config.applications[0].import_path == "app:app" and dep.num_replicas == 1 and dep.ray_actor_options.num_cpus == 1
    app = (out / "app.py").read_text()
    assert "@serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)" in app and "@serve.ingress(build_app)" in app
    assert "serve run serve_config.yaml" in (out / "README.txt").read_text()


def test_ray_autoscaling_config_is_valid_for_ray_serve(runs, tmp_path):
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from compress.api import package

    result = package(runs["onnx"], "ray", tmp_path / "auto", autoscale="1-3", threads=2, host="0.0.0.0", port=8123, cache_size=64)
    config = ServeDeploySchema.model_validate(yaml.safe_load((tmp_path / "auto" / "serve_config.yaml").read_text()))
    dep = config.applications[0].deployments[0]
    auto = dep.autoscaling_config if isinstance(dep.autoscaling_config, dict) else dep.autoscaling_config.model_dump()
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 3) and dep.ray_actor_options.num_cpus == 2
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 8123)
    app = (tmp_path / "auto" / "app.py").read_text()
    assert "serve.batch" not in app and "'cache_size': 64" in app and "'threads_per_worker': 2" in app
    compile(app, "app.py", "exec")
    assert result.start == [f"cd {tmp_path / 'auto'} && serve run serve_config.yaml"]


def test_ray_answers_like_the_artifact(ray_app, runs):
    base, x = ray_app["base"], runs["x"]
    meta = _get(f"{base}/v2/models/tiny")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    got = _post(f"{base}/v2/models/tiny/infer", _v2(x))["outputs"][0]
    want = _expected(runs["onnx"], x)
    assert got["shape"] == [3, 5] and np.allclose(np.reshape(got["data"], got["shape"]), want, atol=1e-5)
    pred = _post(f"{base}/predict", {"inputs": x[:2].tolist()})
    assert np.allclose(pred["outputs"], want[:2], atol=1e-5)
    with pytest.raises(urllib.error.HTTPError) as bad:           # compress serve's own 4xx answers, through Ray's proxy
        _post(f"{base}/v2/models/tiny/infer", _v2(x[:, :2]))
    assert bad.value.code == 422 and "shape" in json.loads(bad.value.read())["error"]


def test_compress_loadtest_measures_the_ray_application(ray_app, runs, cli, tmp_path):
    r = cli("loadtest", ray_app["base"], "--data", runs["data"], "--duration", "2s", "--concurrency", "1,4", "--json", tmp_path / "load.json")
    assert r.rc == 0, r.err
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert [row["concurrency"] for row in rows] == [1, 4]
    assert all(row["errors"] == 0 and row["throughput_rps"] > 0 for row in rows), rows
    assert rows[1].get("mean_batch", 0) > 1.0, rows          # @serve.batch gathered the concurrent requests


# ---------------------------------------------------------------- triton
def _triton_config(path: Path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb.ModelConfig()), pb


def _feed(config, pb, batch: int, seq: int = 7) -> dict[str, np.ndarray]:
    """Inputs as Triton would feed them: the names, types and dims the config declares, a batch axis in front."""
    types = {pb.TYPE_FP32: np.float32, pb.TYPE_INT64: np.int64, pb.TYPE_INT32: np.int32, pb.TYPE_FP16: np.float16}
    rng = np.random.default_rng(2)
    feed = {}
    for t in config.input:
        shape = ([batch] if config.max_batch_size else []) + [d if d > 0 else seq for d in t.dims]
        feed[t.name] = rng.standard_normal(shape).astype(types[t.data_type])
    return feed


def _check_outputs(config, pb, outs: list[np.ndarray], batch: int) -> None:
    types = {pb.TYPE_FP32: np.float32, pb.TYPE_INT64: np.int64}
    assert len(outs) == len(config.output)
    for t, o in zip(config.output, outs):
        assert o.shape[0] == batch and o.dtype == types[t.data_type]
        assert len(o.shape[1:]) == len(t.dims) and all(d in (-1, s) for d, s in zip(t.dims, o.shape[1:])), (t, o.shape)


def test_triton_repository_for_onnx_matches_triton_schema_and_runs_as_declared(runs, tmp_path):
    import onnxruntime as ort

    from compress.api import package

    result = package(runs["onnx"], "triton", tmp_path / "repo", name="tiny", max_batch_size=16, max_wait_ms=5, replicas=2, cache_size=100)
    assert result.format == "onnx" and result.start == [f"tritonserver --model-repository={tmp_path / 'repo'}"]
    config, pb = _triton_config(tmp_path / "repo" / "tiny" / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("tiny", "onnxruntime_onnx", 16)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", pb.TYPE_FP32, [3, 32, 32])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("output", pb.TYPE_FP32, [5])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb.ModelInstanceGroup.KIND_CPU)]
    assert config.response_cache.enable and config.parameters["intra_op_thread_count"].string_value == "1"
    model = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    assert model.is_file() and sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["README.txt", "package.json", "tiny"]
    feed = _feed(config, pb, batch=3)
    outs = ort.InferenceSession(str(model)).run([t.name for t in config.output], feed)
    _check_outputs(config, pb, outs, 3)
    assert np.allclose(outs[0], _expected(runs["onnx"], feed["input"]), atol=1e-5)


def test_a_torch_model_is_exported_to_onnx_for_triton_and_says_so(runs, tmp_path, cli):
    import onnxruntime as ort

    r = cli("package", runs["torch"], "--target", "triton", "--device", "cuda", "-o", tmp_path / "repo")
    assert r.rc == 0, r.err
    assert "exported it to onnx with compress's exporter" in r.err
    name = "tiny-torch"
    config, pb = _triton_config(tmp_path / "repo" / name / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert not config.parameters and not (tmp_path / "repo" / ".convert").exists()
    feed = _feed(config, pb, batch=2)
    outs = ort.InferenceSession(str(tmp_path / "repo" / name / "1" / "model.onnx")).run(None, feed)
    _check_outputs(config, pb, outs, 2)
    with torch.no_grad():
        assert np.allclose(outs[0], runs["module"](torch.from_numpy(feed["input"])).numpy(), atol=1e-4)


def test_triton_repository_for_torchscript_uses_libtorch_names(runs, tmp_path):
    from compress.api import package

    package(runs["ts"], "triton", tmp_path / "repo", name="tiny_ts")
    config, pb = _triton_config(tmp_path / "repo" / "tiny_ts" / "config.pbtxt")
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == 8
    assert [t.name for t in config.input] == ["INPUT__0"] and [t.name for t in config.output] == ["OUTPUT__0"]
    assert list(config.output[0].dims) == [5] and config.parameters["INTRA_OP_THREAD_COUNT"].string_value == "1"
    feed = _feed(config, pb, batch=2)
    module = torch.jit.load(str(tmp_path / "repo" / "tiny_ts" / "1" / "model.pt"))
    out = module(*(torch.from_numpy(feed[t.name]) for t in config.input)).numpy()
    _check_outputs(config, pb, [out], 2)
    assert np.allclose(out, _expected(runs["onnx"], feed["INPUT__0"]), atol=1e-4)


def test_triton_config_edge_cases_parse(tmp_path):
    """A fixed batch axis (max_batch_size 0, full shapes) and one value per sample (dims [1] reshaped to a scalar)."""
    from compress.triton_repo import Tensor, config_text

    text = config_text("m", "onnxruntime_onnx", 0, [Tensor("ids", "TYPE_INT64", [1, -1])], [Tensor("score", "TYPE_FP32", [1])],
                       delay_us=None, count=1, kind="KIND_GPU", cache=False, parameters={})
    (tmp_path / "a.pbtxt").write_text(text)
    config, pb = _triton_config(tmp_path / "a.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, -1] and not config.HasField("dynamic_batching")
    text = config_text("m", "onnxruntime_onnx", 4, [Tensor("x", "TYPE_FP32", [-1, 4])], [Tensor("score", "TYPE_FP32", [-1])],
                       delay_us=100, count=1, kind="KIND_CPU", cache=False, parameters={})
    (tmp_path / "b.pbtxt").write_text(text)
    config, pb = _triton_config(tmp_path / "b.pbtxt")
    assert list(config.output[0].dims) == [1] and config.output[0].HasField("reshape") and list(config.output[0].reshape.shape) == []


# ---------------------------------------------------------------- docker
def test_docker_files_are_complete_and_the_image_command_serves_the_copy(runs, tmp_path, cli):
    from cli import cli as group
    from compress.loadtest import free_port, wait_ready

    out = tmp_path / "image"
    r = cli("package", runs["onnx"], "--target", "docker", "--name", "tiny", "--replicas", "1", "--cache-size", "16", "-o", out)
    assert r.rc == 0, r.err
    docker = (out / "Dockerfile").read_text()
    lines = [line for line in docker.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim" and "EXPOSE 8000" in lines and "COPY model /model" in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines) and "/v2/health/ready" in docker
    wheel = next(out.glob("compress-*-py3-none-any.whl"))
    assert f"COPY {wheel.name} /tmp/" in lines and any("-r /tmp/requirements.txt" in line for line in lines)
    # the pins: every one exactly as in the lock, and what serving an ONNX image model needs among them
    lock = set((ROOT / "requirements" / "lock.txt").read_text().splitlines())
    pins = [line for line in (out / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins and set(pins) <= lock, set(pins) - lock
    names = {p.split("==")[0].lower() for p in pins}
    assert {"torch", "onnxruntime", "fastapi", "uvicorn", "prometheus_client", "python-multipart", "pillow", "numpy"} <= names
    assert not names & {"transformers", "ray", "tritonclient", "pytest", "matplotlib"}
    # the command: parses with compress's own CLI, and serves the packaged copy (compress from the wheel, not the checkout)
    cmd = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    assert cmd[:5] == ["compress", "serve", "/model", "--host", "0.0.0.0"] and cmd[cmd.index("--port") + 1] == "8000"
    import click

    with click.Context(group) as parent:
        group.commands["serve"].make_context("serve", cmd[2:], parent=parent)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    assert "compress.plugins" in (site / f"{wheel.name.split('-py3')[0]}.dist-info" / "entry_points.txt").read_text()
    port = free_port()
    args = [str(out / "model") if a == "/model" else "127.0.0.1" if a == "0.0.0.0" else str(port) if a == "8000" else a for a in cmd[1:]]
    env = subprocess_env() | {"PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import cli, compress, exporters; print(cli.__file__, compress.__file__, exporters.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120, proc)
        got = _post(f"http://127.0.0.1:{port}/v2/models/tiny/infer", _v2(runs["x"]))["outputs"][0]
        assert np.allclose(np.reshape(got["data"], got["shape"]), _expected(runs["onnx"], runs["x"]), atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, proc.stderr.read().decode(errors="replace")[-2000:]
    readme = (out / "README.txt").read_text()
    assert "docker build -t compress-tiny ." in readme and shlex.join(cmd) in readme


def test_a_text_model_is_packaged_with_its_tokenizer_and_serves_without_its_folder(tmp_path):
    """The transformers folder the manifest names by an absolute path is copied in (tokenizer and config, no weights)
    and named relative to the packaged copy, which then serves after the original folder is gone."""
    transformers = pytest.importorskip("transformers")
    import compress
    from compress.api import package
    from compress.artifact import save
    from compress.serving import ServedModel

    folder = tmp_path / "bert"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film"] + [f"w{i}" for i in range(100)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  num_labels=2, architectures=["BertForSequenceClassification"], id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    save(compress.load(folder, input_shape=["input_ids=1x8:int64", "attention_mask=1x8:int64"]), tmp_path / "run")
    want = ServedModel.load(tmp_path / "run", "bert")
    texts = ["a good film", "a bad bad film"]
    expected = want.run(want.encode_texts(texts))[0]

    result = package(tmp_path / "run", "docker", tmp_path / "image", name="bert")
    assert result.kind == "text" and result.format == "torch"
    hf = tmp_path / "image" / "model" / "hf"
    assert {"config.json", "tokenizer.json", "vocab.txt"} <= {p.name for p in hf.iterdir()} and not list(hf.glob("*.safetensors"))
    assert json.loads((tmp_path / "image" / "model" / "manifest.json").read_text())["arch"]["spec"] == "hf:hf"
    names = {line.split("==")[0].lower() for line in (tmp_path / "image" / "requirements.txt").read_text().splitlines() if "==" in line}
    assert {"transformers", "tokenizers"} <= names and "pillow" not in names
    folder.rename(tmp_path / "moved")
    served = ServedModel.load(tmp_path / "image" / "model", "bert")
    assert served.kind == "text" and served.labels == ("bad", "good")
    assert np.allclose(served.run(served.encode_texts(texts))[0], expected, atol=1e-5)


# ---------------------------------------------------------------- refusals: one line, exit 1, nothing written
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, cli):
    cases = [(("package", runs["onnx"], "--target", "kubernetes", "-o", tmp_path / "a"), "--target 'kubernetes' is not one compress can package for"),
             (("package", runs["onnx"], "--target", "rya", "-o", tmp_path / "a"), "Did you mean ray?"),
             (("package", tmp_path / "missing", "--target", "ray", "-o", tmp_path / "a"), "missing does not exist"),
             (("package", runs["root"], "--target", "ray", "-o", tmp_path / "a"), "is not a compress run directory"),
             (("package", runs["onnx"], "--target", "ray", "--replicas", "2", "--autoscale", "1-4", "-o", tmp_path / "a"), "contradict"),
             (("package", runs["onnx"], "--target", "triton", "--name", "../up", "-o", tmp_path / "a"), "--name '../up' may hold only")]
    for args, message in cases:
        r = cli(*args)
        assert r.rc == 1 and len(r.err_lines) == 1 and message in r.err, (args, r.err)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))


def test_an_existing_out_needs_force_and_a_failure_leaves_it_intact(runs, tmp_path, cli, monkeypatch):
    out = tmp_path / "out"
    assert cli("package", runs["onnx"], "--target", "triton", "-o", out).rc == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = cli("package", runs["onnx"], "--target", "ray", "-o", out)
    assert r.rc == 1 and len(r.err_lines) == 1 and "already exists" in r.err and "--force" in r.err
    import compress.packaging as pkg

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pkg, "requirements", broken)
    r = cli("package", runs["onnx"], "--target", "docker", "-o", out, "--force")
    assert r.rc == 1 and len(r.err_lines) == 1 and "no space left" in r.err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    r = cli("package", runs["onnx"], "--target", "ray", "-o", out, "--force")
    assert r.rc == 0 and (out / "app.py").is_file() and not (out / "tiny-onnx").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = cli("package", runs["onnx"], "--target", "ray", "-o", tmp_path / "mine", "--force")
    assert r.rc == 1 and "compress did not write" in r.err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_tensorrt_and_pt2_say_what_to_do(runs, tmp_path, cli):
    """Formats a target cannot take: one line naming what can (made by editing a copy's manifest: no GPU needed)."""
    from compress.manifest import Manifest

    for fmt, target, message in (("tensorrt", "ray", "a TensorRT engine needs a GPU"), ("pt2", "triton", "Triton cannot load a pt2 model")):
        run = tmp_path / fmt
        run.mkdir()
        (run / "model.bin").write_bytes(b"not a model")
        Manifest(format=fmt, model_file="model.bin", source="x", input_spec=Manifest.read(runs["onnx"]).input_spec).write(run)
        r = cli("package", run, "--target", target, "-o", tmp_path / f"out-{fmt}")
        assert r.rc == 1 and len(r.err_lines) == 1 and message in r.err, r.err
        assert not (tmp_path / f"out-{fmt}").exists()
