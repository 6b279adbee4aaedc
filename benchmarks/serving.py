"""Does compress serve hold what issue #19 asks, on this machine, against the servers users would otherwise write?

    python benchmarks/serving.py [--quick] [--models fmnist,minilm] [--duration 8] [--out benchmarks/results/serving]

Run it on a quiet machine (nothing else busy: two busy processes on 2 cores make onnxruntime 10-20x slower). Per model
— the int8 Fashion-MNIST ResNet (onnxruntime static Q/DQ, calibrated on 256 images) and MiniLM-L6 (all-MiniLM-L6-v2,
itself a distilled model) with onnxruntime dynamic int8 — every server is loaded by the same closed-loop client
(compress.loadtest.measure) with the same real requests, one after another:

1. ``compress loadtest RUN_DIR``: the sweep of compress serve configurations and the one it recommends;
2. the tutorial server: FastAPI + onnxruntime in one uvicorn process, a plain ``def`` endpoint, a default
   InferenceSession (all cores) — what the FastAPI/onnxruntime tutorials show;
3. a default Ray Serve deployment of the same handler (``@serve.deployment`` + ``@serve.ingress``, one replica);
4. the response cache: the recommended configuration under a Zipf(1.1) request mix, with and without --cache-size;
5. the overhead at concurrency 1: compress serve's p50 (1 worker, 1 thread, one request after another from a
   keep-alive client) minus the model's own p50 on the same inputs (onnxruntime in this process, 1 thread), timed in
   alternating blocks with a third: a bare ASGI app on the same uvicorn, the floor any Python server has here.

Writes OUT/results.json and OUT/RESULTS.md with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "benchmarks" / ".cache" / "serving"

PIPELINES = {
    "fmnist": ("fashion-mnist", {"model": {"source": "zoo:fmnist-resnet"}, "data": "fashion-mnist",
                                 "stages": [{"export": {"target": "onnx"}}, {"quantize": {"method": "static", "backend": "onnxruntime", "samples": 256}}]}),
    "minilm": ("rotten-tomatoes", {"model": {"source": "zoo:minilm-l6", "input_shape": ["input_ids=1x32:int64", "attention_mask=1x32:int64"]},
                                   "data": "rotten-tomatoes",
                                   "stages": [{"export": {"target": "onnx", "dynamic_axes": ["batch", "sequence"]}}, {"quantize": {"method": "dynamic", "backend": "onnxruntime"}}]}),
}


# ---------------------------------------------------------------- the peers' server (one handler, two engines)
def peer_app(run_dir: str, threads: int | None = None):
    """The tutorial recipe: FastAPI, an onnxruntime session, JSON in and out. It speaks the same routes as compress serve
    so the same client loads both."""
    import onnxruntime as ort
    from fastapi import Body, FastAPI

    from compress.artifact import load_run_dir as load_artifact
    from compress.data import tokenizer_for

    artifact = load_artifact(Path(run_dir))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(artifact.path), opts, providers=["CPUExecutionProvider"])
    tokenizer = tokenizer_for(artifact)
    name = Path(run_dir).name
    ins = sess.get_inputs()
    types = {"tensor(float)": ("FP32", np.float32), "tensor(int64)": ("INT64", np.int64)}
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.get("/v2/models/{model}")
    def metadata(model: str):
        return {"name": name, "parameters": {"kind": "text" if tokenizer is not None else "tensor"},
                "inputs": [{"name": i.name, "datatype": types[i.type][0], "shape": [d if isinstance(d, int) else -1 for d in i.shape]} for i in ins]}

    @app.post("/v2/models/{model}/infer")
    def infer(model: str, body: dict = Body(...)):
        feed = {t["name"]: np.asarray(t["data"], dtype=types[i.type][1]).reshape(t["shape"]) for t, i in zip(body["inputs"], ins)}
        out = sess.run(None, feed)[0]
        return {"model_name": name, "outputs": [{"name": "output0", "datatype": "FP32", "shape": list(out.shape), "data": out.ravel().tolist()}]}

    @app.post("/predict")
    def predict(body: dict = Body(...)):
        enc = tokenizer([body["text"]], return_tensors="np")
        out = sess.run(None, {i.name: enc[i.name].astype(np.int64) for i in ins})[0]
        return {"outputs": out[0].tolist()}

    return app


def bare_app(run_dir: str):
    """The floor for the overhead target: as little server as Python has — a raw ASGI callable on the same uvicorn
    (httptools, uvloop), no framework, no checks, no metrics; the tokenizer's Rust engine, an onnxruntime session on 1
    thread, orjson. It answers the same two requests compress serve's overhead is timed on."""
    import onnxruntime as ort
    import orjson
    from tokenizers import Tokenizer

    from compress.artifact import load_run_dir as load_artifact
    from compress.data import tokenizer_for

    artifact = load_artifact(Path(run_dir))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(artifact.path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    wrapper = tokenizer_for(artifact)
    tok = Tokenizer.from_str(wrapper.backend_tokenizer.to_str()) if wrapper is not None else None
    if tok is not None:
        tok.no_padding()
    types = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}

    def answer(path: str, body: bytes) -> bytes:
        req = orjson.loads(body)
        if path == "/predict":
            e = tok.encode(req["text"])
            enc = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            feed = {n: np.array([enc[n]], np.int64) for n in names}
        else:
            feed = {n: np.asarray(t["data"], dtype=types[t["datatype"]]).reshape(t["shape"]) for n, t in zip(names, req["inputs"])}
        out = sess.run(None, feed)[0]
        return orjson.dumps({"outputs": out.ravel().tolist()})

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        out = answer(scope["path"], body) if scope["method"] == "POST" else b'{"ready":true}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    return app


