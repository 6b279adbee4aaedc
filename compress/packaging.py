"""``compress package``: hand a run directory to what serves it at scale, as files that start it.

- ``ray``: a Ray Serve application: compress serve's own FastAPI app (the same handlers) as the ingress of a
  deployment, batching through ``@serve.batch`` when asked, with ``serve_config.yaml`` (replicas or autoscaling,
  CPUs per replica) that ``serve run`` starts.
- ``triton``: a Triton Inference Server model repository (see :mod:`compress.triton_repo`).
- ``docker``: a Dockerfile and pinned requirements that run ``compress serve`` on the artifact.

OUT holds its own copy of the artifact (hard links where the file system allows), made self-contained: a
transformers folder or an architecture file the manifest names by an absolute path is copied in and named relative
to it. OUT is written into a hidden sibling and renamed into place, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import CompressError
from .progress import SILENT, Progress

TARGETS = ("ray", "triton", "docker")
MARKER = "package.json"             # what compress package wrote: lets --force replace an OUT it made
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf", ".tflite")
SERVE_PACKAGES = ("fastapi", "uvicorn", "httptools", "uvloop", "prometheus-client", "python-multipart", "orjson")
GPU_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")     # torch's CUDA libraries: the image installs torch's CPU wheel


@dataclass
class PackageOptions:
    """What the packaged server does; each target uses the ones it has a place for (see ``compress package --help``)."""
    name: str | None = None
    replicas: int | None = None               # Ray replicas, Triton instances, compress serve workers (docker)
    autoscale: tuple[int, int] | None = None  # Ray: (min, max) replicas
    threads: int = 1                          # per replica: Ray num_cpus, Triton intra-op threads, serve --threads-per-worker
    max_batch_size: int | None = None         # None: 1 (off) for ray and docker, 8 for triton
    max_wait_ms: float = 2.0
    cache_size: int = 0
    device: str = "cpu"                       # triton: where instances run (cpu | cuda)
    host: str = "127.0.0.1"                   # ray: where its HTTP proxy listens
    port: int = 8000

    def __post_init__(self):
        if isinstance(self.autoscale, str):
            m = re.fullmatch(r"\s*(\d+)\s*[-:]\s*(\d+)\s*", self.autoscale)
            if not m:
                raise CompressError(f"--autoscale '{self.autoscale}' is not MIN-MAX", "e.g. --autoscale 1-4")
            self.autoscale = (int(m.group(1)), int(m.group(2)))
        checks = [(self.name is None or bool(NAME.match(self.name)), f"--name '{self.name}' may hold only letters, digits and _ . - (and not start with . or -)"),
                  (self.replicas is None or self.replicas >= 1, "--replicas must be at least 1"),
                  (self.autoscale is None or 0 <= self.autoscale[0] <= self.autoscale[1] and self.autoscale[1] >= 1, "--autoscale needs 0 <= MIN <= MAX, MAX >= 1"),
                  (self.autoscale is None or self.replicas is None, "--replicas and --autoscale contradict each other: give one"),
                  (self.threads >= 1, "--threads-per-replica must be at least 1"),
                  (self.max_batch_size is None or self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
                  (self.max_wait_ms >= 0, "--max-wait-ms must not be negative"), (self.cache_size >= 0, "--cache-size must not be negative"),
                  (self.device in ("cpu", "cuda"), f"--device '{self.device}' is not cpu or cuda"), (0 < self.port < 65536, "--port must be in 1..65535")]
        for ok, what in checks:
            if not ok:
                raise CompressError(what, "See compress package --help")

    def batch(self, target: str) -> int:
        return self.max_batch_size if self.max_batch_size is not None else (8 if target == "triton" else 1)


@dataclass
class PackageResult:
    target: str
    out: Path
    name: str
    format: str                 # of the packaged model (after a conversion for Triton)
    kind: str | None            # text | image | tensor (None where it was not loaded: TensorRT)
    files: list[str]
    start: list[str]            # commands that start it
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


def package(run_dir, target: str, out, *, force: bool = False, progress: Progress = SILENT, **options) -> PackageResult:
    """Write OUT, from which ``target`` (ray, triton or docker) serves the artifact of ``run_dir``."""
    from .manifest import MANIFEST, Manifest
    from .rundir import commit_dir, exclusive, partial_dir, sync_tree, write_failure

    if target not in TARGETS:
        near = difflib.get_close_matches(str(target), TARGETS, n=1)
        raise CompressError(f"--target '{target}' is not one compress can package for", f"Did you mean {near[0]}?" if near else f"Use one of: {', '.join(TARGETS)}")
    opts = options.pop("options", None)
    if opts is None:
        known = [f.name for f in fields(PackageOptions)]
        for key in options:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                raise CompressError(f"'{key}' is not a package option", f"Did you mean {near[0]}?" if near else f"Options: {', '.join(known)}")
        opts = PackageOptions(**options)
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / MANIFEST).is_file():
        what = "does not exist" if not run_dir.exists() else "is not a compress run directory (no manifest.json)"
        raise CompressError(f"{run_dir} {what}", "Give a directory written by a compress command, e.g. compress export MODEL --target onnx -o DIR")
    _check_out(out, force, run_dir)
    manifest = Manifest.read(run_dir)
    manifest.verify(run_dir)
    name = opts.name or _name(run_dir)
    with exclusive(out):
        tmp = partial_dir(out)
        try:
            result = _WRITERS[target](run_dir, manifest, tmp, name, opts, progress)
            result.out = out
            result.start = [s.replace("{out}", shlex.quote(str(out))) for s in result.start]
            result.files = sorted([MARKER, *(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())])
            _write_json(tmp / MARKER, {"written_by": f"compress {_version()}", "source": str(run_dir.resolve()), **result.to_json(),
                                       "options": asdict(opts)})
            sync_tree(tmp)
            commit_dir(tmp, out)
        except BaseException as exc:
            full = write_failure(exc, out)
            shutil.rmtree(tmp, ignore_errors=True)
            if full is not None:
                raise full from exc
            raise
    return result


def _check_out(out: Path, force: bool, run_dir: Path) -> None:
    from .rundir import check_destination

    if force and (out / MARKER).is_file():          # an earlier compress package output: replaced with --force
        resolved = out.resolve()
        if resolved == run_dir.resolve() or resolved in run_dir.resolve().parents:
            raise CompressError(f"output {out} would overwrite the input {run_dir}", "Choose an -o outside the input")
        return
    check_destination(out, force, protect=(run_dir,))


def _name(run_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", run_dir.resolve().name).lstrip(".-")
    return name or "model"


# ---------------------------------------------------------------- the artifact, self-contained
def copy_artifact(run_dir: Path, manifest, dest: Path) -> tuple[object, list[str]]:
    """``dest``: the run directory's model file(s) and a manifest naming them, with the transformers folder or
    architecture file it needs copied in (named relative to ``dest``). Returns the manifest written and notes."""
    from .artifact import _companions
    from .formats import TORCH_FORMATS

    dest.mkdir(parents=True, exist_ok=True)
    src = run_dir / manifest.model_file
    kept = [f for f in run_dir.glob("reference.*") if f.is_file()]       # the drift reference: compress drift works on the copy too
    for f in [src, *_companions(src), *kept]:
        _link_or_copy(f, dest / f.name)
    manifest.model_file = src.name
    notes = []
    spec = str((manifest.arch or {}).get("spec") or "")
    if spec.startswith("hf:"):
        from .arch import resolve_hf_path
        from .artifact import _local_arch

        folder = resolve_hf_path(str(_local_arch(manifest.arch, run_dir)["spec"])[3:])
        _copy_tree(folder, dest / "hf")
        manifest.arch = {**manifest.arch, "spec": "hf:hf"}
    elif ".py:" in spec:
        from .artifact import _local_arch

        file = Path(str(_local_arch(manifest.arch, run_dir)["spec"]).rpartition(":")[0])
        if file.is_file():
            _link_or_copy(file, dest / file.name)
            manifest.arch = {**manifest.arch, "spec": f"{file.name}:{spec.rpartition(':')[2]}"}
    elif spec and manifest.format in TORCH_FORMATS and not spec.startswith(("torchvision:", "timm:", "compress.")):
        notes.append(f"the architecture {spec} is imported by name: its module must be importable wherever this serves")
    if manifest.extra.get("status"):
        notes.append(f"{run_dir} is an {manifest.extra['status']} run: packaged the model of its last completed stage")
    manifest.extra = {k: v for k, v in manifest.extra.items() if k not in ("status", "error", "pipeline")}
    manifest.write(dest)
    return manifest, notes


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        _copy_tree(src, dst, weights=True)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path, weights: bool = False) -> None:
    """A folder's files (weights left out unless ``weights``: a transformers folder's tokenizer and config are what serving needs)."""
    for f in sorted(Path(src).rglob("*")):
        if f.is_file() and (weights or f.suffix.lower() not in WEIGHT_SUFFIXES) and "__pycache__" not in f.parts:
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(f, dst / f.relative_to(src))


def _served(model_dir: Path, name: str, target: str):
    """The packaged copy loaded the way compress serve loads it: proof that it is complete, and what it takes."""
    import torch

    from .serving import ServedModel

    if _format(model_dir) == "tensorrt":
        raise CompressError(f"compress serve runs models on the CPU, and a TensorRT engine needs a GPU, so --target {target} cannot serve it",
                            "Package it with --target triton, or package the ONNX run directory the engine was built from")
    threads = torch.get_num_threads()
    try:
        return ServedModel.load(model_dir, name, threads=1)
    finally:
        torch.set_num_threads(threads)


def _format(model_dir: Path) -> str:
    from .manifest import Manifest

    return Manifest.read(model_dir).format


# ---------------------------------------------------------------- ray
RAY_BATCHER = '''

class RayBatcher:
    """compress's batcher interface (one sample in, its outputs back) on Ray Serve's @serve.batch."""

    def __init__(self, model, max_batch_size, max_wait_ms, on_batch):
        self.model, self.on_batch = model, on_batch

    def start(self):
        pass

    async def stop(self):
        pass

    async def submit(self, sample):
        return await self.run_batch(sample)

    @serve.batch(max_batch_size={batch}, batch_wait_timeout_s={wait_s})
    async def run_batch(self, samples):
        started = time.perf_counter()
        outs = self.model.run(pad_concat(self.model, samples))      # text padded to the longest in the batch only
        self.on_batch(len(samples), time.perf_counter() - started)
        return [[o[k:k + 1] for o in outs] for k in range(len(samples))]
'''

RAY_APP = '''"""Ray Serve application for '{name}' ({format}, {kind} model), written by compress package --target ray.

