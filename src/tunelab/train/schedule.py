"""Learning-rate schedules: linear warm-up, then linear / cosine decay to 0, or constant."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, steps: int | None, ratio: float | None) -> int:
    if steps is not None:
        return min(steps, total_steps)
    if ratio is not None:
        return math.ceil(ratio * total_steps)
    return 0


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
