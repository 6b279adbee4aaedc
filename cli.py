"""The ``compress`` command line: a thin layer over the library (:mod:`compress.plan`, :mod:`compress.pipeline`,
:mod:`compress.measure`) that owns the terminal — rich output, progress bars, log lines — and the exit codes.

Every stage command builds a one-stage pipeline and runs the same code as ``compress run PIPELINE.yaml``.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import traceback
import warnings
from pathlib import Path

import click
from rich.markup import escape

from cli_commands.common import CONTEXT, Flags, RichProgress, console, global_flags, model_options, out_console
from cli_commands.common import flags as _flags
from compress.errors import CompressError, StagesKept, chain
from compress.version import __version__

class _LogLines(logging.Handler):
    """The library's log records as one line each: notes dimmed (hidden by --quiet), warnings always."""

    def __init__(self, flags: Flags):
        super().__init__(logging.INFO)
        self.flags = flags

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and self.flags.quiet:
            return
        text = escape(one_line(record.getMessage()))
        console().print(f"[yellow]warning:[/yellow] {text}" if record.levelno >= logging.WARNING else f"[dim]{text}[/dim]", soft_wrap=True)


@contextlib.contextmanager
def _logging(flags: Flags):
    handler = _LogLines(flags)
    loggers = [logging.getLogger(n) for n in ("compress", "exporters")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def _model_doc(source, arch, arch_args, input_shape, example_input, static_shapes, trust_pickle, no_verify, allow_nonfinite) -> dict:
    """The model options as a pipeline's ``model:`` section."""
    m = {"source": str(source)}
    for k, v in (("arch", arch), ("arch_args", arch_args), ("input_shape", list(input_shape) or None),
                 ("example_input", example_input), ("static_shapes", static_shapes or None), ("trust_pickle", trust_pickle or None),
                 ("verify", False if no_verify else None), ("allow_nonfinite", allow_nonfinite or None)):
        if v not in (None, ""):
            m[k] = v
    return m


def _sets(pairs) -> dict:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"'{p}' is not KEY=VALUE", param_hint="-s/--set")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


def _run_one(stage: str, model: dict, options: dict, data: str | None, out: str, resume: bool = False, show: bool = True):
    from compress.pipeline import run

    flags = _flags()
    doc = {"model": model, "stages": [{stage: {k: v for k, v in options.items() if v is not None}}]}
    if data:
        doc["data"] = data
    if flags.max_memory:
        doc["max_memory"] = flags.max_memory
    result = run(doc, out, force=flags.force, resume=resume, progress=RichProgress(flags.quiet), where=f"compress {stage}")
    if show and not flags.quiet:
        metrics = result.final.stages[-1].get("metrics", {}) if result.final.stages else {}
        _print_metrics(stage, metrics)
        console().print(escape(f"wrote {result.out}/ ({result.final.format}: {Path(result.final.path).name})"))
    return result


def _print_metrics(stage: str, metrics: dict) -> None:
    from compress.report import metrics_tables

    for t in metrics_tables(stage, metrics):
        out_console().print(t)


def _print_bench(report) -> None:
    from compress.report import rich_table

    out_console().print(rich_table(report))
    for w in report.warnings:
        console().print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    for line in report.recommendations:
        console().print(f"[cyan]serving:[/cyan] {escape(line)}", soft_wrap=True)


OUT_OPTION = click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (a run directory).")
SET_OPTION = click.option("-s", "--set", "sets", multiple=True, metavar="KEY=VALUE", help="A method option; repeatable.")
DATA_OPTION = click.option("--data", help="DATA spec: imagefolder:DIR, tensors:FILE, python:mod:fn, or a built-in set (see 'compress ls').")


