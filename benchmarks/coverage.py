"""The coverage table: every CLI step over the model families a user brings, each as a user would run it.

    python benchmarks/coverage.py [--only PATTERN] [--timeout 600] [--max-memory 0.6] [--out benchmarks/results]

Families: torchvision's classification zoo, timm's (ResNet, EfficientNet, ConvNeXt, RegNet, MobileNetV3, ViT, DeiT, Swin,
MobileViT) and transformers' (BERT, DistilBERT, RoBERTa, DeBERTa-v2, ELECTRA, GPT-2, ViT) built from their configs
(randomly initialised: coverage is about what runs, not accuracy). Steps: export onnx / pt2 / torchscript, structured
prune 50% then the pruned model to ONNX, heads prune (transformers), int8 with onnxruntime (static, calibrated on real
photos, for images; dynamic for text), dynamic int8 (torch) and ``optimize --no-training`` (the ONNX recipes; exit 3,
the budget missed, still counts as a pass: the command worked and said so). Every cell is the real `compress` command in its own process, under a time limit
and compress's --max-memory guard, with its wall time and peak memory (GNU time). A cell passes, is refused in one
clean line (the reason is kept), or fails: a crash, an "unexpected" error, a hang or a memory blow-up — never
acceptable. Writes OUT/coverage.md and OUT/coverage.json.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ["input_ids=1x32:int64", "attention_mask=1x32:int64"]

# name -> (how to build it: "torchvision:NAME" | "timm:NAME" | "hf:CONFIG_CLASS" with config kwargs, input shapes, kind)
MODELS = {
    **{f"torchvision/{n}": (f"torchvision:{n}", {}, ["1x3x224x224"], "image") for n in (
        "resnet50", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "densenet121", "mobilenet_v3_large", "googlenet",
        "shufflenet_v2_x1_0", "vit_b_16", "swin_t")},
    **{f"timm/{n}": (f"timm:{n}", {}, [f"1x3x{256 if 'mobilevit' in n else 224}x{256 if 'mobilevit' in n else 224}"], "image") for n in (
        "resnet18", "efficientnet_b0", "convnext_tiny", "regnety_004", "mobilenetv3_large_100", "vit_small_patch16_224",
        "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xs")},
    "transformers/bert": ("hf:BertConfig", {"num_hidden_layers": 4}, TEXT, "text"),
    "transformers/distilbert": ("hf:DistilBertConfig", {"n_layers": 4}, TEXT, "text"),
    "transformers/roberta": ("hf:RobertaConfig", {"num_hidden_layers": 4}, TEXT, "text"),
    "transformers/deberta-v2": ("hf:DebertaV2Config", {"num_hidden_layers": 4, "relative_attention": True,
                                                      "pos_att_type": ["p2c", "c2p"]}, TEXT, "text"),
    "transformers/electra": ("hf:ElectraConfig", {"num_hidden_layers": 4}, TEXT, "text"),
    "transformers/gpt2": ("hf:GPT2Config", {"n_layer": 4}, TEXT, "text"),
    "transformers/vit": ("hf:ViTConfig", {"num_hidden_layers": 4}, ["pixel_values=1x3x224x224"], "image"),
}
STEPS = ("export onnx", "export pt2", "export torchscript", "prune structured → onnx", "prune heads", "int8 onnxruntime", "dynamic int8",
         "optimize --no-training")


def _source(name: str, work: Path) -> list[str]:
    """The model saved as a user would hold it, and the SOURCE arguments that load it."""
    spec, kwargs, shapes, _ = MODELS[name]
    folder = work / name.replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    shape_args = [a for s in shapes for a in ("--input-shape", s)]
    if spec.startswith("hf:"):
        import transformers

        if not (folder / "config.json").exists():
            config = getattr(transformers, spec[3:])(**kwargs)
            transformers.AutoModel.from_config(config).save_pretrained(folder)
            if MODELS[name][3] == "text":      # a real tokenizer (MiniLM's WordPiece: its ids fit every family's vocabulary)
                from compress.zoo import resolve

                transformers.AutoTokenizer.from_pretrained(resolve("minilm-l6")["source"]).save_pretrained(folder)
        return [str(folder), *shape_args]
    import torch

    path = folder / "model.pt"
    if not path.exists():
        kind, _, arch = spec.partition(":")
        if kind == "torchvision":
            import torchvision

            model = getattr(torchvision.models, arch)(weights=None)
        else:
            import timm

            model = timm.create_model(arch, pretrained=False)
        torch.save(model.state_dict(), path)
    return [str(path), "--arch", spec, *shape_args]


def _commands(name: str, step: str, source: list[str], out: Path) -> list[list[str]]:
    kind = MODELS[name][3]
    vision_tf = any(k in name for k in ("vit", "deit", "swin"))
    torchvision_tf = name in ("torchvision/vit_b_16", "torchvision/swin_t")
    if step.startswith("export "):
        return [["export", *source, "--target", step.split()[1], "-o", str(out)]]
    if step == "prune structured → onnx":
        return [["prune", *source, "--method", "structured", "--amount", "0.5", "-o", str(out / "pruned")],
                ["export", str(out / "pruned"), "--target", "onnx", "-o", str(out / "onnx")]]
    if step == "prune heads":
        if kind == "text" or vision_tf or "mobilevit" in name or "transformers" in name:
            amount = "0" if torchvision_tf else "0.25"
            return [["prune", *source, "--method", "heads", "-s", f"amount={amount}", "-s", "mlp_amount=0.25", "-o", str(out / "pruned")],
                    ["export", str(out / "pruned"), "--target", "onnx", "-o", str(out / "onnx")]]
        return []
    if step == "int8 onnxruntime":        # static (calibrated on real photos) for images, dynamic for text
        data = ["--data", "photos"] if kind == "image" else []
        method = ["--method", "static", "--backend", "onnxruntime"] if kind == "image" else ["--method", "dynamic", "--backend", "onnxruntime"]
        return [["quantize", *source, *method, *data, "-s", "check_speed=false", "-o", str(out)]]
    if step == "dynamic int8":
        return [["quantize", *source, "--method", "dynamic", "--backend", "torch", "-s", "check_speed=false", "-o", str(out)]]
    if step == "optimize --no-training":    # the search over the ONNX recipes, briefly measured (exit 3: the budget was missed)
        data = "photos" if kind == "image" else "rotten-tomatoes"
        return [["optimize", *source, "--data", data, "--no-training", "--time-budget", "8m", "-s", "only=onnx fp32,entropy,int4", "-s", "eval_limit=64",
                 "-s", "timing_budget_s=0.2", "-o", str(out)]]
    raise ValueError(step)


def _run_cell(name: str, step: str, source: list[str], work: Path, timeout: float, max_memory: str) -> dict:
    out = work / "cells" / f"{name.replace('/', '-')}-{step.split()[0]}-{step.split()[-1]}"
    shutil.rmtree(out, ignore_errors=True)
    cmds = _commands(name, step, source, out)
    if not cmds:
        return {"model": name, "step": step, "outcome": "n/a", "reason": "not a transformer", "seconds": None, "peak_mb": None}
    seconds, peak = 0.0, 0.0
    for args in cmds:
        stats = work / "time.txt"
        cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), sys.executable, "-m", "cli", "--quiet", "--max-memory", max_memory, *args]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "step": step, "outcome": "failure", "reason": f"hang: no answer within {timeout:.0f} s",
                    "seconds": timeout, "peak_mb": None}
        elapsed, rss = (stats.read_text().split()[-2:] if stats.exists() else ("0", "0"))
        seconds += float(elapsed)
        peak = max(peak, int(rss) / 1024)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        if proc.returncode == 3 and args[0] == "optimize":       # it worked and says no candidate kept the budget
            note = next((ln for ln in lines if "budget missed" in ln), "budget missed")
            return {"model": name, "step": step, "outcome": "pass", "reason": note[:300], "seconds": round(seconds, 1), "peak_mb": round(peak)}
        if proc.returncode != 0:
            line = lines[-1] if lines else f"exit {proc.returncode}"
            clean = proc.returncode == 1 and len([ln for ln in lines if ln.startswith("error:")]) == 1 and "Traceback" not in proc.stderr \
                and "unexpected" not in line
            return {"model": name, "step": step, "outcome": "refused" if clean else "failure",
                    "reason": line.removeprefix("error: ")[:300], "seconds": round(seconds, 1), "peak_mb": round(peak)}
    return {"model": name, "step": step, "outcome": "pass", "reason": "", "seconds": round(seconds, 1), "peak_mb": round(peak)}


def write_table(cells: list[dict], out: Path, machine: dict, merge: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if merge and (out / "coverage.json").exists():    # a partial run replaces its cells in the committed table
        ran = {(c["model"], c["step"]) for c in cells}
        old = json.loads((out / "coverage.json").read_text())
        cells = [c for c in old["cells"] if (c["model"], c["step"]) not in ran] + cells
        cells.sort(key=lambda c: (list(MODELS).index(c["model"]) if c["model"] in MODELS else 99, STEPS.index(c["step"])))
        merged = f"{machine['commit']} (merged)"
        before = str(old["machine"].get("commit"))
        machine = {**machine, "commit": before if before.endswith(merged) else f"{before} + {merged}"}
    (out / "coverage.json").write_text(json.dumps({"machine": machine, "cells": cells}, indent=2) + "\n")
    counts = {k: sum(c["outcome"] == k for c in cells) for k in ("pass", "refused", "failure", "n/a")}
    mark = {"pass": "pass", "refused": "refused", "failure": "**FAIL**", "n/a": "—"}
    models = list(dict.fromkeys(c["model"] for c in cells))
    lines = ["# Coverage: every CLI step over the model families a user brings", "",
             f"Machine: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, compress at {machine['commit']}. "
             f"Randomly initialised models; each cell is the real `compress` command in its own process (time limit, --max-memory guard).", "",
             f"**{counts['pass']} pass, {counts['refused']} refused in one clean line, {counts['failure']} failures** "
             f"({counts['n/a']} not applicable).", "",
             "| model | " + " | ".join(STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for m in models:
        row = {c["step"]: c for c in cells if c["model"] == m}
        lines.append(f"| {m} | " + " | ".join(
            f"{mark[row[s]['outcome']]}" + (f" {row[s]['seconds']:.0f}s/{row[s]['peak_mb']}MB" if row[s].get("peak_mb") else "")
            if s in row else "" for s in STEPS) + " |")
    refused = [c for c in cells if c["outcome"] in ("refused", "failure")]
    if refused:
        lines += ["", "## Refusals and failures, with the line compress printed", ""]
        lines += [f"- {c['model']} · {c['step']} · {c['outcome']}: {c['reason']}" for c in refused]
    worst = {}
    for c in cells:
        if c.get("peak_mb"):
            w = worst.setdefault(c["step"], c)
            if c["peak_mb"] > w["peak_mb"]:
                worst[c["step"]] = c
    lines += ["", "## Largest memory and time per step", "", "| step | peak memory | model | longest | model |", "|---|---:|---|---:|---|"]
    for s in STEPS:
        timed = [c for c in cells if c["step"] == s and c.get("seconds")]
        if timed:
            mem = max((c for c in timed if c.get("peak_mb")), key=lambda c: c["peak_mb"], default=None)
            slow = max(timed, key=lambda c: c["seconds"])
            lines.append(f"| {s} | {mem['peak_mb'] if mem else '-'} MB | {mem['model'] if mem else '-'} | {slow['seconds']:.0f} s | {slow['model']} |")
    (out / "coverage.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="*", help="models to run, globs on their names, comma-separated (e.g. 'timm/*,transformers/bert')")
    p.add_argument("--steps", default="*", help="steps to run, a glob")
    p.add_argument("--timeout", type=float, default=600, help="seconds per command before a cell counts as a hang")
    p.add_argument("--max-memory", default="0.6", help="compress's --max-memory for every cell")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--merge", action="store_true", help="replace only the cells this run ran in OUT/coverage.json")
    a = p.parse_args(argv)
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    machine = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d")}
    cells = []
    with tempfile.TemporaryDirectory(prefix="compress-coverage-") as tmp:
        work = Path(tmp)
        for name in [m for m in MODELS if any(fnmatch.fnmatch(m, g) for g in a.only.split(","))]:
            source = _source(name, work)
            for step in [s for s in STEPS if fnmatch.fnmatch(s, a.steps)]:
                cell = _run_cell(name, step, source, work, a.timeout, a.max_memory)
                cells.append(cell)
                print(f"{name:40s} {step:26s} {cell['outcome']:8s} {cell['seconds'] or '':>6} s {cell['peak_mb'] or '':>6} MB  {cell['reason'][:90]}",
                      flush=True)
                shutil.rmtree(work / "cells", ignore_errors=True)
            shutil.rmtree(work / name.replace("/", "-"), ignore_errors=True)
    write_table(cells, Path(a.out), machine, a.merge)
    return 1 if any(c["outcome"] == "failure" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
