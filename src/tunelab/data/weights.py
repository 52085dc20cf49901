"""Sample weights: per-row ``weight`` and class-balanced weights.

A row's weight multiplies the loss of each of its target tokens; the training loss of an
optimiser step is ``sum(w * ce) / sum(w)`` over its target tokens (see
``objectives/causal_lm.py`` and ``train/loop.py``). Class-balanced weights:

* ``inverse``: ``w_c = N / (C * n_c)`` (scikit-learn's "balanced");
* ``effective``: ``w_c ∝ (1 - beta) / (1 - beta^n_c)``, the inverse effective number of samples
  (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019),

both scaled so that the mean weight over rows is 1 (the loss keeps its scale).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.data.formats import open_source
from tunelab.data.records import Record
from tunelab.data.stream import RowWriter
from tunelab.errors import UserError


def class_weights(counts: dict[Any, int], scheme: str = "inverse", beta: float = 0.999) -> dict[Any, float]:
    """Weight per class, scaled so that ``sum(n_c * w_c) == sum(n_c)``."""
    if not counts or any(n <= 0 for n in counts.values()):
        raise ValueError("counts must be positive")
    total, k = sum(counts.values()), len(counts)
    if scheme == "inverse":
        raw = {c: total / (k * n) for c, n in counts.items()}
    elif scheme == "effective":
        raw = {c: (1 - beta) / (1 - beta**n) for c, n in counts.items()}
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    scale = total / sum(counts[c] * w for c, w in raw.items())
    return {c: w * scale for c, w in raw.items()}


def balance(records: Sequence[Record], key: Callable[[Record], Any], scheme: str, beta: float,
            where: str = "data.prepare.weights") -> tuple[list[Record], dict[str, float]]:
    """Records with ``weight *= class weight`` of their key (label or dataset)."""
    keys = [key(r) for r in records]
    missing = sum(1 for x in keys if x is None)
    if missing:
        raise UserError(f"{where}: {missing} of {len(records)} rows have no class to balance (got rows without a "
                        "label). Use labelled data (format: classification or a label column), or by: dataset.")
    table = class_weights(Counter(keys), scheme, beta)
    out = [dataclasses.replace(r, weight=r.weight * table[k]) for r, k in zip(records, keys, strict=True)]
    return out, {str(k): round(v, 6) for k, v in sorted(table.items(), key=lambda kv: str(kv[0]))}


def weights_file(path: str | Path, out: str | Path, *, scheme: str = "inverse", beta: float = 0.999,
                 format: str = "auto", columns: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``path``'s rows with a ``weight`` column (row weight x class weight of its label)."""
    src = open_source(path, format, columns)
    counts = Counter(i.record.label for i in src.items() if i.record is not None)
    if None in counts or not counts:
        raise UserError(f"{src.path}: class weights need a label on every row (got {counts.get(None, 0)} rows "
                        "without one). Use format classification or map your label column with --column label=COL.")
    table = class_weights(counts, scheme, beta)
    skipped = 0
    with RowWriter(out, protect=[src.path]) as w:
        for item in src.items():
            if item.record is None:
                skipped += 1
                continue
            w.write({**item.raw, "weight": round(item.record.weight * table[item.record.label], 6)})
    return {"output": str(out), "rows": w.count, "rejected": skipped, "scheme": scheme,
            "class_weights": {str(k): round(v, 6) for k, v in sorted(table.items())},
            "class_counts": dict(sorted(counts.items()))}
