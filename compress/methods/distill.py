"""Knowledge distillation ("kd"): train a student to match a teacher on real data, with a plain PyTorch loop.

Losses: soft targets (KL at temperature T, scaled by T²) mixed with hard-label cross-entropy (``alpha``);
embedding models match the teacher's output by cosine instead. Optional: hidden-feature matching through a
learned projection where widths differ, and attention-map matching for transformers.

Students: the SOURCE itself (e.g. a pruned copy of the teacher), any other architecture given as SOURCE
(``student_init: random`` starts it from fresh weights), or a shallower copy of a transformer
(``student_layers``), saved with a ``keep_layers`` rebuild step so the run directory reloads.

Training is resumable: a checkpoint is written atomically after every epoch (and on Ctrl-C / SIGTERM) into
``$COMPRESS_CACHE_DIR/distill/<key>/`` (default ``~/.cache/compress``), keyed by the teacher and student
weights, the config and the data; ``resume: true`` continues from it and reaches the same result, and it is
deleted after success. Under ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel (gloo on
CPU, nccl on GPU); every rank returns the same weights, and only rank 0 writes the checkpoint (the CLI makes
the other ranks write their OUT to a throw-away folder).
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import Artifact, rebuilder
from ..errors import CompressError, require
from ..registry import option, register
from .fasterai import DISTILL_BACKENDS

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class KDConfig:
    teacher: str | None = option(None, "teacher SOURCE (default: the pipeline's original model)")
    teacher_arch: str | None = option(None, "architecture spec of a state-dict teacher")
    teacher_arch_args: dict | None = option(None, "keyword arguments for teacher_arch")
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


# ---------------------------------------------------------------- transformers: shallower students
def encoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding a transformers model's encoder layers."""
    from ..arch import HFModel

    inner = model.model if isinstance(model, HFModel) else model
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    for name, m in inner.named_modules():
        if isinstance(m, nn.ModuleList) and n and len(m) == n:
            parent, _, attr = name.rpartition(".")
            return inner.get_submodule(parent), attr, m
    raise CompressError("student_layers needs a transformers model with an encoder layer list",
                        "Use a transformers (hf:) model, or give a smaller student as SOURCE")


