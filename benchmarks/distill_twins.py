"""Does distillation beat training on labels alone? Each student is trained twice with the same budget, seed and
data — once with knowledge distillation (compress's default loss: soft targets at T=4 mixed with labels, alpha 0.5)
and once on labels alone (alpha 1.0, its "label-only twin") — and scored on held-out data.

    python benchmarks/distill_twins.py [--suite fmnist|text|all] [--seeds 0,1,2] [--quick]

Cases:
- fmnist-pruned: zoo:fmnist-resnet pruned 50% (structured), then 3 epochs on the 60k training images;
  accuracy on all 10,000 test images.
- fmnist-half: a residual CNN with half the channels (width 8), 3 epochs from the same random weights.
- text: the MiniLM-L6 Rotten Tomatoes teacher of the text suite, a 3-layer student (every other layer), 5 epochs;
  accuracy on the 973 held-out sentences.

Writes benchmarks/results/distill_twins.json and distill_twins.md. Every run goes through compress.pipeline.run,
the code path of the CLI.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress import run  # noqa: E402


def fmnist_cases(quick: bool) -> dict:
    import torch
    from safetensors.torch import save_file

    from compress.models import fashion_resnet

    budget = {"epochs": 1, "limit": 10000} if quick else {"epochs": 3}
    half = ROOT / "benchmarks" / ".cache" / "fmnist-half-init-seed0.safetensors"   # the student's random start, shared by both twins
    if not half.exists():
        half.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_file(fashion_resnet(8).state_dict(), str(half))
    return {
        "fmnist-pruned": ({"source": "zoo:fmnist-resnet"}, [{"prune": {"method": "structured", "amount": 0.5}}], budget, "fashion-mnist"),
        "fmnist-half": ({"source": str(half), "arch": "compress.models:fashion_resnet", "arch_args": {"width": 8}, "input_shape": ["1x1x28x28"]},
                        [], {**budget, "teacher": "zoo:fmnist-resnet", "lr": 0.003}, "fashion-mnist"),
    }


def text_cases(quick: bool) -> dict:
    from benchmarks.suites import Settings, _minilm_dir, fine_tune_text_teacher
    from compress.data import load_data
    from transformers import AutoTokenizer

    path = _minilm_dir()
    s = Settings(quick=quick)
    teacher, _ = fine_tune_text_teacher(s, path, load_data("rotten-tomatoes"), AutoTokenizer.from_pretrained(str(path)))
    model = {"source": str(teacher), "arch": f"hf:{path}", "arch_args": {"task": "classification", "num_labels": 2}}
    budget = {"epochs": 1, "steps": 40} if quick else {"epochs": 5}
    return {"text": (model, [], {**budget, "student_layers": 3, "lr": 1e-4}, "rotten-tomatoes")}


def one(model: dict, before: list, distill: dict, data: str, seed: int, alpha: float | None, work: Path) -> dict:
    d = {**distill, "seed": seed, **({"alpha": alpha} if alpha is not None else {})}
    doc = {"model": model, "data": data, "seed": seed, "stages": [*before, {"distill": d}]}
    t = time.perf_counter()
    res = run(doc, work / f"{seed}-{alpha}", force=True)
    m = res.final.stages[-1]["metrics"]
    return {"seed": seed, "alpha": m["alpha"], "accuracy": m["student_accuracy_after"], "teacher_accuracy": m["teacher_accuracy"],
            "start_accuracy": m.get("student_accuracy_before"), "params_student": m.get("params_student"),
            "params_teacher": m.get("params_teacher"), "eval_samples": m.get("eval_samples"), "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", choices=("fmnist", "text", "all"), default="all")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    cases = {**(fmnist_cases(a.quick) if a.suite in ("fmnist", "all") else {}), **(text_cases(a.quick) if a.suite in ("text", "all") else {})}
    out = Path(a.out)
    existing = json.loads((out / "distill_twins.json").read_text()) if (out / "distill_twins.json").exists() else {"cases": {}}
    results = existing["cases"]
    with tempfile.TemporaryDirectory(prefix="twins-") as tmp:
        for name, (model, before, distill, data) in cases.items():
            runs = []
            for seed in seeds if name != "text" else seeds[:1]:
                for alpha in (None, 1.0):
                    r = one(model, before, distill, data, seed, alpha, Path(tmp) / name)
                    print(f"{name} seed {seed} {'kd' if alpha is None else 'labels-only'}: {r['accuracy']:.4f} "
                          f"(teacher {r['teacher_accuracy']:.4f}, {r['seconds']:.0f}s)", flush=True)
                    runs.append({**r, "loss": "kd" if alpha is None else "labels-only"})
            kd = [r["accuracy"] for r in runs if r["loss"] == "kd"]
            lab = [r["accuracy"] for r in runs if r["loss"] == "labels-only"]
            results[name] = {"budget": distill, "data": data, "runs": runs, "kd_mean": statistics.mean(kd), "labels_mean": statistics.mean(lab),
                             "kd_wins": sum(k > l for k, l in zip(kd, lab)), "pairs": len(kd), "quick": a.quick}
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_twins.json").write_text(json.dumps({"cases": results}, indent=1))
    lines = ["# Distillation vs labels alone (same student, budget, seed and data)", "",
             "Written by `python benchmarks/distill_twins.py`. Accuracy on held-out data (Fashion-MNIST: 10,000 test images; "
             "text: 973 held-out Rotten Tomatoes sentences), each student's best epoch.", "",
             "| case | teacher | student params | seeds | KD (mean) | labels only (mean) | KD − labels | KD wins |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["runs"][0]
        lines.append(f"| {name} | {t['teacher_accuracy']:.2%} | {t['params_student']:,} | {r['pairs']} | {r['kd_mean']:.2%} | "
                     f"{r['labels_mean']:.2%} | {(r['kd_mean'] - r['labels_mean']) * 100:+.2f} pt | {r['kd_wins']}/{r['pairs']} |")
    lines += ["", "Per run:", "", "| case | seed | loss | accuracy | seconds |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines += [f"| {name} | {x['seed']} | {x['loss']} | {x['accuracy']:.2%} | {x['seconds']:.0f} |" for x in r["runs"]]
    (out / "distill_twins.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
