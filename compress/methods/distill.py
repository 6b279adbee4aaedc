"""Knowledge distillation ("kd"): train a student to match a teacher on real data, with a plain PyTorch loop.

Losses: soft targets (KL at temperature T, scaled by T²) mixed with hard-label cross-entropy (``alpha``);
embedding models match the teacher's output by cosine instead. Optional: hidden-feature matching through a
learned projection where widths differ, and attention-map matching for transformers.

Students: the SOURCE itself (e.g. a pruned copy of the teacher), any other architecture given as SOURCE
(``student_init: random`` starts it from fresh weights), or a shallower copy of a transformer
(``student_layers``), saved with a ``keep_layers`` rebuild step so the run directory reloads.

Training runs in the shared loop (:mod:`.training`), resumable: its checkpoint lives in
``$COMPRESS_CACHE_DIR/distill/<key>/`` (default ``~/.cache/compress``), keyed by the teacher and student weights, the
config and the data. Under ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel (gloo on CPU, nccl on
GPU); every rank returns the same weights, and only rank 0 writes the checkpoint (the other ranks write their OUT to a
throw-away folder). :func:`finetune` is the short distillation that pruning runs between its steps.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import Artifact
from ..config import option
from ..errors import CompressError, require
from ..registry import register
from .depth import encoder_layers, keep_layers, spaced_layers
from .training import FitSettings, Run, cache_dir, fit

# fasterai's logit losses (optional extra) as the soft-target loss, in this same loop.
DISTILL_LOSSES = ("SoftTarget", "Logits", "Mutual", "DecoupledKD")
DISTILL_BACKENDS = ("torch", "fasterai", *(f"fasterai:{n}" for n in DISTILL_LOSSES))


@dataclass(frozen=True)
class KDConfig:
    teacher: str | dict | None = option(None, "teacher SOURCE (default: the pipeline's original model); in YAML also "
                                        "{source, arch, arch_args, input_shape}. Any format runs: torch, TorchScript, ONNX, .pt2")
    teacher_arch: str | None = option(None, "architecture spec of a state-dict teacher")
    teacher_arch_args: dict | None = option(None, "keyword arguments for teacher_arch")
    teacher_input_shape: tuple[str, ...] = option((), "what the teacher eats, where it differs from the student (default: the "
                                                  "teacher's own inputs, or the student's when its format does not record them)")
    epochs: int = option(3, "passes over the training split", range=(1, None))
    steps: int | None = option(None, "stop after this many optimizer steps in all (overrides epochs)", range=(1, None))
    batch_size: int = option(64, "samples per step (per process under torchrun)", range=(1, None))
    lr: float | None = option(None, "learning rate (default: 1e-3 with adamw, 5e-5 for transformers, 0.05 with sgd)", range=(0.0, None))
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "sgd"))
    weight_decay: float = option(0.01, "weight decay", range=(0.0, None))
    schedule: str = option("cosine", "learning-rate schedule over the whole run", choices=("cosine", "constant", "linear"))
    warmup_steps: int = option(0, "linear warm-up steps", range=(0, None))
    temperature: float = option(4.0, "softmax temperature of the soft targets", range=(0.01, None))
    alpha: float | None = option(None, "weight of the hard-label loss, 1 - alpha goes to the soft targets "
                                 "(default 0.5 with labels, 0 without; 1 trains on labels alone)", range=(0.0, 1.0))
    output_loss: str = option("auto", "how outputs are matched: kl (logits), mse, cosine (embeddings); auto picks", choices=("auto", "kl", "mse", "cosine"))
    feature_weight: float = option(0.0, "weight of hidden-feature matching (0: off)", range=(0.0, None))
    feature_layers: tuple[str, ...] = option((), "TEACHER_MODULE=STUDENT_MODULE pairs to match (default: the input of the "
                                             "last Linear, or the last encoder layer of a transformer)")
    attention_weight: float = option(0.0, "weight of attention-map matching, transformers only (0: off)", range=(0.0, None))
    student_init: str = option("source", "start from the SOURCE's weights, or from fresh random ones", choices=("source", "random"))
    student_layers: int | None = option(None, "keep this many evenly spaced encoder layers of a transformer SOURCE", range=(1, None))
    grad_clip: float | None = option(1.0, "clip the gradient norm to this (null: no clipping)", range=(0.0, None))
    amp: bool = option(True, "mixed precision (bf16, else fp16) when training on a GPU")
    device: str = option("auto", "where to train: auto picks cuda when available", choices=("auto", "cpu", "cuda"))
    patience: int | None = option(None, "stop after this many epochs without a better held-out score", range=(1, None))
    keep_best: bool = option(True, "return the weights of the best held-out epoch, not the last")
    limit: int | None = option(None, "train on the first N training samples only", range=(1, None))
    eval_limit: int | None = option(None, "evaluate on the first N held-out samples only", range=(1, None))
    max_length: int = option(128, "token cap for text data", range=(1, None))
    seed: int | None = option(None, "random seed (default: the pipeline's seed)")
    resume: bool = option(False, "continue an interrupted run from its checkpoint")
    backend: str = option("torch", "soft-target loss: torch, or fasterai's (optional extra): fasterai (SoftTarget), "
                          "fasterai:Logits, fasterai:Mutual, fasterai:DecoupledKD (needs labels)", choices=DISTILL_BACKENDS)

    def __post_init__(self):   # checked when the config is built, so `validate` reports it before anything runs
        if self.teacher_input_shape:
            from ..inputs import parse_input_shapes

            try:
                parse_input_shapes(list(self.teacher_input_shape))
            except CompressError as exc:
                raise ValueError(f"teacher_input_shape: {exc.what}") from None


# ---------------------------------------------------------------- hooks and the trained module
class _Taps:
    """Forward hooks that capture hidden features (a module's input or output) and transformer attentions."""

    def __init__(self, model: nn.Module, points: list[tuple[str, str]], attentions: bool):
        from ..arch import HFModel

        self.features: dict[int, torch.Tensor] = {}
        self.attn = None
        self.handles = []
        modules = dict(model.named_modules())
        for i, (name, where) in enumerate(points):
            if name not in modules:
                near = [n for n in modules if n][-4:]
                raise CompressError(f"feature layer '{name}' is not a module of the model", f"Module names look like: {', '.join(near)}")
            self.handles.append(modules[name].register_forward_hook(self._grab(i, where)))
        self.hf_config = None
        if attentions:
            if not isinstance(model, HFModel):
                raise CompressError("attention matching works on transformers (hf:) models only", "Set attention_weight=0")
            self.hf_config = model.model.config
            self.was = getattr(self.hf_config, "output_attentions", False)
            self.hf_config.output_attentions = True
            self.handles.append(model.model.register_forward_hook(lambda m, i, o: setattr(self, "attn", getattr(o, "attentions", None))))

    def _grab(self, i: int, where: str):
        def hook(module, inputs, output):
            x = inputs[0] if where == "input" else output
            self.features[i] = x[0] if isinstance(x, (tuple, list)) else x
        return hook

    def take(self) -> tuple[list[torch.Tensor], tuple]:
        feats = [self.features[i] for i in sorted(self.features)]
        attn = tuple(self.attn or ())
        self.features, self.attn = {}, None
        return feats, attn

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.hf_config is not None:
            self.hf_config.output_attentions = self.was


class _Student(nn.Module):
    """The student plus the feature projections: one module, so DDP syncs all trained weights."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList, taps: _Taps):
        super().__init__()
        self.student = student
        self.proj = projections
        self.taps = taps

    def forward(self, *inputs):
        out = _main_output(self.student(*inputs))
        feats, attn = self.taps.take()
        return out, [p(_width_last(f)) for p, f in zip(self.proj, feats)], attn


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return _main_output(next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return _main_output(out[0])
    raise CompressError(f"the model returns {type(out).__name__}, not a tensor", "Distillation needs a model that returns a tensor")


def _width_last(x: torch.Tensor) -> torch.Tensor:
    """Feature maps [N, C, H, W] put channels last, so one Linear projects any feature's width."""
    return x.movedim(1, -1) if x.dim() >= 4 else x


def _default_points(model: nn.Module) -> tuple[str, str]:
    from ..arch import HFModel

    if isinstance(model, HFModel):
        parent, attr, layers = encoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        return f"{prefix}.{len(layers) - 1}", "output"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CompressError("feature matching by default hooks the input of the last Linear layer, and the model has none",
                            "Name the layers with feature_layers=TEACHER_MODULE=STUDENT_MODULE")
    return linears[-1], "input"


# ---------------------------------------------------------------- losses
def _soft_loss(kind: str, s: torch.Tensor, t: torch.Tensor, temperature: float, backend: str, labels=None) -> torch.Tensor:
    s, t = s.float(), t.float()
    if kind == "kl":
        if backend != "torch":
            return _fasterai_loss(backend, s, t, temperature, labels)
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                        reduction="batchmean") * temperature ** 2
    if kind == "cosine":
        return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()
    return F.mse_loss(s, t)


