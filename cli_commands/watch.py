"""The command that watches a deployed model: ``compress drift``."""
from __future__ import annotations

import click
from rich.markup import escape

from .common import CONTEXT, console, global_flags, out_console
from .common import flags as current_flags


@click.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress drift runs/fm-pruned --current mnist --html drift.html
  compress drift runs/fm-pruned --current tensors:new.npz --sample 50 --sample-out to-label.csv
  compress drift runs/fm-pruned --current tensors:new.npz --labels to-label.csv --json drift.json
  compress drift runs/served --current logs/ --window 1h --html drift.html      (a compress serve --log-dir)
  compress drift runs/old --reference fashion-mnist --current imagefolder:new/      (a run dir without a reference)
Exit codes: 0 no drift detected, 3 drift detected, 1 an error.
""")
@click.argument("run_dir", type=click.Path())
@click.option("--current", required=True, help="The data to check: a DATA spec, or the --log-dir of compress serve.")
@click.option("--reference", help="Profile this DATA as the reference, instead of the one RUN_DIR keeps.")
@click.option("--window", help="Test every window of this length of a log too, e.g. 30m, 1h, 1d.")
@click.option("--sample", type=int, help="Write the K current inputs most worth labelling by hand (CSV with an empty label column).")
@click.option("--sample-out", type=click.Path(), help="Where --sample writes [default: drift-sample.csv].")
@click.option("--labels", type=click.Path(), help="A --sample CSV with labels filled in: the measured accuracy, beside the estimate.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="False-alarm rate of the combined verdict (Bonferroni over the tests).")
@click.option("--limit", type=int, default=1000, show_default=True, help="Samples of --current DATA to use.")
@click.option("--model", "log_model", help="With a log of several models: the served model's name.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--html", type=click.Path(), help="Write a self-contained HTML report with plots.")
@click.option("--no-calibration", is_flag=True, help="Estimate the accuracy from confidences only (ATC), without profiling "
              "synthetic shifts of the reference's images (seconds for a small model, up to a minute for a large one).")
@global_flags
def drift(run_dir, current, reference, window, sample, sample_out, labels, alpha, limit, log_model, json_path, html, no_calibration):
    """Has the data moved away from what RUN_DIR's model was validated on, and what is it likely costing?

    Compares the reference RUN_DIR keeps (held-out data, profiled when it was made) with the current data by four tests:
    confidence (KS), embedding distance (MMD), a domain classifier (AUC) and input statistics (KS/PSI); and estimates
    the accuracy on the current data (for images, from synthetic shifts of the reference's inputs; else from confidences).
    """
    from compress.api import drift as check_drift
    from compress.drift_report import rich_tables, verdict_line

    flags = current_flags()
    report = check_drift(run_dir, current, reference=reference, window=window, sample=sample, sample_out=sample_out, labels=labels,
                         alpha=alpha, limit=limit, model=log_model, json_path=json_path, html_path=html, force=flags.force,
                         calibrate=not no_calibration)
    if not flags.quiet:
        for t in rich_tables(report):
            out_console().print(t)
    for w in report.warnings:
        console().print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    color = "red" if report.drifted else "green"
    console().print(f"[{color}]{escape(verdict_line(report))}[/{color}]", soft_wrap=True)
    for p in report.written:
        console().print(escape(f"wrote {p}"))
    return report.exit_code
