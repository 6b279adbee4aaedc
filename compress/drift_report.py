"""A drift report as JSON, as a self-contained HTML page (matplotlib PNGs inlined as base64: confidence histograms,
a PCA projection of the embeddings, input statistics, the statistics over time) and as rich tables for the CLI."""
from __future__ import annotations

import base64
import datetime as dt
import io
import json
from pathlib import Path

import numpy as np

from .rundir import write_file_atomic

REF_COLOR, CUR_COLOR = "#4c72b0", "#dd8452"
TITLES = {"confidence": "confidence (KS)", "embedding": "embedding distance (MMD)", "domain": "domain classifier (AUC)",
          "inputs": "input statistics (KS)"}


def write_outputs(report, json_path=None, html_path=None) -> list[Path]:
    out = []
    if json_path:
        out.append(write_file_atomic(Path(json_path), json.dumps(report.to_dict(), indent=2) + "\n"))
    if html_path:
        out.append(write_file_atomic(Path(html_path), html(report)))
    return out


# ---------------------------------------------------------------- cells shared by the table, the HTML and the CLI
def verdict_line(report) -> str:
    if report.drifted:
        return f"drift detected by {', '.join(report.drifted_tests)} (alpha {report.alpha:g}, Bonferroni over {len(report.tests)} tests)"
    return f"no drift detected (alpha {report.alpha:g}, Bonferroni over {len(report.tests)} tests)"


def test_rows(report) -> list[list[str]]:
    rows = []
    for t in report.tests:
        interval = f"[{t.interval[0]:.3f}, {t.interval[1]:.3f}]" if t.interval else "-"
        rows.append([TITLES[t.name], f"{t.statistic_name} = {t.statistic:.4g}", _p(t.p_value), interval, f"p < {t.threshold:.4g}",
                     "DRIFT" if t.drifted else "ok", _detail(t)])
    for name, why in report.skipped.items():
        rows.append([TITLES[name], "-", "-", "-", "-", "skipped", why])
    return rows


TEST_HEADERS = ["test", "statistic", "p-value", "95% interval", "threshold", "verdict", "details"]


def _p(p: float) -> str:
    if p <= 0:
        return "< 1e-300"          # below what a float holds: certain
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def _detail(t) -> str:
    d = t.details
    if t.name == "confidence":
        return (f"mean confidence {d['mean_confidence_reference']:.3f} → {d['mean_confidence_current']:.3f}; "
                f"entropy KS {d['ks_entropy']:.3f}")
    if t.name == "embedding":
        return f"cosine of mean embeddings {d['cosine_of_means']:.4f}; {d['permutations']} permutations; {d['dim']}-d"
    if t.name == "domain":
        return f"linear (least squares), PCA {d['pca_components']}, {d['folds']}-fold; {d.get('permutations', '?')} permutations"
    worst = sorted(d["statistics"].items(), key=lambda kv: kv[1]["p"])[:3]
    return "; ".join(f"{k}: {v['mean_reference']:.3g} → {v['mean_current']:.3g} (PSI {v['psi']:.2f})" for k, v in worst)


def accuracy_lines(report) -> list[str]:
    a = report.accuracy
    lines = []
    if a.get("reference") is not None:
        lines.append(f"reference accuracy (measured on {report.reference['labelled']} labelled held-out samples): {a['reference']:.1%}")
    if a.get("estimated") is not None:
        lo, hi = a.get("interval") or (a["estimated"], a["estimated"])
        lines.append(f"estimated accuracy on the current data: {a['estimated']:.1%} [{lo:.1%}, {hi:.1%}] by {a['method']} "
                     f"({-a['drop'] * 100:+.1f} points)")
        if a.get("calibration"):
            c = a["calibration"]
            lines.append(f"the current data looks most like {', '.join(c['nearest'])} (confidence estimate "
                         f"{a['methods']['atc_entropy']:.1%}, predicted-class shift {c['statistics']['predicted_shift']:.2f}, "
                         f"distance {c['statistics']['distance']:+.2f})")
    if a.get("current"):
        m = a["current"]
        lines.append(f"measured accuracy on the current data's own labels ({m['labelled']} samples): {m['measured']:.1%} "
                     f"[{m['interval'][0]:.1%}, {m['interval'][1]:.1%}]")
    if a.get("note"):
        lines.append(a["note"])
    if a.get("labels"):
        m = a["labels"]
        lines.append(f"measured accuracy on {m['labelled']} hand labels: {m['measured']:.1%} [{m['interval'][0]:.1%}, {m['interval'][1]:.1%}] "
                     f"(Wilson 95%; {m['how']})")
    return lines


def window_rows(report) -> list[list[str]]:
    rows = []
    for w in report.windows:
        when = f"{_time(w['start'], report.window_s)} – {_time(w['end'], report.window_s)}"
        if "skipped" in w:
            rows.append([when, str(w["samples"]), *["-"] * len(report.tests), "-", "not tested"])
            continue
        cells = [f"{_p(w['tests'][t.name]['p_value'])}{' *' if w['tests'][t.name]['drifted'] else ''}" if t.name in w["tests"] else "-"
                 for t in report.tests]
        est = w.get("estimated_accuracy")
        rows.append([when, str(w["samples"]), *cells, "-" if est is None else f"{est:.1%}", "DRIFT" if w["drifted"] else "ok"])
    return rows


