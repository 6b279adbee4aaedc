"""fasterai (optional extra, ``pip install 'compress[fasterai]'``) as a backend for prune, quantize and distill.

- ``prune --method fasterai``: fasterai's ``Sparsifier`` zeros weights at a granularity (single weights, or
  whole kernels/filters/rows... of a layer) ranked by one of its criteria, locally or globally, one-shot or
  over several steps on one of its schedules with short fine-tuning on --data between steps (compress's
  distillation loop). The result is made permanent: plain weights with zeros, no masks or hooks. Nothing
  shrinks physically, even at filter granularity, and zeros alone make dense kernels no faster.
- ``quantize --method fasterai``: fasterai's ``Quantizer`` (FX graph mode for x86 CPUs): static int8 with
  calibration on --data, or dynamic int8 Linear/LSTM/GRU. The int8 GraphModule is saved as its state dict
  (no pickle) and rebuilt on load by re-running the quantizer on the architecture, then loading the saved
  int8 weights and scales over it.
- ``distill -s backend=fasterai[:LOSS]``: fasterai's logit losses (SoftTarget, Logits, Mutual, DecoupledKD)
  in compress's own training loop (in :mod:`.distill`).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressError, first_line, require
from ..config import option
from ..registry import register
from .distill import finetune
from .magnitude import prunable_layers, sparsity
from .quality import QualityGate, check

PURPOSE = "the fasterai backend"
# fasterai 0.4.1's names (checked against the installed package when used).
GRANULARITIES = ("weight", "shared_weight", "channel", "column", "row", "kernel", "filter", "shared_channel", "shared_column",
                 "shared_row", "vertical_slice", "horizontal_slice", "shared_vertical_slice", "shared_horizontal_slice",
                 "shared_kernel", "layer")
CRITERIA = ("large_final", "squared_final", "small_final", "random", "large_init", "small_init", "large_init_large_final",
            "small_init_small_final", "magnitude_increase", "movement", "updating_magnitude_increase", "updating_movement",
            "updating_movmag", "wanda")
# Criteria that score the change since pruning started: all equal before any training, so they need fine-tuning.
CHANGE_CRITERIA = ("magnitude_increase", "movement", "updating_magnitude_increase", "updating_movement", "updating_movmag")
SCHEDULES = ("one_shot", "iterative", "agp", "one_cycle", "cos", "lin")   # dsd ends dense, so it is left out
LAYER_TYPES = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------- prune
@dataclass(frozen=True)
class SparsifyConfig:
    amount: float = option(0.5, "fraction of the weights (or groups, at a coarser granularity) to zero", range=(0.0, 0.99))
    granularity: str = option("weight", "what is zeroed together: single weights, or kernel/filter/row/... groups "
                              "(Conv2d; Linear knows weight/column/row/layer)", choices=GRANULARITIES)
    context: str = option("global", "rank across all layers (global) or within each layer (local)", choices=("global", "local"))
    criteria: str = option("large_final", "fasterai criteria: which weights to keep (wanda weighs |w| by activations on --data)",
                           choices=CRITERIA)
    ignore: tuple[str, ...] = option((), "module-name patterns to leave alone (fnmatch), e.g. 'head'")
    steps: int = option(1, "sparsify in this many steps, fine-tuning between them when finetune_epochs > 0", range=(1, 100))
    schedule: str = option("agp", "fasterai schedule of the sparsity over the steps", choices=SCHEDULES)
    finetune_epochs: float = option(0.0, "epochs of fine-tuning on --data after each step, zeros kept (0: none)", range=(0.0, 100.0))
    finetune: str = option("distill", "fine-tuning loss: distillation from the unpruned model, or labels only", choices=("distill", "labels"))
    finetune_limit: int | None = option(None, "fine-tune on the first N training samples only", range=(1, None))
    finetune_lr: float | None = option(None, "fine-tuning learning rate (default: the distill stage's)", range=(0.0, None))
    calibration_samples: int = option(128, "samples from --data for the wanda criteria", range=(1, 100_000))


def _criteria(name: str, model: nn.Module, types: tuple, artifact, config: SparsifyConfig, ctx):
    crit_mod = require("fasterai.core.criteria", "fasterai", PURPOSE)
    crit = getattr(crit_mod, name, None)
    if crit is None:
        raise CompressError(f"this fasterai version has no criteria '{name}'", f"Known: {', '.join(crit_mod.available_criterias())}")
    crit = copy.copy(crit)  # fasterai's criteria are module-level objects: never leave calibration on them
    if getattr(crit, "needs_data", False):
        from .quantize_ort import calibration_batches

        batches = calibration_batches(artifact, ctx, config.calibration_samples)
        crit.calibrate(model, [b[0] for b in batches], types, n_batches=len(batches))
        crit.needs_data = False  # calibrated on the whole model here; the sparsifier sees only the pruned layers
    return crit


def _layer_types(granularity: str) -> tuple:
    gran = require("fasterai.core.granularity", "fasterai", PURPOSE).Granularities
    samples = {nn.Conv2d: nn.Conv2d(1, 1, 1), nn.Linear: nn.Linear(1, 1)}
    return tuple(t for t in LAYER_TYPES if granularity in gran.allowed_granularities(samples[t]))


def _targets(model: nn.Module, layers: list[nn.Module]) -> nn.ModuleList:
    """The layers to sparsify, each followed by the BatchNorm that follows it in the model (fasterai's filter
    granularity zeros that BatchNorm too): the sparsifier only ever sees these."""
    mods = list(model.modules())
    out = []
    for m in layers:
        out.append(m)
        i = mods.index(m)
        if i + 1 < len(mods) and isinstance(mods[i + 1], nn.modules.batchnorm._BatchNorm):
            out.append(mods[i + 1])
    return nn.ModuleList(out)


def _schedule(name: str, steps: int) -> list[float]:
    """Fraction of the final sparsity reached after each step (the last is always 1)."""
    if steps == 1:
        return [1.0]
    sched = require("fasterai.core.schedule", "fasterai", PURPOSE)
    fn = getattr(sched, name).sched_func
    return [float(fn(0.0, 1.0, k / steps)) for k in range(1, steps)] + [1.0]


@register("prune", "fasterai", SparsifyConfig, accepts=("torch",), produces="torch", requires=(("fasterai", "fasterai"),),
          needs_data=lambda c: c.finetune_epochs > 0 or c.criteria == "wanda",
          summary="fasterai Sparsifier: zeros weights or kernel/filter groups by fasterai criteria and schedules "
                  "(optional extra; permanent zeros, nothing shrinks, dense kernels no faster)")
def sparsify(artifact, config: SparsifyConfig, ctx):
    sparsifier_mod = require("fasterai.sparse.sparsifier", "fasterai", PURPOSE)
    if config.criteria in CHANGE_CRITERIA and not (config.steps > 1 and config.finetune_epochs > 0):
        raise CompressError(f"criteria {config.criteria} scores how weights changed since pruning started, which is nothing "
                            "without training", "Use steps>1 with finetune_epochs>0 and --data, or criteria=large_final")
    types = _layer_types(config.granularity)
    if not types:
        raise CompressError(f"granularity {config.granularity} fits no Conv2d or Linear layer", "Use granularity=weight")
    model = copy.deepcopy(artifact.model).eval()
    layers = [m for _, m in prunable_layers(model, config.ignore, types)]
    if not layers:
        kinds = "/".join(t.__name__ for t in types)
        raise CompressError(f"the model has no {kinds} layers to sparsify at granularity {config.granularity}",
                            "Use granularity=weight (Conv2d and Linear), or another method")
    targets = _targets(model, layers)
    crit = _criteria(config.criteria, model, types, artifact, config, ctx)
    sp = _fasterai(lambda: sparsifier_mod.Sparsifier(targets, config.granularity, config.context, crit, layer_type=types))
    log = []
    for k, fraction in enumerate(_schedule(config.schedule, config.steps)):
        _fasterai(lambda: sp.sparsify_model(config.amount * fraction))
        entry = {"step": k + 1, "target": round(config.amount * fraction, 4), "sparsity": round(sparsity(model)["sparsity"], 4)}
        if config.finetune_epochs > 0:
            entry["finetune"] = _finetune_keeping_zeros(model, layers, artifact, config, ctx)
        log.append(entry)
    # Permanent: drop fasterai's masks and saved weights, so the model is the plain architecture with zeros.
    for m in targets:
        for name in ("_mask", "_init_weights", "_init_biases", "_old_weights"):
            m._buffers.pop(name, None)
    ctx.metrics.update(sparsity(model))
    ctx.metrics.update({"granularity": config.granularity, "context": config.context, "criteria": config.criteria,
                        "layers": [n for n, m in model.named_modules() if any(m is l for l in layers)]})
    if len(log) > 1 or config.finetune_epochs > 0:
        ctx.metrics["steps"] = log
    ctx.metrics.update(_accuracy(artifact, model, ctx))
    ctx.metrics["note"] = ("zeros alone make dense kernels no faster" + ("" if config.granularity in ("weight", "shared_weight") else
                           f"; {config.granularity} granularity zeros whole groups but removes none (use --method structured to shrink layers)"))
    return artifact.evolve(model=model)


def _fasterai(fn):
    try:
        return fn()
    except (ValueError, RuntimeError) as exc:  # fasterai raises plain errors for what it cannot do
        raise CompressError(f"fasterai could not sparsify this model ({first_line(exc, 200)})",
                            "Try granularity=weight or context=local") from None


def _accuracy(before, model: nn.Module, ctx) -> dict:
    """Held-out accuracy before and after, when --data has labels."""
    if not ctx.data_spec or not ctx.data().labelled:
        return {}
    from ..evaluate import accuracy
    from ..runners import TorchRunner

    try:
        acc = [accuracy(TorchRunner(before, module=m), ctx.data(), limit=2000)["accuracy"] for m in (before.model, model)]
    except CompressError:  # not a classifier for this data
        return {}
    return {"accuracy_before": acc[0], "accuracy": acc[1], "accuracy_drop": acc[0] - acc[1]}


class _Mask(nn.Module):
    """weight = weight * mask: keeps the zeros at zero while the weights train."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def _finetune_keeping_zeros(model: nn.Module, layers: list[nn.Module], artifact, config: SparsifyConfig, ctx) -> dict:
    """Fine-tune with structured pruning's helper while a parametrization holds the zeros at zero."""
    from torch.nn.utils import parametrize

    for m in layers:
        parametrize.register_parametrization(m, "weight", _Mask((m._mask.expand_as(m.weight) != 0).to(m.weight.dtype)))
    try:
        tuned, summary = finetune(artifact.evolve(model=model), ctx, epochs=config.finetune_epochs, limit=config.finetune_limit,
                                  labels_only=config.finetune == "labels", lr=config.finetune_lr)
        model.load_state_dict(tuned.model.state_dict())
    finally:
        for m in layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    model.eval()
    return summary