@click.group(context_settings=CONTEXT, epilog="""\b
Examples:
  compress bench zoo:mobilenet_v2 --data photos
  compress export resnet.pt --arch torchvision:resnet18 --target onnx -o runs/resnet-onnx
  compress run configs/demo.yaml -o runs/demo
  compress ls
""")
@click.version_option(__version__, prog_name="compress")
@global_flags
def cli():
    """Prune, distill, quantize, export and benchmark a trained PyTorch model.

    SOURCE is a state dict (.pt/.pth/.safetensors, with --arch), a run directory written by compress,
    a TorchScript/ONNX/.pt2 file, a transformers model folder, or a built-in model (zoo:NAME).
    """


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress prune model.pt --arch torchvision:resnet18 --method structured --amount 0.5 -o runs/pruned
  compress prune runs/base --method magnitude --amount 0.7 -s scope=global -o runs/sparse
  compress prune model.pt --arch torchvision:resnet18 --sweep 0.1,0.3,0.5 --data imagefolder:val -o runs/sweep
""")
@click.argument("source")
@model_options
@click.option("--method", help="Pruning method (see 'compress ls prune').")
@click.option("--amount", type=float, help="Fraction to remove, between 0 and 1.")
@click.option("--sweep", help="Comma-separated amounts to measure instead of pruning once.")
@click.option("--ignore", multiple=True, metavar="PATTERN", help="Module-name pattern to leave unpruned (fnmatch); repeatable.")
@SET_OPTION
@DATA_OPTION
@OUT_OPTION
@click.option("--resume", is_flag=True, help="Reuse completed work in OUT.")
@global_flags
def prune(source, method, amount, sweep, ignore, sets, data, out, resume, **model):
    """Remove weights or whole channels/heads from a model."""
    opts = {"method": method, "amount": amount, "sweep": sweep, "ignore": list(ignore) or None, **_sets(sets)}
    _run_one("prune", _model_doc(source, **model), opts, data, out, resume)


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress distill runs/pruned --teacher runs/base --data fashion-mnist -s epochs=3 -o runs/distilled
  compress distill small.pt --arch torchvision:mobilenet_v3_small --teacher big.pt --data imagefolder:train -o runs/kd
  compress distill zoo:minilm-l6 --student-layers 3 --data rotten-tomatoes -s steps=500 -o runs/minilm-l3
  compress distill runs/pruned --teacher runs/base --data digits --resume -o runs/kd      (after Ctrl-C)
  torchrun --nproc_per_node 2 --no-python compress distill runs/pruned --teacher runs/base --data digits -o runs/kd
""")
@click.argument("source")
@model_options
@click.option("--teacher", help="The teacher SOURCE (defaults to the SOURCE's original model in pipelines).")
@click.option("--teacher-input-shape", multiple=True, help="What the teacher eats, where it differs from the student (repeatable).")
@click.option("--method", help="Distillation method (see 'compress ls distill').")
@click.option("--student-layers", type=int, help="Train a shallower copy of a transformer SOURCE keeping this many encoder layers.")
@SET_OPTION
@DATA_OPTION
@OUT_OPTION
@click.option("--resume", is_flag=True, help="Continue an interrupted training from its checkpoint.")
@global_flags
def distill(source, teacher, teacher_input_shape, method, student_layers, sets, data, out, resume, **model):
    """Train a student model to match a teacher on real data.

    Runs as is under torchrun (DistributedDataParallel); only rank 0 writes OUT.
    """
    opts = {"method": method, "teacher": teacher, "teacher_input_shape": list(teacher_input_shape) or None,
            "student_layers": student_layers, **_sets(sets)}
    if resume:
        opts["resume"] = True
    _run_one("distill", _model_doc(source, **model), opts, data, out)


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress quantize model.pt --arch torchvision:mobilenet_v2 --method static --backend onnxruntime --data photos -o runs/int8
  compress quantize zoo:minilm-l6 --method dynamic -o runs/minilm-int8
  compress quantize runs/pruned --method auto --data fashion-mnist -o runs/auto
  compress quantize zoo:mobilenet_v2 --method static --backend openvino --data photos -o runs/ov-int8   (NNCF)
