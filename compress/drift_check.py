"""``compress drift``: has the data a model sees moved away from what it was validated on, and what is it costing?

The reference profile (:mod:`compress.reference`, kept in the run directory or made from ``--reference DATA``) is
compared with the profile of the current data — a DATA spec, or a served model's log — by four tests, each with its
statistic, p-value (and interval), threshold and verdict:

1. **confidence**: KS tests on the max-softmax confidence and the entropy; the accuracy on the unlabelled current data
   is estimated on synthetic shifts of the labelled reference where its inputs can be read again (images:
   :mod:`compress.drift_estimate`), else from confidences calibrated on it (average thresholded confidence, ATC);
2. **embedding**: MMD² with an RBF kernel (median-heuristic bandwidth), permutation p-value; and the cosine
   similarity of the mean embeddings;
3. **domain**: a cross-validated linear classifier telling reference from current embeddings: ROC AUC of its held-out
   scores with a bootstrap interval, permutation p-value (the cross-validation re-run on shuffled labels);
4. **inputs**: KS (and PSI) per input statistic or tabular feature.

The verdict is "drift" when any test's p-value is below alpha / (the number of tests that ran): Bonferroni, so that
the combined false-alarm rate stays within alpha. ``--sample K`` writes the current inputs most worth labelling by
hand, ``--labels FILE`` turns them into a measured accuracy (Wilson interval), ``--window`` tests every time window of
a served model's log.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import durations
from .drift_estimate import ShiftCalibration, atc_share
from .drift_labels import read_labels, wilson, write_sample
from .drift_report import TITLES, write_outputs
from .errors import CompressError, require
from .reference import Profile

ALPHA = 0.05
MIN_SAMPLES = 20
PERMUTATIONS = 500
BOOTSTRAP = 200
FOLDS = 5
FAR_AUC = 0.95        # a domain classifier this good: the current data is out of the reference's distribution
TESTS = ("confidence", "embedding", "domain", "inputs")


@dataclass
class TestResult:
    name: str
    statistic: float
    statistic_name: str
    p_value: float
    threshold: float                  # the p-value below which this test says "drift" (alpha / tests)
    interval: tuple | None = None     # a 95% interval on the statistic, where there is one
    details: dict = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return bool(self.p_value < self.threshold)

    def to_dict(self) -> dict:
        return {"test": self.name, "title": TITLES[self.name], "statistic": _r(self.statistic), "statistic_name": self.statistic_name,
                "p_value": _g(self.p_value), "interval": None if self.interval is None else [_r(v) for v in self.interval],
                "threshold": _g(self.threshold), "drifted": self.drifted, "details": _clean(self.details)}


@dataclass
class DriftReport:
    run_dir: str
    current: dict                     # what was compared: source, samples, kind
    reference: dict
    tests: list[TestResult]
    skipped: dict                     # test -> why it did not run
    alpha: float
    accuracy: dict                    # reference, estimated (+ interval, methods), measured (from labels)
    windows: list[dict] = field(default_factory=list)
    window_s: float | None = None
    written: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ref_profile: Profile | None = field(default=None, repr=False)
    cur_profile: Profile | None = field(default=None, repr=False)

    @property
    def drifted(self) -> bool:
        return any(t.drifted for t in self.tests)

    @property
    def exit_code(self) -> int:
        """The CLI's answer: 0 nothing drifted, 3 drift detected (the command ran and the answer is no)."""
        return 3 if self.drifted else 0

    @property
    def drifted_tests(self) -> list[str]:
        return [t.name for t in self.tests if t.drifted]

    def to_dict(self) -> dict:
        return _clean({"run_dir": self.run_dir, "drifted": self.drifted, "drifted_tests": self.drifted_tests, "alpha": self.alpha,
                       "correction": f"Bonferroni over {len(self.tests)} tests", "reference": self.reference, "current": self.current,
                       "tests": [t.to_dict() for t in self.tests], "skipped": self.skipped, "accuracy": self.accuracy,
                       "window_s": self.window_s, "windows": self.windows, "warnings": self.warnings})