# ---------------------------------------------------------------- quantize
@dataclass(frozen=True)
class QuantizeConfig(QualityGate):
    mode: str = option("static", "static: int8 weights and activations, calibrated on --data (Conv/Linear); "
                       "dynamic: int8 Linear/LSTM/GRU weights, activations on the fly", choices=("static", "dynamic"))
    backend: str = option("x86", "fasterai Quantizer backend (FX graph mode; both run on x86 CPUs)", choices=("x86", "fbgemm"))
    per_tensor: bool = option(False, "static: one weight scale per tensor instead of per output channel (dynamic is always per tensor)")
    samples: int = option(128, "calibration samples taken from --data", range=(1, 100_000))


def fasterai_quantize(model: nn.Module, mode: str, backend: str, per_tensor: bool, calibration: list[torch.Tensor]) -> nn.Module:
    qmod = require("fasterai.quantize.quantizer", "fasterai", PURPOSE)
    quantizer = qmod.Quantizer(backend, mode, use_per_tensor=per_tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantizer.quantize(copy.deepcopy(model).eval(), calibration if mode == "static" else None,
                               max_calibration_samples=sum(len(b) for b in calibration))
    return q.eval()


def rebuild_quantized(model: nn.Module, step: dict) -> nn.Module:
    """Re-run the quantizer on the float architecture (calibrated on a dummy input): the saved int8 weights,
    scales and zero points then load over it, so the result is the saved model without unpickling code."""
    example = [torch.randn(*step["example_shape"]).to(getattr(torch, step["example_dtype"]))]
    return fasterai_quantize(model, step["mode"], step["backend"], step["per_tensor"], example)


@register("quantize", "fasterai", QuantizeConfig, accepts=("torch",), produces="torch-quantized", requires=(("fasterai", "fasterai"),),
          needs_data=lambda c: c.mode == "static",
          summary="fasterai Quantizer (optional extra): static int8 calibrated on --data, or dynamic int8, in FX graph mode for x86 CPUs")
def quantize(artifact, config: QuantizeConfig, ctx):
    from .quantize_ort import calibration_batches

    require("fasterai.quantize.quantizer", "fasterai", PURPOSE)
    if len(artifact.input_spec) != 1 or not artifact.input_spec[0].dtype.startswith("float"):
        raise CompressError("fasterai's quantizer takes models with one float input", "Use --method static or dynamic")
    spec = artifact.input_spec[0]
    if config.mode == "static":
        batches = [b[0] for b in calibration_batches(artifact, ctx, config.samples)]
        ctx.metrics["calibration_samples"] = sum(len(b) for b in batches)
    else:
        batches = [spec.example(1)]
    try:
        q = fasterai_quantize(artifact.model, config.mode, config.backend, config.per_tensor, batches)
    except (ValueError, RuntimeError, TypeError) as exc:  # fasterai wraps the FX errors in plain ones
        raise CompressError(f"fasterai could not quantize this model ({first_line(exc, 200)})",
                            "Use --method static (onnxruntime) or --method dynamic") from None
    qspec = getattr(q, "_fasterai_quant_spec", None)
    per_tensor = config.per_tensor or getattr(qspec, "qscheme", "") == "per_tensor"   # fasterai may fall back to it
    step = {"op": "quantize_fasterai", "mode": config.mode, "backend": config.backend, "per_tensor": per_tensor,
            "example_shape": [1, *spec.shape[1:]], "example_dtype": spec.dtype}
    ctx.metrics.update({"flow": f"fasterai Quantizer ({config.backend}, {config.mode}, FX graph mode)",
                        "qscheme": getattr(qspec, "qscheme", None) if config.mode == "static" else "per_tensor",  # torch's dynamic default
                        "quantized_layers": sum(1 for m in q.modules() if ".quantized" in type(m).__module__ and hasattr(m, "weight"))})
    # Dynamic int8 is re-made exactly from float weights, so those may be saved instead when int8 state needs pickling.
    out = artifact.evolve(format="torch-quantized", model=q, rebuild=[*artifact.rebuild, step],
                          float_model=artifact.model if config.mode == "dynamic" else None,
                          extra={**artifact.extra, "quantization": f"{config.mode} int8 (fasterai)"})
    return check(artifact, out, config, ctx, retry=None)