Every replica runs compress serve's own FastAPI app (Open Inference Protocol v2, POST /predict, /metrics) on the
artifact in model/{batching_doc}. Start it from this folder:  serve run serve_config.yaml
"""
{imports}from pathlib import Path

from ray import serve

from compress import server
{pad_import}
MODEL_DIR = Path(__file__).resolve().parent / "model"
SETTINGS = {settings}
{batcher}

def build_app():
    """compress serve's app, built in each replica; the model loads when the replica starts."""
    return server.create_app(server.ServeConfig(str(MODEL_DIR), **SETTINGS){batcher_arg})


@serve.deployment
@serve.ingress(build_app)
class CompressModel:
    """One replica: the artifact loaded once, answering compress serve's endpoints."""


app = CompressModel.bind()
'''


def _ray(run_dir: Path, manifest, tmp: Path, name: str, opts: PackageOptions, progress: Progress) -> PackageResult:
    import yaml

    with progress.stage("copying the artifact"):
        _, notes = copy_artifact(run_dir, manifest, tmp / "model")
    with progress.stage("loading it as Ray's replicas will"):
        served = _served(tmp / "model", name, "ray")
    batch = opts.batch("ray")
    settings = {"name": name, "threads_per_worker": opts.threads, "max_batch_size": batch, "max_wait_ms": opts.max_wait_ms, "cache_size": opts.cache_size}
    batched = batch > 1
    (tmp / "app.py").write_text(RAY_APP.format(
        name=name, format=manifest.format, kind=served.kind, settings=repr(settings),
        batching_doc=f"; requests are batched by Ray Serve's @serve.batch (up to {batch}, waiting {opts.max_wait_ms:g} ms)" if batched else "",
        imports="import time\n" if batched else "", pad_import="from compress.serving import pad_concat\n" if batched else "",
        batcher=RAY_BATCHER.format(batch=batch, wait_s=round(opts.max_wait_ms / 1000, 6)) if batched else "",
        batcher_arg=", batcher=RayBatcher" if batched else ""))
    deployment = {"name": "CompressModel", "max_ongoing_requests": max(8, 2 * batch), "ray_actor_options": {"num_cpus": opts.threads}}
    if opts.autoscale:
        deployment["autoscaling_config"] = {"min_replicas": opts.autoscale[0], "max_replicas": opts.autoscale[1], "target_ongoing_requests": max(2, batch)}
    else:
        deployment["num_replicas"] = opts.replicas or 1
    config = {"proxy_location": "EveryNode", "http_options": {"host": opts.host, "port": opts.port},
              "applications": [{"name": name, "route_prefix": "/", "import_path": "app:app", "deployments": [deployment]}]}
    (tmp / "serve_config.yaml").write_text(f"# Ray Serve config for '{name}' (compress package --target ray). Start: serve run serve_config.yaml\n"
                                           + yaml.safe_dump(config, sort_keys=False))
    base = f"http://{'127.0.0.1' if opts.host in ('0.0.0.0', '::') else opts.host}:{opts.port}"
    scaling = (f"autoscaling between {opts.autoscale[0]} and {opts.autoscale[1]} replicas" if opts.autoscale else f"{opts.replicas or 1} replica(s)")
    (tmp / "README.txt").write_text(f"""'{name}' for Ray Serve, written by compress package --target ray from {run_dir.resolve()}.
{manifest.format} {served.kind} model; {scaling} of {opts.threads} CPU(s) each; {'batches of up to ' + str(batch) if batched else 'no batching'}; \
response cache {opts.cache_size or 'off'} (per replica).

Start it here (needs pip install 'compress[ray]'; run from this folder, which holds app.py):
    serve run serve_config.yaml
On a running Ray cluster (every node needs compress[ray]; not tried by compress's tests):
    serve run serve_config.yaml --address ray://HEAD:10001 --working-dir .
(uploads this folder with the model; for serve deploy, put this folder on remote storage and name it as
runtime_env.working_dir in serve_config.yaml).{_reach(opts.host)}

Endpoints at {base}: GET /v2/health/ready, GET /v2/models/{name}, POST /v2/models/{name}/infer (Open Inference
Protocol v2), POST /predict, GET /metrics (the counters of the replica that answers).
    curl {base}/v2/models/{name}
    compress loadtest {base} --data DATA --concurrency 1,4,16

Scale by editing serve_config.yaml: num_replicas or autoscaling_config, ray_actor_options.num_cpus, max_ongoing_requests.
Files: app.py (the application), serve_config.yaml, model/ (the artifact: manifest.json and its model files).
""")
    return PackageResult("ray", tmp, name, manifest.format, served.kind, [], ["cd {out} && serve run serve_config.yaml"], notes)


def _reach(host: str) -> str:
    if host.startswith("127.") or host in ("localhost", "::1"):
        return f"\nThe HTTP proxy listens on {host} only: package with --host 0.0.0.0 to reach it from other machines."
    return ""


# ---------------------------------------------------------------- docker
DOCKERFILE = """# '{name}' ({format}, {kind} model) served by compress serve: written by compress package --target docker.
#   docker build -t {tag} .   &&   docker run --rm -p {port}:{port} {tag}
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch's CPU wheels (no CUDA libraries): the same versions, from PyTorch's index
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -r /tmp/requirements.txt
COPY {wheel} /tmp/
RUN pip install --no-cache-dir --no-deps /tmp/{wheel} && rm /tmp/{wheel}
COPY model /model
RUN useradd --system --uid 10001 --no-create-home compress
USER compress
EXPOSE {port}
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \\
  CMD python -c "import json, urllib.request; json.load(urllib.request.urlopen('http://127.0.0.1:{port}/v2/health/ready', timeout=4))['ready'] or exit(1)"
CMD {cmd}
"""


def serve_command(name: str, opts: PackageOptions, model: str = "/model") -> list[str]:
    """The compress serve command line the image runs."""
    cmd = ["compress", "serve", model, "--host", "0.0.0.0", "--port", str(opts.port), "--name", name, "--threads-per-worker", str(opts.threads)]
    if opts.replicas:
        cmd += ["--workers", str(opts.replicas)]
    if opts.batch("docker") > 1:
        cmd += ["--max-batch-size", str(opts.batch("docker")), "--max-wait-ms", f"{opts.max_wait_ms:g}"]
    if opts.cache_size:
        cmd += ["--cache-size", str(opts.cache_size)]
    return cmd


def _docker(run_dir: Path, manifest, tmp: Path, name: str, opts: PackageOptions, progress: Progress) -> PackageResult:
    from .wheel import build_wheel

    if opts.autoscale:
        raise CompressError("--autoscale is for --target ray", "Give --replicas N (compress serve workers) for docker")
    with progress.stage("copying the artifact"):
        m, notes = copy_artifact(run_dir, manifest, tmp / "model")
    with progress.stage("loading it as compress serve will"):
        served = _served(tmp / "model", name, "docker")
    with progress.stage("pinning requirements and building compress's wheel"):
        lines, unpinned = requirements(_packages(m, served.kind))
        wheel = build_wheel(tmp)
    head = "# What serving this artifact needs, pinned as in compress's requirements/lock.txt (compress itself: the wheel beside this).\n"
    if unpinned:
        head += f"# Left to pip (not in the lock; installed as their dependents require): {', '.join(unpinned)}\n"
    (tmp / "requirements.txt").write_text(head + "".join(line + "\n" for line in lines))
    if opts.device != "cpu":
        notes.append("compress serve runs models on the CPU: --device is for --target triton, and the image serves on the CPU")
    tag = f"compress-{name.lower()}"
    (tmp / "Dockerfile").write_text(DOCKERFILE.format(name=name, format=m.format, kind=served.kind, tag=tag, port=opts.port, wheel=wheel.name,
                                                      cmd=json.dumps(serve_command(name, opts))))
    (tmp / ".dockerignore").write_text("package.json\nREADME.txt\n")
    (tmp / "README.txt").write_text(f"""'{name}' in a container, written by compress package --target docker from {run_dir.resolve()}.
    docker build -t {tag} .
    docker run --rm -p {opts.port}:{opts.port} {tag}
    curl http://127.0.0.1:{opts.port}/v2/models/{name}
The image runs: {' '.join(serve_command(name, opts))}
Without docker, the same server from this folder: pip install -r requirements.txt {wheel.name} && {' '.join(serve_command(name, opts, 'model'))}
Files: Dockerfile, requirements.txt (pinned), {wheel.name} (compress), model/ (the artifact).
""")
    return PackageResult("docker", tmp, name, m.format, served.kind, [], [f"docker build -t {tag} {{out}}", f"docker run --rm -p {opts.port}:{opts.port} {tag}"], notes)


def _packages(manifest, kind: str) -> list[str]:
    """The distributions serving this artifact imports: compress's own dependencies, the server's, and what the
    model's format, architecture and inputs need."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        base = [r for r in distribution("compress").requires or [] if "extra ==" not in r]
    except PackageNotFoundError:
        base = ["torch", "onnx", "onnxruntime", "onnxscript", "click", "rich", "pyyaml", "safetensors", "numpy"]
    names = [*base, *SERVE_PACKAGES]
    spec = str((manifest.arch or {}).get("spec") or "")
    if spec.startswith("hf:") or kind == "text":
        names += ["transformers", "tokenizers"]
    if kind == "image":
        names.append("pillow")
    if spec.startswith("torchvision:"):
        names.append("torchvision")
    if spec.startswith("timm:"):
        names.append("timm")
    if manifest.format == "openvino":
        names.append("openvino")
    if any(str(s.get("op")) == "quantize_fasterai" for s in manifest.rebuild):
        names.append("fasterai")
    return names


def requirements(names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` and everything they depend on here (markers evaluated for this Python on Linux; torch's CUDA libraries
    left out), as the pins of requirements/lock.txt; without a lock (an installed compress), the versions installed
    here. Returns the pins and the names left unpinned (not in the lock)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = _lock()
    seen: dict[str, str | None] = {}
    todo = [Requirement(n) for n in names]
    done_extras: set[tuple[str, str]] = set()
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if GPU_ONLY.match(key):
            continue
        extras = sorted(req.extras)
        if key in seen and all((key, e) in done_extras for e in extras):
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            seen[key] = None
            continue
        seen.setdefault(key, dist.version)
        for e in ["", *extras]:
            if (key, e) in done_extras:
                continue
            done_extras.add((key, e))
            for line in dist.requires or []:
                r = Requirement(line)
                if r.marker is None or r.marker.evaluate({"extra": e}):
                    todo.append(r)
    pins, unpinned = [], []
    for key in sorted(seen):
        if lock is not None and key in lock:
            pins.append(lock[key])
        elif lock is not None:
            unpinned.append(key)
        elif seen[key] is not None:
            pins.append(f"{key}=={seen[key]}")
    return pins, unpinned


def _lock() -> dict[str, str] | None:
    from packaging.utils import canonicalize_name

    path = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
    if not path.is_file():
        return None
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            out[canonicalize_name(line.split("==", 1)[0].split("[", 1)[0])] = line
    return out


# ---------------------------------------------------------------- triton
def _triton(run_dir: Path, manifest, tmp: Path, name: str, opts: PackageOptions, progress: Progress) -> PackageResult:
    from .triton_repo import write_repository

    if opts.autoscale:
        raise CompressError("--autoscale is for --target ray", "Give --replicas N (Triton instances) for triton")
    fmt, kind, notes = write_repository(run_dir, manifest, tmp, name, opts, progress)
    return PackageResult("triton", tmp, name, fmt, kind, [], ["tritonserver --model-repository={out}"], notes)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _version() -> str:
    from .version import __version__

    return __version__


_WRITERS = {"ray": _ray, "triton": _triton, "docker": _docker}