# ---------------------------------------------------------------- the tests
def compare(ref: Profile, cur: Profile, alpha: float = ALPHA, permutations: int = PERMUTATIONS, seed: int = 0,
            bootstrap: int = BOOTSTRAP) -> tuple[list[TestResult], dict]:
    """Every test that applies to ``ref`` vs ``cur``, at the Bonferroni threshold; and why the others were skipped."""
    rng = np.random.default_rng(seed)
    if ref.space != cur.space:                        # like with like: both in the space of the model's outputs
        ref, cur = ref.in_output_space(), cur.in_output_space()
    if ref.embedding.shape[1] != cur.embedding.shape[1]:
        raise CompressError(f"the reference's embeddings have {ref.embedding.shape[1]} dimensions and the current data's "
                            f"{cur.embedding.shape[1]}", "Compare data run through the same model")
    skipped = {}
    if not (ref.classifier and cur.classifier):
        skipped["confidence"] = "the model is not a classifier (its outputs are not class scores)"
    common = sorted(set(ref.inputs) & set(cur.inputs))
    if not common:
        skipped["inputs"] = "no input statistic is known for both sides"
    runs = [t for t in TESTS if t not in skipped]
    threshold = alpha / len(runs)
    tests = []
    with _one_thread():
        for name in runs:
            if name == "confidence":
                tests.append(confidence_test(ref, cur, threshold))
            elif name == "embedding":
                tests.append(mmd_test(ref.embedding, cur.embedding, threshold, permutations, rng))
            elif name == "domain":
                tests.append(domain_test(ref.embedding, cur.embedding, threshold, rng, bootstrap, permutations))
            else:
                tests.append(inputs_test(ref, cur, common, threshold))
    return tests, skipped