def _attention_loss(s_att: tuple, t_att: tuple, mapping: list[int]) -> torch.Tensor:
    return torch.stack([F.mse_loss(s.float(), t_att[j].float()) for s, j in zip(s_att, mapping)]).mean()


# ---------------------------------------------------------------- the method
@dataclass
class _Setup:
    bundle: object
    teacher_specs: list
    student_specs: list
    teacher_tok: object
    student_tok: object
    shared_inputs: bool
    max_length: int
    device: torch.device
    autocast: object
    metric: str          # accuracy (labelled classifier) | agreement (top-1 with the teacher) | cosine (embeddings)
    batch_size: int
    world: int
    rank: int


@register("distill", "kd", KDConfig, accepts=("torch",), produces="torch", needs_data=True,
          summary="knowledge distillation with soft targets, labels, features and attention; resumable, torchrun-ready")
def kd(artifact: Artifact, config: KDConfig, ctx) -> Artifact:
    """Knowledge distillation: train the student (SOURCE) to match a teacher on real data."""
    if config.backend != "torch":
        require("fasterai.distill", "fasterai", "the fasterai distillation backend")
    seed = ctx.seed if config.seed is None else config.seed
    device = _device(config.device)
    world, rank, dist = _distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    bundle = ctx.data()
    if bundle.train is None or len(bundle.train) == 0:
        raise CompressError(f"data '{bundle.name}' has no training split", "Give data with a training split (e.g. a built-in set)")
    teacher_art = _load_teacher(config, ctx, artifact.input_spec)
    student, rebuild = _make_student(artifact, config, seed)
    if teacher_art.model is not None:
        teacher = copy.deepcopy(teacher_art.model) if device.type != "cpu" else teacher_art.model
    else:
        if config.feature_weight > 0 or config.attention_weight > 0:
            raise CompressError(f"feature and attention matching read a PyTorch teacher's layers, and this teacher is {teacher_art.format}",
                                "Set feature_weight=0 and attention_weight=0 (outputs are matched), or give a PyTorch teacher")
        teacher = _RunnerTeacher(teacher_art, device)
    teacher.eval().to(device)
    student.to(device)

    from ..data import tokenizer_for

    text = bundle.kind == "text"
    t_tok = tokenizer_for(teacher_art) if text else None
    s_tok = tokenizer_for(artifact) if text else None
    shared = teacher_art.input_spec == artifact.input_spec and (teacher_art.arch or {}).get("spec") == (artifact.arch or {}).get("spec")
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    setup = _Setup(bundle, teacher_art.input_spec, artifact.input_spec, t_tok, s_tok, shared, config.max_length, device,
                   autocast, "accuracy", config.batch_size, world, rank)

    # Probe one batch: output shapes, which losses apply, feature widths (for the projections).
    probe_idx = list(range(min(4, len(bundle.train))))
    points_t, points_s = _feature_points(config, teacher, student)
    t_taps = s_taps = None
    try:
        t_taps = _Taps(teacher, points_t, config.attention_weight > 0)
        s_taps = _Taps(student, points_s, config.attention_weight > 0)
        (t_in, s_in), labels = _inputs(setup, bundle.train, probe_idx)
        with torch.no_grad():
            t_out = _main_output(teacher(*t_in))
            t_feats, t_att = t_taps.take()
            s_out = _main_output(student(*s_in))
            s_feats, s_att = s_taps.take()
        if tuple(t_out.shape[1:]) != tuple(s_out.shape[1:]):
            raise CompressError(f"the teacher's output has shape {tuple(t_out.shape[1:])} per sample but the student's has {tuple(s_out.shape[1:])}",
                                "Distillation matches outputs: give a student with the same number of classes (or embedding size)")
        kind = _output_kind(config, teacher, student, s_out)
        if config.backend != "torch":
            _check_fasterai_loss(config.backend, kind, bundle.labelled)
        classifier = not _embedding(teacher, student) and s_out.dim() == 2 and s_out.shape[1] > 1 \
            and (bundle.num_classes is None or s_out.shape[1] == bundle.num_classes)
        alpha = config.alpha if config.alpha is not None else (0.5 if bundle.labelled and classifier else 0.0)
        if alpha > 0 and not bundle.labelled:
            raise CompressError(f"alpha={alpha} asks for a hard-label loss but data '{bundle.name}' has no labels",
                                "Set alpha=0 (soft targets only) or give labelled data")
        if alpha > 0 and not classifier:
            raise CompressError(f"alpha={alpha} asks for a hard-label loss but the model is not a classifier for this data "
                                f"(its output is {tuple(s_out.shape[1:])}, matched by {kind})", "Set alpha=0")
        setup.metric = ("accuracy" if bundle.labelled else "agreement") if classifier else "cosine"
        projections = nn.ModuleList()
        torch.manual_seed(seed)
        for (tn, _), (sn, _), tf, sf in zip(points_t, points_s, t_feats, s_feats):
            tf, sf = _width_last(tf), _width_last(sf)
            if tuple(tf.shape[:-1]) != tuple(sf.shape[:-1]):
                raise CompressError(f"features '{tn}' {tuple(tf.shape[1:])} and '{sn}' {tuple(sf.shape[1:])} differ in more than their width",
                                    "Pick feature_layers whose outputs have the same spatial size")
            projections.append(nn.Identity() if tf.shape[-1] == sf.shape[-1] else nn.Linear(sf.shape[-1], tf.shape[-1]))
        mapping = _attention_mapping(config, rebuild, len(t_att), len(s_att))
        if config.attention_weight > 0 and any(s.shape[1:] != t_att[j].shape[1:] for s, j in zip(s_att, mapping)):
            raise CompressError("the teacher's and student's attention maps differ in shape (heads or tokens)",
                                "Attention matching needs the same number of heads and the same tokenizer; set attention_weight=0")

        wrapper = _Student(student, projections, s_taps).to(device)
        trained = wrapper
        if world > 1:
            from ..arch import HFModel

            trained = nn.parallel.DistributedDataParallel(
                wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=isinstance(student, HFModel))
        plan = {"alpha": alpha, "kind": kind, "mapping": mapping}
        started = time.perf_counter()
        result = _train(trained, wrapper, teacher, t_taps, config, ctx, setup, plan, seed, artifact, dist)
    finally:
        for taps in (t_taps, s_taps):
            if taps is not None:
                taps.close()
    student = wrapper.student.cpu().eval()
    ctx.metrics.update(result)
    ctx.metrics.update({"alpha": alpha, "output_loss": kind, "world_size": world, "device": device.type,
                        "params_teacher": _params(teacher_art.model) if teacher_art.model is not None else None,
                        "params_student": _params(student), "teacher_format": teacher_art.format,
                        "train_seconds": round(time.perf_counter() - started, 2)})
    return artifact.evolve(model=student, rebuild=[*artifact.rebuild, *rebuild])


