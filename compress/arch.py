"""Architecture specs: where a model's code comes from, so a state dict can be loaded into it.

``torchvision:NAME``, ``timm:NAME``, ``hf:PATH_OR_PACKAGE``, ``path/to/file.py:Callable``, ``package.module:Callable``.
A spec is only ever executed because the user wrote it; nothing here evaluates strings.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CompressError, require
from .inputs import InputSpec

KINDS = ("torchvision", "timm", "hf")


def parse_arch_args(text: str | dict | None) -> dict:
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CompressError(f"--arch-args is not valid JSON ({exc.msg} at column {exc.colno})",
                            "Write a JSON object, e.g. --arch-args '{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise CompressError("--arch-args must be a JSON object", "Write e.g. --arch-args '{\"num_classes\": 10}'")
    return value


def build(spec: str, args: dict | None = None) -> nn.Module:
    """Build an untrained model from an architecture spec."""
    args = dict(args or {})
    kind, _, rest = spec.partition(":")
    if not rest:
        raise CompressError(f"architecture spec '{spec}' has no ':'",
                            "Use torchvision:NAME, timm:NAME, hf:PATH, path/file.py:Callable or package.module:Callable")
    if kind == "torchvision":
        return _torchvision(rest, args)
    if kind == "timm":
        timm = require("timm", "vision", "the timm: architecture spec")
        if rest not in timm.list_models():
            near = difflib.get_close_matches(rest, timm.list_models(), n=3)
            raise CompressError(f"timm has no model '{rest}'", f"Did you mean: {', '.join(near)}?" if near else "See timm.list_models()")
        return timm.create_model(rest, pretrained=False, **args)
    if kind == "hf":
        return HFModel.from_spec(rest, args, pretrained=False)
    return _callable(spec, args)


def _torchvision(name: str, args: dict) -> nn.Module:
    tvm = require("torchvision.models", "vision", "the torchvision: architecture spec")
    names = tvm.list_models()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        raise CompressError(f"torchvision has no model '{name}'", f"Did you mean: {', '.join(near)}?" if near else "See torchvision.models.list_models()")
    args.setdefault("weights", None)
    try:
        return tvm.get_model(name, **args)
    except TypeError as exc:
        raise CompressError(f"torchvision:{name} does not accept these --arch-args: {exc}", "Check the argument names") from None


def _callable(spec: str, args: dict) -> nn.Module:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise CompressError(f"architecture file {path} does not exist", "Check the path before ':'")
        mod_name = f"_compress_arch_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise CompressError(f"importing {path} failed: {type(exc).__name__}: {exc}", "Fix the file, or run with --debug") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise CompressError(f"cannot import module '{target}' ({exc})", "Check the module name, or install its package") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        near = difflib.get_close_matches(attr, public, n=3)
        raise CompressError(f"'{target}' has no callable '{attr}'", f"Did you mean: {', '.join(near)}?" if near else f"It defines: {', '.join(public[:8])}")
    try:
        model = fn(**args)
    except TypeError as exc:
        raise CompressError(f"{attr}(**arch_args) failed: {exc}", "Check --arch-args") from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module", "Point the spec at a function or class that builds the model")
    return model


def default_input_spec(spec: str | None, model: nn.Module | None = None) -> list[InputSpec] | None:
    """The input shape a known architecture expects, or None when the user must say."""
    if isinstance(model, HFModel):
        return model.default_inputs()
    if spec and spec.startswith(("torchvision:", "timm:")):
        size = 224
        if spec.startswith("timm:") and model is not None:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            size = (cfg.get("input_size") or (3, 224, 224))[-1]
        elif spec.startswith("torchvision:") and "inception" in spec:
            size = 299
        return [InputSpec("input", (1, 3, size, size), "float32", (0,))]
    return None


# ---------------------------------------------------------------- transformers
def resolve_hf_path(ref: str) -> Path:
    """A local folder with config.json, or an installed package that carries a model folder."""
    path = Path(ref)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        found = sorted(path.rglob("config.json"))
        if found:
            return found[0].parent
        raise CompressError(f"{path} holds no config.json", "Point hf: at a transformers model folder")
    try:
        pkg = importlib.import_module(ref.replace("-", "_"))
    except ImportError:
        raise CompressError(f"hf:{ref} is neither a folder nor an installed package",
                            "Give a transformers model folder, or install the package that carries the model") from None
    getter = getattr(pkg, "get_model_path", None)
    if callable(getter):
        return resolve_hf_path(str(getter()))
    return resolve_hf_path(str(Path(pkg.__file__).parent))


class HFModel(nn.Module):
    """A transformers model that takes token tensors and returns one tensor: logits, or a pooled embedding."""

    def __init__(self, model: nn.Module, task: str, pooling: str, normalize: bool, path: str):
        super().__init__()
        self.model = model
        self.task, self.pooling, self.normalize, self.path = task, pooling, normalize, path

    @classmethod
    def from_spec(cls, ref: str, args: dict, pretrained: bool) -> "HFModel":
        transformers = require("transformers", "hf", "the hf: architecture spec")
        transformers.utils.logging.disable_progress_bar()   # its per-load "Loading weights" bar is noise on stderr
        path = resolve_hf_path(ref)
        args = dict(args)
        task = args.pop("task", None)
        pooling = args.pop("pooling", "mean")
        config = transformers.AutoConfig.from_pretrained(path, **{k: v for k, v in args.items() if k in ("num_labels",)})
        archs = config.architectures or []
        if task is None:
            task = "classification" if any("SequenceClassification" in a for a in archs) or "num_labels" in args else "embedding"
        if task not in ("classification", "embedding"):
            raise CompressError(f"hf task '{task}' is not known", "Use task 'classification' or 'embedding' in --arch-args")
        normalize = bool(args.pop("normalize", (path / "2_Normalize").exists() or _lists_normalize(path)))
        args.pop("num_labels", None)
        args.setdefault("attn_implementation", "eager")
        vision = getattr(config, "image_size", None) is not None     # ViT, DeiT, Swin, ...: pixel_values in
        if vision:
            cls = HFVisionModel
            auto = transformers.AutoModelForImageClassification if task == "classification" else transformers.AutoModel
        else:
            auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModel
        if pretrained:
            model = auto.from_pretrained(path, config=config, **args)
        else:
            model = auto.from_config(config, **args)
        return cls(model, task, pooling, normalize, str(path)).eval()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        if self.task == "classification":
            return out.logits
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "none":
            return hidden
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    def default_inputs(self, seq: int = 128) -> list[InputSpec]:
        return [InputSpec("input_ids", (1, seq), "int64", (0, 1)), InputSpec("attention_mask", (1, seq), "int64", (0, 1))]

    def tokenizer(self):
        transformers = require("transformers", "hf", "tokenizing text")
        return transformers.AutoTokenizer.from_pretrained(self.path)


class HFVisionModel(HFModel):
    """A transformers vision model (ViT, DeiT, Swin, ...): ``pixel_values`` in, logits or the pooled embedding out."""

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        if self.task == "classification":
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        if pooled is None or self.pooling == "cls":
            hidden = out.last_hidden_state
            pooled = hidden[:, 0] if hidden.dim() == 3 else hidden.flatten(2).mean(-1)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def default_inputs(self, seq: int = 128) -> list[InputSpec]:
        cfg = self.model.config
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return [InputSpec("pixel_values", (1, getattr(cfg, "num_channels", 3), size, size), "float32", (0,))]

    def tokenizer(self):
        return None


def _lists_normalize(path: Path) -> bool:
    try:
        return any("Normalize" in m.get("type", "") for m in json.loads((path / "modules.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return False


def load_state_dict(model: nn.Module, state: dict[str, Any], what: str) -> None:
    """Load a state dict strictly, naming the first few offending keys when it does not fit."""
    metadata = getattr(state, "_metadata", None)  # layer versions: quantized modules need them to load
    if isinstance(model, HFModel) and state and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
        metadata = {f"model.{k}" if k else "model": v for k, v in metadata.items()} if metadata is not None else None
    own = model.state_dict()
    # Rebuilt buffers (position_ids, ...) may be absent from either side; they are never offending keys.
    state = OrderedDict((k, v) for k, v in state.items() if k in own or not _optional_buffer(model, k))
    if metadata is not None:
        state._metadata = metadata
    missing = [k for k in own if k not in state and not _optional_buffer(model, k)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_first(wrong)}")
    if problems:
        raise CompressError(f"the state dict does not fit {what}: {'; '.join(problems)}",
                            "Check --arch and --arch-args (e.g. num_classes) match the checkpoint")
    model.load_state_dict(state, strict=False)


def _optional_buffer(model: nn.Module, key: str) -> bool:
    # Buffers such as BERT's position_ids are rebuilt by the architecture and often absent from checkpoints.
    return key.endswith(("position_ids", "num_batches_tracked", "token_type_ids"))


def _first(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (+{len(items) - n} more)" if len(items) > n else shown
