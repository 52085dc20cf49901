"""What every loss module returns for a micro-batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree


@dataclass(frozen=True)
class LossSum:
    """A micro-batch's loss, summed, not averaged: the loop divides the step's total by the step's count.

    ``total``: the loss summed over the labelled units (tokens; examples for a class head), with
    its graph; ``count``: how many units (the weight sum with sample weights); ``groups``: per
    dataset or task index, ``(loss sum, count)`` for the loop's per-dataset / per-task losses.
    """

    total: torch.Tensor
    count: torch.Tensor | int | float
    groups: dict[int, tuple[Any, Any]] | None = None


# DDP hands a forward's output tensors to its reducer through pytrees: register the fields.
_pytree.register_dataclass(LossSum)
