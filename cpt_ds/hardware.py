"""Which floating-point formats this machine computes natively, so a run never crawls without a word.

On a CPU without bf16 instructions (avx512_bf16 / amx_bf16 on x86, bf16 on Arm) PyTorch emulates bf16
matmuls: measured ~150x slower than fp32 on an AVX2-only AMD EPYC (../shared/docs/CPU_DEEPSPEED.md).
fp16 likewise needs avx512_fp16 / amx_fp16 (x86) or fphp/asimdhp (Arm).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

NATIVE_FLAGS = {
    "bf16": {"avx512_bf16", "amx_bf16", "bf16"},
    "fp16": {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"},
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of the first CPU (x86 ``flags``, Arm ``Features``); empty off Linux."""
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_capability() -> str:
    """PyTorch's vectorization level for this CPU (``AVX2``, ``AVX512``, ``DEFAULT``, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_lacks_native(precision: str, *, flags: set[str] | None = None) -> bool:
    """True when ``precision`` (``bf16``/``fp16``) has no native CPU support here; fp32 always has."""
    if precision not in NATIVE_FLAGS:
        return False
    return not (NATIVE_FLAGS[precision] & (cpu_flags() if flags is None else flags))


def slow_cpu_precision_warning(precision: str, ds_path: str, *, flags: set[str] | None = None,
                               capability: str | None = None) -> str | None:
    """The preflight warning for a CPU run whose DeepSpeed JSON asks for emulated bf16/fp16, else None."""
    if not cpu_lacks_native(precision, flags=flags):
        return None
    wanted = " / ".join(sorted(NATIVE_FLAGS[precision] & {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"}))
    return (f"{ds_path} asks for {precision}, but this CPU (PyTorch capability {capability or cpu_capability()}, "
            f"no {wanted}) has no native {precision}: its matmuls are emulated, about 100x slower than fp32. "
            "Train on CPU with ds_configs/zero2_fp32.json (or drop the JSON's bf16/fp16 section)")


def cuda_package_problems(field: str, *, module: str, package: str, extra: str, fallback: str) -> list[str]:
    """Why the optional CUDA feature that run-config field ``field`` asks for cannot run here (empty when it
    can): its package ``package`` (imported as ``module``, installed by the ``extra`` extra) or a GPU is missing."""
    if importlib.util.find_spec(module) is None:
        return [f"{field} is set but {package} is not installed; pip install 'cpt-ds[{extra}]' on a CUDA "
                f"machine, or set {field} false ({fallback})"]
    import torch

    if not torch.cuda.is_available():
        return [f"{field} needs a CUDA GPU; set {field} false on this machine ({fallback})"]
    return []