def window_headers(report) -> list[str]:
    return ["window (UTC)", "samples", *[f"p {t.name}" for t in report.tests], "est. accuracy", "verdict"]


def _time(t: float, window_s: float | None = None) -> str:
    """To the minute; to the second (or its tenth) for windows shorter than a minute (a second), which would else
    all read the same."""
    when = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    if window_s is None or window_s >= 60:
        return when.strftime("%Y-%m-%d %H:%M")
    return when.strftime("%Y-%m-%d %H:%M:%S") + (f".{when.microsecond // 100000}" if window_s < 1 else "")


def rich_tables(report) -> list:
    from .report import table

    title = f"compress drift — {report.current['source']} ({report.current['samples']} samples) vs the reference ({report.reference['data']}, {report.reference['samples']})"
    out = [table(title, TEST_HEADERS, test_rows(report), caption=" · ".join(accuracy_lines(report)) or None)]
    if report.windows:
        out.append(table(f"per window of {_duration(report.window_s)} (* below the threshold)", window_headers(report), window_rows(report)))
    return out


# ---------------------------------------------------------------- pictures
def figures(report) -> list[tuple[str, bytes]]:
    """(title, PNG) for each picture that has data to show."""
    from matplotlib.figure import Figure

    ref, cur = report.ref_profile, report.cur_profile
    out = []
    if ref is not None and cur is not None:
        if ref.classifier and cur.classifier:
            fig = Figure(figsize=(9, 3.2))
            confidence_axes(fig.add_subplot(1, 2, 1), ref, cur, "confidence")
            confidence_axes(fig.add_subplot(1, 2, 2), ref, cur, "entropy")
            out.append(("Confidence: reference vs current", _png(fig)))
        fig = Figure(figsize=(5, 4))
        pca_axes(fig.add_subplot(), ref, cur)
        out.append(("Embeddings: 2-D PCA projection", _png(fig)))
        names = [n for n in sorted(set(ref.inputs) & set(cur.inputs)) if np.asarray(ref.inputs[n]).ndim == 1][:4]
        if names:
            fig = Figure(figsize=(3.2 * len(names), 3))
            for i, n in enumerate(names):
                _hist(fig.add_subplot(1, len(names), i + 1), ref.inputs[n], cur.inputs[n], n)
            out.append(("Input statistics", _png(fig)))
    if report.windows:
        fig = Figure(figsize=(9, 3.5))
        timeline_axes(fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2), report)
        out.append(("Over time", _png(fig)))
    return out


def overview_png(report, title: str | None = None) -> bytes:
    """The report's main pictures in one PNG (for a README or a chat message): confidence, embeddings, time series."""
    from matplotlib.figure import Figure

    ref, cur = report.ref_profile, report.cur_profile
    rows = 2 if report.windows else 1
    fig = Figure(figsize=(10, 3.6 * rows))
    if ref.classifier and cur.classifier:
        confidence_axes(fig.add_subplot(rows, 2, 1), ref, cur, "confidence")
    else:
        _hist(fig.add_subplot(rows, 2, 1), *_first_input(ref, cur))
    pca_axes(fig.add_subplot(rows, 2, 2), ref, cur)
    if report.windows:
        timeline_axes(fig.add_subplot(rows, 2, 3), fig.add_subplot(rows, 2, 4), report)
    fig.suptitle(title or verdict_line(report), fontsize="medium")
    return _png(fig)


def _first_input(ref, cur):
    names = [n for n in sorted(set(ref.inputs) & set(cur.inputs)) if np.asarray(ref.inputs[n]).ndim == 1]
    if not names:
        return np.linalg.norm(ref.embedding, axis=1), np.linalg.norm(cur.embedding, axis=1), "embedding norm"
    return ref.inputs[names[0]], cur.inputs[names[0]], names[0]


def confidence_axes(ax, ref, cur, what: str) -> None:
    a, b = (ref.confidence, cur.confidence) if what == "confidence" else (ref.entropy, cur.entropy)
    _hist(ax, a, b, "max softmax (confidence)" if what == "confidence" else "entropy")
    ax.set_title("Model confidence" if what == "confidence" else "Entropy of the outputs", fontsize="medium")


def _hist(ax, a, b, label: str) -> None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
    ax.hist(a, bins=bins, density=True, alpha=0.55, color=REF_COLOR, label=f"reference ({len(a)})")
    ax.hist(b, bins=bins, density=True, alpha=0.55, color=CUR_COLOR, label=f"current ({len(b)})")
    ax.set_xlabel(label)
    ax.set_yticks([])
    ax.legend(fontsize="small")


