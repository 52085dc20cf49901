"""``tunelab data split`` and ``tunelab data leakage``.

Splits are stratified by label and group-aware: rows are first joined into groups (near
duplicates by MinHash LSH, or exact duplicates), and whole groups are assigned, so a cluster
of near duplicates never straddles train and test. Assignment is greedy by deficit against
integer targets per label (largest-remainder rounding of ratio x count), which, for groups of
one row, gives every split exactly its rounded share of every label (within one row of
ratio x count). Deterministic for a seed. Augmented rows (``augmented`` set by
``tunelab data augment``) never reach validation or test: they follow their source row into
train, or are dropped when their source went elsewhere.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.dedup import NearDupIndex, dedup_key, digest64, exact_duplicates
from tunelab.data.settings import SplitSettings
from tunelab.data.stream import RowWriter, answer_text, open_source, prompt_text
from tunelab.errors import UserError

SPLIT_NAMES = ("train", "val", "test")


def largest_remainder(total: int, ratios: Sequence[float]) -> list[int]:
    """Integers summing to ``total``, each within one of ``ratio x total``."""
    exact = [r * total for r in ratios]
    base = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def assign(labels: Sequence[Any], groups: Sequence[int], ratios: Sequence[float], seed: int,
           stratify: bool = True) -> np.ndarray:
    """The split index (0..len(ratios)-1) of every row; rows of one group share it."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    by_label: dict[Any, list[int]] = defaultdict(list)  # label -> group ids
    for g, rows in members.items():
        label = Counter(labels[i] for i in rows).most_common(1)[0][0] if stratify else None
        by_label[label].append(g)
    out = np.zeros(len(labels), dtype=np.int64)
    rng = random.Random(seed)
    for label in sorted(by_label, key=lambda x: (x is None, str(x))):
        gids = sorted(by_label[label])
        rng.shuffle(gids)
        gids.sort(key=lambda g: -len(members[g]))  # big groups first (stable: shuffled ties)
        n = sum(len(members[g]) for g in gids)
        target = largest_remainder(n, ratios)
        have = [0] * len(ratios)
        for g in gids:
            k = max(range(len(ratios)), key=lambda j: (target[j] - have[j], ratios[j], -j))
            have[k] += len(members[g])
            out[members[g]] = k
    return out


def row_keys(record) -> tuple[str, str]:
    """(normalised input, normalised answer) of a record: what duplicates are judged on."""
    answer = answer_text(record)
    return dedup_key(prompt_text(record)), dedup_key(answer) if answer is not None else ""


def groups_of(records: list, how: str, threshold: float, batch: int = 4096) -> np.ndarray:
    """Group id (the first row of its group) per record: near duplicates, exact duplicates, or none."""
    keys = [row_keys(r) for r in records]
    if how == "none":
        return np.arange(len(records), dtype=np.int64)
    if how == "exact":
        return exact_duplicates(np.asarray([digest64(p + "\n" + a) for p, a in keys], dtype=np.int64))
    with NearDupIndex(threshold=threshold) as index:
        for s in range(0, len(keys), batch):
            part = keys[s : s + batch]
            index.add([p for p, _ in part], [a for _, a in part])
        near = index.clusters()[0]
    return near


@dataclass
class SplitReport:
    input: str
    outputs: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    groups: int = 0
    grouped_rows: int = 0
    augmented_dropped: int = 0
    rejected: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read(path, format, columns):
    src = open_source(path, format, columns)
    originals, augmented, rejected = [], [], 0
    for item in src.items():
        if item.record is None:
            rejected += 1
            continue
        if isinstance(item.raw, dict) and item.raw.get("augmented"):
            augmented.append(item)
        else:
            originals.append(item)
    if not originals:
        raise UserError(f"{src.path}: no usable row to split (got {rejected} rejected). Check the file and its format.")
    return src, originals, augmented, rejected


