"""The accuracy a model is likely keeping on unlabelled data, calibrated on synthetic shifts of its labelled reference.

Confidence alone cannot see a model that is confidently wrong: on Fashion-MNIST brightened by 0.5, zoo:fmnist-resnet
keeps 10% accuracy at 96% mean confidence, so ATC (average thresholded confidence) estimates 95%. What does move is
*where* the current samples sit and *what* the model predicts for them. So, where the reference's own inputs can be
loaded again (images: its DATA spec and the indices it keeps), ``calibrate`` makes labelled shifted versions of them —
eight corruption families at five severities, none of them the families the benchmark scores the estimate on (Gaussian
noise, blur, brightness) — and profiles them with the model. Each shifted set, and clean and class-prior-shifted
resamples of the reference, is one *calibration point*: three statistics of the set and the accuracy measured on it.

- ``atc``: the ATC estimate (negative entropy);
- ``predicted shift``: total variation between the predicted-class histograms of the set and of the reference;
- ``distance``: mean log cosine distance of each sample to its 10 nearest reference embeddings, minus the reference's
  own (leave-one-out).

The current data's estimate is the distance-weighted mean accuracy of the 8 calibration points nearest to its
statistics (standardised): it looks like those shifts, and the model kept that accuracy there (AutoEval's idea, Deng
& Zheng 2021, with nearest neighbours instead of a regression line). The interval is a bootstrap over the current
samples, widened by the error the method made on those nearest shifts with their family left out of the calibration. Points are drawn at the current sample's size, so the sampling noise of the statistics matches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .reference import Profile

log = logging.getLogger(__name__)

FAMILIES = ("contrast", "impulse", "pixelate", "translate", "occlude", "speckle", "gamma", "rotate")
SEVERITIES = (1, 2, 3, 4, 5)
NEIGHBOURS = 10             # reference embeddings each sample's distance is taken to
POINTS = 8                  # calibration points the estimate averages
DRAWS = 3                   # draws of each shifted set at the current sample's size
RESAMPLES = 40              # clean and class-prior-shifted resamples of the reference
MAX_CALIBRATION = 512       # reference samples corrupted per set, at most ...
MIN_CALIBRATION = 64        # ... and at least (fewer where the budget allows no more)
OUTSIDE = 0.05              # a statistic this share of the calibration's range beyond it is outside
BUDGET_S = 60.0             # profiling every set: fewer samples per set, then fewer severities, past this


def corrupt(x: torch.Tensor, family: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Images [n, c, h, w], normalised any way: each image's range is mapped to [0, 1], corrupted there, mapped back."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    p = (x - lo) / span
    s = severity - 1
    h, w = p.shape[-2:]
    if family == "contrast":
        m = p.mean(dim=(1, 2, 3), keepdim=True)
        p = (p - m) * (0.6, 0.45, 0.3, 0.2, 0.1)[s] + m
    elif family == "impulse":
        f, r = (0.02, 0.05, 0.1, 0.2, 0.3)[s], torch.rand(p.shape, generator=generator)
        p = torch.where(r < f / 2, torch.zeros_like(p), torch.where(r < f, torch.ones_like(p), p))
    elif family == "pixelate":
        k = (0.72, 0.57, 0.43, 0.36, 0.29)[s]
        small = torch.nn.functional.interpolate(p, size=(max(2, round(h * k)), max(2, round(w * k))), mode="area")
        p = torch.nn.functional.interpolate(small, size=(h, w), mode="nearest")
    elif family == "translate":
        dx = max(1, round(w * (1, 2, 3, 4, 6)[s] / 28))
        dy = dx // 2
        q = torch.zeros_like(p)
        q[..., dy:, dx:] = p[..., : h - dy, : w - dx]
        p = q
    elif family == "occlude":
        side = max(1, round(min(h, w) * (4, 6, 8, 10, 13)[s] / 28))
        ys = torch.randint(0, h - side + 1, (len(p),), generator=generator)
        xs = torch.randint(0, w - side + 1, (len(p),), generator=generator)
        p = p.clone()
        for i in range(len(p)):
            p[i, :, ys[i]: ys[i] + side, xs[i]: xs[i] + side] = 0
    elif family == "speckle":
        p = p + p * torch.randn(p.shape, generator=generator) * (0.15, 0.3, 0.45, 0.6, 0.8)[s]
    elif family == "gamma":
        p = p.clamp(0, 1) ** (1.5, 2.0, 3.0, 4.0, 5.0)[s]
    elif family == "rotate":
        from torchvision.transforms.functional import rotate

        p = rotate(p, (8, 15, 25, 35, 50)[s])
    else:
        raise ValueError(f"unknown corruption family {family}")
    return p.clamp(0, 1) * span + lo


# ---------------------------------------------------------------- statistics of a set
def atc_share(ref_score, right, cur_score) -> float:
    t = np.quantile(ref_score, 1 - right.mean())
    return float((cur_score > t).mean())


def _unit(e: np.ndarray, centre: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64) - centre
    return e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-9, None)


@dataclass
class ShiftCalibration:
    """The reference, and its shifted versions (each sample i of a set is the reference's sample i, corrupted)."""
    ref: Profile
    sets: dict[str, Profile] = field(default_factory=dict)
    seconds: float | None = None

    def __post_init__(self):
        known = self.ref.labels >= 0
        self._ref = self.ref.take(np.flatnonzero(known))
        self._centre = self._ref.embedding.astype(np.float64).mean(0)
        self._R = _unit(self._ref.embedding, self._centre)
        self._classes = self._ref.outputs.shape[1]
        self._hist = self._histogram(self._ref)
        self._score, self._right = -self._ref.entropy, self._ref.correct.astype(np.float64)
        own = np.arange(len(self._ref))
        self._ref_dist = self.distances(self._ref, own)
        self._base = float(self._ref_dist.mean())
        # the shifted sets, with each sample's own clean original left out of its neighbours
        pos = {int(i): k for k, i in enumerate(self.ref.index[known])} if self.ref.index is not None else None
        self._sets = []
        for name, p in self.sets.items():
            keep = np.flatnonzero(p.labels >= 0)
            p = p.take(keep)
            mine = np.array([pos.get(int(i), -1) for i in p.index]) if pos is not None and p.index is not None else None
            self._sets.append((name, p, self.distances(p, mine)))

    def _histogram(self, p: Profile) -> np.ndarray:
        return np.bincount(p.predicted, minlength=self._classes)[: self._classes] / max(1, len(p))

    def distances(self, p: Profile, own: np.ndarray | None = None) -> np.ndarray:
        """Each sample's log mean cosine distance to its nearest reference embeddings (``own``: a reference index to
        leave out per sample, -1 for none)."""
        s = _unit(p.embedding, self._centre) @ self._R.T
        if own is not None:
            rows = np.flatnonzero(own >= 0)
            s[rows, own[rows]] = -np.inf
        k = min(NEIGHBOURS, s.shape[1] - 1)
        top = -np.partition(-s, k - 1, axis=1)[:, :k]
        return np.log(np.clip(1 - top.mean(1), 1e-6, None))

    def statistics(self, p: Profile, dist: np.ndarray) -> np.ndarray:
        atc = atc_share(self._score, self._right, -p.entropy)
        shift = 0.5 * float(np.abs(self._histogram(p) - self._hist).sum())
        return np.array([atc, shift, float(dist.mean()) - self._base])

    def points(self, n: int, rng) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Calibration points at sample size ``n``: (statistics, accuracy, name) per point."""
        X, y, names = [], [], []
        for name, p, dist in self._sets:
            for _ in range(DRAWS):
                i = rng.choice(len(p), n, replace=n > len(p))      # at the current data's size: the same sampling noise
                q = p.take(i)
                X.append(self.statistics(q, dist[i]))
                y.append(q.accuracy)
                names.append(name)
        labels = self._ref.labels
        for r in range(RESAMPLES):         # the reference resampled: clean (even classes) and with skewed class priors
            w = rng.dirichlet(np.ones(self._classes) * (0.5 if r % 2 else 50.0))[np.clip(labels, 0, self._classes - 1)]
            i = rng.choice(len(self._ref), n, replace=True, p=w / w.sum())
            q = self._ref.take(i)
            X.append(self.statistics(q, self._ref_dist[i]))
            y.append(q.accuracy)
            names.append("reference (clean)" if r % 2 == 0 else "reference (class mix shifted)")
        return np.array(X), np.array(y), names

    def estimate(self, cur: Profile, seed: int = 0, bootstrap: int = 200) -> dict:
        rng = np.random.default_rng(seed)
        X, y, names = self.points(len(cur), rng)
        mu, sd = X.mean(0), X.std(0) + 1e-9
        Z = (X - mu) / sd
        knn = _regressor(Z, y)
        dist = self.distances(cur)
        stats = self.statistics(cur, dist)
        z = ((stats - mu) / sd)[None]
        est = float(np.clip(knn.predict(z)[0], 0, 1))
        near = knn.kneighbors(z, return_distance=False)[0]
        # beyond every calibration point on some statistic (a new domain, MNIST digits to a Fashion-MNIST model): the
        # neighbours are only the nearest edge, and both estimates tend to run high there, so the lower one is given
        span = Z.max(0) - Z.min(0)
        outside = bool(((z[0] < Z.min(0) - OUTSIDE * span) | (z[0] > Z.max(0) + OUTSIDE * span)).any())
        if outside and stats[0] < est:
            est = float(stats[0])
        # how far off the method was on the nearest shifts when their family was left out of the calibration
        family = np.array([n.split("-")[0] if not n.startswith("reference") else "reference" for n in names])
        missed = np.zeros(len(y))
        for fam in np.unique(family):
            out = family == fam
            missed[out] = _regressor(Z[~out], y[~out]).predict(Z[out]) - y[out]
        spread = float(np.sqrt(np.mean(missed[near] ** 2)))
        boots = []
        for _ in range(bootstrap):
            j = rng.integers(len(cur), size=len(cur))
            boots.append(float(knn.predict(((self.statistics(cur.take(j), dist[j]) - mu) / sd)[None])[0]))
        lo, hi = (np.percentile(boots, 2.5), np.percentile(boots, 97.5)) if boots else (est, est)
        lo, hi = min(lo, est), max(hi, est)
        return {"estimated": est, "interval": [float(np.clip(lo - spread, 0, 1)), float(np.clip(hi + spread, 0, 1))],
                "statistics": {"atc": float(stats[0]), "predicted_shift": float(stats[1]), "distance": float(stats[2])},
                "held_out_error": spread, "nearest": sorted({names[i] for i in near}), "shifts": len(self.sets), "outside": outside}


def _regressor(Z: np.ndarray, y: np.ndarray):
    from sklearn.neighbors import KNeighborsRegressor

    return KNeighborsRegressor(n_neighbors=min(POINTS, len(Z)), weights="distance").fit(Z, y)


# ---------------------------------------------------------------- making the shifted sets
def calibrate(artifact, ref: Profile, dataset, *, seed: int = 0, budget_s: float = BUDGET_S, runner=None) -> ShiftCalibration | None:
    """Corrupt (up to MAX_CALIBRATION of) the reference's own inputs — ``dataset`` is the data set ``ref.index``
    indexes — with every family and severity, and profile each set with ``artifact``. None when the reference has no
    labels, is not images, or its inputs cannot be read."""
    from .data import ListData
    from .reference import profile_data
    from .runners import load_runner

    if ref.kind != "image" or ref.correct is None or ref.index is None or not ref.classifier:
        return None
    started = time.perf_counter()
    known = np.flatnonzero(ref.labels >= 0)
    pick = np.random.default_rng(seed).permutation(known)[:MAX_CALIBRATION]
    idx = ref.index[pick]
    items = [dataset[int(i)] for i in idx]
    x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
    if x.dim() != 4:
        return None
    labels = [int(it[1]) for it in items]
    families = list(FAMILIES)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        families.remove("rotate")
    runner = runner or load_runner(artifact)
    sets, order = {}, [(f, s) for s in (1, 5, 3, 2, 4) for f in families]     # the extremes first: a cut keeps the range
    take = min(len(x), MIN_CALIBRATION)            # the first set sets the pace: then as many samples as fit the budget
    first = time.perf_counter()
    for k, (family, severity) in enumerate(order):
        spent = time.perf_counter() - started
        if k == 1:
            pace = (time.perf_counter() - first) / take
            take = int(np.clip(budget_s / len(order) / pace, min(len(x), MIN_CALIBRATION), len(x)))
        if k >= 2 * len(families) and spent * (k + 1) / k > budget_s:
            log.info("shift calibration stopped after %d of %d sets (%.0f s)", k, len(order), spent)
            break
        g = torch.Generator().manual_seed(seed * 1000 + k)
        data = ListData(list(corrupt(x[:take], family, severity, g)), labels[:take])
        name = f"{family}-{severity}"
        sets[name] = profile_data(artifact, data, kind="image", data=name, num_classes=ref.meta.get("num_classes"), limit=None,
                                  indices=np.arange(len(data)), space=ref.space, runner=runner)
        sets[name].index = idx[:take]          # each sample is the reference's sample of that index, corrupted
    return ShiftCalibration(ref, sets, seconds=time.perf_counter() - started)
