"""ONNX Runtime int8: static Q/DQ with calibration on real data, and dynamic int8 for MatMul/Gemm.

A torch input is exported to fp32 ONNX first (the torch exporter cannot export torch-quantized models),
then run through onnxruntime's pre-processing and quantizer. The Q/DQ graph is also what TensorRT 11
builds int8 engines from.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

from ..artifact import Artifact
from ..errors import CompressError, first_line, require

CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def fp32_onnx(artifact: Artifact, scratch: Path, optimize_bert: bool = False, fuse_embeddings: bool = True) -> tuple[Path, list]:
    """The artifact as an fp32 ONNX file (exported here when it is a torch model)."""
    if artifact.format == "onnx":
        return Path(artifact.path), artifact.input_spec
    if artifact.format != "torch":
        raise CompressError(f"onnxruntime quantization takes a torch or ONNX model, not {artifact.format}", "Quantize before exporting to other formats")
    from ..onnx_export import bert_type, export_file

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "fp32.onnx"
    bert = bert_type(artifact) if optimize_bert else None
    export_file(artifact.model, artifact.input_spec, path, exporter="legacy-first" if bert else "auto", optimize=bert, arch=artifact.arch,
                fuse_embeddings=fuse_embeddings)
    return path, artifact.input_spec


def preprocess(src: Path, dst: Path) -> str:
    """onnxruntime's recommended pre-processing (shape inference, graph optimisation); transformer graphs may need
    symbolic shape inference skipped. Returns what ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()  # the tools run in dst's folder (see _quiet)

    for skip_symbolic in (False, True):
        try:
            with _quiet(dst.parent):
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return "quant_pre_process" + (" (symbolic shape inference skipped)" if skip_symbolic else "")
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; fall back to the raw graph
            continue
    shutil.copy(src, dst)
    return "none (pre-processing failed on this graph)"


class _Reader:
    """onnxruntime CalibrationDataReader over real data batches."""

    def __init__(self, batches, names):
        self.items = [dict(zip(names, (t.numpy() for t in inputs))) for inputs in batches]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def calibration_batches(artifact: Artifact, ctx, samples: int, batch_size: int = 8) -> list:
    from ..data import batches, tokenizer_for

    bundle = ctx.data()
    ds = bundle.train if bundle.train is not None and len(bundle.train) else bundle.eval
    if ds is None or len(ds) == 0:
        raise CompressError(f"the calibration set '{bundle.name}' is empty", "Give data with at least one sample")
    n = min(samples, len(ds))
    if n < batch_size:
        batch_size = n
    n -= n % batch_size          # equal batches: the entropy and percentile calibrators stack them
    # Text keeps one sentence per batch, at its natural length, so no padding skews the activation ranges.
    tokenizer = tokenizer_for(artifact)
    size = 1 if tokenizer is not None else batch_size
    out = [inputs for inputs, _ in batches(ds, artifact.input_spec, size, n, tokenizer)]
    if not out:
        raise CompressError(f"the calibration set '{bundle.name}' is empty", "Give data with at least one sample")
    return out


def quantize_static(src: Path, dst: Path, batches: list, calibration: str, per_channel: bool, reduce_range: bool,
                    exclude: tuple[str, ...] = (), symmetric: bool = False) -> dict:
    """Q/DQ int8 calibrated on ``batches``: uint8 activations and int8 weights for onnxruntime's CPU kernels, or with
    ``symmetric`` int8 for both with zero points of 0 (what TensorRT's explicit int8 takes)."""
    ortq = require("onnxruntime.quantization", None, "onnxruntime quantization")
    import onnxruntime as ort

    src, dst = Path(src).resolve(), Path(dst).resolve()
    pre = dst.parent / "_pre.onnx"
    info = {"preprocess": preprocess(src, pre)}
    names = [i.name for i in ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()]
    extra = {"CalibMovingAverage": True} if calibration == "minmax" else {}
    if calibration == "percentile":
        extra["CalibPercentile"] = 99.99
    if symmetric:
        extra |= {"ActivationSymmetric": True, "WeightSymmetric": True}
    try:
        with _quiet(dst.parent):
            ortq.quantize_static(str(pre), str(dst), _Reader(batches, names), quant_format=ortq.QuantFormat.QDQ,
                                 per_channel=per_channel, reduce_range=reduce_range,
                                 activation_type=ortq.QuantType.QInt8 if symmetric else ortq.QuantType.QUInt8,
                                 weight_type=ortq.QuantType.QInt8, calibrate_method=getattr(ortq.CalibrationMethod, CALIBRATION[calibration]),
                                 nodes_to_exclude=list(exclude) or None, extra_options=extra)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"onnxruntime static quantization failed: {first_line(exc, 200)}",
                            "Try -s calibration=minmax, or --method dynamic") from None
    finally:
        for f in dst.parent.glob("_pre.onnx*"):
            f.unlink()
        for f in dst.parent.glob("*augmented*"):
            f.unlink()
    info.update({"format": "QDQ", "activations": "int8" if symmetric else "uint8", "weights": "int8", "calibration": calibration,
                 "calibration_samples": sum(len(b[0]) for b in batches)})
    return info


