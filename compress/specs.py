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