def run_peer(kind: str, run_dir: str, port: int) -> None:
    import uvicorn

    if kind in ("tutorial", "bare"):
        app = peer_app(run_dir) if kind == "tutorial" else bare_app(run_dir)
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return
    import ray
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the documented pattern: a deployment class whose methods are the FastAPI routes; they call the same handlers
    from fastapi import FastAPI

    outer = FastAPI()

    @serve.deployment
    @serve.ingress(outer)
    class Peer:
        def __init__(self, path: str):
            self.inner = peer_app(path)
            self.routes = {(r.path, tuple(sorted(r.methods))): r.endpoint for r in self.inner.routes if hasattr(r, "methods")}

        def _call(self, path, method, *args, **kw):
            return self.routes[(path, (method,))](*args, **kw)

        @outer.get("/v2/health/ready")
        def ready(self):
            return {"ready": True}

        @outer.get("/v2/models/{model}")
        def metadata(self, model: str):
            return self._call("/v2/models/{model}", "GET", model)

        @outer.post("/v2/models/{model}/infer")
        def infer(self, model: str, body: dict):
            return self._call("/v2/models/{model}/infer", "POST", model, body)

        @outer.post("/predict")
        def predict(self, body: dict):
            return self._call("/predict", "POST", body)

    serve.run(Peer.bind(run_dir), route_prefix="/", blocking=False)
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------- running it
def artifact(key: str) -> Path:
    from compress import pipeline

    out = CACHE / f"{key}-int8"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        pipeline.run(PIPELINES[key][1], out, force=True)
    return out


