"""Samplers and dataset mixing, as pure functions of (seed, epoch).

* ``stratified_order``: every class spread evenly through the epoch, so each batch carries
  the classes in their overall proportions (a row's position is (rank in its shuffled class +
  jitter) / class size);
* ``balanced_order``: an epoch of the same length drawn with replacement so that every class
  is equally likely (class-balanced batches);
* ``mix_counts`` / ``mix``: several datasets mixed by explicit ratios or by temperature
  (``p_i ∝ n_i^(1/T)``: T=1 keeps natural sizes, larger T flattens towards uniform, as in
  multilingual pre-training); smaller datasets are repeated (whole shuffled passes), larger ones
  subsampled without replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from tunelab.data.split import largest_remainder

T = TypeVar("T")


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 7919])


def stratified_order(strata: Sequence[int], seed: int, epoch: int) -> list[int]:
    rng = _rng(seed, epoch)
    strata_arr = np.asarray(strata)
    pos = np.empty(len(strata_arr), dtype=np.float64)
    for c in np.unique(strata_arr):
        idx = np.flatnonzero(strata_arr == c)
        rank = rng.permutation(len(idx))
        pos[idx] = (rank + rng.random(len(idx))) / len(idx)
    return np.argsort(pos, kind="stable").tolist()


def balanced_order(strata: Sequence[int], seed: int, epoch: int) -> list[int]:
    rng = _rng(seed, epoch)
    strata_arr = np.asarray(strata)
    classes, inverse, counts = np.unique(strata_arr, return_inverse=True, return_counts=True)
    p = 1.0 / (len(classes) * counts[inverse])
    return rng.choice(len(strata_arr), size=len(strata_arr), replace=True, p=p / p.sum()).tolist()


def mix_counts(sizes: Sequence[int], *, strategy: str, ratios: Sequence[float | None] | None = None,
               temperature: float = 2.0, size: int | None = None) -> list[int]:
    """Rows taken from each dataset."""
    total = size if size is not None else sum(sizes)
    if strategy == "concat":
        return list(sizes)
    if strategy == "ratio":
        if ratios is None or any(r is None for r in ratios):
            raise ValueError("every dataset needs a ratio")
        shares = np.asarray(ratios, dtype=np.float64)
    else:
        shares = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    shares = shares / shares.sum()
    return largest_remainder(total, shares.tolist())


def mix(datasets: Sequence[Sequence[T]], counts: Sequence[int], seed: int) -> list[tuple[int, T]]:
    """(dataset index, item) pairs: ``counts[i]`` items of dataset i, then shuffled together."""
    rng = np.random.default_rng([seed, 104729])
    out: list[tuple[int, T]] = []
    for d, (items, want) in enumerate(zip(datasets, counts, strict=True)):
        if not items or want <= 0:
            continue
        picks: list[int] = []
        while len(picks) < want:
            picks += rng.permutation(len(items)).tolist()[: want - len(picks)]
        out += [(d, items[i]) for i in picks]
    order = rng.permutation(len(out))
    return [out[i] for i in order]