def _one_thread():
    """BLAS on one thread: these matrices are small, and threads fighting for a busy machine's cores made the tests 5x
    slower (measured on 2 cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                  # scikit-learn brings it; without it, the default threads
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def confidence_test(ref: Profile, cur: Profile, threshold: float) -> TestResult:
    from scipy.stats import ks_2samp

    c = ks_2samp(ref.confidence, cur.confidence)
    e = ks_2samp(ref.entropy, cur.entropy)
    return TestResult("confidence", float(c.statistic), "KS D (max softmax)", min(1.0, 2 * min(c.pvalue, e.pvalue)), threshold,
                      details={"ks_confidence": float(c.statistic), "p_confidence": float(c.pvalue), "ks_entropy": float(e.statistic),
                               "p_entropy": float(e.pvalue), "mean_confidence_reference": float(ref.confidence.mean()),
                               "mean_confidence_current": float(cur.confidence.mean()),
                               "mean_entropy_reference": float(ref.entropy.mean()), "mean_entropy_current": float(cur.entropy.mean())})


def mmd_test(x: np.ndarray, y: np.ndarray, threshold: float, permutations: int, rng) -> TestResult:
    """MMD² (V-statistic) with an RBF kernel, bandwidth the median pairwise distance; permutation p-value."""
    z = np.vstack([x, y]).astype(np.float64)
    n, m = len(x), len(y)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    med = float(np.median(d2[np.triu_indices(len(z), 1)])) or 1.0
    k = np.exp(-d2 / (2 * med))
    w = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)])
    observed = float(w @ k @ w)
    above = 0
    for start in range(0, permutations, 100):
        cols = min(100, permutations - start)
        W = np.stack([rng.permutation(w) for _ in range(cols)], axis=1)
        above += int((np.einsum("ij,ij->j", W, k @ W) >= observed - 1e-12).sum())
    mx, my = x.mean(0), y.mean(0)
    cos = float(mx @ my / max(np.linalg.norm(mx) * np.linalg.norm(my), 1e-12))
    return TestResult("embedding", observed, "MMD²", (1 + above) / (1 + permutations), threshold,
                      details={"bandwidth": math.sqrt(med), "permutations": permutations, "cosine_of_means": cos,
                               "dim": int(z.shape[1])})


def domain_test(x: np.ndarray, y: np.ndarray, threshold: float, rng, bootstrap: int = BOOTSTRAP,
                permutations: int = PERMUTATIONS) -> TestResult:
    """A linear classifier told to separate reference from current: least squares (the direction of Fisher's
    discriminant) on the standardised embeddings' first ≤ 32 principal components, 5-fold cross-validated; its statistic
    is the ROC AUC of the held-out scores (a bootstrap interval beside it), its p-value a permutation test that
    re-runs the whole cross-validation on shuffled labels.

    Why this and not a Mann-Whitney test of cross-validated scores (the usual shortcut): scores from different folds
    come from different models, and that test then flagged 5% of same-distribution splits at a 1.25% threshold
    (measured on Fashion-MNIST embeddings); label-independent folds plus a permutation p-value keep it at its level.
    Least squares makes the refits cheap: each fold's fit is one matrix, applied to every shuffled label vector."""
    from scipy.stats import rankdata

    z = np.vstack([x, y]).astype(np.float64)
    lab = np.r_[np.zeros(len(x)), np.ones(len(y))]
    n = len(z)
    folds = min(FOLDS, len(x), len(y))
    z = (z - z.mean(0)) / (z.std(0) + 1e-9)                     # unsupervised, on both sides: labels stay exchangeable
    u, sv, _ = np.linalg.svd(z, full_matrices=False)
    comps = max(1, min(32, z.shape[1], n // 2))
    X = np.c_[u[:, :comps] * sv[:comps] / math.sqrt(n), np.ones(n)]
    penalty = np.eye(comps + 1)
    penalty[-1, -1] = 0.0                                       # the intercept is not shrunk
    labels = np.column_stack([lab] + [rng.permutation(lab) for _ in range(permutations)])
    scores = np.empty_like(labels)
    order = rng.permutation(n)
    for f in range(folds):                                      # folds drawn without looking at the labels
        te = order[f::folds]
        tr = np.setdiff1d(order, te)
        fit = np.linalg.solve(X[tr].T @ X[tr] + penalty, X[tr].T)
        scores[te] = X[te] @ (fit @ labels[tr])
    aucs = _aucs(scores, labels, rankdata)
    auc = float(aucs[0])
    pos, neg = scores[lab == 1, 0], scores[lab == 0, 0]
    boots = [_auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)), rankdata) for _ in range(bootstrap)]
    interval = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))) if boots else None
    p = (1 + int((aucs[1:] >= auc - 1e-12).sum())) / (1 + permutations)
    return TestResult("domain", auc, "ROC AUC", p, threshold, interval=interval,
                      details={"folds": folds, "pca_components": comps, "bootstrap": bootstrap, "permutations": permutations})


def _aucs(scores: np.ndarray, labels: np.ndarray, rankdata) -> np.ndarray:
    """The ROC AUC of every column of ``scores`` [n, P] against the 0/1 ``labels`` [n, P] (1: current)."""
    r = rankdata(scores, axis=0)
    n1 = labels.sum(0)
    return ((r * labels).sum(0) - n1 * (n1 + 1) / 2) / (n1 * (len(labels) - n1))


