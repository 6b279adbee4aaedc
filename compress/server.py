"""``compress serve``: an artifact behind FastAPI + uvicorn, speaking the Open Inference Protocol v2 (KServe, Triton)
plus ``POST /predict`` for raw text and image files, with optional dynamic batching, a response cache keyed on the
model's inputs, Prometheus metrics (summed over worker processes) and a log of served outputs for ``compress drift``.

Defaults follow what measures best for batch-1 CPU serving: one process per core, one thread each, no batching.
Bad requests get a 4xx JSON ``{"error": ...}``, a model failure a 500; neither takes a worker down.
"""
# (no "from __future__ import annotations": FastAPI reads the handlers' annotations, e.g. Request, as objects)
import asyncio
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import CompressError, require

try:            # orjson (in the serve extra) parses a 784-float request in 0.03 ms where json takes 0.27 ms
    import orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    orjson = None
from .serving import V2_DTYPES, BadRequest, Batcher, OutputLog, ResponseCache, ServedModel, cache_key, pad_concat, unpadded

log = logging.getLogger("compress.server")
CONFIG_ENV = "COMPRESS_SERVE_CONFIG"


@dataclass
class ServeConfig:
    source: str
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None               # default: one per core
    threads_per_worker: int = 1
    max_batch_size: int = 1                  # 1: no batching
    max_wait_ms: float = 2.0
    cache_size: int = 0
    max_request_bytes: int = 8 << 20
    log_dir: str | None = None
    log_sample: float = 1.0
    model_args: dict = field(default_factory=dict)   # the model options as the user gave them (see ModelSpec.parse)

    def __post_init__(self):
        checks = [(self.threads_per_worker >= 1, "--threads-per-worker must be at least 1"), (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
                  (self.max_wait_ms >= 0, "--max-wait-ms must not be negative"), (self.cache_size >= 0, "--cache-size must not be negative"),
                  (self.max_request_bytes > 0, "--max-request-bytes must be positive"), (0 < self.log_sample <= 1, "--log-sample must be in (0, 1]"),
                  (self.workers is None or self.workers >= 1, "--workers must be at least 1"), (0 <= self.port < 65536, "--port must be in 0..65535")]
        for ok, what in checks:
            if not ok:
                raise CompressError(what, "See compress serve --help")

    @property
    def n_workers(self) -> int:
        return self.workers or (os.cpu_count() or 1)


def load_model(config: ServeConfig) -> ServedModel:
    from .sources import ModelSpec

    a = config.model_args
    spec = ModelSpec.parse(config.source, a.get("arch"), a.get("arch_args"), a.get("input_shape", ()), a.get("example_input"),
                           a.get("static_shapes", False), a.get("trust_pickle", False), not a.get("no_verify", False), a.get("allow_nonfinite", False))
    return ServedModel.load(config.source, config.name, config.threads_per_worker, spec)


# ---------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics; with PROMETHEUS_MULTIPROC_DIR set (``serve`` sets it) they are summed over worker processes."""

    def __init__(self):
        prom = require("prometheus_client", "serve", "serving metrics")
        self.prom = prom
        # summed over processes only when prometheus_client was first imported with PROMETHEUS_MULTIPROC_DIR set
        self.multiprocess = prom.values.ValueClass.__name__ == "MmapedValue"
        self.registry = prom.CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        fast = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
        self.requests = prom.Counter("compress_requests_total", "Requests answered", ["endpoint", "code"], registry=reg)
        self.latency = prom.Histogram("compress_request_duration_seconds", "Time to answer a request", ["endpoint"], buckets=fast, registry=reg)
        self.inference = prom.Histogram("compress_inference_duration_seconds", "Time the model took per batch", buckets=fast, registry=reg)
        self.batch = prom.Histogram("compress_batch_size", "Samples per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=reg)
        # level: "request" (a whole repeated request answered from its bytes) or "sample" (one input's outputs)
        self.cache_hits = prom.Counter("compress_cache_hits_total", "Answers from the response cache", ["level"], registry=reg)
        self.cache_misses = prom.Counter("compress_cache_misses_total", "Samples the cache did not hold", ["level"], registry=reg)
        self.errors = prom.Counter("compress_errors_total", "Requests answered with an error", ["code"], registry=reg)

    def exposition(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = self.prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return self.prom.generate_latest(registry)
        return self.prom.generate_latest(self.registry)


# ---------------------------------------------------------------- the application
class Engine:
    """Answers for checked input arrays, through the cache and the batcher when they are on."""

    def __init__(self, model: ServedModel, config: ServeConfig, metrics: Metrics, batcher=Batcher):
        self.model, self.config, self.metrics = model, config, metrics
        self.cache = ResponseCache(config.cache_size)
        self.batcher = batcher(model, config.max_batch_size, config.max_wait_ms, self._on_batch) if config.max_batch_size > 1 else None
        self.log = OutputLog(config.log_dir, model.name, config.log_sample) if config.log_dir else None

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch.observe(n)
        self.metrics.inference.observe(seconds)

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        started = time.perf_counter()
        outs = self.model.run(arrays)
        self._on_batch(arrays[0].shape[0], time.perf_counter() - started)
        return outs

    async def outputs(self, arrays: list[np.ndarray], request_id: str | None = None) -> list[np.ndarray]:
        n = arrays[0].shape[0]
        if not self.cache.size and self.batcher is None:
            outs = self._run(arrays)
        else:
            samples = [unpadded(self.model, arrays, i) for i in range(n)]
            keys = [cache_key(s, 0) for s in samples] if self.cache.size else [None] * n
            got = [self.cache.get(k) if k is not None else None for k in keys]
            hits = sum(g is not None for g in got)
            if self.cache.size:
                self.metrics.cache_hits.labels("sample").inc(hits)
                self.metrics.cache_misses.labels("sample").inc(n - hits)
            todo = [i for i in range(n) if got[i] is None]
            if todo and self.batcher is not None:
                done = await asyncio.gather(*(self.batcher.submit(samples[i]) for i in todo))
            elif todo:
                outs = self._run(pad_concat(self.model, [samples[i] for i in todo]))
                done = [[o[k:k + 1] for o in outs] for k in range(len(todo))]
            else:
                done = []
            for i, d in zip(todo, done):
                got[i] = d
                if keys[i] is not None:
                    self.cache.put(keys[i], d)
            outs = [_stack([g[j] for g in got], arrays[0].shape[1] if self.model.kind == "text" else None) for j in range(len(got[0]))]
        if self.log is not None:
            self.log.write(self.model, outs, arrays, request_id)
        return outs


def _stack(parts: list[np.ndarray], tokens: int | None) -> np.ndarray:
    """Samples' outputs back into one batch; per-token outputs fitted to the request's sequence length."""
    if tokens is not None and parts[0].ndim >= 3:
        parts = [np.pad(p[:, :tokens], [(0, 0), (0, max(0, tokens - p.shape[1]))] + [(0, 0)] * (p.ndim - 2)) for p in parts]
    return np.concatenate(parts)


def create_app(config: ServeConfig, model: ServedModel | None = None, batcher=Batcher):
    """The FastAPI application; ``model`` is loaded at start-up unless given. ``batcher``: a class with
    :class:`~compress.serving.Batcher`'s interface (Ray Serve's app passes one built on ``@serve.batch``)."""
    fastapi = require("fastapi", "serve", "compress serve")
    from contextlib import asynccontextmanager

    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    state: dict = {}
    logging.getLogger("python_multipart").setLevel(logging.ERROR)      # a broken upload is answered with 400, not logged

    @asynccontextmanager
    async def lifespan(app):
        state["model"] = model or load_model(config)
        state["metrics"] = Metrics()
        state["engine"] = engine = Engine(state["model"], config, state["metrics"], batcher)
        if engine.batcher is not None:
            engine.batcher.start()
        try:
            yield
        finally:
            if engine.batcher is not None:
                await engine.batcher.stop()
            if engine.log is not None:
                engine.log.close()

    app = fastapi.FastAPI(title="compress serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=config.max_request_bytes)

    def error(status: int, what: str) -> JSONResponse:
        return JSONResponse({"error": what}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        what = {404: f"no such endpoint: {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(exc.status_code, what.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return error(422, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")

    @app.exception_handler(Exception)
    async def _failed(request, exc: Exception):
        log.warning("the model failed on a request: %s: %s", type(exc).__name__, exc)
        return error(500, f"the model failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    if config.cache_size and not config.log_dir:
        # whole answers keyed on the request's bytes, answered in front of the framework: a repeated request skips the
        # routing and even the JSON parsing (off while --log-dir keeps every served sample; the engine's cache, keyed
        # on the model's inputs, still answers those)
        app.add_middleware(_RequestCache, size=config.cache_size, limit=config.max_request_bytes, state=state)
    app.add_middleware(_Counted, state=state)

    def served(name: str) -> ServedModel:
        m = state["model"]
        if name != m.name:
            raise BadRequest(f"no model named '{name}' here (this server serves '{m.name}')", 404)
        return m

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": "engine" in state}

    @app.get("/v2")
    async def server_metadata():
        from .version import __version__

        return {"name": "compress", "version": __version__, "extensions": []}

    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": state["model"].name, "version": "1", "state": "READY"}]

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "1"):
        return served(name).metadata()

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        served(name)
        return {"name": name, "ready": True}

    async def answered(compute) -> Response:
        return Response(_dumps(await compute()), media_type="application/json")

    async def infer(request: Request):
        m = served(request.path_params["name"])

        async def compute():
            body = await _json(request)
            arrays = m.check(_v2_inputs(m, body))
            outs = await _outputs(state["engine"], arrays, _request_id(request, body))
            wanted = [o.get("name") for o in body.get("outputs") or [] if isinstance(o, dict)]
            unknown = [w for w in wanted if w not in m.output_names]
            if unknown:
                raise BadRequest(f"the model has no output named {unknown[0]!r} (it has: {', '.join(m.output_names)})")
            tensors = [{"name": n, "datatype": m.output_dtypes[j], "shape": list(o.shape), "data": o.ravel().tolist()}
                       for j, (n, o) in enumerate(zip(m.output_names, outs)) if not wanted or n in wanted]
            return {"model_name": m.name, "model_version": "1", **({"id": body["id"]} if "id" in body else {}), "outputs": tensors}

        return await answered(compute)

    async def predict(request: Request):
        m = state["model"]
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as exc:  # noqa: BLE001 - starlette raises several kinds for a broken form
                raise BadRequest(f"the multipart body cannot be read ({exc})", 400) from None
            upload = form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise BadRequest("the multipart body has no file field named 'file'", how="Send the image as -F file=@photo.jpg")
            arrays = [m.decode_image(await upload.read())]
            return JSONResponse((await _answers(m, arrays, _request_id(request)))[0])

        async def compute():
            body = await _json(request)
            rid = _request_id(request)
            if "text" in body:
                return (await _answers(m, m.encode_texts([body["text"]]), rid))[0]
            if "texts" in body:
                if not isinstance(body["texts"], list):
                    raise BadRequest("'texts' must be a list of strings")
                answers = await _answers(m, m.encode_texts(body["texts"]), rid)
            elif "inputs" in body:
                answers = await _answers(m, _raw_inputs(m, body["inputs"]), rid)
            else:
                raise BadRequest("the body needs 'text', 'texts' or 'inputs' (or send an image as multipart field 'file')")
            return {key: [a.get(key) for a in answers] for key in answers[0]}

        return await answered(compute)

    async def _answers(m: ServedModel, arrays, request_id: str | None = None) -> list[dict]:
        arrays = m.check(arrays)
        return m.answer(await _outputs(state["engine"], arrays, request_id), arrays)

    @app.get("/metrics")
    async def metrics():
        return Response(state["metrics"].exposition(), media_type="text/plain; version=0.0.4")

    # the answering routes as plain Starlette routes, first in the table: FastAPI's parameter solving and the route
    # scan cost about 0.1 ms a request (measured), and these take the request as it comes
    from starlette.routing import Route

    for path, endpoint in (("/v2/models/{name}/versions/{version}/infer", infer), ("/v2/models/{name}/infer", infer), ("/predict", predict)):
        app.router.routes.insert(0, Route(path, endpoint, methods=["POST"]))
    return app


async def _outputs(engine: Engine, arrays, request_id: str | None = None):
    """The engine's outputs; a failure of the model is the server's (500), said in one line, and the next request is served."""
    try:
        outs = await engine.outputs(arrays, request_id)
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the runtime raises
        log.warning("the model failed on a request: %s: %s", type(exc).__name__, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BadRequest(f"the model failed: {type(exc).__name__}: {first}"[:500], 500) from None
    if not all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f"):
        raise BadRequest("the model's output holds NaN or infinity for this input (JSON cannot carry them)", 500)
    return outs


def _request_id(request, body: dict | None = None) -> str | None:
    """The id a client gave its request: the v2 body's "id", else an X-Request-ID header (kept in the served log)."""
    given = (body or {}).get("id")
    return given if isinstance(given, str) else request.headers.get("x-request-id")


def _dumps(obj) -> bytes:
    return orjson.dumps(obj) if orjson is not None else json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def _json(request) -> dict:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if orjson is not None else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc})", 400) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", 400)
    return body


def _v2_inputs(m: ServedModel, body: dict) -> list[np.ndarray]:
    given = body.get("inputs")
    if not isinstance(given, list) or not given:
        raise BadRequest("the request has no 'inputs' list (Open Inference Protocol v2: {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]})")
    by_name = {}
    for t in given:
        if not isinstance(t, dict):
            raise BadRequest("each input must be an object with 'name', 'shape', 'datatype' and 'data'")
        missing = [k for k in ("name", "shape", "datatype", "data") if k not in t]
        if missing:
            raise BadRequest(f"input {t.get('name', '?')!r} is missing {', '.join(repr(k) for k in missing)}")
        dtype = V2_DTYPES.get(str(t["datatype"]).upper())
        if dtype is None:
            raise BadRequest(f"input {t['name']!r} has datatype {t['datatype']!r}, which this model cannot take "
                             f"(one of {', '.join(V2_DTYPES)}; for text send token ids, or POST /predict with {{\"text\": ...}})")
        try:
            shape = [int(d) for d in t["shape"]]
            a = np.asarray(t["data"], dtype=dtype)
            a = a.reshape(shape)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"input {t['name']!r}: data does not fit shape {t['shape']} as {t['datatype']} ({exc})") from None
        by_name[str(t["name"])] = (a, str(t["datatype"]).upper())
    names = m.input_names
    by_name = _typed(m, by_name)
    if set(by_name) == set(names):
        return [by_name[n] for n in names]
    unknown = [n for n in by_name if n not in names]
    if unknown and len(by_name) == len(names) and len(names) == 1:
        return list(by_name.values())               # one input: its name does not matter
    raise BadRequest(f"the model's inputs are {', '.join(names)}; the request named {', '.join(by_name)}")


def _typed(m: ServedModel, given: dict) -> dict:
    """The arrays, refusing a datatype other than the model's input's (as Triton does)."""
    from .serving import NP_TO_V2

    specs = {s.name: s for s in m.artifact.input_spec}
    only = next(iter(specs.values())) if len(specs) == 1 and len(given) == 1 else None
    out = {}
    for name, (a, dtype) in given.items():
        s = specs.get(name) or only
        want = NP_TO_V2[np.dtype(s.dtype)] if s is not None else dtype
        if dtype != want:
            raise BadRequest(f"input {name!r} is {want}, the request sent {dtype}")
        out[name] = a
    return out


def _raw_inputs(m: ServedModel, inputs) -> list[np.ndarray]:
    """``{"inputs": nested list}`` for a one-input model, or ``{"inputs": {name: nested list}}``."""
    specs = m.artifact.input_spec
    try:
        if isinstance(inputs, dict):
            missing = [s.name for s in specs if s.name not in inputs]
            if missing:
                raise BadRequest(f"'inputs' is missing {', '.join(missing)}")
            return [np.asarray(inputs[s.name], dtype=np.dtype(s.dtype)) for s in specs]
        if len(specs) != 1:
            raise BadRequest(f"this model takes {len(specs)} inputs: send 'inputs' as an object with {', '.join(m.input_names)}")
        return [np.asarray(inputs, dtype=np.dtype(specs[0].dtype))]
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"'inputs' is not a rectangular array of numbers ({exc})") from None


class _BodyLimit:
    """Answers 413 for a body over ``limit`` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"the request body is over the server's limit of {self.limit} bytes (--max-request-bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _Counted:
    """Counts requests, their latency and errors per endpoint (a plain ASGI middleware: cheaper than an http one)."""

    def __init__(self, app, state: dict):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        m = self.state.get("metrics")
        path = scope.get("path", "")
        if scope["type"] != "http" or m is None or path == "/metrics":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            endpoint = "infer" if path.endswith("/infer") else path if path == "/predict" or path.startswith("/v2/health") else "other"
            m.requests.labels(endpoint, str(status[0])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - started)
            if status[0] >= 400:
                m.errors.labels(str(status[0])).inc()


class _RequestCache:
    """Whole 200 answers to POST /predict and .../infer, keyed on the path and the body's bytes (an LRU of ``size``).
    A hit is answered here, before routing, parsing or the model; a body over ``limit``, or of unknown length, passes on."""

    def __init__(self, app, size: int, limit: int, state: dict):
        self.app, self.cache, self.limit, self.state = app, ResponseCache(size), limit, state

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        headers = dict(scope.get("headers") or []) if path else {}
        length = headers.get(b"content-length", b"")
        if scope.get("method") != "POST" or not (path == "/predict" or path.endswith("/infer")) or not length.isdigit() \
                or int(length) > self.limit or headers.get(b"content-type", b"").startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        key = hashlib.blake2b(path.encode() + b"\0" + body, digest_size=16).digest()
        hit = self.cache.get(key)
        if hit is not None:
            self.state["metrics"].cache_hits.labels("request").inc()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(hit)).encode())]})
            await send({"type": "http.response.body", "body": hit})
            return
        replayed, status, out = False, [0], []

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def kept(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] == 200:
                out.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.cache.put(key, b"".join(out))
            await send(message)

        await self.app(scope, replay, kept)


class _TooLarge(Exception):
    pass


# ---------------------------------------------------------------- running it
def worker_app():
    """The application in a uvicorn worker process (``--workers`` > 1): its config comes through the environment."""
    d = json.loads(os.environ[CONFIG_ENV])
    return create_app(ServeConfig(**d))


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CompressError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", "Pass --port with a free port, or stop what uses it") from None


def serve(config: ServeConfig, announce=print) -> ServedModel:
    """Load the model once here (bad input fails before any worker starts), then serve until SIGTERM or Ctrl-C; in-flight
    requests are answered before it returns."""
    metrics_dir = tempfile.mkdtemp(prefix="compress-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir      # before prometheus_client is imported, here and in the workers
    try:
        uvicorn = require("uvicorn", "serve", "compress serve")
        require("fastapi", "serve", "compress serve")
        require("prometheus_client", "serve", "serving metrics")
        require("multipart", "serve", "image uploads")
        check_port(config.host, config.port)
        model = load_model(config)
    except BaseException:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise
    config.name = model.name
    batching = f"batches of up to {config.max_batch_size} within {config.max_wait_ms:g} ms" if config.max_batch_size > 1 else "no batching"
    announce(f"serving '{model.name}' ({model.artifact.format}, {model.kind}) at http://{config.host}:{config.port} — "
             f"{config.n_workers} worker(s) × {config.threads_per_worker} thread(s), {batching}, cache {config.cache_size or 'off'}")
    common = {"host": config.host, "port": config.port, "log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 30,
              "lifespan": "on"}
    try:
        if config.n_workers == 1:
            uvicorn.run(create_app(config, model), **common)
        else:
            del model
            os.environ[CONFIG_ENV] = json.dumps(asdict(config))
            uvicorn.run("compress.server:worker_app", factory=True, workers=config.n_workers, **common)
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return config
