"""``optimize --ray``: the candidates are made — trained, exported, quantized — as tasks on a Ray cluster (an existing engine,
not a home-made pool), in parallel, while every timing still runs on this machine, the deployment device.

Each task gets the search's input run directory as bytes, makes its candidate with the same code as a search without Ray
(``compress.search.make_isolated``, each candidate its own ``compress run`` process with its time limit) in a cache of
its own, and sends back every run directory it made, packed; they are unpacked into this machine's candidate cache under
the same content keys, where the search finds them made and only times and scores them. Workers need compress and the
data: a data set name resolves on the worker, a file path must exist there too."""
from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import warnings
from pathlib import Path

from .errors import CompressError, first_line, require

log = logging.getLogger(__name__)


def connect(address: str):
    """Ray, connected: ``local`` starts an instance on this machine, ``auto`` joins the running cluster, else its address."""
    ray = require("ray", "ray", "optimize --ray")
    if ray.is_initialized():
        return ray
    fix = "Start one with 'ray start --head' and pass --ray auto (or its address), or use --ray local"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address not in ("local", "auto") and port.isdigit():   # Ray waits minutes on an address nobody answers at
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as exc:
            raise CompressError(f"cannot reach a Ray cluster at '{address}' ({exc.strerror or type(exc).__name__})", fix) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError or ValueError, by Ray version and address form
        raise CompressError(f"cannot reach a Ray cluster at '{address}' ({first_line(exc, 160)})", fix) from None
    return ray


def pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


def unpack(blob: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(folder, filter="data")


def _make_remote(make, input_blob: bytes, name: str, stages: list, training: bool, data: str, seed: int, timeout: float) -> dict:
    """On a Ray worker: ``make`` (:func:`compress.search.make_isolated`) one candidate in a scratch cache; return its outcome
    and every run directory it made, packed."""
    with tempfile.TemporaryDirectory(prefix="compress-ray-") as tmp:
        root = Path(tmp)
        unpack(input_blob, root / "input")
        error, seconds, made = make(name, stages, training, root / "input", data, seed, timeout, root)
        runs = {d.name: pack(d) for d in made.iterdir() if (d / "manifest.json").is_file()} if made.is_dir() else {}
        return {"error": error, "seconds": seconds, "runs": runs, "node": os.uname().nodename}


def make_on_ray(make, cands: list, input_dir: Path, data: str, seed: int, timeout: float, address: str, cache: Path) -> dict:
    """Make ``cands`` on Ray with ``make``, at most ``timeout`` seconds in all; their run directories land in ``cache`` (this
    machine's candidate cache). Returns ``{name: (error or None, seconds)}`` for every candidate."""
    from .manifest import Manifest

    ray = connect(address)
    remote = ray.remote(num_cpus=1, max_retries=0)(_make_remote)
    blob = ray.put(pack(input_dir))
    refs = {remote.remote(make, blob, c.name, c.stages, c.training, data, seed, timeout): c.name for c in cands}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout + 30)
    for ref in pending:
        ray.cancel(ref, force=True)
    out = {}
    for ref in done:
        name = refs[ref]
        try:
            res = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the task died (its worker crashed, or was killed for memory)
            out[name] = (f"its Ray task failed ({first_line(exc, 200)})", None)
            continue
        for key, run in res["runs"].items():
            target = cache / key
            if (target / "manifest.json").is_file():
                continue
            scratch = cache / f".{key}.ray"
            shutil.rmtree(scratch, ignore_errors=True)
            unpack(run, scratch)
            Manifest.read(scratch).verify(scratch)          # what came over the wire is what the worker wrote
            shutil.rmtree(target, ignore_errors=True)
            os.replace(scratch, target)
        out[name] = (res["error"], res["seconds"])
        log.info("made '%s' on Ray node %s in %s s%s", name, res["node"], res["seconds"], f": {res['error']}" if res["error"] else "")
    for ref in pending:
        out[refs[ref]] = (f"its Ray task gave no answer within {timeout:.0f} s", timeout)
    return out