def _auc(pos, neg, rankdata) -> float:
    r = rankdata(np.r_[pos, neg])
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def inputs_test(ref: Profile, cur: Profile, names: list[str], threshold: float) -> TestResult:
    """KS per input statistic (each tabular feature counts as one), Bonferroni within; PSI beside each."""
    from scipy.stats import ks_2samp

    cols = []
    for name in names:
        a, b = np.asarray(ref.inputs[name], np.float64), np.asarray(cur.inputs[name], np.float64)
        if a.ndim == 2:
            cols += [(f"feature {j}", a[:, j], b[:, j]) for j in range(min(a.shape[1], b.shape[1]))]
        else:
            cols.append((name, a, b))
    per = {}
    for name, a, b in cols:
        r = ks_2samp(a, b)
        per[name] = {"ks": float(r.statistic), "p": float(r.pvalue), "psi": psi(a, b), "mean_reference": float(a.mean()),
                     "mean_current": float(b.mean())}
    worst = min(per, key=lambda k: per[k]["p"])
    return TestResult("inputs", per[worst]["ks"], f"KS D ({worst})", min(1.0, len(per) * per[worst]["p"]), threshold,
                      details={"statistics": per, "max_psi": max(v["psi"] for v in per.values())})


def psi(a: np.ndarray, b: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's deciles (0.1: a small shift, 0.25: a large one, by convention)."""
    edges = np.unique(np.quantile(a, np.linspace(0, 1, bins + 1)[1:-1]))
    pa = np.bincount(np.searchsorted(edges, a, side="right"), minlength=len(edges) + 1) / len(a)
    pb = np.bincount(np.searchsorted(edges, b, side="right"), minlength=len(edges) + 1) / len(b)
    pa, pb = np.clip(pa, 1e-4, None), np.clip(pb, 1e-4, None)
    return float(((pb - pa) * np.log(pb / pa)).sum())


# ---------------------------------------------------------------- the accuracy it is likely costing
def estimate_accuracy(ref: Profile, cur: Profile, seed: int = 0, bootstrap: int = BOOTSTRAP,
                      calibration: ShiftCalibration | None = None) -> dict | None:
    """The accuracy on the unlabelled current data. With ``calibration`` (synthetic shifts of the reference, see
    :mod:`compress.drift_estimate`): the accuracy the model kept on the shifts whose statistics are nearest the current
    data's. Without: from confidences calibrated on the labelled reference, ATC (the share of current samples more
    confident than the threshold that the reference's accuracy puts on its negative entropy). Either with a bootstrap
    interval; ATC, DoC and isotonic-calibrated mean confidence beside it. None without labels."""
    if ref.correct is None or not cur.classifier:
        return None
    known = ref.labels >= 0
    right = ref.correct.astype(np.float64)
    ref_s, cur_s = -ref.entropy[known], -cur.entropy
    atc = atc_share(ref_s, right, cur_s)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap if calibration is None else 0):       # (the calibrated estimate brings its own interval)
        i, j = rng.integers(len(ref_s), size=len(ref_s)), rng.integers(len(cur_s), size=len(cur_s))
        boots.append(atc_share(ref_s[i], right[i], cur_s[j]))
    conf_r, conf_c = ref.confidence[known], cur.confidence
    interval = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    out = {"method": "ATC (negative entropy)", "estimated": atc, "interval": interval,
           "reference": float(right.mean()), "drop": float(right.mean() - atc),
           "methods": {"atc_entropy": atc, "atc_confidence": atc_share(conf_r, right, conf_c),
                       "doc": float(right.mean() - (conf_r.mean() - conf_c.mean())), "calibrated_confidence": _calibrated(conf_r, right, conf_c)}}
    if calibration is not None:
        cal = calibration.estimate(cur, seed, bootstrap)
        out.update({"method": f"calibration on {cal['shifts']} synthetic shifts of the reference", "estimated": cal["estimated"],
                    "interval": cal["interval"], "drop": float(right.mean() - cal["estimated"]),
                    "calibration": {"nearest": cal["nearest"], "statistics": cal["statistics"], "seconds": calibration.seconds}})
        out["methods"]["shift_calibrated"] = cal["estimated"]
    return out


def _calibrated(conf_r, right, conf_c) -> float:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(conf_r, right)
    return float(iso.predict(conf_c).mean())


