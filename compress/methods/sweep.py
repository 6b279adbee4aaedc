"""Sensitivity sweep: prune at several amounts and measure parameters, MACs, CPU latency and accuracy for each,
so the amount can be picked by looking (a table, a plot, and sweep.json in OUT)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


from ..errors import CompressError
from ..rundir import write_file_atomic


def run_sweep(method, artifact, config, ctx, amounts: tuple[float, ...]):
    """Apply ``method`` at every amount (``sweep:`` of any method with an ``amount``); returns the input artifact
    unchanged, with the rows in ``ctx.metrics["sweep"]`` (the CLI draws them as a table) and sweep.json / sweep.png."""
    from ..evaluate import accuracy, fidelity
    from ..runners import TorchRunner
    from ..timing import time_runner

    bundle = ctx.data() if ctx.data_spec else None
    base_runner = TorchRunner(artifact, threads=1)
    example = tuple(s.example(1) for s in artifact.input_spec)
    rows = []
    macs_before = None
    with ctx.progress.task("sweep", len(amounts) + 1) as task:
        for amount in [0.0, *amounts]:
            task.advance(0, f"amount {amount:g}")
            if amount == 0.0:
                art, metrics = artifact, {}
            else:
                sub = dataclasses.replace(ctx, metrics={})
                art = method(artifact, dataclasses.replace(config, amount=amount), sub)
                metrics = sub.metrics
                macs_before = metrics.get("macs_before", macs_before)
            runner = TorchRunner(art, threads=1)
            row = {"amount": amount, "params": sum(p.numel() for p in art.model.parameters()), "macs": metrics.get("macs_after", metrics.get("macs_before")),
                   "sparsity": metrics.get("sparsity"), "p50_ms": time_runner(runner, example, budget_s=0.5, min_runs=5).stats(1)["p50_ms"]}
            if bundle is not None:
                if bundle.labelled:
                    try:
                        row["accuracy"] = accuracy(runner, bundle, limit=1000)["accuracy"]
                    except CompressError:
                        pass
                if "accuracy" not in row and amount > 0:
                    f = fidelity(runner, base_runner, bundle, limit=128)
                    row.update({k: f[k] for k in ("cosine", "top1_agreement") if k in f})
            rows.append(row)
            task.advance(1)
    if rows[0].get("macs") is None:
        rows[0]["macs"] = macs_before
    workdir = Path(ctx.workdir)
    write_file_atomic(workdir / "sweep.json", json.dumps(rows, indent=2))
    png = _plot(rows, workdir / "sweep.png")
    ctx.metrics["sweep"] = rows
    if png:
        ctx.metrics["sweep_plot"] = "sweep.png"
    return artifact


def _plot(rows, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["amount"] for r in rows]
    quality = "accuracy" if any("accuracy" in r for r in rows) else "cosine" if any("cosine" in r for r in rows) else None
    ax.plot(xs, [r["p50_ms"] for r in rows], "o-", color="tab:blue", label="CPU latency p50 (ms)")
    ax.set_xlabel("amount pruned")
    ax.set_ylabel("latency p50 (ms, batch 1, 1 thread)", color="tab:blue")
    if quality:
        ax2 = ax.twinx()
        ax2.plot([r["amount"] for r in rows if quality in r], [r[quality] for r in rows if quality in r], "s--", color="tab:red")
        ax2.set_ylabel(quality, color="tab:red")
    ax.set_title("pruning sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
