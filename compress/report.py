"""The bench report as people and programs read it: JSON (the CLI contract), Markdown, one self-contained HTML file
with plots, and the table's cells (the CLI draws them). Renderers only format; nothing here measures or prints."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .rundir import write_file_atomic


def _fmt_metrics(m: dict) -> str:
    parts = []
    if "accuracy" in m:
        parts.append(f"acc {m['accuracy']:.2%}" + (f" ({m['accuracy_delta']:+.2%})" if "accuracy_delta" in m else ""))
    if "top1_agreement_vs_source" in m:
        parts.append(f"top1 {m['top1_agreement_vs_source']:.1%}")
    if "cosine_vs_source" in m:
        parts.append(f"cos {m['cosine_vs_source']:.4f}")
    if "max_abs_diff_vs_source" in m:
        parts.append(f"Δmax {m['max_abs_diff_vs_source']:.2g}")
    return ", ".join(parts)


def format_size(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def _count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


HEADERS = ["artifact", "stage", "format", "device", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "spread", "items/s",
           "speedup", "size", "params", "accuracy / fidelity"]
LEFT = ("artifact", "stage", "format", "device", "accuracy / fidelity")


def table_rows(report) -> list[list[str]]:
    """The cells of the bench table, one list per row, in HEADERS' order."""
    return [[r["label"], r["stage"], r["format"], r["device"], str(r["batch_size"]), str(r["threads"]), f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['spread']:.0%}", f"{r['throughput_per_s']:.1f}",
             f"{r['speedup_vs_source']:.2f}x" if r.get("speedup_vs_source") else "-", format_size(r["size_bytes"]),
             _count(r.get("params")), _fmt_metrics(r["metrics"])] for r in report.rows]


def footer(report) -> str:
    parts = [f"peak RSS {report.peak_rss_mb:.0f} MiB"] if report.peak_rss_mb else []
    if report.data:
        parts.append(f"data {report.data}")
    text = [r for r in report.rows if r.get("inputs") == "data"]
    if text:
        lengths = sorted({round(r["seq_len_mean"]) for r in text})
        parts.append(f"timed on real text at natural length (mean {', '.join(map(str, lengths))} tokens per batch)")
    return " · ".join(parts)


def _env_line(report) -> str:
    e = report.env
    return (f"CPU: {e.get('cpu')} ({e.get('cores')} cores, VNNI {'yes' if e.get('vnni') else 'no'}) · GPU: {e.get('gpu') or 'none'} · "
            f"torch {e.get('torch')} · onnxruntime {e.get('onnxruntime')}")


def markdown(report) -> str:
    lines = ["# compress bench", "", _env_line(report), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" if h in LEFT else "---:" for h in HEADERS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table_rows(report)]
    if footer(report):
        lines += ["", footer(report)]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    if report.recommendations:
        lines += ["", "## CPU serving", ""] + [f"- {r}" for r in report.recommendations]
    return "\n".join(lines) + "\n"


def html(report) -> str:
    """A single self-contained HTML file: table, warnings, and inline SVG plots when matplotlib is installed."""
    from html import escape

    from .plots import svg_plots

    head = "".join(f"<th>{escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td class='{'l' if h in LEFT else 'r'}'>{escape(c)}</td>" for h, c in zip(HEADERS, r)) + "</tr>"
                   for r in table_rows(report))
    parts = [f"<h1>compress bench</h1><p>{escape(_env_line(report))}</p>", f"<table><tr>{head}</tr>{body}</table>",
             f"<p>{escape(footer(report))}</p>"]
    if report.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{escape(w)}</li>" for w in report.warnings) + "</ul>")
    if report.recommendations:
        parts.append("<h2>CPU serving</h2><ul>" + "".join(f"<li>{escape(r)}</li>" for r in report.recommendations) + "</ul>")
    try:
        plots = svg_plots(report.rows)
    except ImportError:
        parts.append("<p class='note'>Plots need matplotlib, which is not installed: pip install 'compress[report]'.</p>")
    else:
        parts.append("<h2>Plots</h2>" + "".join(f"<figure><figcaption>{escape(title)}</figcaption>{svg}</figure>" for title, svg in plots))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:14px}"
             "td,th{border:1px solid #ccc;padding:4px 8px}td.r{text-align:right}td.l{text-align:left}th{background:#f3f3f3}"
             "figure{display:inline-block;margin:1em}figcaption{font-weight:bold}.note{color:#a60}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compress bench</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def to_json(report) -> str:
    return json.dumps(_jsonable(report.to_dict()), indent=2, default=str, allow_nan=False) + "\n"


