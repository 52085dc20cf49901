"""One optimiser step, the way every caller runs it: the loop and the advisor's probes.

:func:`accumulate` runs the forward and backward of a step's micro-batches, each loss sum scaled
into its share of the step's objective, the gradients summed into ``.grad``; :func:`update` clips,
checks that the step is finite, and applies it (or skips it) before clearing the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def accumulate(loss_model: torch.nn.Module, make_batch: Callable[[int], dict[str, torch.Tensor]], count: int, *,
               scale: float, backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
               context: Callable[[bool], AbstractContextManager] = lambda last: nullcontext(),
               forward_context: Callable[[], AbstractContextManager] = nullcontext,
               penalty: Callable[[], torch.Tensor] | None = None,
               on_groups: Callable[[dict | None], None] | None = None) -> tuple[torch.Tensor, float | None]:
    """Forward and backward of micro-batches ``make_batch(0 .. count-1)``; returns the step's summed loss
    (float64) and the penalty's value (or None).

    ``scale`` turns a micro-batch's loss sum into its share of the step's objective; ``context(last)``
    wraps each micro-batch's forward and backward (DDP's ``no_sync`` for all but the last),
    ``forward_context()`` its forward only (autocast, where the model is not prepared by accelerate); ``penalty()`` is added once, to the
    last micro-batch's objective; ``on_groups`` gets the loss module's per-group sums
    (:attr:`~tunelab.objectives.output.LossSum.groups`).
    """
    loss_sum, penalty_value = None, None
    for micro in range(count):
        batch = make_batch(micro)
        last = micro == count - 1
        with context(last):
            with forward_context():
                out = loss_model(**batch)
            part = out.total
            if on_groups is not None:
                on_groups(out.groups)
            objective = part * scale
            if last and penalty is not None:
                value = penalty()
                objective = objective + value
                penalty_value = value.detach().item()
            backward(objective)
        part = part.detach().double()
        loss_sum = part if loss_sum is None else loss_sum + part
    return loss_sum, penalty_value


def update(optimizer, trainable: list[torch.nn.Parameter], *, loss: float, max_grad_norm: float | None,
           clip: Callable[..., torch.Tensor | float | None] = torch.nn.utils.clip_grad_norm_) -> tuple[float, bool]:
    """Clip, then apply the step if its loss and gradient norm are finite; clear the gradients.

    Returns (gradient norm, whether the step was applied)."""
    norm = clip(trainable, max_grad_norm if max_grad_norm is not None else float("inf"))
    norm = float(norm) if norm is not None else float("nan")
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite
