"""What a model eats: input specs parsed from ``1x3x224x224[:DTYPE]`` strings, and example inputs made from them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import CompressError

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
CANONICAL = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
             torch.float64: "float64", torch.int64: "int64", torch.int32: "int32",
             torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}
_SHAPE = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic_axes: tuple[int, ...] = field(default=(0,))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point

    def with_batch(self, batch: int) -> "InputSpec":
        return InputSpec(self.name, (batch, *self.shape[1:]), self.dtype, self.dynamic_axes)

    def example(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        """A deterministic example tensor: normal floats, ones for masks, zeros for token types, small ids else."""
        shape = (batch if batch is not None else self.shape[0], *self.shape[1:])
        gen = torch.Generator().manual_seed(seed)
        dtype = self.torch_dtype
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen).to(dtype)
        if dtype == torch.bool or "mask" in self.name:
            return torch.ones(shape, dtype=dtype)
        if "type" in self.name:
            return torch.zeros(shape, dtype=dtype)
        return torch.randint(0, 100, shape, generator=gen, dtype=dtype)  # token ids: small enough for any vocabulary

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "dynamic_axes": list(self.dynamic_axes)}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d.get("dtype", "float32"), tuple(d.get("dynamic_axes", (0,))))


def parse_input_shape(text: str, name: str = "input", static: bool = False) -> InputSpec:
    """Parse ``[NAME=]1x3x224x224[:DTYPE]``."""
    raw = str(text).strip()
    if "=" in raw:
        name, raw = (p.strip() for p in raw.split("=", 1))
    shape_text, _, dtype = raw.partition(":")
    shape_text = shape_text.strip().lower()
    dtype = (dtype.strip() or "float32").lower()
    if not _SHAPE.match(shape_text):
        raise CompressError(f"input shape '{text}' is not of the form 1x3x224x224[:DTYPE]",
                            "Write the dimensions joined by 'x', e.g. --input-shape 1x3x224x224 or 1x128:int64")
    dims = tuple(int(d) for d in shape_text.split("x"))
    if any(d <= 0 for d in dims):
        raise CompressError(f"input shape '{text}' has a zero dimension", "Every dimension must be at least 1")
    if dtype not in DTYPES:
        raise CompressError(f"input dtype '{dtype}' in '{text}' is not known", f"Use one of: {', '.join(sorted(set(CANONICAL.values())))}")
    return InputSpec(name or "input", dims, CANONICAL[DTYPES[dtype]], () if static else (0,))


def parse_input_shapes(texts, names=None, static: bool = False) -> list[InputSpec]:
    specs = []
    for i, t in enumerate(texts):
        default = (names[i] if names and i < len(names) else ("input" if len(texts) == 1 else f"input_{i}"))
        specs.append(parse_input_shape(t, default, static))
    if len({s.name for s in specs}) != len(specs):
        raise CompressError("two inputs share a name", "Name them: --input-shape input_ids=1x128:int64 --input-shape attention_mask=1x128:int64")
    return specs


def examples(specs: list[InputSpec], batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return tuple(s.example(batch, seed + i) for i, s in enumerate(specs))


def check_inputs(specs: list[InputSpec], inputs: tuple) -> None:
    """Say clearly when given inputs do not fit the spec (count, rank, dtype, fixed dimensions)."""
    if len(inputs) != len(specs):
        raise CompressError(f"the model takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}) but {len(inputs)} were given",
                            "Give one --input-shape per model input")
    for s, x in zip(specs, inputs):
        if x.dim() != len(s.shape):
            raise CompressError(f"input '{s.name}' has {x.dim()} dimensions {tuple(x.shape)} but the model expects {len(s.shape)} {s.shape}",
                                "Fix --input-shape or the data")


def with_dynamic_axes(specs: list[InputSpec], requested=None, static: bool = False) -> list[InputSpec]:
    """The input specs with the dynamic axes an export will have (``requested``: batch, sequence or axis numbers)."""
    if static:
        return [InputSpec(s.name, s.shape, s.dtype, ()) for s in specs]
    if not requested:
        return list(specs)
    out = []
    for s in specs:
        axes = set()
        for a in requested:
            a = str(a).strip().lower()
            if a == "batch":
                axes.add(0)
            elif a in ("sequence", "seq"):
                if len(s.shape) in (2, 3):
                    axes.add(1)
            elif a.isdigit():
                if int(a) < len(s.shape):
                    axes.add(int(a))
            else:
                raise CompressError(f"dynamic_axes: '{a}' is not an axis", "Use batch, sequence or axis numbers, e.g. -s dynamic_axes=batch,sequence")
        out.append(InputSpec(s.name, s.shape, s.dtype, tuple(sorted(axes))))
    return out


def axis_name(axis: int) -> str:
    return {0: "batch", 1: "sequence"}.get(axis, f"dim{axis}")


def export_batch(specs: list[InputSpec]) -> int:
    """The batch size examples are exported at: at least 2 when batch is dynamic (torch.export specializes 0/1)."""
    b = specs[0].shape[0] if specs and specs[0].shape else 1
    return max(b, 2) if specs and all(0 in s.dynamic_axes for s in specs) else b


def example_inputs(specs: list[InputSpec], batch: int, seq: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs for ``specs`` at a batch size and (for inputs with a dynamic axis 1) a sequence length."""
    out = []
    for i, s in enumerate(specs):
        shape = [batch, *s.shape[1:]]
        if seq is not None and len(shape) in (2, 3) and 1 in s.dynamic_axes:
            shape[1] = seq
        out.append(InputSpec(s.name, tuple(shape), s.dtype, s.dynamic_axes).example(seed=seed + i))
    return tuple(out)
