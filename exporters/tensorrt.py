"""Build a TensorRT engine from ONNX (NVIDIA GPU only), and the runner that executes it with torch CUDA tensors.

Two API generations are supported:
- TensorRT 10: fp32/fp16/int8 through builder flags, int8 calibrated by an ``IInt8EntropyCalibrator2`` fed
  from ``--data``;
- TensorRT 11: strongly typed networks only (no precision flags, no calibrators): fp16 comes from converting
  the ONNX graph to float16, int8 from a Q/DQ ONNX graph (made with onnxruntime's quantizer from ``--data``
  unless the graph already holds QuantizeLinear/DequantizeLinear nodes).
Dynamic axes get one optimization profile (min/opt/max batch from the config); a timing cache file is read
before and written after the build when ``timing_cache`` names one.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import Artifact
from compress.config import option
from compress.errors import CompressError, first_line, is_installed
from compress.inputs import InputSpec, example_inputs, export_batch
from compress.methods.quantize_ort import quantize_static
from compress.onnx_export import EXTERNAL_DATA_BYTES, export_file, to_fp16
from compress.registry import register, register_runner
from compress.runners import Runner

from .verify import verified

INSTALL = "pip install 'compress[trt]' (the tensorrt wheel from pypi.nvidia.com, matching your CUDA driver)"


@dataclass(frozen=True)
class TensorRTConfig:
    precision: str = option("fp32", "fp32, fp16 or int8 (int8 needs --data, or an ONNX graph with Q/DQ nodes)",
                            choices=("fp32", "fp16", "int8"))
    min_batch: int = option(1, "smallest batch the engine accepts (dynamic batch)", range=(1, None))
    opt_batch: int | None = option(None, "batch TensorRT tunes for (default: the input spec's, at least min_batch)", range=(1, None))
    max_batch: int = option(32, "largest batch the engine accepts", range=(1, None))
    workspace_gb: float = option(4.0, "builder workspace memory limit in GiB", range=(0.01, None))
    timing_cache: str | None = option(None, "timing cache file to reuse across builds (read if present, written after)")
    backend: str = option("tensorrt", "build through the TensorRT Python API from ONNX, or torch2trt (torch models, when installed)",
                          choices=("tensorrt", "torch2trt"))
    opset: int | None = option(None, "ONNX opset for the intermediate ONNX export of a torch model", range=(9, 25))
    calibration_batches: int = option(8, "int8: batches of --data used for calibration", range=(1, None))
    atol: float | None = option(None, "allowed max abs difference vs the source, relative to output scale (default fp32 5e-3, fp16 3e-2)",
                                range=(0, None))


@register("export", "trt", TensorRTConfig, accepts=("torch", "onnx"), produces="tensorrt", requires=(("tensorrt", "trt"),),
          summary="TensorRT engine from ONNX (NVIDIA GPU): fp32/fp16/int8, dynamic batch profile, verified on the GPU")
def export_trt(artifact: Artifact, config: TensorRTConfig, ctx) -> Artifact:
    """TensorRT engine from ONNX (NVIDIA GPU): fp32/fp16/int8, dynamic batch profile, verified on the GPU."""
    trt = require_tensorrt()
    if config.min_batch > config.max_batch:
        raise CompressError(f"min_batch {config.min_batch} is larger than max_batch {config.max_batch}", "Fix -s min_batch / -s max_batch")
    if config.precision == "int8" and not getattr(ctx, "data_spec", None) and not (artifact.format == "onnx" and _has_qdq(Path(artifact.path))):
        raise CompressError("TensorRT int8 needs calibration data", "Give --data (e.g. --data photos), or a Q/DQ-quantized ONNX model")
    workdir = Path(ctx.workdir)
    engine_path = workdir / "model.engine"
    scratch = workdir / "_trt_build"
    scratch.mkdir(exist_ok=True)
    try:
        if config.backend == "torch2trt":
            specs, info = _torch2trt(artifact, config, engine_path)
        else:
            if artifact.format == "onnx":
                onnx_path, specs, info = Path(artifact.path), artifact.input_spec, {"onnx": "given"}
            else:
                onnx_path, specs = scratch / "model.onnx", artifact.input_spec
                info = export_file(artifact.model, specs, onnx_path, opset=config.opset)
                info = {"onnx_exporter": info["exporter"], "onnx_opset": info["opset"]}
            calib = _calibration_batches(ctx, artifact, specs, config) if config.precision == "int8" else None
            info |= build_engine(trt, onnx_path, engine_path, specs, config, calib, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = artifact.evolve(format="tensorrt", path=engine_path, model=None, input_spec=specs,
                          extra={"precision": config.precision, "tensorrt": trt.__version__,
                                 "batch_range": [config.min_batch, config.max_batch]})
    ctx.metrics.update(info)
    source_device = "cuda" if artifact.format == "torch" else "cpu"   # the source ONNX runs in onnxruntime on CPU
    return verified(artifact, out, ctx, target="tensorrt", precision=config.precision, atol=config.atol,
                              device="cuda", source_device=source_device)


def require_tensorrt():
    """The tensorrt module, or one CompressError naming everything missing (GPU and/or package) and how to get it."""
    missing, fixes = [], []
    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU with CUDA (torch sees none)")
        fixes.append("run on a machine with an NVIDIA GPU and a CUDA build of torch")
    if not is_installed("tensorrt"):
        missing.append("the 'tensorrt' package (not installed)")
        fixes.append(INSTALL)
    if missing:
        raise CompressError(f"TensorRT export needs {' and '.join(missing)}",
                            "; ".join(fixes).capitalize() + "; or export with --target onnx and run it in onnxruntime")
    import tensorrt

    return tensorrt


def trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 10


def build_engine(trt, onnx_path: Path, engine_path: Path, specs: list[InputSpec], config: TensorRTConfig,
                 calibration: list[tuple[torch.Tensor, ...]] | None, scratch: Path, device: str = "cuda") -> dict:
    """Parse ONNX, set precision, profile, workspace and timing cache, build, and write the serialized engine."""
    major = trt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    info: dict = {"tensorrt_version": str(trt.__version__), "precision": config.precision}
    onnx_path = Path(onnx_path)
    if major >= 11:
        # Strongly typed: precision comes from the graph's own types.
        if config.precision == "fp16":
            onnx_path = _fp16_onnx(onnx_path, scratch)
        elif config.precision == "int8" and not _has_qdq(onnx_path):
            onnx_path = _qdq_onnx(onnx_path, scratch, calibration)
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network = builder.create_network(1 << int(flag) if flag is not None else 0)
        info["typing"] = "strong"
    else:
        network = builder.create_network(0)   # explicit batch is the only mode since TensorRT 10
        info["typing"] = "weak (builder flags)"
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CompressError(f"TensorRT cannot parse the ONNX graph: {(errors[0] if errors else 'unknown error')[:300]}",
                            "An operator may be unsupported by TensorRT; try another --opset, or use --target onnx")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    if major < 11:
        if config.precision == "fp16":
            cfg.set_flag(trt.BuilderFlag.FP16)
        elif config.precision == "int8":
            cfg.set_flag(trt.BuilderFlag.INT8)
            if _has_qdq(onnx_path):
                info["int8"] = "explicit (Q/DQ graph)"
            else:
                if not calibration:
                    raise CompressError("int8 needs calibration data", "Give --data (e.g. --data photos)")
                cfg.int8_calibrator = make_calibrator(trt, calibration, scratch / "calibration.cache", device)
                info["int8"] = f"entropy calibration on {len(calibration)} batches"
    profile = builder.create_optimization_profile()
    profiled = False
    opt_b = min(max(config.opt_batch or export_batch(specs), config.min_batch), config.max_batch)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if all(d > 0 for d in shape):
            continue
        spec = next((s for s in specs if s.name == tensor.name), specs[i] if i < len(specs) else None)
        base = [d if d > 0 else (spec.shape[j] if spec else 1) for j, d in enumerate(shape)]
        mins, opts, maxs = list(base), list(base), list(base)
        if shape and shape[0] <= 0:
            mins[0], opts[0], maxs[0] = config.min_batch, opt_b, config.max_batch
        for j in range(1, len(shape)):
            if shape[j] <= 0:   # other dynamic axes (e.g. sequence): 1 .. the spec's length
                mins[j] = 1
        profile.set_shape(tensor.name, tuple(mins), tuple(opts), tuple(maxs))
        profiled = True
        info.setdefault("profile", {})[tensor.name] = {"min": mins, "opt": opts, "max": maxs}
    if profiled:
        cfg.add_optimization_profile(profile)
    cache_path = Path(config.timing_cache) if config.timing_cache else None
    if cache_path is not None:
        cache = cfg.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        cfg.set_timing_cache(cache, False)
        info["timing_cache"] = "reused" if cache_path.is_file() else "created"
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise CompressError("TensorRT could not build an engine for this model (see the TensorRT log above)",
                            "Try precision fp32, a larger -s workspace_gb, or --target onnx")
    engine_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(cfg.get_timing_cache().serialize()))
    return info


def make_calibrator(trt, batches: list[tuple[torch.Tensor, ...]], cache_file: Path, device: str = "cuda"):
    """An IInt8EntropyCalibrator2 (TensorRT 10) that hands TensorRT one batch of real data at a time."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.index, self.current = batches, 0, None

        def get_batch_size(self):
            return int(self.batches[0][0].shape[0])

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            self.current = [t.contiguous().to(device) for t in self.batches[self.index]]
            self.index += 1
            return [int(t.data_ptr()) for t in self.current]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return Calibrator()