def write_reports(report, directory: Path | None, settings) -> list[Path]:
    """Write report.json/.md/.html into ``directory`` (pipelines) and wherever --json/--markdown/--html say, atomically."""
    written = []
    targets = []
    if directory is not None:
        targets += [(Path(directory) / "report.json", "json"), (Path(directory) / "report.md", "md"), (Path(directory) / "report.html", "html")]
    for path, kind in ((settings.json, "json"), (settings.markdown, "md"), (settings.html, "html")):
        if path:
            targets.append((Path(path), kind))
    render = {"json": to_json, "md": markdown, "html": html}
    for path, kind in targets:
        written.append(write_file_atomic(path, render[kind](report)))
    return written


# ---------------------------------------------------------------- rich tables (the CLI prints them)
def table(title: str, columns, rows, right=(), **kw):
    """A rich table of plain-text cells (escaped); ``right``: the columns aligned right."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, **kw)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left")
    for r in rows:
        t.add_row(*(escape(str(c)) for c in r))
    return t


def metrics_tables(stage: str, metrics: dict) -> list:
    """A stage's metrics as tables: a sensitivity sweep when there is one, then the scalar metrics."""
    out = []
    if metrics.get("sweep"):
        keys = [k for k in ("amount", "params", "macs", "sparsity", "p50_ms", "accuracy", "cosine", "top1_agreement")
                if any(r.get(k) is not None for r in metrics["sweep"])]
        cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v  # noqa: E731
        out.append(table("pruning sensitivity sweep", keys, [[cell(r.get(k)) for k in keys] for r in metrics["sweep"]], right=keys))
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, (dict, list))]
    if rows:
        out.append(table(f"{stage} metrics", ("metric", "value"), rows, right=("value",)))
    return out


def rich_table(report):
    """The bench table, speedups coloured: red slower than the source, yellow about even, green faster."""
    from rich.markup import escape
    from rich.table import Table

    from .diagnosis import NOT_FASTER

    t = Table(title="compress bench", caption=footer(report), show_lines=False)
    for h in HEADERS:
        t.add_column(h, justify="left" if h in LEFT else "right")
    for r, cells in zip(report.rows, table_rows(report)):
        s = r.get("speedup_vs_source")
        cells = [escape(c) for c in cells]
        if s is not None and not r["baseline"]:
            color = "red" if s < 1 / NOT_FASTER else "yellow" if s < NOT_FASTER else "green"
            cells[11] = f"[{color}]{cells[11]}[/{color}]"
        t.add_row(*cells)
    return t


def search_table(search: dict):
    """``compress optimize``'s candidates: latency, quality, size, time to make, failure; the pick marked."""
    metric = search["budget"]["metric"]
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    src = search["source"]
    rows = [("input", num(src["p50_ms"], ".3f"), "1.00×", num(search["budget"]["source"], ".4f"), format_size(src.get("size_bytes")), "", "")]
    for c in search["candidates"]:
        speed = f"{src['p50_ms'] / c['p50_ms']:.2f}×" if c["p50_ms"] else "-"
        mark = "→ " if c["recipe"] == search["picked"] else ""
        rows.append((mark + c["recipe"], num(c["p50_ms"], ".3f"), speed, num(c.get(metric), ".4f"), format_size(c["size_bytes"]),
                     num(c["seconds"], ".0f"), c["error"] or ""))
    budget = f"budget: {metric} ≥ {search['budget']['floor']:.4g} ({'met' if search['met'] else 'missed'})"
    return table(f"compress optimize — {budget}", ("recipe", "p50 ms", "speedup", metric, "size", "make s", "failure"), rows,
                 right=("p50 ms", "speedup", metric, "size", "make s"))
