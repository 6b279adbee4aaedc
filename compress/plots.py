"""Plots for the HTML bench report, as inline SVG: latency per stage, latency vs accuracy, throughput vs batch size.

Needs matplotlib (the ``report`` extra); :func:`svg_plots` raises ImportError without it and the report falls
back to its table. Figures are drawn with ``matplotlib.figure.Figure``, so no GUI backend or global state is used.
"""
from __future__ import annotations

import io


def svg_plots(rows: list[dict]) -> list[tuple[str, str]]:
    """(title, inline <svg>) pairs for a bench report's rows; plots without data to show are left out."""
    from matplotlib.figure import Figure  # noqa: F401 - raises ImportError when matplotlib is absent

    if not rows:
        return []
    plots = [("Latency per stage", _latency_per_stage(rows))]
    acc = _latency_vs_accuracy(rows)
    if acc is not None:
        plots.append(acc)
    plots.append(("Throughput vs batch size", _throughput_vs_batch(rows)))
    return plots


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _svg(fig) -> str:
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _latency_per_stage(rows: list[dict]) -> str:
    """p50 per artifact at the smallest batch size, one bar per device and thread count."""
    small = min(r["batch_size"] for r in rows)
    rows = [r for r in rows if r["batch_size"] == small]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    configs = list(dict.fromkeys((r["device"], r["threads"]) for r in rows))[:6]
    by = {(r["label"], r["device"], r["threads"]): r for r in rows}
    fig, ax = _figure(7.0, max(2.5, 0.4 * len(labels) * len(configs) + 1.2))
    height = 0.8 / len(configs)
    for j, (device, threads) in enumerate(configs):
        ys, p50, err = [], [], []
        for i, label in enumerate(labels):
            r = by.get((label, device, threads))
            if r:
                ys.append(i + j * height)
                p50.append(r["p50_ms"])
                err.append(max(0.0, r["p90_ms"] - r["p50_ms"]))
        ax.barh(ys, p50, height=height, xerr=[[0] * len(err), err], label=f"{device}, {threads} thread(s)", capsize=2)
    ax.set_yticks([i + (len(configs) - 1) * height / 2 for i in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"latency p50 (ms) at batch {small}; whiskers to p90")
    ax.legend(fontsize="small")
    return _svg(fig)


QUALITY = (("accuracy", "accuracy"), ("top1_agreement_vs_source", "top-1 agreement with the source"),
           ("cosine_vs_source", "cosine similarity to the source"))


def _latency_vs_accuracy(rows: list[dict]) -> tuple[str, str] | None:
    """p50 against accuracy (or fidelity to the source when there are no labels), one point per artifact and device."""
    first = min(rows, key=lambda r: (r["batch_size"], r["threads"]))
    picked = [r for r in rows if r["batch_size"] == first["batch_size"] and r["threads"] == first["threads"]]
    key, name = next(((k, n) for k, n in QUALITY if any(k in r["metrics"] for r in picked)), (None, None))
    if key is None:
        return None
    # the source agrees with itself perfectly
    points = [(r, r["metrics"].get(key, 1.0 if r["baseline"] and key != "accuracy" else None)) for r in picked]
    points = [(r, v) for r, v in points if v is not None]
    fig, ax = _figure()
    for r, value in points:
        ax.scatter(r["p50_ms"], value, s=40)
        ax.annotate(f"{r['label']} ({r['device']})", (r["p50_ms"], value), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.set_xlabel(f"latency p50 (ms), batch {first['batch_size']}, {first['threads']} thread(s)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    return f"Latency vs {name}", _svg(fig)


def _throughput_vs_batch(rows: list[dict]) -> str:
    """Items per second against batch size, one line per artifact, device and thread count."""
    fig, ax = _figure()
    for (label, device, threads) in dict.fromkeys((r["label"], r["device"], r["threads"]) for r in rows):
        pts = sorted((r["batch_size"], r["throughput_per_s"]) for r in rows
                     if (r["label"], r["device"], r["threads"]) == (label, device, threads))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} ({device}, {threads}t)")
    batches = sorted({r["batch_size"] for r in rows})
    if len(batches) > 1 and batches[-1] / batches[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (items/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _svg(fig)


def pareto_svg(candidates: list[dict], metric: str, floor: float, picked: str, source: dict | None = None) -> str:
    """An optimize search: latency p50 against the budget's metric, one point per measured candidate, the budget's
    floor drawn as a line, the front of candidates no other beats on both drawn through, the pick ringed."""
    pts = [(c["p50_ms"], c[metric], c["recipe"]) for c in candidates if c.get("p50_ms") is not None and c.get(metric) is not None]
    fig, ax = _figure(7.5, 4.5)
    if source and source.get("p50_ms") is not None and source.get(metric) is not None:
        ax.scatter(source["p50_ms"], source[metric], marker="s", s=50, color="grey")
        ax.annotate("input", (source["p50_ms"], source[metric]), textcoords="offset points", xytext=(5, 4), fontsize="small")
    for x, y, name in pts:
        ring = name == picked
        ax.scatter(x, y, s=90 if ring else 40, facecolors="none" if ring else None, edgecolors="red" if ring else None,
                   linewidths=2 if ring else None)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
    front, best = [], float("-inf")
    for x, y, _ in sorted(pts):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", alpha=0.4, label="Pareto front")
    ax.axhline(floor, color="red", linestyle="--", alpha=0.6, label=f"budget: {metric} ≥ {floor:.4g}")
    ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _svg(fig)