def start_peer(kind: str, run_dir: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, __file__, "--peer", kind, "--run-dir", str(run_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if kind_is_ray(proc):
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def kind_is_ray(proc) -> bool:
    return "ray" in " ".join(map(str, proc.args))


def measure_peer(kind: str, run_dir: Path, settings, label: str) -> list[dict]:
    from compress.loadtest import LoadSettings, free_port, measure, wait_ready

    port = free_port()
    proc = start_peer(kind, run_dir, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300.0, proc)
        return measure(f"http://127.0.0.1:{port}", LoadSettings(**{**settings.__dict__, "name": run_dir.name}), label=label)
    finally:
        stop(proc)


def measure_compress(run_dir: Path, config: dict, settings, label: str) -> list[dict]:
    from compress.loadtest import LoadSettings, free_port, measure, start_server, stop_server, wait_ready

    port = free_port()
    proc = start_server(str(run_dir), config, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300.0, proc)
        return measure(f"http://127.0.0.1:{port}", LoadSettings(**{**settings.__dict__, "name": None}), label=label)
    finally:
        stop_server(proc)


def model_feeds(run_dir: Path, data: str, n: int = 300):
    """An onnxruntime session on 1 thread and the batch-1 feeds of the same inputs the load sends."""
    import onnxruntime as ort

    from compress.artifact import load_run_dir as load_artifact
    from compress.data import batches, load_data, tokenizer_for

    art = load_artifact(Path(run_dir))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    bundle = load_data(data)
    tok = tokenizer_for(art)
    feeds = []
    if tok is not None:
        for i in range(min(n, len(bundle.eval))):
            enc = tok([bundle.eval[i][0]], return_tensors="np")
            feeds.append({x.name: enc[x.name].astype(np.int64) for x in sess.get_inputs()})
    else:
        for inputs, _ in batches(bundle.eval, art.input_spec, batch_size=1, limit=n):
            feeds.append({s.name: x.numpy() if hasattr(x, "numpy") else x for s, x in zip(art.input_spec, inputs)})
    return sess, feeds


class RawClient:
    """One keep-alive HTTP/1.1 connection on a plain socket: the least client Python has (http.client's header parsing
    alone costs about 0.25 ms a request here, which is the client's, not the server's)."""

    def __init__(self, port: int):
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes) -> float:
        """The round trip in ms."""
        req = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body
        t0 = time.perf_counter()
        self.sock.sendall(req)
        buf = b""
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                length = next(int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:]) if k.strip().lower() == b"content-length")
                if len(rest) >= length:
                    break
        took = (time.perf_counter() - t0) * 1000
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path} answered {head.splitlines()[0].decode()}")
        return took

    def close(self) -> None:
        self.sock.close()


def overhead(run_dir: Path, data: str, rounds: int = 15, block: int = 40) -> dict:
    """What compress serve adds at one request in flight: its p50 (1 worker, 1 thread; a keep-alive client sending one
    request after another, as little client as Python has) against the model's own p50 (onnxruntime in this process,
    1 thread, the same inputs), timed in alternating blocks so both see the same machine: measured apart, a 6 ms model's
    p50 drifts by more than the 1 ms the target allows. A third block times the floor, a bare ASGI app on the same
    uvicorn (:func:`bare_app`): what any Python server adds on this machine, so the part that is compress's own shows."""
    from compress.loadtest import LoadSettings, only_model, build_requests, free_port, start_server, stop_server, wait_ready

    sess, feeds = model_feeds(run_dir, data)
    port, bare_port = free_port(), free_port()
    proc = start_server(str(run_dir), {"workers": 1, "threads_per_worker": 1}, port)
    bare = start_peer("bare", run_dir, bare_port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 300.0, proc)
        wait_ready(f"http://127.0.0.1:{bare_port}", 300.0, bare)
        reqs = build_requests(base, LoadSettings(data=data, name=only_model(base)))
        clients = {"served": RawClient(port), "bare": RawClient(bare_port)}
        times: dict[str, list[float]] = {"served": [], "bare": [], "model": []}
        bodies = reqs.bodies

        def model(j: int) -> float:
            t0 = time.perf_counter()
            sess.run(None, feeds[j % len(feeds)])
            return (time.perf_counter() - t0) * 1000

        for i in range(block):               # warm all three
            clients["served"].post(reqs.path, bodies[i % len(bodies)])
            clients["bare"].post(reqs.path, bodies[i % len(bodies)])
            model(i)
        for r in range(rounds):
            k = r * block
            for name, c in clients.items():
                times[name] += [c.post(reqs.path, bodies[(k + j) % len(bodies)]) for j in range(block)]
            times["model"] += [model(k + j) for j in range(block)]
        for c in clients.values():
            c.close()
    finally:
        stop_server(proc)
        stop(bare)
    return {"served_p50_ms": float(np.median(times["served"])), "bare_p50_ms": float(np.median(times["bare"])),
            "model_p50_ms": float(np.median(times["model"])), "requests": len(times["served"]),
            "client": "a plain-socket keep-alive HTTP/1.1 client, one request after another", "rounds": rounds, "block": block}


def _ceiling_worker(run_dir: str, data: str, seconds: float, queue) -> None:
    sess, feeds = model_feeds(Path(run_dir), data)
    for f in feeds[:20]:
        sess.run(None, f)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, feeds[n % len(feeds)])
        n += 1
    queue.put(n / (time.perf_counter() - t0))


