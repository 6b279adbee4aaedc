"""``compress loadtest``: closed-loop HTTP load on a server, on real inputs, at several concurrencies.

Given a URL it measures that server; given a RUN_DIR it starts ``compress serve`` on loopback in several
configurations (workers × threads, with and without batching), measures each, and recommends the one that holds the
most requests per second on this machine. The client is a small keep-alive HTTP/1.1 client on asyncio streams: it
spends far less CPU per request than a general-purpose one, which matters when client and server share two cores.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import durations
from .errors import CompressError
from .progress import SILENT, Progress
from .timing import percentile

MAX_SAMPLES = 512


@dataclass
class LoadSettings:
    data: str
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    duration_s: float = 20.0
    zipf: float | None = None
    name: str | None = None
    warmup_s: float = 2.0

    @classmethod
    def parse(cls, data: str, concurrency="1,4,16,64", duration="20s", repeat: str | None = None, name: str | None = None) -> "LoadSettings":
        try:
            levels = tuple(int(c) for c in str(concurrency).split(",") if c.strip())
        except ValueError:
            raise CompressError(f"--concurrency '{concurrency}' is not a comma-separated list of whole numbers", "e.g. --concurrency 1,4,16") from None
        if not levels or min(levels) < 1:
            raise CompressError(f"--concurrency '{concurrency}' needs numbers of at least 1", "e.g. --concurrency 1,4,16")
        seconds = parse_duration(duration)
        zipf = None
        if repeat:
            m = re.fullmatch(r"zipf:([0-9.]+)", repeat.strip())
            if not m or float(m.group(1)) <= 1.0:
                raise CompressError(f"--repeat '{repeat}' is not zipf:S with S above 1", "e.g. --repeat zipf:1.1 (larger S repeats more)")
            zipf = float(m.group(1))
        return cls(data, levels, seconds, zipf, name, min(2.0, seconds / 5))


def parse_duration(text) -> float:
    try:
        value = durations.seconds(text)
    except ValueError:
        raise CompressError(f"'{text}' is not a duration", "e.g. 20s, 1m or 500ms") from None
    if value <= 0:
        raise CompressError(f"the duration '{text}' must be positive", "e.g. 20s")
    return value


# ---------------------------------------------------------------- the requests
@dataclass
class Requests:
    """Pre-built HTTP requests (bytes) for the server's model, one per distinct input, and the order to send them in."""
    path: str
    bodies: list[bytes]
    zipf: float | None = None

    def order(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        k = len(self.bodies)
        if self.zipf is None:
            return np.arange(n) % k
        p = 1.0 / np.arange(1, k + 1) ** self.zipf
        return rng.choice(k, size=n, p=p / p.sum())


def build_requests(base: str, settings: LoadSettings) -> Requests:
    """Requests from DATA that fit the served model: raw text to ``/predict`` for text models, Open Inference Protocol
    v2 tensors otherwise."""
    from .data import batches, load_data
    from .inputs import InputSpec

    meta = _get_json(f"{base}/v2/models/{settings.name}")
    bundle = load_data(settings.data)
    kind = (meta.get("parameters") or {}).get("kind")
    n = min(MAX_SAMPLES, len(bundle.eval))
    if bundle.kind == "text":
        if kind not in (None, "text"):
            raise CompressError(f"--data {settings.data} is text but the served model takes {kind} inputs", "Give data of the model's kind")
        bodies = [json.dumps({"text": bundle.eval[i][0]}).encode() for i in range(n)]
        return Requests("/predict", bodies, settings.zipf)
    if kind == "text":
        raise CompressError(f"the served model takes text but --data {settings.data} is {bundle.kind} data", "Give text data, e.g. --data rotten-tomatoes")
    specs = [InputSpec(i["name"], [1 if d == -1 else d for d in i["shape"]], {"FP32": "float32", "INT64": "int64", "INT32": "int32", "FP16": "float16"}.get(i["datatype"], "float32"),
                       [0]) for i in meta["inputs"]]
    bodies = []
    for inputs, _ in batches(bundle.eval, specs, batch_size=1, limit=n):
        bodies.append(json.dumps({"inputs": [{"name": s.name, "shape": list(x.shape), "datatype": i["datatype"], "data": x.flatten().tolist()}
                                             for s, x, i in zip(specs, inputs, meta["inputs"])]}).encode())
    return Requests(f"/v2/models/{settings.name}/infer", bodies, settings.zipf)


# ---------------------------------------------------------------- the client
class _Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def request(self, head: bytes, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(head + body)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")      # the status line and headers in one read
        except asyncio.IncompleteReadError:
            raise ConnectionError("the server closed the connection") from None
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, chunked, close = 0, False, False
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif key == "connection" and "close" in value.lower():
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


def _run(coro):
    """On uvloop where it is installed (with uvicorn's standard extras): the client then costs about half the CPU per
    request, which on a small machine it shares with the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _level(host: str, port: int, reqs: Requests, concurrency: int, duration: float, warmup: float, seed: int) -> dict:
    """``concurrency`` closed loops for ``warmup`` + ``duration`` seconds; latencies of the timed part only."""
    order = reqs.order(1_000_000, seed)
    heads = [(f"POST {reqs.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(b)}\r\n\r\n").encode() for b in reqs.bodies]
    latencies: list[float] = []
    errors, statuses = 0, {}
    counter = [0]
    loop = asyncio.get_running_loop()
    start = loop.time()
    timed_from, stop = start + warmup, start + warmup + duration

    async def worker():
        nonlocal errors
        conn = _Conn(host, port)
        try:
            while True:
                now = loop.time()
                if now >= stop:
                    return
                k = int(order[counter[0] % len(order)])
                counter[0] += 1
                t0 = time.perf_counter()
                try:
                    status = await conn.request(heads[k], reqs.bodies[k])
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    conn.close()
                    status = 0
                dt = time.perf_counter() - t0
                if now >= timed_from:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(dt)
                    else:
                        errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    done = len(latencies) + errors
    ms = [t * 1000 for t in latencies]
    return {"concurrency": concurrency, "requests": done, "throughput_rps": len(latencies) / duration,
            "p50_ms": percentile(ms, 50) if ms else None, "p90_ms": percentile(ms, 90) if ms else None,
            "p99_ms": percentile(ms, 99) if ms else None, "errors": errors, "error_rate": errors / done if done else 0.0,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def _server_stats(base: str) -> dict | None:
    """The counters compress serve exposes (other servers: None)."""
    try:
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    vals = {}
    for line in text.splitlines():
        m = re.match(r"^(compress_batch_size_(?:sum|count)|compress_cache_(?:hits|misses)_total)(?:{[^}]*})? ([0-9.e+-]+)$", line)
        if m:        # summed over labels (cache hits come per level: whole requests and single samples)
            vals[m.group(1)] = vals.get(m.group(1), 0.0) + float(m.group(2))
    return vals or None


def _delta(before: dict | None, after: dict | None) -> dict:
    if not before or not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out = {}
    if d.get("compress_batch_size_count"):
        out["mean_batch"] = d["compress_batch_size_sum"] / d["compress_batch_size_count"]
    lookups = d.get("compress_cache_hits_total", 0) + d.get("compress_cache_misses_total", 0)
    if lookups:
        out["cache_hit_rate"] = d.get("compress_cache_hits_total", 0) / lookups
    return out


def measure(url: str, settings: LoadSettings, progress: Progress = SILENT, label: str | None = None) -> list[dict]:
    """One row per concurrency level against the server at ``url``."""
    base = url.rstrip("/")
    m = re.match(r"^http://([^/:]+)(?::(\d+))?$", base)
    if not m:
        raise CompressError(f"'{url}' is not an http://HOST[:PORT] address", "e.g. http://127.0.0.1:8000")
    host, port = m.group(1), int(m.group(2) or 80)
    wait_ready(base, 10.0)
    if settings.name is None:
        settings.name = only_model(base)
    reqs = build_requests(base, settings)
    rows = []
    with progress.task(f"load on {label or base}", total=len(settings.concurrency)) as task:
        for i, c in enumerate(settings.concurrency):
            before = _server_stats(base)
            row = _run(_level(host, port, reqs, c, settings.duration_s, settings.warmup_s, seed=i))
            row |= _delta(before, _server_stats(base))
            rows.append({"server": label or base, **row})
            task.advance(1, f"{c} in flight: {row['throughput_rps']:.0f} req/s")
    return rows


def _get_json(url: str, timeout: float = 10.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:200]
        raise CompressError(f"{url} answered {exc.code}: {detail}", "Check the model name (--name) and the server") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CompressError(f"cannot reach {url} ({getattr(exc, 'reason', exc)})", "Start the server first, or give a RUN_DIR") from None


def only_model(base: str) -> str:
    req = urllib.request.Request(f"{base}/v2/repository/index", data=b"{}", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            models = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        raise CompressError(f"{base} does not list its models", "Give the model's name with --name") from None
    names = [m["name"] for m in models if isinstance(m, dict) and "name" in m]
    if len(names) != 1:
        raise CompressError(f"{base} serves {len(names)} models ({', '.join(names)})", "Choose one with --name")
    return names[0]


def wait_ready(base: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    why = None
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as r:
                if r.status == 200 and json.loads(r.read()).get("ready", True):
                    return
                why = "it answers, but is not ready"
        except urllib.error.HTTPError as exc:
            why = f"/v2/health/ready answered {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = str(getattr(exc, "reason", exc))
        if proc is not None and proc.poll() is not None:
            raise CompressError(f"the server exited with code {proc.returncode} before it was ready", "Run compress serve on it to see why")
        if time.monotonic() > deadline:
            raise CompressError(f"cannot reach {base} in {timeout:.0f}s ({why})", "Start the server first (compress serve), or check the address")
        time.sleep(0.2)


# ---------------------------------------------------------------- sweeping configurations of compress serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configurations(cores: int, cache: bool) -> list[dict]:
    """What to compare on this machine: processes vs threads, and dynamic batching."""
    base = {"cache_size": 4096} if cache else {}
    configs = [{"workers": cores, "threads_per_worker": 1}, {"workers": 1, "threads_per_worker": cores},
               {"workers": cores, "threads_per_worker": 1, "max_batch_size": 8, "max_wait_ms": 2.0}]
    if cores > 1:
        configs.insert(2, {"workers": 1, "threads_per_worker": 1})
    return [base | c for c in configs]


def describe(config: dict) -> str:
    b = config.get("max_batch_size", 1)
    parts = [f"{config['workers']} worker(s) × {config['threads_per_worker']} thread(s)", f"batch ≤{b}" if b > 1 else "no batching"]
    if config.get("cache_size"):
        parts.append(f"cache {config['cache_size']}")
    return ", ".join(parts)


def serve_args(config: dict) -> list[str]:
    args = []
    for k, v in config.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def start_server(source: str, config: dict, port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli", "serve", str(source), "--port", str(port), "--quiet", *serve_args(config), *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    proc.log = log
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.log.close()
    return proc.returncode


def sweep(run_dir: str, settings: LoadSettings, progress: Progress = SILENT, configs: list[dict] | None = None) -> dict:
    """Start compress serve on ``run_dir`` in each configuration, measure it, recommend the best for this machine."""
    if not (Path(run_dir) / "manifest.json").is_file() and not Path(run_dir).is_file():
        raise CompressError(f"{run_dir} is neither a URL nor a run directory or model file", "Give http://HOST:PORT or a run directory")
    configs = configs or configurations(os.cpu_count() or 1, settings.zipf is not None)
    rows, runs = [], []
    for config in configs:
        port = free_port()
        proc = start_server(run_dir, config, port)
        try:
            wait_ready(f"http://127.0.0.1:{port}", 180.0, proc)
            s = LoadSettings(**{**settings.__dict__})
            got = measure(f"http://127.0.0.1:{port}", s, progress, label=describe(config))
        finally:
            stop_server(proc)
        for r in got:
            r["config"] = config
        rows += got
        runs.append((config, got))
    return {"rows": rows, "recommended": recommend(runs), "settings": _settings_json(settings), "env": _env()}


def recommend(runs: list[tuple[dict, list[dict]]]) -> dict | None:
    """The configuration with the highest error-free throughput (within 5%: the lower p99 there)."""
    best = []
    for config, rows in runs:
        ok = [r for r in rows if not r["errors"] and r["p99_ms"] is not None]
        if ok:
            top = max(ok, key=lambda r: r["throughput_rps"])
            best.append((config, top))
    if not best:
        return None
    peak = max(r["throughput_rps"] for _, r in best)
    close = [(c, r) for c, r in best if r["throughput_rps"] >= 0.95 * peak]
    config, row = min(close, key=lambda cr: cr[1]["p99_ms"])
    return {"config": config, "description": describe(config), "throughput_rps": row["throughput_rps"], "p99_ms": row["p99_ms"],
            "concurrency": row["concurrency"], "command": "compress serve RUN_DIR " + " ".join(serve_args(config))}


def run_loadtest(target: str, settings: LoadSettings, progress: Progress = SILENT) -> dict:
    if str(target).startswith(("http://", "https://")):
        if str(target).startswith("https://"):
            raise CompressError("https is not supported by the load client", "Load the server over plain http on loopback or its internal address")
        rows = measure(target, settings, progress)
        return {"rows": rows, "recommended": None, "settings": _settings_json(settings), "env": _env()}
    return sweep(target, settings, progress)


def _settings_json(s: LoadSettings) -> dict:
    return {"data": s.data, "concurrency": list(s.concurrency), "duration_s": s.duration_s, "zipf": s.zipf, "name": s.name}


def _env() -> dict:
    from .manifest import environment

    env = environment()
    return {"cpu": env.get("device"), "cores": os.cpu_count(), "python": env.get("python")}


# ---------------------------------------------------------------- reports
COLUMNS = ("server", "in flight", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "mean batch", "cache hits")


def table_rows(result: dict) -> list[list[str]]:
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    return [[r["server"], str(r["concurrency"]), f(r["throughput_rps"], 1), f(r["p50_ms"]), f(r["p90_ms"]), f(r["p99_ms"]),
             f"{r['errors']} ({r['error_rate']:.1%})" if r["errors"] else "0", f(r.get("mean_batch")),
             f"{r['cache_hit_rate']:.0%}" if r.get("cache_hit_rate") is not None else "-"] for r in result["rows"]]


def recommendation_line(result: dict) -> str | None:
    rec = result.get("recommended")
    if not rec:
        return None
    return (f"recommended on this machine: {rec['description']} — {rec['throughput_rps']:.0f} req/s at p99 {rec['p99_ms']:.1f} ms "
            f"with {rec['concurrency']} in flight ({rec['command']})")


def tables(result: dict) -> list:
    from .report import table

    out = [table("loadtest", COLUMNS, table_rows(result), right=COLUMNS[1:])]
    line = recommendation_line(result)
    if line:
        from rich.text import Text

        out.append(Text(line))
    return out


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    line = recommendation_line(result)
    env = result.get("env", {})
    return "\n".join([f"# compress loadtest\n\n{env.get('cpu')}, {env.get('cores')} cores; data {result['settings']['data']}, "
                      f"{result['settings']['duration_s']:g} s per level" + (f", zipf:{result['settings']['zipf']}" if result['settings'].get('zipf') else "") + "\n",
                      *lines, *([f"\n{line}"] if line else [])]) + "\n"


def throughput_vs_p99_svg(result: dict) -> str:
    from .plots import _figure, _svg

    fig, ax = _figure(7.0, 4.0)
    servers = list(dict.fromkeys(r["server"] for r in result["rows"]))
    for s in servers:
        rows = [r for r in result["rows"] if r["server"] == s and r["p99_ms"] is not None]
        ax.plot([r["throughput_rps"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=s)
        for r in rows:
            ax.annotate(str(r["concurrency"]), (r["throughput_rps"], r["p99_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("throughput vs p99 (labels: requests in flight)", fontsize=9)
    return _svg(fig)


def html(result: dict) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(result))
    parts = [f"<h1>compress loadtest</h1><p>{escape(markdown(result).splitlines()[2])}</p>", f"<table><tr>{head}</tr>{body}</table>"]
    line = recommendation_line(result)
    if line:
        parts.append(f"<p><b>{escape(line)}</b></p>")
    try:
        parts.append(f"<figure>{throughput_vs_p99_svg(result)}</figure>")
    except ImportError:
        parts.append("<p>The plot needs matplotlib: pip install 'compress[report]'.</p>")
    style = "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>compress loadtest</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


def write_reports(result: dict, json_path=None, markdown_path=None, html_path=None) -> list[Path]:
    from .rundir import write_file_atomic

    written = []
    for path, render in ((json_path, lambda r: json.dumps(r, indent=2) + "\n"), (markdown_path, markdown), (html_path, html)):
        if path:
            written.append(write_file_atomic(Path(path), render(result)))
    return written