def pca_axes(ax, ref, cur) -> None:
    if ref.space != cur.space:
        ref, cur = ref.in_output_space(), cur.in_output_space()
    z = np.vstack([ref.embedding, cur.embedding]).astype(np.float64)
    z = (z - z.mean(0)) / (z.std(0) + 1e-9)
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    p = z @ vt[:2].T
    n = len(ref)
    ax.scatter(p[:n, 0], p[:n, 1], s=6, alpha=0.5, color=REF_COLOR, label="reference")
    ax.scatter(p[n:, 0], p[n:, 1], s=6, alpha=0.5, color=CUR_COLOR, label="current")
    ax.set_xlabel(f"PC 1 ({ref.space} space)")
    ax.set_ylabel("PC 2")
    ax.set_title("Embeddings, 2-D PCA", fontsize="medium")
    ax.legend(fontsize="small", markerscale=3)


def timeline_axes(ax_p, ax_acc, report) -> None:
    import matplotlib.dates as mdates

    tested = [w for w in report.windows if "tests" in w]
    if not tested:
        return
    x = [dt.datetime.fromtimestamp((w["start"] + w["end"]) / 2, dt.timezone.utc) for w in tested]   # each window's middle
    floor = 1e-6
    for t in report.tests:
        ax_p.plot(x, [max(w["tests"][t.name]["p_value"], floor) if t.name in w["tests"] else np.nan for w in tested], marker="o",
                  label=t.name)
    ax_p.axhline(report.tests[0].threshold if report.tests else report.alpha, color="red", ls="--", lw=1, label="threshold")
    ax_p.set_yscale("log")
    ax_p.set_ylim(floor / 2, 1.5)
    ax_p.set_ylabel(f"p-value (floored at {floor:g})")
    ax_p.set_title(f"Tests per window of {_duration(report.window_s)} (red: drift)", fontsize="medium")
    ax_p.legend(fontsize="x-small")
    est = [w.get("estimated_accuracy") for w in tested]
    if any(e is not None for e in est):
        ax_acc.plot(x, [np.nan if e is None else e for e in est], marker="o", color=CUR_COLOR, label="estimated (current)")
        if report.accuracy.get("reference") is not None:
            ax_acc.axhline(report.accuracy["reference"], color=REF_COLOR, ls="--", lw=1, label="reference (measured)")
        ax_acc.set_ylim(0, 1.02)
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_title("Estimated accuracy per window", fontsize="medium")
        ax_acc.legend(fontsize="x-small")
    else:
        ax_acc.plot(x, [w["samples"] for w in tested], marker="o")
        ax_acc.set_ylabel("samples per window")
        ax_acc.set_title("Samples per window", fontsize="medium")
    for ax in (ax_p, ax_acc):
        for w, when in zip(tested, x):
            if w["drifted"]:
                ax.axvspan(dt.datetime.fromtimestamp(w["start"], dt.timezone.utc), dt.datetime.fromtimestamp(w["end"], dt.timezone.utc),
                           color="#f4cccc", alpha=0.5, lw=0)
        loc = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
        ax.set_xlabel("UTC", loc="left", fontsize="small")


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g} {unit}"
    return f"{seconds:g} s"


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------- HTML
def html(report) -> str:
    from html import escape

    def tab(headers, rows):
        head = "".join(f"<th>{escape(h)}</th>" for h in headers)
        return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"

    color = "#b00" if report.drifted else "#070"
    parts = [f"<h1>compress drift</h1><p>{escape(report.run_dir)}: reference {escape(str(report.reference['data']))} "
             f"({report.reference['samples']} samples) vs current {escape(str(report.current['source']))} ({report.current['samples']} samples); "
             f"embeddings compared in the {escape(report.current['embedding_space'])} space</p>",
             f"<p style='font-size:1.2em;color:{color}'><b>{escape(verdict_line(report))}</b></p>",
             tab(TEST_HEADERS, test_rows(report))]
    parts += [f"<p>{escape(line)}</p>" for line in accuracy_lines(report)]
    if report.windows:
        tested = [w for w in report.windows if "alpha" in w]
        why = (f"<p>Each of the {len(tested)} windows tested is judged at alpha {tested[0]['alpha']:.4g} (alpha / windows, and again "
               f"over its tests), so unchanged traffic raises no more false alarms than one test would.</p>") if tested else ""
        parts.append(f"<h2>Per window of {_duration(report.window_s)}</h2>" + why + tab(window_headers(report), window_rows(report)))
    if report.warnings:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(w)}</li>" for w in report.warnings) + "</ul>")
    try:
        pics = figures(report)
    except ImportError:
        parts.append("<p class='note'>Plots need matplotlib, which is not installed: pip install 'compress[report]'.</p>")
    else:
        parts.append("<h2>Plots</h2>" + "".join(
            f"<figure><figcaption>{escape(title)}</figcaption><img alt='{escape(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>"
            for title, png in pics))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:14px}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
             "figure{display:inline-block;margin:1em}figcaption{font-weight:bold}.note{color:#a60}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compress drift</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