def _calibration_batches(ctx, artifact: Artifact, specs: list[InputSpec], config: TensorRTConfig) -> list[tuple[torch.Tensor, ...]] | None:
    """Fixed-size batches of real data (text padded to the spec's length) for int8 calibration."""
    if not getattr(ctx, "data_spec", None):
        return None
    from compress.data import batches, tokenizer_for

    bundle = ctx.data()
    size = min(max(config.opt_batch or 8, config.min_batch), config.max_batch)
    tok = tokenizer_for(artifact)
    pad = specs[0].shape[1] if tok is not None and len(specs[0].shape) > 1 else None
    ds = bundle.train if bundle.train is not None and len(bundle.train) else bundle.eval
    out = [inputs for inputs, _ in batches(ds, specs, size, size * config.calibration_batches, tok, pad_to=pad)
           if len(inputs[0]) == size]   # the calibrator's batch size is fixed
    return out or None


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def _fp16_onnx(onnx_path: Path, scratch: Path) -> Path:
    """TensorRT 11 takes precision from the graph: convert it to float16 (inputs/outputs stay float32)."""
    import onnx

    half = to_fp16(onnx.load(str(onnx_path)))
    out = scratch / "model.fp16.onnx"
    onnx.save_model(half, str(out), save_as_external_data=half.ByteSize() > EXTERNAL_DATA_BYTES, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return out


def _qdq_onnx(onnx_path: Path, scratch: Path, calibration) -> Path:
    """TensorRT 11 int8 is explicit: symmetric Q/DQ nodes inserted by onnxruntime's static quantizer fed from --data."""
    if not calibration:
        raise CompressError("int8 with TensorRT 11 needs a Q/DQ ONNX graph, made from calibration data",
                            "Give --data, or quantize first: compress quantize ... --method static --backend onnxruntime")
    out = scratch / "model.qdq.onnx"
    quantize_static(onnx_path, out, calibration, "minmax", per_channel=True, reduce_range=False, symmetric=True)
    return out


def _torch2trt(artifact: Artifact, config: TensorRTConfig, engine_path: Path) -> tuple[list[InputSpec], dict]:
    """The alternative backend: torch2trt converts module calls directly (torch models only)."""
    from compress.errors import require

    if artifact.format != "torch":
        raise CompressError("backend torch2trt converts torch models, not " + artifact.format, "Use -s backend=tensorrt for ONNX input")
    t2t = require("torch2trt", None, "the torch2trt backend")
    specs = artifact.input_spec
    model = artifact.model.eval().cuda()
    inputs = [x.cuda() for x in example_inputs(specs, min(max(config.opt_batch or 1, config.min_batch), config.max_batch))]
    kwargs = {"fp16_mode": config.precision == "fp16", "int8_mode": config.precision == "int8",
              "max_workspace_size": int(config.workspace_gb * (1 << 30)), "max_batch_size": config.max_batch}
    if all(0 in s.dynamic_axes for s in specs):
        kwargs |= {"min_shapes": [(config.min_batch, *x.shape[1:]) for x in inputs],
                   "opt_shapes": [tuple(x.shape) for x in inputs], "max_shapes": [(config.max_batch, *x.shape[1:]) for x in inputs]}
    try:
        trt_module = t2t.torch2trt(model, inputs, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"torch2trt failed: {first_line(exc)}", "Use -s backend=tensorrt (through ONNX)") from None
    engine_path.write_bytes(bytes(trt_module.engine.serialize()))
    return specs, {"backend": "torch2trt"}


# ---------------------------------------------------------------- runner
@register_runner("tensorrt")
class TensorRTRunner(Runner):
    """Deserialize an engine and run it on torch CUDA tensors (TensorRT 10+ name-based tensor API)."""

    format = "tensorrt"

    def __init__(self, artifact, device="cuda", threads=None):
        if not str(device).startswith("cuda"):
            raise CompressError("TensorRT engines run on NVIDIA GPUs only", "Use --device cuda")
        super().__init__(artifact, device, threads)
        trt = require_tensorrt()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(artifact.path).read_bytes())
        if self.engine is None:
            raise CompressError(f"{artifact.path} is not an engine this TensorRT ({trt.__version__}) and GPU can load",
                                "Engines are tied to the TensorRT version and GPU that built them; rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def prepare(self, inputs):
        if len(inputs) != len(self.inputs):
            raise CompressError(f"the engine takes {len(self.inputs)} input(s) but {len(inputs)} were given", "Check --input-shape")
        return tuple(x.to(self.device, self.dtypes[n]).contiguous() for n, x in zip(self.inputs, inputs))

    def run(self, prepared):
        stream = torch.cuda.current_stream(torch.device(self.device))
        for name, x in zip(self.inputs, prepared):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, int(x.data_ptr()))
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, int(out.data_ptr()))
            outs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise CompressError(f"TensorRT failed to run {self.artifact.path}", "Check the input shapes against the engine's batch range")
        return tuple(outs)


def torch_dtype(trt, dt) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, td in table.items():
        if dt == getattr(trt.DataType, name, object()):
            return td
    raise CompressError(f"TensorRT tensor type {dt} has no torch equivalent here", "Export with fp32/fp16 inputs and outputs")