""")
@click.argument("source")
@model_options
@click.option("--method", help="dynamic | static | auto (see 'compress ls quantize').")
@click.option("--backend", help="torch | onnxruntime | openvino (NNCF).")
@click.option("--max-accuracy-drop", type=float, help="Fail (keeping nothing) when accuracy on --data drops more than this, e.g. 0.01.")
@click.option("--require-speedup", is_flag=True, default=None, help="Fail when the result is not faster than its input.")
@SET_OPTION
@DATA_OPTION
@OUT_OPTION
@global_flags
def quantize(source, method, backend, max_accuracy_drop, require_speedup, sets, data, out, **model):
    """Quantize to int8: dynamic (Linear/LSTM), static (calibrated on --data) or auto (picks per model)."""
    opts = {"method": method, "backend": backend, "max_accuracy_drop": max_accuracy_drop, "require_speedup": require_speedup, **_sets(sets)}
    _run_one("quantize", _model_doc(source, **model), opts, data, out)


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress export model.pt --arch torchvision:resnet18 --target onnx -o runs/onnx
  compress export zoo:minilm-l6 --target onnx -s dynamic_axes=batch,sequence -o runs/minilm-onnx
  compress export runs/pruned --target pt2 -s aoti=true -o runs/pt2
  compress export runs/int8 --target torchscript -o runs/ts      (TorchScript is deprecated upstream; kept working)
  compress export runs/onnx --target trt -s precision=fp16 -o runs/trt   (needs an NVIDIA GPU and TensorRT)
  compress export zoo:mobilenet_v2 --target openvino --data photos -o runs/ov   (pip install 'compress[openvino]')
""")
@click.argument("source")
@model_options
@click.option("--target", required=True, help="torchscript | onnx | pt2 | openvino | trt.")
@click.option("--opset", type=int, help="ONNX opset version.")
@SET_OPTION
@DATA_OPTION
@OUT_OPTION
@global_flags
def export(source, target, opset, sets, data, out, **model):
    """Export to TorchScript, ONNX, torch.export (.pt2) or TensorRT, verified against the source."""
    opts = {"target": target, "opset": opset, **_sets(sets)}
    _run_one("export", _model_doc(source, **model), opts, data, out)


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress optimize zoo:fmnist-resnet --data fashion-mnist -o runs/opt
  compress optimize zoo:mobilenet_v2 --data photos --min-fidelity 0.95 --no-training -o runs/opt-mnv2
  compress optimize zoo:minilm-l6 --data rotten-tomatoes --max-accuracy-drop 1 --time-budget 1h -o runs/opt-text
  compress optimize zoo:fmnist-resnet --data fashion-mnist --ray auto -o runs/opt   (candidates made on the Ray cluster)