def ceiling(run_dir: Path, data: str, seconds: float = 6.0) -> dict:
    """The most this machine runs of the model with no server and no client: one process per core, one onnxruntime
    thread each, the same batch-1 inputs back to back, all started together. No server can hold more requests a second
    at batch 1; a throughput target above it cannot be met here by serving, only by a faster model or more cores."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(str(run_dir), data, seconds, queue)) for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"processes": len(procs), "throughput_rps": float(sum(rates)), "seconds": seconds}


def at_latency(mine: list[dict], theirs: list[dict]) -> tuple[float, dict, dict] | None:
    """The throughput ratio at an equal or lower p99: for each of ``mine``'s levels, the most ``theirs`` holds at a p99
    no higher than that level's; the level where the ratio is best. None where ``theirs`` never gets that low."""
    out = None
    for m in (r for r in mine if not r["errors"]):
        fits = [t for t in theirs if not t["errors"] and t["p99_ms"] <= m["p99_ms"]]
        if fits:
            t = max(fits, key=lambda r: r["throughput_rps"])
            ratio = m["throughput_rps"] / t["throughput_rps"]
            if out is None or ratio > out[0]:
                out = (ratio, m, t)
    return out


def best(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["errors"]] or rows
    return max(ok, key=lambda r: r["throughput_rps"])


def run_model(key: str, settings, quick: bool) -> dict:
    from compress.loadtest import LoadSettings, sweep

    data = PIPELINES[key][0]
    run_dir = artifact(key)
    print(f"[{key}] sweep of compress serve configurations", flush=True)
    swept = sweep(str(run_dir), settings)
    rec = swept["recommended"]
    rec_rows = [r for r in swept["rows"] if r["config"] == rec["config"]]
    print(f"[{key}] recommended: {rec['description']}; tutorial server", flush=True)
    tutorial = measure_peer("tutorial", run_dir, settings, "FastAPI + onnxruntime (tutorial)")
    print(f"[{key}] Ray Serve (default deployment)", flush=True)
    try:
        ray_rows = measure_peer("ray", run_dir, settings, "Ray Serve (default deployment)")
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
        ray_rows = [{"server": "Ray Serve (default deployment)", "failed": f"{type(exc).__name__}: {exc}"}]
    print(f"[{key}] cache under a Zipf(1.1) mix", flush=True)
    zipf = LoadSettings(**{**settings.__dict__, "zipf": 1.1})
    no_cache_cfg = {k: v for k, v in rec["config"].items() if k != "cache_size"}
    without = measure_compress(run_dir, no_cache_cfg, zipf, "recommended, no cache, zipf 1.1")
    with_cache = measure_compress(run_dir, no_cache_cfg | {"cache_size": 4096}, zipf, "recommended + cache 4096, zipf 1.1")
    print(f"[{key}] overhead at concurrency 1", flush=True)
    one = LoadSettings(**{**settings.__dict__, "concurrency": (1,)})
    c1 = measure_compress(run_dir, {"workers": 1, "threads_per_worker": 1}, one, "1 worker × 1 thread, concurrency 1")[0]
    added = overhead(run_dir, data)
    own = added["model_p50_ms"]
    print(f"[{key}] the ceiling: the model alone, one process per core", flush=True)
    top = ceiling(run_dir, data)

    top_c, top_t = best(rec_rows), best(tutorial)
    ray_ok = [r for r in ray_rows if "failed" not in r]
    top_r = best(ray_ok) if ray_ok else None
    cache_ratio = best(with_cache)["throughput_rps"] / best(without)["throughput_rps"]
    slo = at_latency(rec_rows, tutorial)
    verdicts = [
        {"target": "≥ 2× the tutorial server's throughput at an equal or lower p99",
         "measured": ((f"{slo[1]['throughput_rps']:.0f} req/s at p99 {slo[1]['p99_ms']:.1f} ms ({slo[1]['concurrency']} in flight) vs the most the "
                       f"tutorial holds at a p99 no higher, {slo[2]['throughput_rps']:.0f} req/s (p99 {slo[2]['p99_ms']:.1f} ms, "
                       f"{slo[2]['concurrency']} in flight): {slo[0]:.2f}×; peaks {top_c['throughput_rps']:.0f} vs "
                       f"{top_t['throughput_rps']:.0f} req/s ({top_c['throughput_rps'] / top_t['throughput_rps']:.2f}×); the ceiling, the model "
                       f"alone in {top['processes']} processes with no server and no client, runs {top['throughput_rps']:.0f} req/s "
                       f"({top['throughput_rps'] / slo[2]['throughput_rps']:.2f}× that tutorial level)") if slo else
                      f"the tutorial never reaches compress's p99; peaks {top_c['throughput_rps']:.0f} vs {top_t['throughput_rps']:.0f} req/s"),
         "passed": slo is not None and slo[0] >= 2},
        {"target": "≥ a default Ray Serve deployment's throughput",
         "measured": (f"{top_c['throughput_rps']:.0f} vs {top_r['throughput_rps']:.0f} req/s ({top_c['throughput_rps'] / top_r['throughput_rps']:.2f}×)"
                      if top_r else ray_rows[0].get("failed")),
         "passed": bool(top_r) and top_c["throughput_rps"] >= top_r["throughput_rps"]},
        {"target": "the cache raises throughput ≥ 3× under Zipf(1.1)",
         "measured": f"{cache_ratio:.2f}× (hit rate {best(with_cache).get('cache_hit_rate', 0):.0%})", "passed": cache_ratio >= 3},
        {"target": "≤ 1 ms over the model's own p50 at concurrency 1",
         "measured": f"{added['served_p50_ms']:.2f} ms served vs {own:.2f} ms model, timed in alternating blocks: "
                     f"+{added['served_p50_ms'] - own:.2f} ms; the floor, a bare ASGI app on the same uvicorn: +{added['bare_p50_ms'] - own:.2f} ms, "
                     f"so compress's own share is {added['served_p50_ms'] - added['bare_p50_ms']:+.2f} ms (the load client's concurrency-1 row: {c1['p50_ms']:.2f} ms)",
         "passed": added["served_p50_ms"] - own <= 1.0},
    ]
    return {"model": key, "data": data, "artifact": str(run_dir.relative_to(ROOT)), "recommended": rec, "sweep": swept["rows"],
            "tutorial": tutorial, "ray": ray_rows, "zipf_without_cache": without, "zipf_with_cache": with_cache,
            "concurrency1": c1, "model_p50_ms": own, "overhead": added, "ceiling": top, "verdicts": verdicts}