def quantize_dynamic(src: Path, dst: Path, per_channel: bool, reduce_range: bool, exclude: tuple[str, ...] = (),
                     embedding_bits: int = 8) -> dict:
    ortq = require("onnxruntime.quantization", None, "onnxruntime quantization")
    import onnx

    src, dst = Path(src).resolve(), Path(dst).resolve()
    pre = dst.parent / "_pre.onnx"
    info = {"preprocess": preprocess(src, pre)}
    ops = ["MatMul", "Gemm", "Attention", "EmbedLayerNormalization"] + (["Gather"] if embedding_bits == 8 else [])
    try:
        # Fused transformer graphs sometimes defeat the pre-processed shape inference: then quantize the graph as exported.
        for i, graph in enumerate((pre, src)):
            try:
                if embedding_bits == 4:   # int4 tables first (on a copy: src may be the user's file), then int8 for the rest
                    g4 = dst.parent / "_pre.int4.onnx"
                    shutil.copy(graph, g4)
                    info["embeddings"] = int4_embeddings(g4, exclude)
                    graph = g4
                with _quiet(dst.parent):
                    ortq.quantize_dynamic(str(graph), str(dst), op_types_to_quantize=ops, per_channel=per_channel,
                                          reduce_range=reduce_range, weight_type=ortq.QuantType.QInt8, nodes_to_exclude=list(exclude) or None,
                                          extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                if i:
                    info["preprocess"] = "none (the pre-processed graph could not be quantized)"
                break
            except CompressError:
                raise
            except Exception as exc:  # noqa: BLE001
                if i:
                    raise CompressError(f"onnxruntime dynamic quantization failed: {first_line(exc, 200)}", "Try --backend torch") from None
    finally:
        for f in dst.parent.glob("_pre.*onnx*"):
            f.unlink()
    info.update({"format": "QOperator (dynamic)", "weights": "int8"})
    return info


INT4_BLOCK = 64


def int4_embeddings(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """Rewrite ``path`` in place with its embedding tables (Gathers of a 2-D float initializer) block-quantized to int4
    (onnxruntime's GatherBlockQuantized, symmetric, one scale per 64 values of a row): half the size of int8 tables.
    Returns a description, or raises CompressError when the graph has no such Gather."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    from onnxruntime.quantization.quant_utils import QuantFormat

    model = onnx.load(str(path))
    tables = {i.name: i for i in model.graph.initializer if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables and n.name not in exclude]
    if not gathers:
        raise CompressError("embedding_bits=4 found no embedding table (a Gather over a 2-D float weight) in this model",
                            "Use embedding_bits=8, or quantize a model with embeddings (a transformer)")
    axes = (("Gather", 1),)
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, quant_format=QuantFormat.QOperator,
                                                op_types_to_quantize=("Gather",), quant_axes=axes)
    quantizer = nbits.MatMulNBitsQuantizer(model, block_size=INT4_BLOCK, is_symmetric=True, algo_config=config,
                                           op_types_to_quantize=("Gather",), quant_axes=axes, nodes_to_exclude=list(exclude))
    with _quiet(path.parent):
        quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    rows = sum(tables[n.input[0]].dims[0] for n in gathers)
    return f"int4 (block {INT4_BLOCK}) for {len(gathers)} tables, {rows} rows"


def first_and_last(path: Path, op_types=("Conv", "Gemm", "MatMul")) -> list[str]:
    """Names of the first and last quantizable nodes: the layers most sensitive to int8."""
    import onnx

    nodes = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in op_types and n.name]
    return nodes[:1] + nodes[-1:] if len(nodes) > 1 else nodes


@contextlib.contextmanager
def _quiet(workdir: Path):
    """Silence onnxruntime's tools and run them in a scratch folder inside ``workdir``: they leave temporary files
    (symbolic shape inference models, external data) in the working directory, which is removed afterwards."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)         # only while they run: the caller's warnings (compress.*) must still reach it after
    scratch = Path(workdir) / "_ort_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), contextlib.chdir(scratch):
            yield
    finally:
        root.setLevel(level)
        shutil.rmtree(scratch, ignore_errors=True)


def most_sensitive(src: Path, qdq: Path, batches: list, share: float, op_types=("Conv", "Gemm", "MatMul"), samples: int = 32) -> list[dict]:
    """The quantized layers int8 hurts most, measured on real data: each layer's loss is how many dB of
    signal-to-quantization-noise (float model vs ``qdq``) the activations lose from its input to its output. The
    first ``share`` of them (at least one), worst first, as {"node", "loss_db"}."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX

    work = Path(qdq).resolve().parent
    pre = work / "_sensitivity_pre.onnx"
    try:
        preprocess(src, pre)          # the graph quantize_static quantized: the same node and tensor names
        fm, qm = onnx.load(str(pre)), onnx.load(str(qdq))
    finally:
        for f in work.glob("_sensitivity_pre.onnx*"):
            f.unlink()
    # a layer's output is its output in the quantized graph: the quantizer folds a following Relu/Clip into it
    quantized = {n.name: n.output[0] for n in qm.graph.node if n.op_type in op_types}
    layers = [(n.name, n.input[0], quantized[n.name]) for n in fm.graph.node if n.op_type in op_types and n.name in quantized]
    feeds = {i.name for i in fm.graph.input}
    made = [{o for n in m.graph.node for o in n.output} | feeds for m in (fm, qm)]
    layers = [(name, x, y) for name, x, y in layers if all(x in m and y in m for m in made)]   # both graphs name both tensors
    wanted = sorted({t for _, x, y in layers for t in (x, y)} - feeds)
    if not layers:
        return []
    # in the quantized graph a tensor is compared as its consumers see it: after its Q/DQ pair (which also applies the
    # folded Relu/Clip), when it has one
    dq = {t: t + DEQUANT_OUTPUT_SUFFIX if t + DEQUANT_OUTPUT_SUFFIX in made[1] else t for t in wanted}

    def session(model, names):
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names if t not in have)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every tensor the graph names
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    fs, qs = session(fm, wanted), session(qm, [dq[t] for t in wanted])
    names = [i.name for i in fs.get_inputs()]
    signal, noise = dict.fromkeys(wanted, 0.0), dict.fromkeys(wanted, 0.0)
    seen = 0
    for inputs in batches:
        if seen >= samples:
            break
        feed = dict(zip(names, (t.numpy() for t in inputs)))
        for t, a, b in zip(wanted, fs.run(wanted, feed), qs.run([dq[t] for t in wanted], feed)):
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            signal[t] += float((a * a).sum())
            noise[t] += float(((a - b) ** 2).sum())
        seen += len(inputs[0])

    def sqnr(t: str) -> float:          # dB; a graph input is exact (capped at 100 dB)
        if t in feeds or noise[t] == 0:
            return 100.0
        return min(100.0, 10 * float(np.log10(max(signal[t], 1e-30) / noise[t])))

    ranked = sorted(({"node": name, "loss_db": round(sqnr(x) - sqnr(y), 2)} for name, x, y in layers), key=lambda r: -r["loss_db"])
    return ranked[:max(1, round(share * len(ranked)))]
