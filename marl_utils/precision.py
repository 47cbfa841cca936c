"""Which precision PPO computes in, and why the default on most CPUs is float32 (notebook 03, README).

bf16 only pays where the hardware computes it fast: CUDA GPUs with bf16 (Ampere and newer), and CPUs with
AMX or avx512_bf16. Elsewhere the CPU emulates it: a PPO step measured 2x SLOWER in bf16 than in fp32 on
a 2-core CPU without avx512_bf16 (11.9 vs 6.0 s per step). `PPOConfig.mixed_precision="auto"` picks bf16
only where it is fast. Whatever is chosen is applied to every forward of a step (see `PPOTrainer`).

A trainer owns its precision. Accelerate keeps one precision per process, and every transformers/TRL Trainer
resets and re-sets it (TRL's RewardConfig defaults to bf16), so a PPOTrainer built after stage 2 in the same
kernel would otherwise inherit it. `mixed_precision=None` therefore means the launcher's setting
(ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets from `accelerate config`), else float32, and the
trainer's forwards run under `autocast_context` of its own setting, never under whatever the process holds.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import MarlInputError


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has AMX-BF16 or AVX512-BF16 (read from /proc/cpuinfo; False where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(use_cuda: bool) -> bool:
    """bf16 matmuls run natively on this machine's training device."""
    if use_cuda:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_mixed_precision(requested: str | None, use_cuda: bool) -> str:
    """"no", "bf16" or "fp16": None is the launcher's setting (ACCELERATE_MIXED_PRECISION) or "no", never the
    precision another trainer left in Accelerate's process-wide state."""
    if requested is None:
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if requested == "auto":
        return "bf16" if bf16_is_fast(use_cuda) else "no"
    if requested == "fp16" and not use_cuda:
        raise MarlInputError("PPOConfig.mixed_precision='fp16' needs a CUDA GPU; on a CPU use 'bf16' (fast only "
                             "with AMX/avx512_bf16), 'auto' or 'no'")
    return requested


def warn_if_slow(mixed_precision: str, use_cuda: bool) -> None:
    """bf16 on hardware that emulates it is a slowdown, not a speedup: say so once, at trainer start."""
    if mixed_precision == "bf16" and not bf16_is_fast(use_cuda):
        where = "this GPU has no native bf16" if use_cuda else "this CPU has neither AMX nor avx512_bf16"
        warnings.warn(f"mixed precision bf16 is on, but {where}: bf16 is emulated and PPO steps run slower than in "
                      "float32 (2x slower measured on such a CPU). Use PPOConfig(mixed_precision='auto') or 'no'",
                      stacklevel=3)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(mixed_precision: str, device_type: str):
    """torch.autocast for "bf16"/"fp16" on `device_type`, a no-op context for "no"."""
    dtype = AUTOCAST_DTYPES.get(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
