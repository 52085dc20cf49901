"""What every loss module returns for a micro-batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
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


class Tally:
    """A loss module that sums statistics over an evaluation's forwards (a confusion matrix, per-task sums,
    preference metrics). It counts only while ``counting``: see :func:`uncounted`."""

    counting = True


@contextmanager
def uncounted(module: nn.Module) -> Iterator[None]:
    """A forward no statistic counts: the evaluation runs one on a borrowed row only to keep the ranks'
    collectives in step (a sharded model's forward is collective), and the row is counted on its own rank."""
    tallies = [m for m in module.modules() if isinstance(m, Tally)]
    for m in tallies:
        m.counting = False
    try:
        yield
    finally:
        for m in tallies:
            m.counting = True