Exit codes: 0 the budget was met, 3 it was not (the closest candidate is still written), 1 an error.
""")
@click.argument("source")
@model_options
@DATA_OPTION
@click.option("--max-accuracy-drop", type=float, help="Accuracy points the result may lose on labelled --data [default: 1.0].")
@click.option("--min-fidelity", type=float, help="Without labels: top-1 agreement (or cosine) with SOURCE to keep [default: 0.95].")
@click.option("--device", help="The device the artifact will run on: cpu or cuda [default: cpu].")
@click.option("--batch-size", type=int, help="The batch size it will serve [default: 1].")
@click.option("--threads", type=int, help="Threads per copy of it [default: 1].")
@click.option("--objective", help="What to minimise within the budget: latency, throughput or size [default: latency].")
@click.option("--time-budget", help="Wall time for the whole search, e.g. 90s, 20m, 1h [default: 20m].")
@click.option("--no-training", is_flag=True, help="Only recipes that do not train (exports, post-training quantization).")
@click.option("--teacher", help="Teacher SOURCE for the training recipes [default: SOURCE].")
@click.option("--ray", "ray_address", metavar="local|auto|ADDRESS",
              help="Make the candidates as tasks on a Ray cluster ('local' starts one here); timing stays on this machine.")
@SET_OPTION
@OUT_OPTION
@click.option("--resume", is_flag=True, help="Reuse finished candidates and stages (a rerun reuses finished candidates anyway).")
@global_flags
def optimize(source, data, max_accuracy_drop, min_fidelity, device, batch_size, threads, objective, time_budget, no_training, teacher,
             ray_address, sets, out, resume, **model):
    """Measure the recipes that fit SOURCE and keep the fastest artifact within the accuracy budget, on this device.

    OUT holds the pick as a run directory, search.json (every candidate), report.html (the Pareto plot) and recipe.yaml.
    """
    opts = {"max_accuracy_drop": max_accuracy_drop, "min_fidelity": min_fidelity, "device": device, "batch_size": batch_size,
            "threads": threads, "objective": objective, "time_budget": time_budget, "training": False if no_training else None,
            "teacher": teacher, "ray": ray_address, **_sets(sets)}
    result = _run_one("optimize", _model_doc(source, **model), opts, data, out, resume, show=False)
    metrics = result.final.stages[-1].get("metrics", {})
    if not _flags().quiet:
        import json

        from compress.report import search_table

        search = json.loads((result.out / "search.json").read_text())
        out_console().print(search_table(search))
        for advice in (search.get("serving") or {}).get("advice") or []:
            console().print(escape(f"serving: {advice}"), soft_wrap=True)
        console().print(escape(f"wrote {result.out}/ ({result.final.format}: {Path(result.final.path).name}; report.html, recipe.yaml)"))
    if not metrics.get("met", True):
        console().print(f"[yellow]budget missed:[/yellow] {escape(metrics.get('miss', ''))}", soft_wrap=True)
        return 3
    return 0


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress bench zoo:mobilenet_v2 runs/int8 --data photos --batch-size 1,32 --threads 1,2
  compress bench zoo:minilm-l6 runs/minilm-onnx --data rotten-tomatoes     (real sentences, natural length)
  compress bench runs/demo --json bench.json --markdown bench.md --html bench.html
  compress bench model.onnx runs/ts --device cpu,cuda
""")
@click.argument("sources", nargs=-1, required=True)
@model_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cpu,cuda.")
@click.option("--batch-size", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default="1", show_default=True, help="Comma-separated thread counts (torch and onnxruntime).")
@click.option("--budget", type=float, default=2.0, show_default=True, help="Timed seconds per row.")
@click.option("--max-runs", type=int, default=1000, show_default=True, help="Stop timing a row after this many runs.")
@click.option("--limit", type=int, default=512, show_default=True, help="Samples of --data used for accuracy and fidelity.")
@DATA_OPTION
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--markdown", type=click.Path(), help="Write the report as Markdown.")
@click.option("--html", type=click.Path(), help="Write a self-contained HTML report with plots.")
@global_flags
def bench(sources, arch, arch_args, input_shape, example_input, static_shapes, trust_pickle, no_verify, allow_nonfinite, device, batch_size, threads, budget,
          max_runs, limit, data, json_path, markdown, html):
    """Measure latency, throughput, size, memory and accuracy of one or more artifacts.

    The first SOURCE is the baseline for speedups and fidelity; when it is a run directory whose manifest
    names an earlier source that can still be loaded, that source is benched first as the baseline.
    """
    from compress.measure import BenchSettings, bench_artifacts, bench_sources
    from compress.report import write_reports
    from compress.sources import ModelSpec

    flags = _flags()
    settings = BenchSettings.from_options({"device": device, "batch_size": batch_size, "threads": threads, "budget_s": budget,
                                           "max_runs": max_runs, "min_runs": min(10, max_runs), "limit": limit,
                                           "json": json_path, "markdown": markdown, "html": html}, data)
    for path in (json_path, markdown, html):
        if path and Path(path).exists() and not flags.force:
            raise CompressError(f"{path} already exists", "Pass --force to replace it")
    options = ModelSpec.parse("", arch, arch_args, input_shape, example_input, static_shapes, trust_pickle,   # parsed once, for every SOURCE
                              not no_verify, allow_nonfinite)
    report = bench_artifacts(bench_sources(sources, options), settings, progress=RichProgress(flags.quiet))
    if not flags.quiet:
        _print_bench(report)
    for p in write_reports(report, None, settings):
        console().print(escape(f"wrote {p}"))


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress run configs/demo.yaml -o runs/demo
  compress run configs/demo.yaml --set stages.0.amount=0.3 --set bench.threads=1,2
  compress run my.yaml -o runs/x --resume          (after a failed stage: reuse the completed ones)