def finetune(artifact: Artifact, ctx, *, epochs: float, limit: int | None, labels_only: bool, lr: float | None) -> tuple[Artifact, dict]:
    """A short distillation from the unpruned model (``ctx.original``), or training on labels alone: what pruning runs
    between its steps. Returns the tuned artifact and a summary of its numeric metrics."""
    sub = dataclasses.replace(ctx, metrics={})
    config = KDConfig(epochs=max(1, int(round(epochs))), limit=limit, eval_limit=2000, alpha=1.0 if labels_only else None, lr=lr)
    out = kd(artifact, config, sub)
    return out, {k: v for k, v in sub.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise CompressError("device=cuda was asked for but no CUDA GPU is visible", "Use device=cpu (or auto)")
    return torch.device("cuda" if choice == "cuda" or choice == "auto" and torch.cuda.is_available() else "cpu")


def _distributed(device: torch.device):
    """(world size, rank, torch.distributed or None); joins the process group torchrun set up the environment for."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 1, 0, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_world_size(), dist.get_rank(), dist


def _load_teacher(config: KDConfig, ctx, student_specs) -> Artifact:
    """The teacher artifact: the given SOURCE, of any format compress runs, or the pipeline's original model."""
    if not config.teacher:
        return ctx.original
    from ..arch import default_input_spec
    from ..formats import STATE_SUFFIXES
    from ..sources import ModelSpec, load_model

    given = config.teacher if isinstance(config.teacher, dict) else {"source": config.teacher}
    unknown = set(given) - {"source", "arch", "arch_args", "input_shape"}
    if unknown or not given.get("source"):
        raise CompressError(f"teacher: {'unknown key ' + repr(sorted(unknown)[0]) if unknown else 'needs a source'}",
                            "Give teacher: {source: PATH, arch: SPEC, arch_args: {...}, input_shape: [1x3x224x224]}")
    arch = given.get("arch") or config.teacher_arch
    spec = ModelSpec.parse(given["source"], arch, given.get("arch_args") or config.teacher_arch_args,
                           given.get("input_shape") or config.teacher_input_shape)
    path = Path(spec.source)
    if not arch and path.is_file() and path.suffix.lower() in STATE_SUFFIXES and spec.format == "torch":
        raise CompressError(f"the teacher {path} is a state dict (weights only), so compress needs its architecture",
                            "Give -s teacher_arch=SPEC (and teacher_arch_args=JSON), or a run directory as --teacher")
    if not spec.inputs and (spec.format in ("torchscript", "tensorrt") or (arch and not default_input_spec(arch))):
        # The teacher's format does not record what it eats (or its custom architecture does not say): the student's inputs.
        spec = dataclasses.replace(spec, inputs=tuple(student_specs))
    return load_model(spec)


class _RunnerTeacher(nn.Module):
    """A teacher in another format (TorchScript, ONNX, .pt2) as a module: its runner's first output, on ``device``."""

    def __init__(self, artifact: Artifact, device: torch.device):
        super().__init__()
        from ..runners import load_runner

        self.runner = load_runner(artifact, "cuda" if device.type == "cuda" and artifact.format != "onnx" else "cpu")
        self.device = device

    def forward(self, *inputs):
        return self.runner(*inputs)[0].to(self.device)


def _make_student(artifact: Artifact, config: KDConfig, seed: int) -> tuple[nn.Module, list[dict]]:
    student = copy.deepcopy(artifact.model)
    rebuild = []
    if config.student_layers is not None:
        from ..arch import HFModel

        if not isinstance(student, HFModel):
            raise CompressError("student_layers makes a shallower copy of a transformers model, and the SOURCE is not one",
                                "Use a transformers (hf:) SOURCE, or give a smaller student as SOURCE")
        _, _, layers = encoder_layers(student)
        if config.student_layers >= len(layers):
            raise CompressError(f"student_layers={config.student_layers} keeps every layer of a {len(layers)}-layer model",
                                f"Give fewer than {len(layers)}")
        step = {"op": "keep_layers", "layers": spaced_layers(len(layers), config.student_layers)}
        student = keep_layers(student, step)
        rebuild.append(step)
    if config.student_init == "random":
        torch.manual_seed(seed)
        for m in student.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    return student, rebuild


def _feature_points(config: KDConfig, teacher: nn.Module, student: nn.Module):
    if config.feature_weight <= 0:
        return [], []
    if not config.feature_layers:
        return [_default_points(teacher)], [_default_points(student)]
    pairs = []
    for item in config.feature_layers:
        t, _, s = item.partition("=")
        pairs.append(((t.strip(), "output"), ((s or t).strip(), "output")))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _output_kind(config: KDConfig, teacher: nn.Module, student: nn.Module, out: torch.Tensor) -> str:
    if config.output_loss != "auto":
        return config.output_loss
    if _embedding(teacher, student):
        return "cosine"
    return "kl" if out.dim() == 2 and out.shape[1] > 1 else "mse"


def _embedding(*models: nn.Module) -> bool:
    from ..arch import HFModel

    return any(isinstance(m, HFModel) and m.task == "embedding" for m in models)


def _attention_mapping(config: KDConfig, rebuild: list[dict], n_teacher: int, n_student: int) -> list[int]:
    if config.attention_weight <= 0 or not n_student:
        return []
    if not n_teacher:
        raise CompressError("the teacher returned no attention maps", "Attention matching needs transformers models; set attention_weight=0")
    kept = rebuild[-1]["layers"] if rebuild else None
    if kept and max(kept) < n_teacher and len(kept) == n_student:
        return list(kept)
    return spaced_layers(n_teacher, n_student) if n_student <= n_teacher else [min(i, n_teacher - 1) for i in range(n_student)]


def _inputs(setup: _Setup, ds, idx: list[int]):
    """((teacher inputs, student inputs), labels) for the samples ``idx``, each fitted to its model."""
    from torch.utils.data import Subset

    from ..data import batches

    sub = Subset(ds, idx)
    s_in, labels = next(batches(sub, setup.student_specs, len(idx), tokenizer=setup.student_tok, max_length=setup.max_length))
    if setup.shared_inputs:
        t_in = s_in
    else:
        t_in, _ = next(batches(sub, setup.teacher_specs, len(idx), tokenizer=setup.teacher_tok, max_length=setup.max_length))
    move = lambda xs: tuple(x.to(setup.device) for x in xs)  # noqa: E731
    return (move(t_in), move(s_in)), labels.to(setup.device)


# ---------------------------------------------------------------- training
def _train(trained, wrapper, teacher, t_taps, config: KDConfig, ctx, setup: _Setup, plan, seed, artifact, dist) -> dict:
    """Distillation through the shared loop: the loss parts of a batch, the held-out score, the checkpoint's key."""
    from ..arch import HFModel

    bundle = setup.bundle
    n_train = min(config.limit or len(bundle.train), len(bundle.train))
    lr = config.lr or (0.05 if config.optimizer == "sgd" else 5e-5 if isinstance(wrapper.student, HFModel) else 1e-3)
    needs_teacher = plan["alpha"] < 1 or config.feature_weight > 0 or config.attention_weight > 0
    teacher_cache: dict = {}

    def step(idx):
        return _loss_parts(trained, teacher, t_taps, config, setup, plan, bundle.train, idx, needs_teacher)

    run = Run(wrapper, step, n_train, metric=setup.metric, trained=trained, device=setup.device, world=setup.world,
              rank=setup.rank, dist=dist,
              evaluate=lambda: _evaluate(wrapper, teacher, setup, teacher_cache, config),
              before=lambda: {"teacher": _evaluate(teacher, teacher, setup, teacher_cache, config, is_teacher=True),
                              "student": _evaluate(wrapper, teacher, setup, teacher_cache, config)})
    settings = FitSettings(epochs=config.epochs, steps=config.steps, batch_size=config.batch_size, lr=lr, optimizer=config.optimizer,
                           weight_decay=config.weight_decay, schedule=config.schedule, warmup_steps=config.warmup_steps,
                           grad_clip=config.grad_clip, amp=config.amp, patience=config.patience, keep_best=config.keep_best, seed=seed)
    res = fit(run, settings, checkpoint=_checkpoint_path(config, ctx, setup, seed, teacher, wrapper), resume=config.resume,
              progress=ctx.progress if setup.rank == 0 else None, name="distill")
    metric, before = setup.metric, res["before"]
    out = {"eval_metric": metric, "epochs": res["epochs"], "steps": res["steps"], "best_epoch": res["best_epoch"],
           f"student_{metric}_before": round(before["student"], 6), f"student_{metric}_after": round(res["final"], 6),
           "train_samples": n_train, "eval_samples": min(config.eval_limit or len(bundle.eval), len(bundle.eval)), "lr": lr}
    if metric == "accuracy":
        out["teacher_accuracy"] = round(before["teacher"], 6)
    if "resumed_from_epoch" in res:
        out["resumed_from_epoch"] = res["resumed_from_epoch"]
    return out


def _loss_parts(trained, teacher, t_taps, config: KDConfig, setup: _Setup, plan, ds, idx, needs_teacher) -> dict:
    """The weighted loss parts of one batch: hard labels, soft targets, features, attention."""
    (t_in, s_in), labels = _inputs(setup, ds, idx)
    if needs_teacher:
        with torch.no_grad():
            t_out = _main_output(teacher(*t_in))
            t_feats, t_att = t_taps.take()
    s_out, s_feats, s_att = trained(*s_in)
    alpha = plan["alpha"]
    parts = {}
    if alpha > 0:
        parts["hard"] = (alpha, F.cross_entropy(s_out.float(), labels))
    if alpha < 1:
        parts["soft"] = (1 - alpha, _soft_loss(plan["kind"], s_out, t_out, config.temperature, config.backend, labels))
    if config.feature_weight > 0:
        parts["feature"] = (config.feature_weight,
                            torch.stack([F.mse_loss(s.float(), _width_last(t).float()) for s, t in zip(s_feats, t_feats)]).mean())
    if config.attention_weight > 0:
        parts["attention"] = (config.attention_weight, _attention_loss(s_att, t_att, plan["mapping"]))
    return parts


def _evaluate(model, teacher, setup: _Setup, cache: dict, config: KDConfig, is_teacher: bool = False) -> float:
    """Held-out accuracy, top-1 agreement with the teacher (no labels) or mean cosine to it; summed over ranks."""
    ev = setup.bundle.eval
    n = min(config.eval_limit or len(ev), len(ev))
    mine = list(range(n))[setup.rank::setup.world]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), setup.autocast():
        for b in range(0, len(mine), setup.batch_size):
            idx = mine[b:b + setup.batch_size]
            (t_in, s_in), labels = _inputs(setup, ev, idx)
            out = _main_output(model(*(t_in if is_teacher else s_in))).float()
            if setup.metric == "accuracy":
                total += torch.tensor([float((out.argmax(1) == labels).sum()), len(idx)], dtype=torch.float64)
                continue
            if b not in cache:
                cache[b] = _main_output(teacher(*t_in)).float()
            if setup.metric == "agreement":
                score = (out.argmax(1) == cache[b].argmax(1)).sum()
            else:
                score = F.cosine_similarity(out.flatten(1), cache[b].flatten(1), dim=1).sum()
            total += torch.tensor([float(score), len(idx)], dtype=torch.float64)
    model.train(was_training)
    if setup.world > 1:
        import torch.distributed as dist

        t = total.to(setup.device) if setup.device.type == "cuda" else total
        dist.all_reduce(t)
        total = t.cpu()
    return float(total[0] / max(total[1], 1))


