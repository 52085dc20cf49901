"""Rows, batches and the data order.

A *row* is what one line of a micro-batch holds: one sample (padded per micro-batch) or,
with packing, several samples laid end to end in ``max_length`` tokens, with position ids
that restart at 0 for every sample. Transformers (>= 4.54) turns restarting position ids
with no attention mask into a block-diagonal causal mask, so no token attends across
samples (only when the forward runs with ``use_cache=False``: with a KV cache transformers
skips that detection, which is why the loss module passes it); the first token of each sample is never a target (its label is set to -100), so
no sample is trained to predict the next one's start.

The data order is a pure function of (seed, epoch, step): every process computes the same
plan and takes its own slice, which makes 1 process = N processes, batch B x accumulation A
= batch B*A, and resume-from-step-k exact.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

IGNORE = -100

# Training micro-batches are padded to a multiple of this many tokens. Every distinct matmul
# shape makes oneDNN (PyTorch's CPU GEMM library) build and cache a primitive, and the heap
# fragments under ever-new tensor sizes, so memory grows row after row for the whole epoch
# (docs/benchmarks.md). With a few shapes the memory stays flat, for a little padding.
PAD_MULTIPLE = 64


@dataclass(frozen=True)
class Row:
    """One row of a micro-batch: one or more samples (``segments`` = their lengths)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    segments: tuple[int, ...]
    weights: tuple[float, ...] | None = None  # per segment; None = all 1 (the fast path)
    groups: tuple[int, ...] | None = None  # dataset index per segment (per-dataset losses)
    # what each segment is to a loss that is not per token (tunelab.data.preference: chosen, rejected,
    # a KTO sample, a KTO mismatched sample); ``tags`` in the batch, per token, -1 on padding
    tags: tuple[int, ...] | None = None
    # the row's count in the step's divisor when the loss is not a mean over tokens (a preference pair,
    # a KTO sample: 1); None = its target tokens
    units: int | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_weight(self) -> float:
        """Sum of the weights of the target tokens (the weighted loss's denominator); ``units`` when set."""
        if self.units is not None:
            return float(self.units)
        if self.weights is None:
            return float(self.n_targets)
        total, start = 0.0, 0
        for seg, w in zip(self.segments, self.weights, strict=True):
            total += w * sum(1 for x in self.labels[start + 1 : start + seg] if x != IGNORE)
            start += seg
        return total

    def token_values(self, per_segment: tuple, width: int, fill) -> list:
        """A per-segment value spread over the row's tokens (``fill`` for padding)."""
        out: list = []
        for seg, v in zip(self.segments, per_segment, strict=True):
            out += [v] * seg
        return out + [fill] * (width - len(out))

    @property
    def n_targets(self) -> int:
        """Labelled tokens that are targets after the causal shift (the loss's denominator)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def _first_token_unlabelled(labels: list[int]) -> list[int]:
    out = list(labels)
    if out:
        out[0] = IGNORE
    return out


def _extras(samples, members, groups) -> dict:
    """Per-segment weights / groups of a row, only when some sample needs them."""
    extra = {}
    if any(getattr(samples[i], "weight", 1.0) != 1.0 for i in members):
        extra["weights"] = tuple(float(samples[i].weight) for i in members)
    if groups is not None:
        extra["groups"] = tuple(int(groups[i]) for i in members)
    return extra


def rows_unpacked(samples, groups=None) -> list[Row]:
    """One row per sample (``samples`` are ``Encoded``-like: ``input_ids``, ``labels``, ``weight``).

    ``groups`` (a dataset index per sample) keeps per-dataset losses apart.
    """
    return [
        Row(tuple(s.input_ids), tuple(_first_token_unlabelled(s.labels)), (len(s.input_ids),),
            **_extras(samples, (i,), groups))
        for i, s in enumerate(samples)
    ]


def rows_packed(samples, max_length: int, groups=None) -> list[Row]:
    """Best-fit-decreasing packing of samples into rows of at most ``max_length`` tokens.

    Deterministic (ties broken by input order). Our own code: the HF collators pack greedily
    in order, which wastes more of each row.
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []  # sample indices per row
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        n = len(samples[i].input_ids)
        if n > max_length:
            raise ValueError(f"sample {samples[i].id} has {n} tokens > max_length {max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in sorted(members):
            ids.extend(samples[i].input_ids)
            labels.extend(_first_token_unlabelled(samples[i].labels))
        rows.append(Row(tuple(ids), tuple(labels), tuple(len(samples[i].input_ids) for i in sorted(members)),
                        **_extras(samples, sorted(members), groups)))
    return rows


def collate(rows: list[Row], *, pad_id: int, packed: bool, pad_to: int | None = None,
            multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch, right-padded to the longest row (or ``pad_to``), rounded up to a
    multiple of ``multiple_of`` tokens.

    Unpacked rows get an ``attention_mask``; packed rows get ``position_ids`` that restart
    for every sample and for the padding tail (so padding is its own block).
    """
    if not rows:  # an empty slice on some process: one fully ignored token keeps DDP in step
        rows = [Row((pad_id,), (IGNORE,), (1,))]
    width = max(pad_to or 0, max(len(r) for r in rows))
    width = -(-width // multiple_of) * multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, : len(r)] = torch.tensor(r.labels, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels}
    if any(r.weights is not None for r in rows):  # sample weights: a weight per token
        batch["weights"] = torch.tensor([r.token_values(r.weights or (1.0,) * len(r.segments), width, 0.0)
                                         for r in rows], dtype=torch.float32)
    if any(r.groups is not None for r in rows):  # dataset index per token (per-dataset losses)
        batch["groups"] = torch.tensor([r.token_values(r.groups or (0,) * len(r.segments), width, 0)
                                        for r in rows], dtype=torch.long)
    if any(r.tags is not None for r in rows):  # what each segment is to a preference loss, per token
        batch["tags"] = torch.tensor([r.token_values(r.tags or (-1,) * len(r.segments), width, -1)
                                      for r in rows], dtype=torch.long)
    if packed:
        pos = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            start = 0
            for seg in r.segments + ((width - len(r),) if width > len(r) else ()):
                pos[i, start : start + seg] = torch.arange(seg)
                start += seg
        batch["position_ids"] = pos
    else:
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, : len(r)] = 1
        batch["attention_mask"] = mask
    return batch


@dataclass(frozen=True)
class Plan:
    """Which rows every process uses at every micro-step of every optimiser step.

    With ``lengths`` (length-grouped batching, for unpacked rows), each block of 16 steps'
    worth of shuffled rows is sorted by length and cut into steps, and the full steps are
    shuffled again: micro-batches hold rows of similar length, so little is padded, while the
    order stays random across steps and a pure function of (seed, epoch).
    """

    n_rows: int
    batch_size: int  # rows per micro-batch per process
    grad_accum: int
    world_size: int
    seed: int
    lengths: tuple[int, ...] | None = None
    sampler: str = "random"  # random | stratified | balanced (tunelab.data.sampling)
    strata: tuple[int, ...] | None = None  # a class per row, for the stratified / balanced samplers

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.n_rows // self.rows_per_step))

    def epoch_order(self, epoch: int) -> list[int]:
        return _epoch_order(self, epoch)

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimiser step ``step`` (0-based, counted over all epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[k * self.rows_per_step : (k + 1) * self.rows_per_step]

    def micro_rows(self, step: int, micro: int, rank: int) -> list[int]:
        """Rows of micro-batch ``micro`` on process ``rank`` at optimiser step ``step``."""
        chunk = self.step_rows(step)
        start = (micro * self.world_size + rank) * self.batch_size
        return chunk[start : start + self.batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_order(plan: Plan, epoch: int) -> list[int]:
    if plan.sampler != "random" and plan.strata is not None:
        from tunelab.data.sampling import balanced_order, stratified_order

        return (stratified_order if plan.sampler == "stratified" else balanced_order)(plan.strata, plan.seed, epoch)
    g = torch.Generator().manual_seed(plan.seed * 1_000_003 + epoch)
    order = torch.randperm(plan.n_rows, generator=g).tolist()
    if plan.lengths is None:
        return order
    per_step = plan.rows_per_step
    block = per_step * 16
    steps: list[list[int]] = []
    for start in range(0, len(order), block):
        chunk = sorted(order[start : start + block], key=lambda i: -plan.lengths[i])
        steps += [chunk[i : i + per_step] for i in range(0, len(chunk), per_step)]
    full = [s for s in steps if len(s) == per_step]
    partial = [s for s in steps if len(s) < per_step]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    return [i for s in shuffled + partial for i in s]