# ---------------------------------------------------------------- over time
def over_time(ref: Profile, cur: Profile, window_s: float, alpha: float, permutations: int, seed: int = 0,
              calibration: ShiftCalibration | None = None) -> tuple[list[dict], list[str]]:
    """Every test on each window of ``window_s`` seconds of a log (windows with too few samples are listed, not tested).
    Each window is tested at ``alpha`` divided by the number of windows tested (Bonferroni again, over the windows), so a
    day of hourly windows of unchanged traffic raises no more false alarms than one test would."""
    t0 = float(cur.times.min())
    bucket = np.floor((cur.times - t0) / window_s).astype(int)
    rows, notes = [], []
    tested = sum(1 for b in np.unique(bucket) if (bucket == b).sum() >= MIN_SAMPLES)
    alpha = alpha / max(1, tested)
    for b in np.unique(bucket):
        idx = np.flatnonzero(bucket == b)
        row = {"start": t0 + b * window_s, "end": t0 + (b + 1) * window_s, "samples": int(len(idx))}
        if len(idx) < MIN_SAMPLES:
            row["skipped"] = f"only {len(idx)} samples (at least {MIN_SAMPLES} needed)"
            notes.append(f"window {b + 1} was not tested: {row['skipped']}")
        else:
            part = cur.take(idx)
            tests, _ = compare(ref, part, alpha, permutations, seed + int(b), bootstrap=50)
            row["alpha"] = _g(alpha)
            row["tests"] = {t.name: {"statistic": _r(t.statistic), "p_value": _g(t.p_value), "drifted": t.drifted} for t in tests}
            row["drifted"] = any(t.drifted for t in tests)
            est = estimate_accuracy(ref, part, bootstrap=0, calibration=calibration)
            row["estimated_accuracy"] = None if est is None else _r(est["estimated"])
        rows.append(row)
    return rows, notes


