"""What a server needs around an artifact: the loaded model behind the same runners ``bench`` uses, turning requests
(tensors, raw text, image files) into model inputs and outputs into answers; a response cache keyed on the model's
inputs (token ids for text); dynamic batching; and a log of served outputs for ``compress drift``.

Nothing here knows HTTP: :mod:`compress.server` puts it behind FastAPI, ``compress package --target ray`` behind
Ray Serve, with the same code.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifact import Artifact
from .errors import CompressError

# Open Inference Protocol v2 datatypes ↔ numpy
V2_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
NP_TO_V2 = {np.dtype(v): k for k, v in V2_DTYPES.items()}


class BadRequest(CompressError):
    """A request the model cannot take: answered with ``status`` (4xx) and the message, never taking the server down."""

    def __init__(self, what: str, status: int = 422, how: str | None = None):
        super().__init__(what, how)
        self.status = status


@dataclass
class ServedModel:
    """An artifact loaded for serving: checks and prepares inputs, runs them, names the answers."""
    name: str
    artifact: Artifact
    runner: object
    kind: str                                     # text | image | tensor
    tokenizer: object = None
    labels: tuple[str, ...] | None = None
    normalization: tuple | None = None            # (mean, std) per channel for raw images
    output_names: list[str] = field(default_factory=list)
    output_shapes: list[list[int]] = field(default_factory=list)
    output_dtypes: list[str] = field(default_factory=list)
    max_length: int = 512
    fast: object = None                           # the fast tokenizer's own engine, truncating: one text without the wrapper

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, source, name: str | None = None, threads: int | None = 1, options=None) -> "ServedModel":
        """``source``: a run directory or any SOURCE (``options``: its parsed model options), or a loaded Artifact."""
        import dataclasses

        from .data import image_normalization, tokenizer_for
        from .runners import load_runner
        from .sources import ModelSpec, load_model

        if isinstance(source, Artifact):
            artifact = source
        else:
            spec = dataclasses.replace(options or ModelSpec(""), source=str(source))
            artifact = load_model(spec)
        if threads:
            torch.set_num_threads(threads)
        runner = load_runner(artifact, "cpu", threads)
        tokenizer = tokenizer_for(artifact)
        first = artifact.input_spec[0]
        kind = "text" if tokenizer is not None else "image" if len(first.shape) == 4 and first.is_float else "tensor"
        data = next((s["data"] for s in reversed(artifact.stages) if s.get("data")), None)
        norm = image_normalization(data, first.shape[1]) if kind == "image" else None
        name = name or _default_name(source)
        model = cls(name, artifact, runner, kind, tokenizer, None, norm)
        model.max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512) if tokenizer is not None else 512
        model.fast = _fast_tokenizer(tokenizer, model.max_length)
        model._describe_outputs()
        model.labels = _labels(artifact, data, model.output_shapes)
        return model

    def _describe_outputs(self) -> None:
        """Run one example (also a warm-up) to learn the outputs' names, shapes and types."""
        from .inputs import example_inputs

        seq = 8 if self.kind == "text" else None
        outs = self.run([x.numpy() for x in example_inputs(self.artifact.input_spec, 1, seq)])
        session = getattr(self.runner, "session", None)
        names = [o.name for o in session.get_outputs()] if session is not None and hasattr(session, "get_outputs") else []
        self.output_names = names if len(names) == len(outs) else [f"output{i}" for i in range(len(outs))]
        self.output_shapes = [[-1, *(-1 if self.kind == "text" and j == 0 and o.ndim > 2 else d for j, d in enumerate(o.shape[1:]))] for o in outs]
        self.output_dtypes = [NP_TO_V2.get(o.dtype, "FP32") for o in outs]

    # ------------------------------------------------------------ describing
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.artifact.input_spec]

    def metadata(self) -> dict:
        """The Open Inference Protocol v2 model metadata (dynamic axes as -1)."""
        ins = [{"name": s.name, "datatype": NP_TO_V2[np.dtype(s.dtype)], "shape": [-1 if i in (s.dynamic_axes or ()) else d for i, d in enumerate(s.shape)]}
               for s in self.artifact.input_spec]
        outs = [{"name": n, "datatype": d, "shape": s} for n, d, s in zip(self.output_names, self.output_dtypes, self.output_shapes)]
        return {"name": self.name, "versions": ["1"], "platform": _platform(self.artifact.format), "inputs": ins, "outputs": outs,
                "parameters": {"kind": self.kind, "format": self.artifact.format, **({"labels": list(self.labels)} if self.labels else {})}}

    # ------------------------------------------------------------ inputs
    def check(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Cast and check one request's input arrays against the model's input spec (rank, fixed dims, dtype kind)."""
        specs = self.artifact.input_spec
        if len(arrays) != len(specs):
            raise BadRequest(f"the model takes {len(specs)} input(s) ({', '.join(self.input_names)}), the request gave {len(arrays)}")
        out = []
        for a, s in zip(arrays, specs):
            want = np.dtype(s.dtype)
            if a.dtype.kind == "f" and want.kind in "iub":
                raise BadRequest(f"input '{s.name}' takes {want.name} values, the request gave {a.dtype.name}")
            if a.ndim != len(s.shape):
                raise BadRequest(f"input '{s.name}' has shape {_shape(s)}, the request gave {list(a.shape)}")
            dynamic = set(s.dynamic_axes or ())
            for i, (got, need) in enumerate(zip(a.shape, s.shape)):
                if i not in dynamic and got != need:
                    raise BadRequest(f"input '{s.name}' has shape {_shape(s)}, the request gave {list(a.shape)}")
            if a.shape[0] == 0:
                raise BadRequest(f"input '{s.name}' holds no samples")
            out.append(np.ascontiguousarray(a, dtype=want))
        if len({a.shape[0] for a in out}) > 1:
            raise BadRequest("the inputs hold different numbers of samples")
        return out

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        if self.kind != "text":
            raise BadRequest(f"this model takes {self.kind} inputs, not text", how="Send {\"inputs\": ...} or an image file")
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'text' must be a string and 'texts' a non-empty list of strings")
        if len(texts) == 1 and self.fast is not None:      # a third of the time of the wrapper's call, the same ids
            e = self.fast.encode(texts[0])
            enc = {"input_ids": np.array([e.ids]), "attention_mask": np.array([e.attention_mask]), "token_type_ids": np.array([e.type_ids])}
        else:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        by_name = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": enc.get("token_type_ids")}
        arrays = []
        for i, s in enumerate(self.artifact.input_spec):
            a = by_name.get(s.name)
            if a is None:
                a = [enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")][i]
            arrays.append(np.asarray(a, dtype=np.dtype(s.dtype)))
        return arrays

    def decode_image(self, data: bytes) -> np.ndarray:
        """An image file's bytes as one model input [1, C, H, W], preprocessed as the model's data was."""
        if self.kind != "image":
            raise BadRequest(f"this model takes {self.kind} inputs, not images")
        from .errors import require

        PIL = require("PIL.Image", "vision", "reading images")
        try:
            with PIL.open(io.BytesIO(data)) as img:
                c, h, w = self.artifact.input_spec[0].shape[1:]
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), PIL.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as exc:
            why = "not a format PIL reads" if type(exc).__name__ == "UnidentifiedImageError" else f"{type(exc).__name__}: {exc}"
            raise BadRequest(f"the file is not an image that can be read ({why})", 400, how="Send a PNG, JPEG or another common image format") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if self.normalization is not None:
            mean, std = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in self.normalization)
            arr = (arr - mean) / std
        return arr[None].astype(np.float32)

    # ------------------------------------------------------------ running
    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for checked input arrays (a batch)."""
        outs = self.runner(*(torch.from_numpy(a) for a in arrays))
        return [o.numpy() if o.dtype != torch.bfloat16 else o.float().numpy() for o in outs]

    def answer(self, outputs: list[np.ndarray], inputs: list[np.ndarray]) -> list[dict]:
        """Per sample: its outputs (an embedding model's pooled over tokens), and the label and scores of a classifier."""
        first = outputs[0]
        answers = []
        for i in range(first.shape[0]):
            row = self.pooled(first, inputs, i)
            a = {"outputs": row.tolist()}
            if self.labels and row.ndim == 1 and row.shape[0] == len(self.labels):
                p = _softmax(row)
                a["label"] = self.labels[int(p.argmax())]
                a["scores"] = {lab: round(float(v), 6) for lab, v in zip(self.labels, p)}
            answers.append(a)
        return answers

    def pooled(self, first: np.ndarray, inputs: list[np.ndarray], i: int) -> np.ndarray:
        """Sample ``i`` of the first output; a per-token output ([batch, tokens, hidden]) mean-pooled over its real tokens."""
        row = first[i]
        if self.kind == "text" and row.ndim == 2:
            mask = self.attention_mask(inputs)
            m = np.ones(row.shape[0], np.float32)
            if mask is not None:      # a batched sample's output may hold more (padded) tokens than its own mask
                m[:] = 0.0
                own = mask[i][: row.shape[0]]
                m[: own.shape[0]] = own
            row = (row * m[:, None]).sum(0) / max(float(m.sum()), 1.0)
        return row

    def attention_mask(self, inputs: list[np.ndarray]) -> np.ndarray | None:
        names = self.input_names
        return inputs[names.index("attention_mask")] if "attention_mask" in names else (inputs[1] if self.kind == "text" and len(inputs) > 1 else None)

    def input_stats(self, inputs: list[np.ndarray], i: int) -> dict:
        """What ``compress drift`` compares about one served input (no input is kept)."""
        if self.kind == "text":
            ids = inputs[0][i]
            mask = self.attention_mask(inputs)
            real = ids[mask[i].astype(bool)] if mask is not None else ids
            unk = getattr(self.tokenizer, "unk_token_id", None)
            return {"kind": "text", "tokens": int(real.size), "unknown_rate": float((real == unk).mean()) if unk is not None and real.size else 0.0}
        x = inputs[0][i].astype(np.float32)
        return {"kind": self.kind, "mean": float(x.mean()), "std": float(x.std())}

    # ------------------------------------------------------------ batching text
    def pad_value(self, index: int) -> int:
        name = self.input_names[index]
        if name == "input_ids" or (index == 0 and self.kind == "text"):
            return int(getattr(self.tokenizer, "pad_token_id", 0) or 0)
        return 0


def _shape(spec) -> list:
    return [("N" if i in (spec.dynamic_axes or ()) else d) for i, d in enumerate(spec.shape)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _platform(fmt: str) -> str:
    return {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "tensorrt": "tensorrt_plan", "openvino": "openvino"}.get(fmt, f"compress_{fmt}")


def _default_name(source) -> str:
    p = Path(str(source))
    name = (p.name if p.is_dir() else p.stem) or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace("zoo:", ""))


def _labels(artifact: Artifact, data: str | None, output_shapes) -> tuple[str, ...] | None:
    """Class names where they are known: a transformers config's id2label, a built-in data set's, torchvision's ImageNet."""
    from .data import CLASS_NAMES

    width = output_shapes[0][-1] if output_shapes and len(output_shapes[0]) == 2 else None
    if not width or width < 2:
        return None
    names = CLASS_NAMES.get(str(data)) if data else None
    if names and len(names) == width:
        return tuple(names)
    spec = (artifact.arch or {}).get("spec", "")
    if spec.startswith("hf:"):
        from .arch import resolve_hf_path

        try:
            cfg = json.loads((resolve_hf_path(spec[3:]) / "config.json").read_text())
            id2label = cfg.get("id2label") or {}
            if len(id2label) == width and not all(str(v).startswith("LABEL_") for v in id2label.values()):
                return tuple(str(id2label[str(i)]) for i in range(width))
        except (OSError, ValueError, KeyError):
            pass
    if width == 1000 and (spec.startswith("torchvision:") or str(artifact.source) == "zoo:mobilenet_v2"):
        try:
            from torchvision.models import MobileNet_V2_Weights

            return tuple(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
        except ImportError:
            return None
    return None


# ---------------------------------------------------------------- the response cache
def cache_key(arrays: list[np.ndarray], i: int) -> bytes:
    """A digest of sample ``i``'s inputs (token ids for text, without padding): equal inputs, equal key."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        row = np.ascontiguousarray(a[i])
        h.update(str((row.shape, row.dtype.str)).encode())
        h.update(row.tobytes())
    return h.digest()


def unpadded(model: ServedModel, arrays: list[np.ndarray], i: int) -> list[np.ndarray]:
    """Sample ``i`` of a text batch without its padding (so a sentence's key and batch do not depend on its neighbours)."""
    if model.kind != "text":
        return [a[i:i + 1] for a in arrays]
    mask = model.attention_mask(arrays)
    n = int(mask[i].sum()) if mask is not None else arrays[0].shape[1]
    return [a[i:i + 1, :n] if a.ndim == 2 else a[i:i + 1] for a in arrays]


class ResponseCache:
    """An LRU of per-sample outputs keyed on :func:`cache_key`; ``size`` 0 keeps nothing."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: bytes):
        if not self.size:
            return None
        v = self.items.get(key)
        if v is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: bytes, value) -> None:
        if not self.size:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


# ---------------------------------------------------------------- dynamic batching
def pad_concat(model: ServedModel, samples: list[list[np.ndarray]]) -> list[np.ndarray]:
    """One batch from single samples: text padded only to the longest sequence in the batch."""
    out = []
    for j in range(len(samples[0])):
        parts = [s[j] for s in samples]
        if parts[0].ndim == 2 and model.kind == "text":
            longest = max(p.shape[1] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, longest - p.shape[1])), constant_values=model.pad_value(j)) for p in parts]
        out.append(np.concatenate(parts))
    return out


class Batcher:
    """Gathers single samples from concurrent requests into batches of up to ``max_batch_size``: what is queued when the
    model is free, plus what arrives within ``max_wait_ms`` once several are waiting."""

    def __init__(self, model: ServedModel, max_batch_size: int, max_wait_ms: float, on_batch=None):
        self.model, self.max_batch, self.max_wait = model, max_batch_size, max_wait_ms / 1000.0
        self.on_batch = on_batch or (lambda n, seconds: None)
        self.queue: asyncio.Queue | None = None
        self.task = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, sample: list[np.ndarray]) -> list[np.ndarray]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((sample, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            self._drain(items)
            # wait for more only when requests are arriving together: a lone request (concurrency 1) runs at once
            deadline = loop.time() + self.max_wait
            while 1 < len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                self._drain(items)
            started = time.perf_counter()
            try:
                # on the loop itself: a worker runs one batch at a time, and requests arriving meanwhile queue for the next
                outs = self.model.run(pad_concat(self.model, [s for s, _ in items]))
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the model's failure
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.on_batch(len(items), time.perf_counter() - started)
            for k, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result([o[k:k + 1] for o in outs])
            await asyncio.sleep(0)           # let the requests that arrived meanwhile reach the queue

    def _drain(self, items: list) -> None:
        while len(items) < self.max_batch and not self.queue.empty():
            items.append(self.queue.get_nowait())


# ---------------------------------------------------------------- the served-output log (read by compress drift)
class OutputLog:
    """JSON lines, one per served sample: ``{"t", "model", "id"?, "output", "input"}`` (see ``compress drift --current LOG_DIR``),
    in ``served-<pid>-<n>.jsonl`` files of at most ``max_bytes``, the newest ``keep`` per process kept. ``sample`` is the
    fraction of served samples written."""

    def __init__(self, directory: Path, model: str, sample: float = 1.0, max_bytes: int = 16 << 20, keep: int = 8):
        self.dir, self.model, self.sample, self.max_bytes, self.keep = Path(directory), model, sample, max_bytes, keep
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n, self.f, self.written = 0, None, 0
        self.rng = random.Random(os.getpid())

    def _open(self) -> None:
        if self.f is not None:
            self.f.close()
        self.n += 1
        self.f = open(self.dir / f"served-{os.getpid()}-{self.n}.jsonl", "a", encoding="utf-8")
        self.written = 0
        old = sorted(self.dir.glob(f"served-{os.getpid()}-*.jsonl"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        for p in old[: max(0, len(old) - self.keep)]:
            p.unlink(missing_ok=True)

    def write(self, model: ServedModel, outputs: list[np.ndarray], inputs: list[np.ndarray], request_id: str | None = None) -> None:
        now = time.time()
        n = outputs[0].shape[0]
        for i in range(n):
            if self.sample < 1.0 and self.rng.random() >= self.sample:
                continue
            if self.f is None or self.written > self.max_bytes:
                self._open()
            # the request's id (v2 "id", or the X-Request-ID header) and the sample's place in it: a drifted sample
            # found in the log leads back to the request that carried it
            rid = {"id": request_id[:200], **({"sample": i} if n > 1 else {})} if request_id else {}
            line = json.dumps({"t": round(now, 3), "model": self.model, **rid,
                               "output": [round(float(v), 6) for v in model.pooled(outputs[0], inputs, i).ravel()],
                               "input": model.input_stats(inputs, i)}) + "\n"
            self.f.write(line)
            self.written += len(line)
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _fast_tokenizer(tokenizer, max_length: int):
    """A copy of a fast (Rust) tokenizer's engine that truncates to ``max_length`` and does not pad, or None. Only where
    the wrapper adds nothing of its own: special tokens come from the engine's post-processor either way."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or getattr(tokenizer, "padding_side", "right") != "right":
        return None
    try:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_padding()
        fast.enable_truncation(max_length)
        return fast
    except Exception:  # noqa: BLE001 - the wrapper's call stays the way
        return None
