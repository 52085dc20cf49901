"""Choosing the numeric precision: bf16 / fp16 autocast or fp32, recorded in the run."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import UserError


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> bf16 on capable GPUs/CPUs, fp16 on older GPUs, fp32 otherwise."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16 else "fp16"
        if requested == "bf16" and not bf16:
            raise UserError("train.precision: this GPU has no bf16 support (got 'bf16'). Use fp16 or auto")
        return requested
    if requested == "fp16":
        raise UserError("train.precision: fp16 needs a GPU; this run is on the CPU (got 'fp16'). Use auto, bf16 or fp32")
    if requested == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return requested


def accelerate_mixed_precision(precision: str) -> str:
    """Our names -> accelerate's ``mixed_precision`` values."""
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