""")
@click.argument("pipeline", type=click.Path())
@click.option("-o", "--out", type=click.Path(), help="Output directory [default: runs/<pipeline name>].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a value, e.g. stages.0.amount=0.3.")
@click.option("--resume", is_flag=True, help="Reuse the completed stages already in OUT.")
@global_flags
def run(pipeline, out, sets, resume):
    """Run a pipeline file: stages in order, then a bench over every stage."""
    from compress.pipeline import run as run_pipeline
    from compress.plan import apply_sets, read_pipeline

    flags = _flags()
    doc = apply_sets(read_pipeline(pipeline), sets)
    if flags.max_memory:
        doc["max_memory"] = flags.max_memory
    out = out or str(Path("runs") / Path(pipeline).stem)
    result = run_pipeline(doc, out, force=flags.force, resume=resume, progress=RichProgress(flags.quiet), where=str(pipeline))
    if result.report is not None and not flags.quiet:
        _print_bench(result.report)
    if not flags.quiet:
        console().print(escape(f"wrote {result.out}/" + (f" — report: {result.out / 'report.html'}" if result.report else "")))


@cli.command(context_settings=CONTEXT, epilog="""\b
Examples:
  compress validate configs/demo.yaml
  compress validate my.yaml --set stages.0.amount=1.5      (reports the range error)
""")
@click.argument("pipeline", type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a value before checking.")
@global_flags
def validate(pipeline, sets):
    """Check a pipeline file and report every problem at once, before anything runs."""
    from compress.plan import ValidationError, apply_sets, check, read_pipeline

    doc = apply_sets(read_pipeline(pipeline), sets)
    try:
        plan = check(doc, str(pipeline))
    except ValidationError as exc:
        console().print(f"[red]error:[/red] {escape(one_line(str(pipeline)))} has {len(exc.problems)} problem(s):", soft_wrap=True)
        for p in exc.problems:
            console().print(f"  - {escape(one_line(p))}", soft_wrap=True)
        sys.exit(1)
    stages = ", ".join(f"{s.stage} {s.method.name}" for s in plan.stages) or "no stages"
    click.echo(f"{pipeline}: ok ({stages}{'; bench' if plan.bench is not None else ''})")


@cli.command(name="ls", context_settings=CONTEXT, epilog="""\b
Examples:
  compress ls
  compress ls quantize
""")
@click.argument("stage", required=False)
@global_flags
def ls_cmd(stage):
    """List stages and their methods, built-in models and data sets, and shipped pipeline configs."""
    from compress.catalog import tables

    for t in tables(stage):
        out_console().print(t)

from cli_commands import serving, watch  # noqa: E402 - the commands beside this file join the group

for _command in (serving.serve, serving.loadtest, serving.package, watch.drift):
    cli.add_command(_command)


def one_line(text: str) -> str:
    """An error stays one line even when it echoes user input holding newlines or control characters (shown escaped)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def rerun_command(argv: list[str]) -> str:
    """The command that continues a run from its kept stages: this one with --resume (``make demo`` names itself)."""
    import os
    import shlex

    if os.environ.get("COMPRESS_RERUN"):
        return os.environ["COMPRESS_RERUN"]
    return shlex.join(["compress", *argv, *([] if "--resume" in argv else ["--resume"])])


