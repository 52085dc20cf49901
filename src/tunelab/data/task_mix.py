"""Task sampling for multi-task runs (``task: multitask``): which task each optimiser step trains on.

Every optimiser step holds rows of one task only (as MT-DNN samples one task per mini-batch):
the loop's per-step normaliser (labelled tokens for SFT, examples for classification) is then
that task's own, so a step's loss is the task's mean loss and batch 8 = batch 2 x accumulation 4
holds per task. :class:`TaskPlan` has the interface of :class:`tunelab.data.batching.Plan`
(``steps_per_epoch``, ``step_rows``, ``micro_rows``) and, like it, is a pure function of
(seed, step), so resuming at step k gives the same batches.

Strategies (shares of the steps of an epoch; an epoch is ``ceil(all rows / rows per step)`` steps):

* ``proportional``: task t gets ``n_t / sum n`` of the steps (``n_t``: its training rows);
* ``temperature``: ``n_t^(1/T) / sum n^(1/T)`` (T = 1 is proportional; large T is uniform);
* ``round_robin``: the tasks in turn, in config order (step k trains task ``k mod tasks``).

Proportional and temperature give each task its share as a whole number of steps per epoch
(largest remainder), in an order shuffled per epoch from the seed: the counts are exact in
every epoch, not only on average. Within a task, rows are taken in a fresh seeded permutation
per pass over that task's rows; a task whose pass ends mid-step continues with its next pass,
so every step is full.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def shares(sizes: list[int], strategy: str, temperature: float) -> list[float]:
    """Each task's share of the steps."""
    if strategy == "round_robin":
        return [1.0 / len(sizes)] * len(sizes)
    power = 1.0 if strategy == "proportional" else 1.0 / temperature
    raw = [n**power if n > 0 else 0.0 for n in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def quotas(share: list[float], steps: int) -> list[int]:
    """Whole steps per task summing to ``steps``, by largest remainder (ties: the earlier task)."""
    exact = [s * steps for s in share]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(share)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: steps - sum(out)]:
        out[i] += 1
    return out


@dataclass(frozen=True)
class TaskPlan:
    """Rows of every (step, micro-batch, process) of a multi-task run; see the module docstring."""

    task_rows: tuple[tuple[int, ...], ...]  # indices (into the run's row list) of each task's rows
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    strategy: str = "proportional"
    temperature: float = 2.0

    @property
    def n_tasks(self) -> int:
        return len(self.task_rows)

    @property
    def n_rows(self) -> int:
        return sum(len(r) for r in self.task_rows)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(self.n_tasks, -(-self.n_rows // self.rows_per_step))

    @property
    def shares(self) -> list[float]:
        return shares([len(r) for r in self.task_rows], self.strategy, self.temperature)

    def epoch_tasks(self, epoch: int) -> list[int]:
        """The task of each step of ``epoch``."""
        return list(_epoch_tasks(self, epoch))

    def step_task(self, step: int) -> int:
        epoch, k = divmod(step, self.steps_per_epoch)
        return _epoch_tasks(self, epoch)[k]

    def _steps_before(self, step: int, task: int) -> int:
        """Steps of ``task`` before ``step`` (over all epochs)."""
        if self.strategy == "round_robin":
            return len(range(task, step, self.n_tasks))
        epoch, k = divmod(step, self.steps_per_epoch)
        per_epoch = quotas(self.shares, self.steps_per_epoch)[task]
        return epoch * per_epoch + _epoch_tasks(self, epoch)[:k].count(task)

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimiser step ``step``: ``rows_per_step`` rows of one task."""
        task = self.step_task(step)
        start = self._steps_before(step, task) * self.rows_per_step
        rows = self.task_rows[task]
        out = []
        for c in range(start, start + self.rows_per_step):
            pass_, pos = divmod(c, len(rows))
            out.append(rows[_task_order(self, task, pass_)[pos]])
        return out

    def micro_rows(self, step: int, micro: int, rank: int) -> list[int]:
        chunk = self.step_rows(step)
        start = (micro * self.world_size + rank) * self.batch_size
        return chunk[start : start + self.batch_size]


@functools.lru_cache(maxsize=8)
def _epoch_tasks(plan: TaskPlan, epoch: int) -> tuple[int, ...]:
    steps = plan.steps_per_epoch
    if plan.strategy == "round_robin":
        first = epoch * steps
        return tuple((first + k) % plan.n_tasks for k in range(steps))
    seq = [t for t, q in enumerate(quotas(plan.shares, steps)) for _ in range(q)]
    g = torch.Generator().manual_seed(plan.seed * 1_000_003 + epoch)
    return tuple(seq[i] for i in torch.randperm(len(seq), generator=g).tolist())


@functools.lru_cache(maxsize=64)
def _task_order(plan: TaskPlan, task: int, pass_: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed((plan.seed * 1_000_003 + 7919 * (task + 1)) * 1_000_033 + pass_)
    return tuple(torch.randperm(len(plan.task_rows[task]), generator=g).tolist())
