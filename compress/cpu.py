"""What this CPU can do for int8 (and bf16): read once from /proc/cpuinfo (Linux x86); other systems are assumed capable of
int8 and not of bf16."""
from __future__ import annotations

import functools
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def _flags() -> frozenset[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return frozenset(line.split(":", 1)[1].split()) if line else None


def has_vnni() -> bool:
    """VNNI int8 dot products (avx512_vnni, avx_vnni or AMX); True where the flags cannot be read or the CPU is not x86."""
    flags = _flags()
    if flags is None or "avx2" not in flags:
        return True
    return any(f in flags for f in VNNI_FLAGS)


def has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX): where bf16 inference is a speed-up rather than an emulation."""
    flags = _flags()
    return flags is not None and any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def int8_saturates() -> bool:
    """x86 without VNNI: u8×s8 products are summed pairwise into int16 (vpmaddubsw), which overflows with full 8-bit
    ranges. onnxruntime and fbgemm recommend 7-bit ranges (``reduce_range``) on such CPUs."""
    return not has_vnni()


def resolve_reduce_range(value: bool | str, saturating_kernels: bool) -> tuple[bool, str]:
    """``auto`` → 7-bit ranges exactly where the backend's int8 kernels would saturate on this CPU; with the reason.

    Measured on an AVX2 CPU without VNNI: onnxruntime static Q/DQ (QLinearConv) lost 5 points of Fashion-MNIST accuracy
    with 8-bit weights and none with 7. torch's kernels are left at 8 bits: PT2E static int8 kept the same accuracy
    either way, and on MiniLM 7-bit dynamic activations cost fidelity (cosine 0.973 vs 0.991) on both kinds of CPU; a
    layer whose weights and inputs both fill their ranges can still saturate there, which ``min_cosine`` catches."""
    if value != "auto":
        return bool(value), "set by the config"
    if saturating_kernels and int8_saturates():
        return True, "auto: this x86 CPU has no VNNI, so onnxruntime's u8×s8 kernels would saturate their int16 sums with 8-bit weights"
    if saturating_kernels:
        return False, "auto: this CPU has VNNI (or is not x86), so the full 8-bit range is safe"
    return False, "auto: torch's int8 kernels do not saturate, so the full 8-bit range is kept"


REDUCE_RANGE = ("auto", True, False)
REDUCE_RANGE_HELP = ("7-bit ranges, for x86 CPUs without VNNI whose int16 accumulators overflow with 8 bits; auto: true for "
                     "onnxruntime's int8 kernels when this CPU is one (torch's kernels do not saturate: false)")


def reduce_range(value: bool | str, metrics: dict, saturating_kernels: bool) -> bool:
    """A ``reduce_range`` option resolved for this CPU and backend; ``metrics`` record what was used and why."""
    resolved, why = resolve_reduce_range(value, saturating_kernels)
    metrics["reduce_range"] = resolved
    if value == "auto":
        metrics["reduce_range_why"] = why
    return resolved