def split_file(path: str | Path, out_dir: str | Path, settings: SplitSettings | None = None, *,
               kfold: int | None = None, format: str = "auto", columns: dict[str, str] | None = None) -> SplitReport:
    """Write ``train/val[/test]`` files (or ``fold_<i>/{train,val}``) in the input's format."""
    s = settings or SplitSettings()
    src, originals, augmented, rejected = _read(path, format, columns)
    labels = [i.record.label for i in originals]
    stratify = s.stratify and any(label is not None for label in labels)
    groups = groups_of([i.record for i in originals], s.group, s.threshold)
    ratios = [1.0 / kfold] * kfold if kfold else list(s.ratios)
    which = assign(labels, groups, ratios, s.seed, stratify)
    report = SplitReport(str(src.path), rejected=rejected)
    report.groups = len(set(groups.tolist()))
    report.grouped_rows = int(len(groups) - report.groups)
    position = {i.index: k for k, i in enumerate(originals)}
    ext = src.path.suffix.lower()
    out_dir = Path(out_dir)

    def source_split(item) -> int | None:
        k = position.get(item.raw.get("source_row"))
        return None if k is None else int(which[k])

    if kfold:
        if kfold < 2:
            raise UserError(f"--kfold: needs at least 2 folds (got {kfold}).")
        for f in range(kfold):
            train_rows = [i.raw for k, i in enumerate(originals) if which[k] != f]
            train_rows += [i.raw for i in augmented if source_split(i) not in (None, f)]
            val_rows = [i.raw for k, i in enumerate(originals) if which[k] == f]
            for name, rows in (("train", train_rows), ("val", val_rows)):
                dest = out_dir / f"fold_{f}" / f"{name}{ext}"
                with RowWriter(dest, protect=[src.path]) as w:
                    for r in rows:
                        w.write(r)
                report.outputs[f"fold_{f}/{name}"] = str(dest)
                report.counts[f"fold_{f}/{name}"] = len(rows)
        report.augmented_dropped = 0
        return report

    names = SPLIT_NAMES[: len(ratios)]
    writers = {n: RowWriter(out_dir / f"{n}{ext}", protect=[src.path]) for n in names}
    label_counts: dict[str, Counter] = {n: Counter() for n in names}
    try:
        for k, item in enumerate(originals):
            name = names[which[k]]
            writers[name].write(item.raw)
            label_counts[name][str(item.record.label)] += item.record.label is not None
        for item in augmented:
            if source_split(item) == 0:
                writers["train"].write(item.raw)
            else:
                report.augmented_dropped += 1
        for n, w in writers.items():
            w.close()
            report.outputs[n] = str(w.path)
            report.counts[n] = w.count
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    report.label_counts = {n: dict(sorted(c.items())) for n, c in label_counts.items() if c}
    return report


# ----------------------------------------------------------------------------- leakage


def leakage(paths: Sequence[str | Path], *, threshold: float = 0.8, format: str = "auto",
            examples: int = 10) -> dict[str, Any]:
    """Exact and near overlaps of every later file with the first one (e.g. TRAIN then TEST...)."""
    if len(paths) < 2:
        raise UserError(f"leakage: give at least two files (got {len(paths)}). E.g. tunelab data leakage train.jsonl test.jsonl")
    texts, answers, prompts, file_of, ids = [], [], [], [], []
    for f, path in enumerate(paths):
        src = open_source(path, format)
        for item in src.items():
            if item.record is None:
                continue
            p, a = row_keys(item.record)
            texts.append(p + "\n" + a)
            answers.append(a)
            prompts.append(p)
            file_of.append(f)
            ids.append(item.record.id)
    file_arr = np.asarray(file_of)
    full = np.asarray([digest64(t) for t in texts], dtype=np.int64)
    prompt = np.asarray([digest64(t) for t in prompts], dtype=np.int64)
    first_full, first_prompt = set(full[file_arr == 0].tolist()), set(prompt[file_arr == 0].tolist())
    with NearDupIndex(threshold=threshold) as index:
        for s in range(0, len(texts), 4096):
            index.add(prompts[s : s + 4096], answers[s : s + 4096])
        root, sim = index.clusters(cross=file_arr)
    report: dict[str, Any] = {"reference": str(paths[0]), "threshold": threshold, "files": []}
    for f in range(1, len(paths)):
        mine = np.flatnonzero(file_arr == f)
        exact = [i for i in mine.tolist() if full[i] in first_full]
        same_prompt = [i for i in mine.tolist() if prompt[i] in first_prompt]
        near = [i for i in mine.tolist() if file_arr[root[i]] == 0 and root[i] != i]
        report["files"].append({
            "path": str(paths[f]), "rows": len(mine), "exact": len(exact), "same_input": len(same_prompt),
            "near": len(near), "near_share": round(len(near) / max(len(mine), 1), 4),
            "examples": [{"row": ids[i], "matches": ids[root[i]], "similarity": round(float(sim[i]), 3)}
                         for i in near[:examples]],
        })
    return report