class Terminated(BaseException):
    """Raised from SIGTERM so that every cleanup path runs, as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


_previous_unraisablehook = sys.unraisablehook   # what prints (or, under pytest, collects) every other one


def _redeliver_interrupts(args) -> None:
    """An interrupt that lands inside a callback Python cannot raise from (a weakref callback in the import machinery, a
    ``__del__``) is not lost and not printed as "Exception ignored … Traceback": the signal is sent again a moment later
    (from a thread: sent from here, it would be raised inside this hook and lost again), so it is raised in the run's own
    code and stops the run the usual way."""
    if args.exc_type is not None and issubclass(args.exc_type, (KeyboardInterrupt, Terminated)):
        import os
        import threading
        import time

        signum = signal.SIGTERM if issubclass(args.exc_type, Terminated) else signal.SIGINT
        threading.Thread(target=lambda: (time.sleep(0.02), os.kill(os.getpid(), signum)), daemon=True).start()
        return
    _previous_unraisablehook(args)


def _interrupt_behind(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM an error was raised while handling, if any: an interrupt in the middle of an import leaves
    the module half-loaded, and the cleanup that runs next may fail on it ("cannot load module more than once") — the
    user pressed Ctrl-C and is told so, not asked to report a bug."""
    return next((e for e in chain(exc) if isinstance(e, (KeyboardInterrupt, Terminated))), None)


def _interrupted(exc: BaseException, argv: list[str]) -> int:
    # click turns Ctrl-C into Abort: the interrupt it came from, or the error raised after it, carries what the run kept
    kept = next((e.kept_stages for e in chain(exc) if getattr(e, "kept_stages", None)), None)
    if kept:
        console().print(f"[red]interrupted[/red]: {escape(f'the {kept[0]} completed stage(s) are kept in {kept[1]}/stages; rerun {rerun_command(argv)} to continue from them')}",
                        soft_wrap=True)
    else:
        console().print("[red]interrupted[/red]: nothing half-written was left behind")
    return 130


def install_signal_handlers() -> None:
    """SIGTERM stops a run like Ctrl-C; an interrupt raised where Python cannot raise is delivered again."""
    global _previous_unraisablehook
    signal.signal(signal.SIGTERM, _on_sigterm)
    if sys.unraisablehook is not _redeliver_interrupts:
        _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _redeliver_interrupts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = Flags(debug="--debug" in argv)
    install_signal_handlers()
    if not flags.debug:
        # Libraries' internal deprecation chatter (torch's pytree notices when torchao is imported, "torch.jit.load is
        # deprecated" when a TorchScript artifact is benched, "No CUDA runtime is found, using CUDA_HOME" when an
        # AOTInductor candidate is built on a CPU machine) is not for users.
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    with _logging(flags):
        return _main(argv, flags)


def _main(argv: list[str], flags: Flags) -> int:
    try:
        rv = cli.main(args=argv, prog_name="compress", standalone_mode=False, obj=flags)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return 2
    except click.ClickException as exc:
        exc.show()
        return 2 if isinstance(exc, click.UsageError) else 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort, Terminated) as exc:
        return _interrupted(exc, argv)
    except CompressError as exc:
        if _interrupt_behind(exc):
            return _interrupted(exc, argv)
        if flags.debug:
            traceback.print_exc()
        if isinstance(exc, StagesKept):
            exc.fix = f"Fix the problem and rerun {rerun_command(argv)} to continue from them"
        console().print(f"[red]error:[/red] {escape(one_line(str(exc)))}", soft_wrap=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if _interrupt_behind(exc) and not flags.debug:
            return _interrupted(exc, argv)
        if flags.debug:
            traceback.print_exc()
        from compress.errors import first_line

        msg = first_line(exc, 300) if str(exc).strip() else ""
        console().print(f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(one_line(msg))} (rerun with --debug for the traceback; please report it)", soft_wrap=True)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
