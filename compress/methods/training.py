"""The one training loop: distillation, fine-tuning between pruning steps (through distillation), QAT and the fasterai
adapters all train through :func:`fit`.

A caller hands over a :class:`Run` — the weights to train, a function that computes the weighted loss parts of one
batch, and optionally a held-out score — and :class:`FitSettings`. :func:`fit` owns what every run needs the same way:
AdamW/SGD with a cosine/linear/constant schedule and warm-up, gradient clipping, mixed precision on a GPU, a
(distributed) sampler, progress, early stopping and the best epoch kept, and a checkpoint written atomically after
every epoch and on Ctrl-C / SIGTERM that ``resume`` continues from to the same result (deleted after success).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CompressError
from ..progress import Progress

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 2   # 2: best_state holds the whole trained module (student and projections)


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 3
    steps: int | None = None            # stop after this many optimizer steps in all (overrides epochs)
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"            # adamw | sgd | adam
    weight_decay: float = 0.01
    schedule: str = "cosine"            # cosine | linear | constant
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    amp: bool = False                   # mixed precision (bf16, else fp16 with a scaler) on a GPU
    patience: int | None = None         # stop after this many epochs without a better held-out score
    keep_best: bool = True              # return the best held-out epoch's weights, not the last
    seed: int = 0


@dataclass
class Run:
    """What :func:`fit` trains and how it scores it."""
    module: nn.Module                                   # the weights: optimized, checkpointed, kept at their best epoch
    step: Callable[[list[int]], dict]                   # sample indices -> {part: (weight, loss tensor)}
    n_train: int                                        # samples to draw batch indices from
    evaluate: Callable[[], float] | None = None         # held-out score, higher is better (None: none, the last weights)
    metric: str = "score"
    trained: nn.Module | None = None                    # what to put in train mode (a DDP wrapper); default: module
    train_mode: Callable[[], None] | None = None        # how to switch to training (PT2E graphs need their own)
    before: Callable[[], dict] | None = None            # scores before training (kept in the checkpoint for a resume)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world: int = 1
    rank: int = 0
    dist: object = None                                 # torch.distributed when training under torchrun


def fit(run: Run, settings: FitSettings, *, checkpoint: Path | None = None, resume: bool = False,
        progress: Progress | None = None, name: str = "train") -> dict:
    """Train ``run.module`` in place; returns the log: epochs, steps, best epoch, scores before and after."""
    from torch.utils.data import DistributedSampler

    progress = progress or Progress()
    sampler = DistributedSampler(range(run.n_train), num_replicas=run.world, rank=run.rank, shuffle=True, seed=settings.seed)
    per_rank, bs = len(sampler), settings.batch_size
    # A last batch of one sample is dropped (BatchNorm cannot train on it).
    steps_per_epoch = per_rank // bs + (1 if per_rank % bs > 1 or per_rank < bs else 0)
    total_steps = settings.steps or settings.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    params = [p for p in run.module.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(settings.schedule, total_steps, settings.warmup_steps))
    cuda_amp = run.device.type == "cuda" and settings.amp
    scaler = torch.amp.GradScaler("cuda", enabled=cuda_amp and not torch.cuda.is_bf16_supported())
    trained = run.trained or run.module
    train_mode = run.train_mode or trained.train

    state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": {}, "loss_n": 0, "log": [], "best": None, "best_epoch": None,
             "best_state": None, "bad_epochs": 0, "before": None, "rng": None}
    resumed = None
    if checkpoint is not None and checkpoint.exists():
        if resume:
            saved = read_checkpoint(checkpoint)
            run.module.load_state_dict(saved.pop("model"))
            opt.load_state_dict(saved.pop("optimizer"))
            sched.load_state_dict(saved.pop("scheduler"))
            scaler.load_state_dict(saved.pop("scaler"))
            state.update(saved)
            resumed = state["epoch"] + state["batch"] / steps_per_epoch
            log.info("resuming from epoch %.2f (checkpoint %s)", resumed, checkpoint)
        else:
            log.info("an interrupted run left a checkpoint (%s); starting over — pass --resume to continue it", checkpoint)
    elif resume:
        log.info("no checkpoint of an interrupted run with this model, config and data: starting from the beginning")
    if state["before"] is None and run.before is not None:
        state["before"] = run.before()
    last_saved = state["step"]

    def save():
        nonlocal last_saved
        if checkpoint is not None and run.rank == 0:
            write_checkpoint(checkpoint, {**state, "model": run.module.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "version": CHECKPOINT_VERSION})
        last_saved = state["step"]

    completed_buffers = [b.detach().clone() for b in run.module.buffers()]
    try:
        with progress.task(name, total_steps, completed=state["step"]) as task:
            while state["epoch"] < n_epochs and state["step"] < total_steps:
                epoch, skip = state["epoch"], state["batch"]
                if skip and state["rng"] is not None:
                    torch.set_rng_state(state["rng"])
                else:
                    torch.manual_seed(settings.seed + 1000 * (epoch + 1) + run.rank)
                sampler.set_epoch(epoch)
                order = list(sampler)
                chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
                chunks = [c for c in chunks if len(c) > 1 or len(chunks) == 1]
                started = time.perf_counter()
                train_mode()
                for b, idx in enumerate(chunks):
                    if b < skip:
                        continue
                    if state["step"] >= total_steps:
                        break
                    parts = _optimizer_step(run, idx, opt, sched, scaler, settings, params, cuda_amp)
                    state["step"] += 1
                    state["batch"] = b + 1
                    state["rng"] = torch.get_rng_state()
                    for k, v in parts.items():
                        state["loss_sum"][k] = state["loss_sum"].get(k, 0.0) + v
                    state["loss_n"] += 1
                    completed_buffers = [t.detach().clone() for t in run.module.buffers()]
                    best = state["best"]
                    task.advance(1, f"epoch {epoch + 1}/{n_epochs} loss {parts['loss']:.4f}"
                                 + (f" · best {run.metric} {best:.4f}" if best is not None else ""))
                if run.dist is not None:  # DDP syncs buffers (BatchNorm statistics) before each forward: sync after the last one too
                    for buf in run.module.buffers():
                        run.dist.broadcast(buf.data, 0)
                losses = {k: round(_mean_across(v, state["loss_n"], run.dist), 6) for k, v in state["loss_sum"].items()}
                entry = {"epoch": epoch + 1, "steps": state["step"], **losses, "lr": sched.get_last_lr()[0]}
                if run.evaluate is not None:
                    score = run.evaluate()
                    entry[run.metric] = round(score, 6)
                    if state["best"] is None or score > state["best"]:
                        state.update(best=score, best_epoch=epoch + 1, bad_epochs=0,
                                     best_state={k: v.detach().cpu().clone() for k, v in run.module.state_dict().items()})
                    else:
                        state["bad_epochs"] += 1
                    task.advance(0, f"epoch {epoch + 1}/{n_epochs} {run.metric} {score:.4f}")
                state["log"].append({**entry, "seconds": round(time.perf_counter() - started, 3)})
                state.update(epoch=epoch + 1, batch=0, loss_sum={}, loss_n=0, rng=None)
                save()
                _after_epoch(epoch + 1)
                if settings.patience and state["bad_epochs"] >= settings.patience:
                    break
    except BaseException:
        if state["step"] > last_saved:  # keep the work done since the last epoch for --resume
            with torch.no_grad():  # an interrupted forward pass may have moved BatchNorm statistics
                for t, kept in zip(run.module.buffers(), completed_buffers):
                    t.copy_(kept)
            save()
        raise

    if settings.keep_best and state["best_state"] is not None:
        run.module.load_state_dict(state["best_state"])
    if checkpoint is not None and run.rank == 0:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    final = state["best"] if settings.keep_best and state["best"] is not None else \
        (state["log"][-1].get(run.metric) if state["log"] else None)
    out = {"epochs": state["log"], "steps": state["step"], "best_epoch": state["best_epoch"], "final": final,
           "before": state["before"] or {}}
    if resumed is not None:
        out["resumed_from_epoch"] = round(resumed, 3)
    return out


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (tests replace it to simulate an interruption)."""


def _optimizer_step(run: Run, idx: list[int], opt, sched, scaler, settings: FitSettings, params, cuda_amp: bool) -> dict:
    """One optimizer step; returns the loss and its parts (when there are several) as floats."""
    dtype = torch.bfloat16 if cuda_amp and torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype, enabled=cuda_amp):
        parts = run.step(idx)
        loss = sum(w * v for w, v in parts.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if settings.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return {"loss": float(loss.detach()), **({f"loss_{k}": float(v.detach()) for k, (_, v) in parts.items()} if len(parts) > 1 else {})}


def make_optimizer(params, settings: FitSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_lambda(schedule: str, total: int, warmup: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 if schedule == "constant" else 1.0 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return factor


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


def write_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file
        raise CompressError(f"the training checkpoint {path} cannot be read ({type(exc).__name__})",
                            "Delete it and run again without --resume") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CompressError(f"the training checkpoint {path} was written by another version", "Delete it and run again without --resume")
    state.pop("version")
    return state
