"""What a model does on some data, per sample, kept small: the *profile* ``compress drift`` compares.

A run directory made with data keeps the profile of its final model on held-out data (``reference.npz`` with a
readable summary in ``reference.json``, both listed in its manifest): up to MAX_SAMPLES random samples, fewer (never
under MIN_REFERENCE) where the model is too slow to profile them within BUDGET_S. The current data — a DATA spec, or a served
model's log — is profiled by the same model the same way, so the two are always compared like with like:

- outputs: the model's first output per sample (pooled to one vector; a sample of them is kept), from which a
  classifier's confidence (max softmax), entropy and predicted class follow, and whether it was right where labels exist;
- embeddings: the input of the last Linear layer where that layer makes the output (the penultimate features, found
  by a forward hook), else the outputs themselves (sentence-embedding models, and formats that cannot be hooked:
  ONNX, OpenVINO, ...); ``space`` records which;
- input statistics: images' mean, std and edge strength (mean absolute difference of neighbouring pixels), text's
  length in tokens and unknown-token rate, a tabular input's features.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import CompressError

log = logging.getLogger(__name__)

REFERENCE_NPZ, REFERENCE_JSON = "reference.npz", "reference.json"
MAX_SAMPLES = 512              # the reference a run directory keeps
BUDGET_S = 5.0                 # ... profiled for about this long at most (a large text model on a small CPU), but
MIN_REFERENCE = 128            # ... never fewer samples than this
CHUNK = 128                    # samples are run in random chunks of this many (text: sorted by length within, less padding)
MAX_FEATURES = 64              # tabular inputs up to this many features are kept feature by feature
EMBEDDING_TASKS = ("embedding", "feature-extraction", "sentence-embedding")


@dataclass
class Profile:
    kind: str                               # image | text | tensor
    data: str                               # where the samples came from
    space: str                              # the embedding space: "penultimate" or "outputs"
    classifier: bool                        # outputs are class scores
    probabilities: bool                     # ... already normalised (softmax inside the model), not logits
    outputs: np.ndarray                     # [n, k] float32, pooled to one vector per sample
    embeddings: np.ndarray | None = None    # [n, d] penultimate features (None when space is "outputs")
    inputs: dict = field(default_factory=dict)   # statistic name -> [n] (or "features" -> [n, f])
    labels: np.ndarray | None = None        # [n] int, -1 where unknown; None: no labels at all
    index: np.ndarray | None = None         # [n] each sample's index in its data set (or line in a log)
    times: np.ndarray | None = None         # [n] unix seconds (a served model's log)
    refs: list | None = None                # [n] how a person finds the input: its text, file, or DATA#index
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.outputs)

    # -------------------------------------------------------------- what follows from the outputs
    @property
    def probs(self) -> np.ndarray | None:
        if not self.classifier:
            return None
        if self.probabilities:
            p = np.clip(self.outputs.astype(np.float64), 0, None)
            return p / np.maximum(p.sum(1, keepdims=True), 1e-12)
        z = self.outputs.astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    @property
    def confidence(self) -> np.ndarray | None:
        p = self.probs
        return None if p is None else p.max(1)

    @property
    def entropy(self) -> np.ndarray | None:
        p = self.probs
        return None if p is None else -(p * np.log(np.clip(p, 1e-12, None))).sum(1)

    @property
    def predicted(self) -> np.ndarray | None:
        return None if not self.classifier else self.outputs.argmax(1)

    @property
    def correct(self) -> np.ndarray | None:
        """Per labelled sample, whether the prediction was right (None without labels)."""
        if self.labels is None or not self.classifier or not (self.labels >= 0).any():
            return None
        known = self.labels >= 0
        return (self.predicted[known] == self.labels[known])

    @property
    def accuracy(self) -> float | None:
        c = self.correct
        return None if c is None or not len(c) else float(c.mean())

    @property
    def embedding(self) -> np.ndarray:
        """The vectors drift compares: the penultimate features, or the outputs."""
        return self.embeddings if self.space == "penultimate" and self.embeddings is not None else self.outputs

    def in_output_space(self) -> "Profile":
        return replace(self, space="outputs", embeddings=None)

    def take(self, idx) -> "Profile":
        idx = np.asarray(idx)
        cut = lambda a: None if a is None else a[idx]  # noqa: E731
        return replace(self, outputs=self.outputs[idx], embeddings=cut(self.embeddings), labels=cut(self.labels),
                       index=cut(self.index), times=cut(self.times), refs=None if self.refs is None else [self.refs[i] for i in idx],
                       inputs={k: v[idx] for k, v in self.inputs.items()})

    def summary(self) -> dict:
        conf = self.confidence
        return {"data": self.data, "kind": self.kind, "samples": len(self), "embedding_space": self.space,
                "embedding_dim": int(self.embedding.shape[1]), "classifier": self.classifier,
                "mean_confidence": None if conf is None else round(float(conf.mean()), 4),
                "accuracy": None if self.accuracy is None else round(self.accuracy, 4),
                "labelled": 0 if self.correct is None else int(len(self.correct)), "inputs": sorted(self.inputs)}

    # -------------------------------------------------------------- on disk
    def save(self, directory: Path) -> list[Path]:
        """Write reference.npz and reference.json into ``directory`` (each atomically)."""
        import io

        from .rundir import write_file_atomic

        arrays = {"outputs": self.outputs.astype(np.float32)}
        if self.embeddings is not None:
            arrays["embeddings"] = self.embeddings.astype(np.float32)
        if self.labels is not None:
            arrays["labels"] = self.labels.astype(np.int64)
        if self.index is not None:
            arrays["index"] = self.index.astype(np.int64)
        arrays.update({f"input_{k}": np.asarray(v, dtype=np.float32) for k, v in self.inputs.items()})
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        doc = {"kind": self.kind, "data": self.data, "embedding_space": self.space, "classifier": self.classifier,
               "probabilities": self.probabilities, **self.summary(), **self.meta}
        return [write_file_atomic(Path(directory) / REFERENCE_NPZ, buf.getvalue()),
                write_file_atomic(Path(directory) / REFERENCE_JSON, json.dumps(doc, indent=2) + "\n")]

    @classmethod
    def load(cls, directory: Path) -> "Profile | None":
        """The reference a run directory keeps, or None when it has none."""
        npz, js = Path(directory) / REFERENCE_NPZ, Path(directory) / REFERENCE_JSON
        if not npz.is_file() or not js.is_file():
            return None
        try:
            doc = json.loads(js.read_text())
            with np.load(npz, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            raise CompressError(f"the reference profile in {directory} cannot be read ({exc})",
                                "Give --reference DATA to profile the held-out data again") from None
        meta = {k: doc[k] for k in ("num_classes", "model_format", "compress") if k in doc}
        return cls(kind=doc["kind"], data=doc["data"], space=doc["embedding_space"], classifier=doc["classifier"],
                   probabilities=doc["probabilities"], outputs=a["outputs"], embeddings=a.get("embeddings"),
                   inputs={k[len("input_"):]: v for k, v in a.items() if k.startswith("input_")},
                   labels=a.get("labels"), index=a.get("index"), meta=meta)


# ---------------------------------------------------------------- profiling a model on data
def profile_data(artifact, ds, *, kind: str, data: str, num_classes: int | None = None, labelled: bool = True,
                 limit: int | None = MAX_SAMPLES, indices=None, exclude=None, seed: int = 0, space: str | None = None,
                 runner=None, batch_size: int = 64, budget_s: float | None = None, min_samples: int = MIN_REFERENCE) -> Profile:
    """Run ``artifact`` on (up to ``limit`` random samples of) the data set ``ds`` and profile it.

    ``exclude``: indices not to use (the reference's, when current data comes from the same set); ``space``: the
    embedding space to use (the reference's), found from the model when None; ``budget_s``: once ``min_samples`` are
    done, stop before a chunk of samples that would end past this many seconds (at the pace so far; every chunk is a
    random draw, so the profile stays a random sample)."""
    import time

    from torch.utils.data import Subset

    from .data import batches, tokenizer_for
    from .runners import load_runner

    if indices is None:
        order = np.random.default_rng(seed).permutation(len(ds))
        if exclude is not None and len(exclude):
            order = order[~np.isin(order, np.asarray(exclude))]
        indices = order[:limit] if limit else order
    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        if exclude is not None and len(exclude):
            raise CompressError(f"every held-out sample of {data} is in the reference already, so none is left to compare with it",
                                "Give other data as --current (new inputs, or a compress serve --log-dir)")
        raise CompressError(f"the data {data} has no samples to profile", "Give more data")
    runner = runner or load_runner(artifact)
    tokenizer = tokenizer_for(artifact) if kind == "text" else None
    hook = _Penultimate(runner, artifact) if space != "outputs" else None
    outs, feats, stats, labels, done = [], [], {}, [], []
    started = time.perf_counter()
    try:
        for c in range(0, len(indices), CHUNK):
            spent = time.perf_counter() - started
            if budget_s is not None and len(done) >= max(min_samples, 1) and spent * (len(done) + CHUNK) / len(done) > budget_s:
                log.debug("profiled %d of %d samples within %.1f s", len(done), len(indices), budget_s)
                break
            chunk = indices[c: c + CHUNK]
            if kind == "text":      # batches of texts of similar length: less padding, same outputs
                chunk = chunk[np.argsort([len(str(ds[int(i)][0])) for i in chunk], kind="stable")]
            for inputs, lab in batches(Subset(ds, chunk.tolist()), artifact.input_spec, batch_size, None, tokenizer):
                if hook is not None:
                    hook.captured = None
                out = _pool(runner(*inputs)[0], inputs)
                outs.append(out)
                labels.append(lab)
                if hook is not None:
                    feats.append(hook.features(out))
                for k, v in input_stats(inputs, kind, tokenizer).items():
                    stats.setdefault(k, []).append(v)
            done.extend(chunk.tolist())
    finally:
        if hook is not None:
            hook.remove()
    indices = np.asarray(done, dtype=np.int64)
    outputs = torch.cat(outs).float().numpy()
    penultimate = hook is not None and all(f is not None for f in feats)
    if space == "penultimate" and not penultimate:
        raise CompressError("the reference holds penultimate features but this model's cannot be read now",
                            "Give --reference DATA to profile the reference again with this model")
    labels = torch.cat(labels).numpy().astype(np.int64) if labelled else None
    refs = [_ref(ds, int(i), data) for i in indices]
    return Profile(kind=kind, data=data, space="penultimate" if penultimate else "outputs",
                   classifier=is_classifier(artifact, outputs, num_classes),
                   probabilities=_are_probabilities(outputs), outputs=outputs,
                   embeddings=torch.cat(feats).float().numpy() if penultimate else None,
                   inputs={k: np.concatenate(v) for k, v in stats.items()}, labels=labels, index=indices, refs=refs,
                   meta={"num_classes": num_classes, "model_format": artifact.format})


def profile_bundle(artifact, bundle, **kw) -> Profile:
    """Profile a DataBundle's held-out split."""
    return profile_data(artifact, bundle.eval, kind=bundle.kind, data=bundle.name, num_classes=bundle.num_classes,
                        labelled=bundle.labelled, **kw)


def write_reference(artifact, data, directory: Path) -> list[Path]:
    """Profile ``artifact`` on the held-out split of ``data`` (a DATA spec, or the DataBundle already loaded; at most
    MAX_SAMPLES) and keep it in ``directory``. Skipped when $COMPRESS_REFERENCE is 0 (optimize's candidates: only the
    pick needs one)."""
    if os.environ.get("COMPRESS_REFERENCE", "1") == "0":
        return []
    from .data import load_data
    from .version import __version__

    ref = profile_bundle(artifact, load_data(data) if isinstance(data, (str, Path)) else data, budget_s=BUDGET_S)
    ref.meta["compress"] = __version__
    return ref.save(directory)


class _Penultimate:
    """A forward hook on the last Linear layer of a torch model: its input is the penultimate features, when its output
    is the model's output (checked on every batch)."""

    def __init__(self, runner, artifact):
        self.captured, self.handle = None, None
        module = getattr(runner, "module", None)
        if not artifact.is_torch or module is None:
            return
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("Linear")]
        if linears:
            self.handle = linears[-1].register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            self.captured = (args[0].detach().float().cpu(), output.detach().float().cpu())

    def features(self, out: torch.Tensor) -> torch.Tensor | None:
        if self.captured is None:
            return None
        x, y = self.captured
        if x.dim() != 2 or y.shape != out.shape or not torch.allclose(y, out.float(), rtol=1e-4, atol=1e-5):
            return None
        return x

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _pool(out: torch.Tensor, inputs) -> torch.Tensor:
    """One vector per sample: [B, seq, H] mean-pooled over the tokens the mask keeps, [B, C, H, W] over space."""
    out = out.float()
    if out.dim() == 1:
        return out[:, None]
    if out.dim() == 3:
        mask = inputs[1] if len(inputs) > 1 and inputs[1].shape == out.shape[:2] else None
        if mask is None:
            return out.mean(1)
        m = mask.float()[..., None]
        return (out * m).sum(1) / m.sum(1).clamp(min=1)
    if out.dim() > 3:
        return out.flatten(2).mean(2)
    return out


def is_classifier(artifact, outputs: np.ndarray, num_classes: int | None) -> bool:
    """Whether the outputs are class scores: [n, k≥2], not an embedding model's (by its task, or unit-length rows)."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return False
    task = (((artifact.arch or {}).get("args") or {}).get("task") if artifact is not None else None)
    if task in EMBEDDING_TASKS:
        return False
    if num_classes and outputs.shape[1] != num_classes:
        return False
    norms = np.linalg.norm(outputs, axis=1)
    return not ((outputs < 0).any() and np.allclose(norms, 1.0, atol=1e-3))


def _are_probabilities(outputs: np.ndarray) -> bool:
    return outputs.ndim == 2 and outputs.shape[1] >= 2 and bool((outputs >= 0).all()) and np.allclose(outputs.sum(1), 1.0, atol=1e-3)


def input_stats(inputs, kind: str, tokenizer=None) -> dict:
    """Per-sample statistics of a batch of model inputs (the same a server logs: mean and std, or tokens and unknown rate)."""
    x = inputs[0]
    if kind == "text" or not x.is_floating_point():
        mask = inputs[1] if len(inputs) > 1 and inputs[1].shape == x.shape else (x != getattr(tokenizer, "pad_token_id", 0))
        tokens = mask.sum(1).clamp(min=1)
        unk = getattr(tokenizer, "unk_token_id", None)
        unknown = ((x == unk) & mask.bool()).sum(1) / tokens if unk is not None else torch.zeros(len(x))
        return {"tokens": tokens.float().numpy(), "unknown_rate": unknown.float().numpy()}
    flat = x.float().flatten(1)
    stats = {"mean": flat.mean(1).numpy(), "std": flat.std(1, unbiased=False).numpy()}      # as a server logs them (numpy std)
    if x.dim() == 4:
        img = x.float()
        edge = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(1).mean(1) + (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(1).mean(1)
        stats["edge"] = (edge / 2).numpy()
    elif x.dim() == 2 and x.shape[1] <= MAX_FEATURES:
        stats["features"] = x.float().numpy()
    return stats


def _ref(ds, i: int, data: str) -> str:
    """How a person finds sample ``i``: its text, its image file, or DATA#index."""
    base, j = ds, i
    while hasattr(base, "indices") and hasattr(base, "dataset"):       # torch Subsets
        j, base = int(base.indices[j]), base.dataset
    items = getattr(base, "items", None)
    if items is not None and j < len(items):
        item = items[j]
        if isinstance(item, str):
            return item
        if isinstance(item, tuple) and item and isinstance(item[0], (str, Path)):
            return str(item[0])
    return f"{data}#{i}"