def spaced_layers(total: int, keep: int) -> list[int]:
    """Evenly spaced layer indices from the first to the last: 6 -> 3 keeps [0, 2, 5], 12 -> 6 keeps DistilBERT's."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


@rebuilder("keep_layers")
def keep_layers(model: nn.Module, step: dict) -> nn.Module:
    """Replay step: keep only ``step["layers"]`` of the encoder (before the state dict loads)."""
    layers = [int(i) for i in step["layers"]]
    parent, attr, old = encoder_layers(model)
    if any(not 0 <= i < len(old) for i in layers):
        raise CompressError(f"keep_layers {layers} does not fit a model with {len(old)} layers", "Re-create the run directory")
    kept = nn.ModuleList([old[i] for i in layers])
    for new_index, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_index
    setattr(parent, attr, kept)
    inner = getattr(model, "model", model)
    inner.config.num_hidden_layers = len(layers)
    return model


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
            from .fasterai import distill_loss

            return distill_loss(backend, s, t, temperature, labels)
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
    quiet = ctx.quiet or rank != 0

    bundle = ctx.data()
    if bundle.train is None or len(bundle.train) == 0:
        raise CompressError(f"data '{bundle.name}' has no training split", "Give data with a training split (e.g. a built-in set)")
    teacher_art = _load_teacher(config, ctx, artifact.input_spec)
    student, rebuild = _make_student(artifact, config, seed)
    teacher = teacher_art.model
    if device.type != "cpu":
        teacher = copy.deepcopy(teacher)
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
            from .fasterai import check_distill

            check_distill(config.backend, kind, bundle.labelled)
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
        result = _train(trained, wrapper, teacher, t_taps, config, ctx, setup, plan, seed, artifact, teacher_art, quiet, dist)
    finally:
        for taps in (t_taps, s_taps):
            if taps is not None:
                taps.close()
    student = wrapper.student.cpu().eval()
    ctx.metrics.update(result)
    ctx.metrics.update({"alpha": alpha, "output_loss": kind, "world_size": world, "device": device.type,
                        "params_teacher": _params(teacher_art.model), "params_student": _params(student),
                        "train_seconds": round(time.perf_counter() - started, 2)})
    return artifact.evolve(model=student, rebuild=[*artifact.rebuild, *rebuild])


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
    if config.teacher:
        from .. import sources

        path = Path(config.teacher)
        if not config.teacher_arch and path.is_file() and path.suffix.lower() in sources.STATE_SUFFIXES:
            raise CompressError(f"the teacher {path} is a state dict (weights only), so compress needs its architecture",
                                "Give -s teacher_arch=SPEC (and teacher_arch_args=JSON), or a run directory as --teacher")

        from ..arch import default_input_spec

        # A state-dict teacher of a custom architecture eats what the student eats.
        shapes = [] if not config.teacher_arch or default_input_spec(config.teacher_arch) else \
            [f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in student_specs]
        teacher = sources.load(config.teacher, config.teacher_arch, config.teacher_arch_args, shapes)
    else:
        teacher = ctx.original
    if teacher.format != "torch" or teacher.model is None:
        raise CompressError(f"the teacher is a {teacher.format} model, but distillation runs it in PyTorch",
                            "Give the teacher as a PyTorch model (a state dict with teacher_arch, a run directory or zoo:NAME)")
    return teacher


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
def _train(trained, wrapper, teacher, t_taps, config, ctx, setup: _Setup, plan, seed, artifact, teacher_art, quiet, dist) -> dict:
    from torch.utils.data import DistributedSampler

    from ..ui import console, progress

    bundle = setup.bundle
    n_train = min(config.limit or len(bundle.train), len(bundle.train))
    sampler = DistributedSampler(range(n_train), num_replicas=setup.world, rank=setup.rank, shuffle=True, seed=seed)
    per_rank = len(sampler)
    bs = config.batch_size
    # A last batch of one sample is dropped (BatchNorm cannot train on it).
    steps_per_epoch = per_rank // bs + (1 if per_rank % bs > 1 or per_rank < bs else 0)
    total_steps = config.steps or config.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    from ..arch import HFModel

    lr = config.lr or (0.05 if config.optimizer == "sgd" else 5e-5 if isinstance(wrapper.student, HFModel) else 1e-3)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.schedule, total_steps, config.warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=setup.device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported())
    needs_teacher = plan["alpha"] < 1 or config.feature_weight > 0 or config.attention_weight > 0

    ckpt_path = _checkpoint_path(config, ctx, setup, seed, teacher, wrapper)
    state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": {}, "loss_n": 0, "log": [], "best": None, "best_epoch": None,
             "best_state": None, "bad_epochs": 0, "before": None, "rng": None}
    resumed = None
    if ckpt_path.exists():
        if config.resume:
            saved = _read_checkpoint(ckpt_path)
            trained_state = saved.pop("model")
            wrapper.load_state_dict(trained_state)
            opt.load_state_dict(saved.pop("optimizer"))
            sched.load_state_dict(saved.pop("scheduler"))
            scaler.load_state_dict(saved.pop("scaler"))
            state.update(saved)
            resumed = state["epoch"] + state["batch"] / steps_per_epoch
            if not quiet:
                console().print(f"[dim]resuming from epoch {resumed:.2f} (checkpoint {ckpt_path})[/dim]", soft_wrap=True)
        elif not quiet:
            console().print(f"[dim]an interrupted run left a checkpoint ({ckpt_path}); starting over — pass --resume to continue it[/dim]",
                            soft_wrap=True)
    elif config.resume and not quiet:
        console().print("[dim]no checkpoint of an interrupted run with this teacher, student, config and data: starting from the beginning[/dim]",
                        soft_wrap=True)

    teacher_cache: dict = {}
    if state["before"] is None:
        state["before"] = {"teacher": _evaluate(teacher, teacher, setup, teacher_cache, config, is_teacher=True),
                           "student": _evaluate(wrapper, teacher, setup, teacher_cache, config)}
    last_saved = state["step"]

    def save():
        nonlocal last_saved
        if setup.rank == 0:
            _write_checkpoint(ckpt_path, {**state, "model": wrapper.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                          "version": CHECKPOINT_VERSION})
        last_saved = state["step"]

    metric = setup.metric
    completed_buffers = [b.detach().clone() for b in wrapper.buffers()]
    try:
        with progress(quiet) as bar:
            task = bar.add_task("distill", total=total_steps, completed=state["step"], info="")
            while state["epoch"] < n_epochs and state["step"] < total_steps:
                epoch, skip = state["epoch"], state["batch"]
                if skip and state["rng"] is not None:
                    torch.set_rng_state(state["rng"])
                else:
                    torch.manual_seed(seed + 1000 * (epoch + 1) + setup.rank)
                sampler.set_epoch(epoch)
                order = list(sampler)
                chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
                chunks = [c for c in chunks if len(c) > 1 or len(chunks) == 1]
                started = time.perf_counter()
                trained.train()
                for b, idx in enumerate(chunks):
                    if b < skip:
                        continue
                    if state["step"] >= total_steps:
                        break
                    parts = _step(trained, teacher, t_taps, opt, sched, scaler, config, setup, plan, bundle.train, idx, needs_teacher, params)
                    state["step"] += 1
                    state["batch"] = b + 1
                    state["rng"] = torch.get_rng_state()
                    for k, v in parts.items():
                        state["loss_sum"][k] = state["loss_sum"].get(k, 0.0) + v
                    state["loss_n"] += 1
                    completed_buffers = [b.detach().clone() for b in wrapper.buffers()]
                    loss = parts["loss"]
                    best = state["best"]
                    bar.update(task, advance=1, info=f"epoch {epoch + 1}/{n_epochs} loss {loss:.4f}"
                               + (f" · best {metric} {best:.4f}" if best is not None else ""))
                if dist is not None:  # DDP syncs buffers (BatchNorm statistics) before each forward: sync after the last one too
                    for buf in wrapper.buffers():
                        dist.broadcast(buf.data, 0)
                score = _evaluate(wrapper, teacher, setup, teacher_cache, config)
                losses = {k: round(_mean_across(v, state["loss_n"], dist), 6) for k, v in state["loss_sum"].items()}
                state["log"].append({"epoch": epoch + 1, "steps": state["step"], **losses, "lr": sched.get_last_lr()[0],
                                     metric: round(score, 6), "seconds": round(time.perf_counter() - started, 3)})
                if state["best"] is None or score > state["best"]:
                    state.update(best=score, best_epoch=epoch + 1, bad_epochs=0,
                                 best_state={k: v.detach().cpu().clone() for k, v in wrapper.student.state_dict().items()})
                else:
                    state["bad_epochs"] += 1
                state.update(epoch=epoch + 1, batch=0, loss_sum={}, loss_n=0, rng=None)
                bar.update(task, info=f"epoch {epoch + 1}/{n_epochs} {metric} {score:.4f}")
                save()
                _after_epoch(epoch + 1)
                if config.patience and state["bad_epochs"] >= config.patience:
                    break
    except BaseException:
        if state["step"] > last_saved:  # keep the work done since the last epoch for --resume
            with torch.no_grad():  # an interrupted forward pass may have moved BatchNorm statistics
                for b, kept in zip(wrapper.buffers(), completed_buffers):
                    b.copy_(kept)
            save()
        raise

    if config.keep_best and state["best_state"] is not None:
        wrapper.student.load_state_dict(state["best_state"])
    final = state["best"] if config.keep_best else state["log"][-1][metric]
    if setup.rank == 0:
        import shutil

        shutil.rmtree(ckpt_path.parent, ignore_errors=True)
    before = state["before"]
    out = {"eval_metric": metric, "epochs": state["log"], "steps": state["step"], "best_epoch": state["best_epoch"],
           f"student_{metric}_before": round(before["student"], 6), f"student_{metric}_after": round(final, 6),
           "train_samples": n_train, "eval_samples": min(config.eval_limit or len(bundle.eval), len(bundle.eval)), "lr": lr}
    if metric == "accuracy":
        out["teacher_accuracy"] = round(before["teacher"], 6)
    if resumed is not None:
        out["resumed_from_epoch"] = round(resumed, 3)
    return out


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (tests replace it to simulate an interruption)."""


