"""Labelling by hand for ``compress drift``: ``--sample K`` writes the current inputs most worth labelling to a CSV,
``--labels FILE`` turns the labels a person filled in into a measured accuracy with a confidence interval."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from .errors import CompressError
from .reference import Profile

SAMPLE_COLUMNS = ("index", "input", "predicted", "confidence", "stratum", "population", "label")


def write_sample(cur: Profile, k: int, path: Path, seed: int = 0, force: bool = True) -> Path:
    """The ``k`` current inputs most worth labelling: the least confident half, and a random draw from the rest (which
    keeps the measured accuracy unbiased). A CSV with an empty ``label`` column for a person to fill in."""
    from .rundir import write_file_atomic

    if not cur.classifier:
        raise CompressError("--sample needs a classifier: this model's outputs are not class scores", "Leave out --sample")
    k = min(int(k), len(cur))
    order = np.argsort(cur.confidence, kind="stable")
    uncertain = order[: (k + 1) // 2]
    rest = np.setdiff1d(np.arange(len(cur)), uncertain)
    drawn = np.random.default_rng(seed).choice(rest, size=min(k - len(uncertain), len(rest)), replace=False)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SAMPLE_COLUMNS)
    for stratum, idx in (("uncertain", uncertain), ("random", np.sort(drawn))):
        for i in idx:
            ref = cur.refs[i] if cur.refs is not None else f"{cur.data}#{i}"
            w.writerow([int(cur.index[i]) if cur.index is not None else int(i), ref, int(cur.predicted[i]), f"{cur.confidence[i]:.4f}",
                        stratum, len(cur), ""])
    return write_file_atomic(path, buf.getvalue(), force=force)


def read_labels(path: Path) -> dict:
    """The accuracy measured on the labels a person filled in (see :func:`write_sample`), with a 95% Wilson interval;
    the uncertain stratum and the random draw are weighted by their share of the current data."""
    try:
        rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    except OSError as exc:
        raise CompressError(f"cannot read the labels file {path} ({exc.strerror})", "Give the CSV that --sample wrote, with its label column filled in") from None
    if not rows or not {"predicted", "label"} <= set(rows[0]):
        raise CompressError(f"{path} has no 'predicted' and 'label' columns", "Give the CSV that --sample wrote, with its label column filled in")
    strata: dict[str, list] = {}
    for n, row in enumerate(rows, 2):
        strata.setdefault(row.get("stratum") or "random", []).append(row)
        if (row["label"] or "").strip():
            try:
                int(row["label"]), int(row["predicted"])
            except ValueError:
                raise CompressError(f"{path} line {n}: label '{row['label']}' is not a class number", "Write the class index, e.g. 3") from None
    labelled = {s: [int(r["label"]) == int(r["predicted"]) for r in rs if (r["label"] or "").strip()] for s, rs in strata.items()}
    total = sum(len(v) for v in labelled.values())
    if not total:
        raise CompressError(f"{path} has no labels filled in", "Fill in the label column of some rows")
    try:
        population = int(rows[0].get("population") or 0)
    except ValueError:
        population = 0
    rand, unc = labelled.get("random", []), labelled.get("uncertain", [])
    if population and unc and rand:
        w_u = len(strata["uncertain"]) / population
        p_u = float(np.mean(unc))
        lo_u, hi_u = (p_u, p_u) if len(unc) == len(strata["uncertain"]) else wilson(sum(unc), len(unc))
        p_r = float(np.mean(rand))
        lo_r, hi_r = wilson(sum(rand), len(rand))
        acc, lo, hi = w_u * p_u + (1 - w_u) * p_r, w_u * lo_u + (1 - w_u) * lo_r, w_u * hi_u + (1 - w_u) * hi_r
        how = "uncertain stratum and random draw, weighted by their share"
    else:
        allv = rand or unc
        acc, (lo, hi) = float(np.mean(allv)), wilson(sum(allv), len(allv))
        how = "random draw" if rand else "uncertain stratum only: biased low, label some random rows too"
    return {"measured": acc, "interval": [lo, hi], "labelled": total, "how": how, "file": str(path)}


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)