def markdown(results: dict) -> str:
    from compress.loadtest import COLUMNS, table_rows

    m = results["machine"]
    lines = ["# compress serve vs the servers users would write", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (VNNI: {m['vnni']}), onnxruntime {m['onnxruntime']}; "
             f"{results['duration_s']:g} s per level, concurrency {', '.join(map(str, results['concurrency']))}; "
             f"client and servers on the same machine (loopback). Generated by benchmarks/serving.py.", ""]
    for r in results["models"]:
        lines += [f"## {r['model']} (`{r['artifact']}`, data {r['data']})", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {v['target']} | {v['measured']} | {'✅' if v['passed'] else '❌'} |" for v in r["verdicts"]]
        lines += ["", f"Recommended: `{r['recommended']['command']}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        rows = r["sweep"] + r["tutorial"] + [x for x in r["ray"] if "failed" not in x] + r["zipf_without_cache"] + r["zipf_with_cache"] + [r["concurrency1"]]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows({"rows": rows})]
        lines += [f"\nFailed: {x['server']}: {x['failed']}" for x in r["ray"] if "failed" in x]
        lines.append(f"\nThe model alone (onnxruntime, 1 thread, batch 1, same inputs, timed in blocks alternating with "
                     f"{r['overhead']['requests']} served requests): p50 {r['model_p50_ms']:.2f} ms.\n")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="fmnist,minilm")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--quick", action="store_true", help="2 s per level, concurrency 1,16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving"))
    ap.add_argument("--peer", choices=("tutorial", "bare", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        run_peer(args.peer, args.run_dir, args.port)
        return 0
    from benchmarks.harness import machine
    from compress.loadtest import LoadSettings

    if args.quick:
        args.duration, args.concurrency = 2.0, "1,16"
    settings = LoadSettings.parse(data="x", concurrency=args.concurrency, duration=f"{args.duration}s")
    results = {"machine": machine(), "duration_s": args.duration, "concurrency": list(settings.concurrency), "models": []}
    started = time.time()
    for key in args.models.split(","):
        s = LoadSettings(**{**settings.__dict__, "data": PIPELINES[key][0]})
        results["models"].append(run_model(key, s, args.quick))
    results["wall_s"] = round(time.time() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
