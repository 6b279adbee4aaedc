"""The commands that put a model behind a server, load it, and package it for the engines users grow onto."""
from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from compress.errors import CompressError

from .common import CONTEXT, RichProgress, console, global_flags, model_options, out_console
from .common import flags as current_flags


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress serve runs/demo                                  (one worker per core, one thread each)
  compress serve runs/minilm-int8 --cache-size 10000 --port 8080
  compress serve model.onnx --workers 1 --max-batch-size 16 --max-wait-ms 5
  curl localhost:8000/predict -d '{"text": "a gripping, funny film"}'
  curl localhost:8000/predict -F file=@shoe.png
""")
@click.argument("source")
@model_options
@click.option("--name", help="The model's name in URLs [default: the run directory's name].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=int, help="Worker processes [default: one per core].")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="Threads each worker's model runs on.")
@click.option("--max-batch-size", type=int, default=1, show_default=True, help="Gather concurrent requests into batches of up to this (1: off).")
@click.option("--max-wait-ms", type=float, default=2.0, show_default=True, help="How long a batch waits for more requests.")
@click.option("--cache-size", type=int, default=0, show_default=True, help="Answers kept per worker, keyed on the model's inputs (0: off).")
@click.option("--max-request-bytes", type=int, default=8 << 20, show_default=True, help="Larger request bodies get 413.")
@click.option("--log-dir", type=click.Path(), help="Keep served outputs here (JSON lines) for compress drift.")
@click.option("--log-sample", type=float, default=1.0, show_default=True, help="Fraction of served samples written to --log-dir.")
@global_flags
def serve(source, name, host, port, workers, threads_per_worker, max_batch_size, max_wait_ms, cache_size, max_request_bytes, log_dir, log_sample,
          **model):
    """Serve SOURCE over HTTP: Open Inference Protocol v2, POST /predict (raw text or an image file), /metrics.

    Stops on SIGTERM or Ctrl-C after answering the requests in flight.
    """
    import signal as signals

    from compress.server import ServeConfig
    from compress.server import serve as run_server

    config = ServeConfig(source, name, host, port, workers, threads_per_worker, max_batch_size, max_wait_ms, cache_size, max_request_bytes,
                         log_dir, log_sample, model_args=model)
    # uvicorn drains on SIGTERM/SIGINT and raises the signal again once done: that is a clean stop here, exit 0
    saved = {sig: signals.signal(sig, lambda *_: None) for sig in (signals.SIGTERM, signals.SIGINT)}
    try:
        run_server(config, announce=lambda line: console().print(escape(line), soft_wrap=True))
    finally:
        for sig, handler in saved.items():
            signals.signal(sig, handler)
    return 0


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress loadtest http://127.0.0.1:8000 --data rotten-tomatoes --concurrency 1,4,16
  compress loadtest runs/minilm-int8 --data rotten-tomatoes --repeat zipf:1.1 --html load.html
                                      (starts servers itself, sweeps workers x threads, recommends one)
""")
@click.argument("target")
@click.option("--data", required=True, help="Real inputs to send (a DATA spec: rotten-tomatoes, fashion-mnist, imagefolder:DIR, ...).")
@click.option("--concurrency", default="1,4,16,64", show_default=True, help="Comma-separated numbers of requests kept in flight.")
@click.option("--duration", default="20s", show_default=True, help="How long each concurrency runs, e.g. 10s, 1m.")
@click.option("--repeat", help="Repeat requests as real traffic does: zipf:S (S > 1; larger repeats more).")
@click.option("--name", help="The model's name on the server [default: the only one it serves].")
@click.option("--json", "json_path", type=click.Path(), help="Write the results as JSON.")
@click.option("--markdown", type=click.Path(), help="Write the results as Markdown.")
@click.option("--html", type=click.Path(), help="Write an HTML report with the throughput vs p99 plot.")
@global_flags
def loadtest(target, data, concurrency, duration, repeat, name, json_path, markdown, html):
    """Closed-loop load on a server (URL), or on servers this command starts for a RUN_DIR (then it recommends a
    configuration for this machine from the measurements)."""
    from compress.loadtest import LoadSettings, run_loadtest, tables, write_reports

    flags = current_flags()
    for path in (json_path, markdown, html):
        if path and Path(path).exists() and not flags.force:
            raise CompressError(f"{path} already exists", "Pass --force to replace it")
    settings = LoadSettings.parse(data=data, concurrency=concurrency, duration=duration, repeat=repeat, name=name)
    result = run_loadtest(target, settings, progress=RichProgress(flags.quiet))
    if not flags.quiet:
        for t in tables(result):
            out_console().print(t)
    for p in write_reports(result, json_path, markdown, html):
        console().print(escape(f"wrote {p}"))
    errors = sum(r["errors"] for r in result["rows"])
    if errors:
        console().print(f"[yellow]warning:[/yellow] {errors} request(s) failed (see the errors column)")
    return 0


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress package runs/minilm-int8 --target ray --replicas 2 --max-batch-size 8 -o deploy/ray
  compress package runs/fm-opt --target ray --autoscale 1-4 --cache-size 4096 -o deploy/ray-auto
  compress package runs/fm-opt --target triton --max-batch-size 16 --replicas 2 -o deploy/triton
  compress package runs/fm-kd --target triton --device cuda -o deploy/triton-gpu      (a torch model: exported to ONNX first)
  compress package runs/minilm-int8 --target docker --cache-size 10000 -o deploy/docker
