"""Experience replay: general or earlier-task rows mixed into every optimiser step.

``objectives.replay`` keeps a share of every optimiser step for *replay rows* (a general
instruction set, or in ``tunelab continual`` a buffer of samples kept from earlier stages), so
the model keeps practising what it knew while it learns the task.

The counts are exact, per optimiser step, whatever the batch size, accumulation or number of
processes: with ``R = batch_size * grad_accum * processes`` rows per step and the step's ratio
``r``, a step holds ``k = floor(r * R + 0.5)`` replay rows (round half up) and ``R - k`` task
rows. A ratio that rounds to 0 or to ``R`` is a configuration error (no replay, or no task).

The order stays a pure function of (seed, step), so resume is exact:

* task rows form one stream, the concatenation of the task plan's epoch orders
  (:meth:`tunelab.data.batching.Plan.epoch_order`, with its sampler and length grouping); step
  ``s`` takes stream positions ``[A(s), A(s+1))`` where ``A(s) = s * R - C(s)`` and ``C(s)`` is
  the number of replay rows of the steps before ``s``. A step may span an epoch boundary; no
  step is short;
* replay rows form a stream of seeded permutations of the replay set (cycled when the run needs
  more than it holds); step ``s`` takes positions ``[C(s), C(s+1))``;
* within a step the replay rows are spread evenly (replay row ``i`` at position
  ``floor((i + 0.5) * R / k)``), so every micro-batch and process gets its share.

Replay rows are tokenised like the training data (the same template, ``train_on``, lengths,
packing), carry the dataset weight of their ``DatasetSpec``, and count in the loss like task
rows: the step loss is the mean over all the step's target tokens. Their loss is logged apart
as ``loss/replay`` (per-dataset losses, as for ``data.mix``).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import numpy as np

from tunelab.data.batching import Plan
from tunelab.errors import UserError

REPLAY = "replay"


def replay_count(ratio: float, rows_per_step: int) -> int:
    """Replay rows in a step of ``rows_per_step`` rows: ``ratio * rows_per_step`` rounded half up."""
    return int(math.floor(ratio * rows_per_step + 0.5))


@functools.lru_cache(maxsize=4)
def _replay_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, epoch, 8675309]).permutation(n).tolist())


def spread(n_task: int, n_replay: int) -> list[bool]:
    """Where the replay rows sit in a step of ``n_task + n_replay`` rows (evenly spaced)."""
    total = n_task + n_replay
    slots = [False] * total
    for i in range(n_replay):
        slots[int((i + 0.5) * total / n_replay)] = True
    return slots


@dataclass(frozen=True)
class ReplayPlan:
    """A :class:`~tunelab.data.batching.Plan` over task rows ``0..n_task-1`` and replay rows
    ``n_task..n_task+n_replay-1`` (one combined row list), with exact replay counts per step.

    ``schedule`` is piecewise constant: ``((step, ratio), ...)``, each ratio in force from its
    step on; before the first entry, ``ratio``.
    """

    task: Plan
    n_replay: int
    ratio: float
    schedule: tuple[tuple[int, float], ...] = ()

    @property
    def rows_per_step(self) -> int:
        return self.task.rows_per_step

    @property
    def world_size(self) -> int:
        return self.task.world_size

    @property
    def batch_size(self) -> int:
        return self.task.batch_size

    def _pieces(self) -> list[tuple[int, int]]:
        """(first step, replay rows per step) for each piece of the schedule."""
        pieces = [(0, replay_count(self.ratio, self.rows_per_step))]
        for step, ratio in self.schedule:
            k = replay_count(ratio, self.rows_per_step)
            if step == 0:
                pieces[0] = (0, k)
            else:
                pieces.append((step, k))
        return pieces

    def replay_rows_at(self, step: int) -> int:
        """``k(step)``: replay rows in optimiser step ``step``."""
        pieces = self._pieces()
        i = bisect.bisect_right([p[0] for p in pieces], step) - 1
        return pieces[i][1]

    def replay_before(self, step: int) -> int:
        """``C(step)``: replay rows of all steps before ``step`` (closed form per schedule piece)."""
        total = 0
        pieces = self._pieces()
        for i, (start, k) in enumerate(pieces):
            end = pieces[i + 1][0] if i + 1 < len(pieces) else None
            if step <= start:
                break
            total += k * ((min(step, end) if end is not None else step) - start)
        return total

    def task_before(self, step: int) -> int:
        """``A(step)``: task rows of all steps before ``step``."""
        return step * self.rows_per_step - self.replay_before(step)

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        """Steps until the task stream has passed every task row once (the first epoch)."""
        n = self.task.n_rows
        lo, hi = 1, max(1, n)  # A(n) >= n: every step has at least one task row
        while lo < hi:  # the first step count with A(steps) >= n (A is increasing)
            mid = (lo + hi) // 2
            if self.task_before(mid) >= n:
                hi = mid
            else:
                lo = mid + 1
        return lo

    @staticmethod
    def _stream(start: int, stop: int, n: int, order) -> list[int]:
        """Positions ``[start, stop)`` of the stream ``order(0) + order(1) + ...`` (each of length ``n``)."""
        out: list[int] = []
        while start < stop:
            epoch, i = divmod(start, n)
            take = min(stop - start, n - i)
            out += order(epoch)[i : i + take]
            start += take
        return out

    def _task_rows(self, start: int, stop: int) -> list[int]:
        return self._stream(start, stop, self.task.n_rows, self.task.epoch_order)

    def _replay_rows(self, start: int, stop: int) -> list[int]:
        rows = self._stream(start, stop, self.n_replay, lambda e: _replay_order(self.n_replay, self.task.seed, e))
        return [self.task.n_rows + i for i in rows]

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimiser step ``step``: ``R - k`` task rows and ``k`` replay rows, spread evenly."""
        k = self.replay_rows_at(step)
        a, c = self.task_before(step), self.replay_before(step)
        task = iter(self._task_rows(a, a + self.rows_per_step - k))
        replay = iter(self._replay_rows(c, c + k))
        return [next(replay) if is_replay else next(task) for is_replay in spread(self.rows_per_step - k, k)]

    def micro_rows(self, step: int, micro: int, rank: int) -> list[int]:
        """Rows of micro-batch ``micro`` on process ``rank`` at optimiser step ``step`` (as ``Plan``)."""
        chunk = self.step_rows(step)
        start = (micro * self.world_size + rank) * self.batch_size
        return chunk[start : start + self.batch_size]

    def check(self) -> None:
        """A ratio that rounds to no replay row, or to no task row, is a user error."""
        ratios = [("objectives.replay.ratio", self.ratio)] + [
            (f"objectives.replay.schedule (step {s})", r) for s, r in self.schedule]
        for where, ratio in ratios:
            k = replay_count(ratio, self.rows_per_step)
            if k == 0 or k >= self.rows_per_step:
                raise UserError(
                    f"{where}: {ratio} of {self.rows_per_step} rows per optimiser step (batch_size x grad_accum x "
                    f"processes) rounds to {k} replay rows. Choose a ratio giving 1..{self.rows_per_step - 1} rows, "
                    "or raise train.batch_size / train.grad_accum")
