"""Choosing the numeric precision: bf16 / fp16 autocast or fp32, recorded in the run."""

from __future__ import annotations

import time
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


def bf16_slowdown(n: int = 256) -> float:
    """How many times slower an ``n``-squared bf16 matmul runs than an fp32 one on one thread of this CPU (one: a
    team of threads waits for its slowest, and a core another process holds made a 2-thread fp32 product 50x slower
    here): the fastest of each, timed in turns. Without AVX512-BF16 or AMX, oneDNN falls back to a reference kernel: on an AVX2 AMD EPYC, 1.3 GFLOP/s in
    bf16 against 85 in fp32 (65x). The probe takes ~0.1 s there, under a millisecond where bf16 is native."""
    pairs = {d: (torch.randn(n, n, dtype=d), torch.randn(n, n, dtype=d)) for d in (torch.bfloat16, torch.float32)}
    best = dict.fromkeys(pairs, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            for dtype, (a, b) in pairs.items():
                for _ in range(1 if dtype == torch.bfloat16 else 4):
                    t0 = time.perf_counter()
                    torch.mm(a, b)
                    best[dtype] = min(best[dtype], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def slow_bf16_warning(precision: str, device: torch.device) -> str | None:
    """A one-line warning when bf16 was asked for on a CPU that multiplies bf16 much slower than fp32."""
    if precision != "bf16" or device.type != "cpu" or cpu_supports_bf16():
        return None
    slower = bf16_slowdown()
    if slower < 2:
        return None
    return (f"train.precision: bf16 on this CPU (no AVX512-BF16 or AMX) multiplies {slower:.0f}x slower than fp32 "
            "(a 256x256 matmul, measured now). Set train.precision: auto (fp32 here) unless memory needs bf16")


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