""")
@click.argument("run_dir", type=click.Path())
@click.option("--target", required=True, help="ray (a Ray Serve application), triton (a model repository) or docker (a Dockerfile running compress serve).")
@click.option("--name", help="The model's name in URLs and in the Triton repository [default: the run directory's name].")
@click.option("--replicas", type=int, help="Copies of the model: Ray replicas, Triton instances, compress serve workers in docker [default: 1; docker: one per core].")
@click.option("--autoscale", metavar="MIN-MAX", help="ray: autoscale between MIN and MAX replicas (instead of --replicas).")
@click.option("--threads-per-replica", "threads", type=int, default=1, show_default=True, help="Threads (Ray: CPUs) each copy runs on.")
@click.option("--max-batch-size", type=int, help="Batch concurrent requests up to this (Ray: @serve.batch; Triton: max_batch_size and dynamic batching) [default: 1, off; triton: 8].")
@click.option("--max-wait-ms", type=float, default=2.0, show_default=True, help="How long a batch waits for more requests.")
@click.option("--cache-size", type=int, default=0, show_default=True, help="Response cache: answers kept per copy (Triton: response_cache on) (0: off).")
@click.option("--device", default="cpu", show_default=True, help="triton: where instances run, cpu or cuda (TensorRT plans: always cuda).")
@click.option("--host", default="127.0.0.1", show_default=True, help="ray: the address Ray Serve's HTTP proxy listens on.")
@click.option("--port", type=int, default=8000, show_default=True, help="ray and docker: the HTTP port.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder.")
@global_flags
def package(run_dir, target, out, **options):
    """Package RUN_DIR's model for what serves it at scale: a Ray Serve application, a Triton Inference Server model
    repository, or a docker image running compress serve. OUT holds its own copy of the model."""
    from compress.packaging import package as package_run

    flags = current_flags()
    result = package_run(run_dir, target, out, force=flags.force, progress=RichProgress(flags.quiet), **options)
    for note in result.notes:
        console().print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    what = {"ray": "a Ray Serve application", "triton": "a Triton model repository", "docker": "a docker image's files"}[result.target]
    console().print(escape(f"wrote {result.out}/: {what} for '{result.name}' ({result.format}{', ' + result.kind if result.kind else ''}); "
                           f"{len(result.files)} files"), soft_wrap=True)
    for command in result.start:
        console().print(escape(f"  start: {command}"), soft_wrap=True)
    return 0