def _step(trained, teacher, t_taps, opt, sched, scaler, config, setup: _Setup, plan, ds, idx, needs_teacher, params) -> dict:
    """One optimizer step; returns the loss and its parts (hard, soft, feature, attention) as floats."""
    (t_in, s_in), labels = _inputs(setup, ds, idx)
    with setup.autocast():
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
        loss = sum(w * v for w, v in parts.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return {"loss": float(loss.detach()), **({f"loss_{k}": float(v.detach()) for k, (_, v) in parts.items()} if len(parts) > 1 else {})}


def _lr_lambda(schedule: str, total: int, warmup: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 if schedule == "constant" else 1.0 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return factor


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


def _mean_across(total: float, count: int, dist) -> float:
    if dist is None:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1))


# ---------------------------------------------------------------- checkpoints
def cache_dir() -> Path:
    root = os.environ.get("COMPRESS_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress"


def _checkpoint_path(config: KDConfig, ctx, setup: _Setup, seed: int, teacher: nn.Module, wrapper: nn.Module) -> Path:
    """A stable place keyed by the teacher and initial student weights, the config and the data."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k != "resume"}
    h.update(json.dumps({"config": settings, "data": ctx.data_spec, "seed": seed, "world": setup.world,
                         "device": setup.device.type}, sort_keys=True, default=str).encode())
    for model in (teacher, wrapper):
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return cache_dir() / "distill" / h.hexdigest()[:20] / "checkpoint.pt"


def _write_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file
        raise CompressError(f"the distillation checkpoint {path} cannot be read ({type(exc).__name__})",
                            "Delete it and run again without --resume") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CompressError(f"the distillation checkpoint {path} was written by another version", "Delete it and run again without --resume")
    state.pop("version")
    return state