# ---------------------------------------------------------------- checkpoints
def _checkpoint_path(config: KDConfig, ctx, setup: _Setup, seed: int, teacher: nn.Module, wrapper: nn.Module) -> Path:
    """A stable place keyed by the teacher and initial student weights, the config and the data."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k != "resume"}
    h.update(json.dumps({"config": settings, "data": ctx.data_spec, "seed": seed, "world": setup.world,
                         "device": setup.device.type}, sort_keys=True, default=str).encode())
    if isinstance(teacher, _RunnerTeacher) and teacher.runner.artifact.path is not None:
        from ..manifest import sha256

        h.update(sha256(Path(teacher.runner.artifact.path)).encode())
    for model in (teacher, wrapper):
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return cache_dir() / "distill" / h.hexdigest()[:20] / "checkpoint.pt"


# ---------------------------------------------------------------- fasterai's losses (optional extra)
def _fasterai_loss(backend: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, labels: torch.Tensor) -> torch.Tensor:
    """The logit loss ``backend`` names ("fasterai" is SoftTarget, else "fasterai:NAME"), from fasterai.distill.losses."""
    losses = require("fasterai.distill.losses", "fasterai", "the fasterai distillation backend")
    name = backend.partition(":")[2] or "SoftTarget"
    return getattr(losses, name)(student, teacher, T=temperature, target=labels)


def _check_fasterai_loss(backend: str, kind: str, labelled: bool) -> None:
    if kind != "kl":
        raise CompressError(f"backend={backend} matches classifier logits, and this model's outputs are matched by {kind}",
                            "Use backend=torch")
    if backend.endswith(":DecoupledKD") and not labelled:
        raise CompressError("fasterai's DecoupledKD loss needs labels, and the data has none", "Use backend=fasterai (SoftTarget)")