def parse_window(text: str) -> float:
    try:
        value = durations.seconds(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise CompressError(f"--window '{text}' is not a duration", "Give e.g. 30m, 1h or 1d")
    return value


# ---------------------------------------------------------------- a served model's log
def is_log_dir(path) -> bool:
    p = Path(str(path))
    return p.is_dir() and any(p.glob("*.jsonl"))


def read_log(log_dir: Path, ref: Profile, model: str | None = None) -> tuple[Profile, Profile, list[str]]:
    """The log's samples as a profile (ordered by time), and the reference to compare them with: in the penultimate
    space when the log carries embeddings of the reference's size, else in the outputs space."""
    notes, recs, bad = [], [], 0
    for f in sorted(Path(log_dir).glob("*.jsonl")):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    t, out = float(r["t"]), r["output"]
                    if not isinstance(out, list) or not out:
                        raise ValueError
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                recs.append((t, f"{f.name}:{line_no}", r))
    if bad:
        notes.append(f"skipped {bad} unreadable line(s) in {log_dir} (e.g. one being written)")
    names = sorted({str(r.get("model")) for _, _, r in recs})
    if model is not None:
        recs = [x for x in recs if str(x[2].get("model")) == model]
        if not recs:
            raise CompressError(f"{log_dir} has no samples of model '{model}'", f"Models in it: {', '.join(names)}")
    elif len(names) > 1:
        raise CompressError(f"{log_dir} holds the logs of {len(names)} models ({', '.join(names)})", "Pick one with --model NAME")
    if not recs:
        raise CompressError(f"{log_dir} holds no readable samples", "Point --current at the --log-dir of compress serve")
    recs.sort(key=lambda x: x[0])
    sizes = {len(r["output"]) for _, _, r in recs}
    if sizes != {ref.outputs.shape[1]}:
        raise CompressError(f"the log's outputs have {', '.join(map(str, sorted(sizes)))} values per sample but this run directory's "
                            f"model gives {ref.outputs.shape[1]}", "Give the run directory of the model that was served")
    outputs = np.asarray([r["output"] for _, _, r in recs], dtype=np.float32)
    emb = [r.get("embedding") for _, _, r in recs]
    embeddings, space = None, "outputs"
    if ref.space == "penultimate" and ref.embeddings is not None and all(isinstance(e, list) and len(e) == ref.embeddings.shape[1] for e in emb):
        embeddings, space = np.asarray(emb, dtype=np.float32), "penultimate"
    elif ref.space == "penultimate":
        notes.append("a served log keeps outputs, not penultimate features: embeddings are compared in the space of the model's outputs")
    inputs = _log_inputs([r.get("input") for _, _, r in recs], ref.kind)
    cur = Profile(kind=ref.kind, data=str(log_dir), space=space, classifier=ref.classifier, probabilities=ref.probabilities,
                  outputs=outputs, embeddings=embeddings, inputs=inputs, index=np.arange(len(recs)),
                  times=np.asarray([t for t, _, _ in recs]), refs=[where for _, where, _ in recs], meta={"models": names})
    return (ref if space == ref.space else ref.in_output_space()), cur, notes


def _log_inputs(items: list, kind: str) -> dict:
    kinds = {i.get("kind") for i in items if isinstance(i, dict)}
    if not items or any(not isinstance(i, dict) for i in items) or len(kinds) != 1:
        return {}
    (logged,) = kinds
    if (logged == "text") != (kind == "text"):
        raise CompressError(f"the log's inputs are {logged} but the run directory's reference was profiled on {kind} data",
                            "Give the run directory of the model that was served")
    keys = ("tokens", "unknown_rate") if logged == "text" else ("mean", "std")
    if not all(all(isinstance(i.get(k), (int, float)) for k in keys) for i in items):
        return {}
    return {k: np.asarray([i[k] for i in items], dtype=np.float32) for k in keys}


def _r(x, nd: int = 4):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def _g(x, digits: int = 4):
    """Rounded to significant digits: a p-value of 2e-10 stays 2e-10 (to 6 decimals it was 0, shown as "< 1e-300")."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(f"{float(x):.{digits}g}")


def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):    # 6 decimals (a window's start time stays whole), 6 digits below 1
        return _r(float(x), 6) if abs(float(x)) >= 1 else _g(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ---------------------------------------------------------------- the command
def check(run_dir, current, *, reference: str | None = None, window: str | float | None = None, sample: int | None = None,
          sample_out=None, labels=None, alpha: float = ALPHA, limit: int = 1000, model: str | None = None, seed: int = 0,
          permutations: int = PERMUTATIONS, json_path=None, html_path=None, force: bool = False, calibrate: bool = True) -> DriftReport:
    """``compress drift``: compare ``current`` (a DATA spec, a served model's log folder, a DataBundle or Dataset, or a
    Profile) with the reference of the run directory ``run_dir`` (or one made from ``reference``, a DATA spec).
    ``calibrate``: estimate the accuracy on synthetic shifts of the reference's inputs where they can be read again."""
    from .artifact import load_run_dir
    from .runners import load_runner

    require("scipy", "drift", "compress drift")
    require("sklearn", "drift", "compress drift")
    if not 0 < alpha < 1:
        raise CompressError(f"--alpha {alpha} is not between 0 and 1", "Give e.g. 0.05")
    window_s = parse_window(window) if window is not None else None
    if limit < MIN_SAMPLES:
        raise CompressError(f"--limit {limit} is below the {MIN_SAMPLES} samples drift tests need", "Give e.g. --limit 1000")
    if sample is not None and sample < 1:
        raise CompressError(f"--sample {sample} is not a positive number of inputs", "Give e.g. --sample 50")
    sample_out = Path(sample_out or "drift-sample.csv") if sample else None
    for p in (json_path, html_path, sample_out):
        if p and Path(p).exists() and not force:
            raise CompressError(f"{p} already exists", "Pass --force to replace it")
    measured = read_labels(Path(labels)) if labels is not None else None      # a bad file fails before the slow part
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompressError(f"{run_dir} is not a run directory", "Give a directory written by a compress command with --data")
    artifact = load_run_dir(run_dir)
    runner = functools.cache(functools.partial(load_runner, artifact))   # loaded once, when a step first runs the model

    if reference is not None:
        ref = _profile_current(artifact, reference, None, limit=512, seed=seed, what="--reference", runner=runner)
    else:
        ref = Profile.load(run_dir)
        if ref is None:
            raise CompressError(f"{run_dir} has no reference profile (it was made without --data, or before compress drift)",
                                "Give --reference DATA: the held-out data the model was validated on, e.g. --reference fashion-mnist")
    if window_s is not None and not (isinstance(current, Profile) and current.times is not None) and \
            not (isinstance(current, (str, Path)) and is_log_dir(current)):
        raise CompressError("--window needs time stamps, which only a served model's log has", "Give --current LOG_DIR, or leave out --window")
    if sample and not ref.classifier:
        raise CompressError("--sample needs a classifier: this model's outputs are not class scores", "Leave out --sample")
    notes = []
    if isinstance(current, Profile):
        cur = current
    elif isinstance(current, (str, Path)) and is_log_dir(current):
        ref, cur, notes = read_log(Path(current), ref, model)
    else:
        cur = _profile_current(artifact, current, ref, limit=limit, seed=seed + 1, what="--current", notes=notes, runner=runner)
    for side, prof in (("reference", ref), ("current", cur)):
        if len(prof) < MIN_SAMPLES:
            raise CompressError(f"the {side} data has only {len(prof)} samples; drift tests need at least {MIN_SAMPLES}",
                                f"Give more {side} data")
    tests, skipped = compare(ref, cur, alpha, permutations, seed)
    accuracy = {"reference": ref.accuracy}
    calibration = _calibration(artifact, ref, seed, notes, runner) if calibrate and ref.correct is not None else None
    est = estimate_accuracy(ref, cur, seed, calibration=calibration)
    if est is not None:
        accuracy.update(est)
        domain = next((t for t in tests if t.name == "domain"), None)
        if domain is not None and domain.statistic >= FAR_AUC:
            accuracy["note"] = (f"the current data is far from the reference (domain AUC {domain.statistic:.2f}): accuracy "
                                "estimates can be far off there (see benchmarks/results/drift); measure with --sample K, then --labels")
    elif ref.classifier:
        accuracy["note"] = "no estimate: the reference has no labels to calibrate the confidences on"
    if cur.correct is not None:          # the current data came with labels: the accuracy measured on them
        hits = int(cur.correct.sum())
        accuracy["current"] = {"measured": cur.accuracy, "interval": list(wilson(hits, len(cur.correct))), "labelled": int(len(cur.correct))}
    if measured is not None:
        accuracy["labels"] = measured
    report = DriftReport(str(run_dir), {"source": cur.data if not isinstance(current, (str, Path)) else str(current), **cur.summary()},
                         ref.summary(), tests, skipped, alpha, accuracy, warnings=notes, ref_profile=ref, cur_profile=cur)
    if window_s is not None:
        report.window_s = window_s
        report.windows, more = over_time(ref, cur, window_s, alpha, permutations, seed, calibration)
        report.warnings += more
    if sample:
        report.written.append(str(write_sample(cur, sample, sample_out, seed, force=True)))
        if cur.times is not None:
            report.warnings.append("a served model's log keeps no inputs: the sample names log lines (file:line); "
                                   "find those requests' inputs in your own records to label them")
    report.written += [str(p) for p in write_outputs(report, json_path, html_path)]
    return report


def _calibration(artifact, ref: Profile, seed: int, notes: list[str], runner) -> ShiftCalibration | None:
    """Synthetic shifts of the reference's own inputs, read again from its DATA spec (images only); None, with a note
    saying why the estimate falls back to confidences, where they cannot be read."""
    if ref.kind != "image":
        return None
    from .data import load_data
    from .drift_estimate import calibrate

    try:
        dataset = load_data(ref.data).eval
        if ref.index is None or not len(ref.index) or int(ref.index.max()) >= len(dataset):
            raise CompressError(f"its data {ref.data} no longer holds the samples it names", "")
        return calibrate(artifact, ref, dataset, seed=seed, runner=runner())
    except Exception as exc:  # noqa: BLE001 - the estimate falls back to confidences; the report says so
        what = exc.what if isinstance(exc, CompressError) else f"{type(exc).__name__}: {exc}"
        notes.append(f"the accuracy estimate uses confidences only (ATC): the reference's inputs could not be read again ({what})")
        return None


def _profile_current(artifact, current, ref: Profile | None, *, limit: int, seed: int, what: str, notes: list | None = None,
                     runner=None) -> Profile:
    """Profile a DATA spec, a DataBundle or a Dataset with the reference's embedding space: all its samples (up to
    ``limit``, drawn at random), or, when it is the reference's own data set, its held-out samples the reference does
    not hold."""
    from .data import DataBundle, load_data
    from .reference import profile_bundle, profile_data

    if isinstance(current, (str, Path)):
        p = Path(str(current))
        if p.is_dir() and ":" not in str(current):
            raise CompressError(f"{what} {current} is a folder with no served-model log (*.jsonl) in it",
                                "Give a DATA spec (e.g. fashion-mnist, imagefolder:DIR) or the --log-dir of compress serve")
        bundle = load_data(str(current))
    elif isinstance(current, DataBundle):
        bundle = current
    elif hasattr(current, "__getitem__") and hasattr(current, "__len__"):
        x = current[0][0] if len(current) else None
        kind = "text" if isinstance(x, str) else "image" if getattr(x, "dim", lambda: 0)() == 3 else "tensor"
        labelled = len(current) > 0 and int(current[0][1]) >= 0
        bundle = DataBundle("python data", None, current, kind, ref.meta.get("num_classes") if ref else None, labelled)
    else:
        raise CompressError(f"{what} is a {type(current).__name__}", "Give a DATA spec, a log folder, a DataBundle or a Dataset")
    if ref is not None and bundle.kind != ref.kind:
        raise CompressError(f"{what} {bundle.name} is {bundle.kind} data but the reference was profiled on {ref.kind} data ({ref.data})",
                            "Give data of the kind the model takes")
    space = ref.space if ref is not None else None
    if ref is None or bundle.name == ref.data:
        # the reference's own data set: its held-out split, leaving out the samples the reference holds
        return profile_bundle(artifact, bundle, limit=limit, seed=seed, exclude=ref.index if ref is not None else None, space=space,
                              runner=runner() if runner else None)
    # new data: all of it (a tensors: file or image folder is not split in two here; the model was not made on it)
    num_classes, labelled = bundle.num_classes, bundle.labelled
    if ref is not None and ref.classifier and num_classes and num_classes != ref.outputs.shape[1]:
        # labels of another task (faces / not faces for an ImageNet model): the model is still a classifier, and
        # those labels measure nothing about it
        if labelled and notes is not None:
            notes.append(f"{bundle.name} is labelled with {num_classes} classes, not this model's {ref.outputs.shape[1]}: "
                         "its labels are not used (no measured accuracy on it)")
        num_classes, labelled = None, False
    return profile_data(artifact, _whole(bundle), kind=bundle.kind, data=bundle.name, num_classes=num_classes,
                        labelled=labelled, limit=limit, seed=seed, space=space, runner=runner() if runner else None)


def _whole(bundle):
    """Every sample of a DataBundle: the data set its train and eval splits were cut from, or both one after the other."""
    from torch.utils.data import ConcatDataset, Subset

    train, ev = bundle.train, bundle.eval
    if train is None or train is ev:
        return ev
    if isinstance(train, Subset) and isinstance(ev, Subset) and train.dataset is ev.dataset and \
            len(train) + len(ev) == len(train.dataset):
        return train.dataset
    return ConcatDataset([ev, train])
