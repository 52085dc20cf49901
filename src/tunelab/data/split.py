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

from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.dedup import NearDupIndex, dedup_key, digest64, exact_duplicates
from tunelab.data.formats import open_source
from tunelab.data.settings import SplitSettings
from tunelab.data.stream import RowWriter, answer_text, prompt_text
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
    names = sorted({str(x) for x in labels if x is not None})
    code = {n: i for i, n in enumerate(names)}
    codes = np.fromiter((len(names) if x is None else code[str(x)] for x in labels), dtype=np.int64, count=len(labels))
    return assign_codes(codes, np.asarray(groups, dtype=np.int64), ratios, seed, stratify)


def assign_codes(codes: np.ndarray, groups: np.ndarray, ratios: Sequence[float], seed: int,
                 stratify: bool = True) -> np.ndarray:
    """:func:`assign` on integer arrays (a label code per row, a group id per row), in numpy.

    A group's label is its most common one (ties: the smallest code). Per label, groups are
    shuffled (seeded), ordered big first (stable), and each goes to the split furthest below its
    integer target. Memory: a few arrays of 8 bytes per row.
    """
    n = len(codes)
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups = len(sizes)
    if stratify:
        width = np.int64(codes.max() + 1)
        pair, votes = np.unique(inverse * width + codes, return_counts=True)
        g_of, l_of = pair // width, pair % width
        order = np.lexsort((l_of, -votes, g_of))  # per group: most votes, then smallest code
        firsts = order[np.concatenate(([True], g_of[order][1:] != g_of[order][:-1]))]
        group_label = np.empty(n_groups, dtype=np.int64)
        group_label[g_of[firsts]] = l_of[firsts]
    else:
        group_label = np.zeros(n_groups, dtype=np.int64)
    rng = np.random.default_rng(seed)
    split_of_group = np.zeros(n_groups, dtype=np.int64)
    k_splits = len(ratios)
    prefer = sorted(range(k_splits), key=lambda j: (-ratios[j], j))  # tie-break: bigger share, then first
    for label in np.unique(group_label).tolist():
        gids = np.flatnonzero(group_label == label)
        gids = gids[rng.permutation(len(gids))]
        gids = gids[np.argsort(-sizes[gids], kind="stable")]  # big groups first (stable: shuffled ties)
        target = largest_remainder(int(sizes[gids].sum()), ratios)
        have = [0] * k_splits
        chosen = np.empty(len(gids), dtype=np.int64)
        for i, size in enumerate(sizes[gids].tolist()):
            k = max(prefer, key=lambda j: target[j] - have[j])
            have[k] += size
            chosen[i] = k
        split_of_group[gids] = chosen
    out[:] = split_of_group[inverse]
    return out


def row_keys(record) -> tuple[str, str]:
    """(normalised input, normalised answer) of a record: what duplicates are judged on."""
    answer = answer_text(record)
    return dedup_key(prompt_text(record)), dedup_key(answer) if answer is not None else ""


def groups_of(records: list, how: str, threshold: float, batch: int = 4096) -> np.ndarray:
    """Group id (the first row of its group) per record: near duplicates, exact duplicates, or none."""
    grouper = _Grouper(how, threshold)
    try:
        for s in range(0, len(records), batch):
            grouper.add([row_keys(r) for r in records[s : s + batch]])
        return grouper.groups()
    finally:
        grouper.close()


class _Grouper:
    """Group ids of rows added in batches: 8 bytes per row in RAM (near: the index is on disk)."""

    def __init__(self, how: str, threshold: float):
        self.how, self.n = how, 0
        self.digests = array("q")
        self.index = NearDupIndex(threshold=threshold) if how == "near" else None

    def add(self, keys: list[tuple[str, str]]) -> None:
        self.n += len(keys)
        if self.how == "exact":
            self.digests.extend(digest64(p + "\n" + a) for p, a in keys)
        elif self.index is not None:
            self.index.add([p for p, _ in keys], [a for _, a in keys])

    def groups(self) -> np.ndarray:
        if self.how == "exact":
            return exact_duplicates(np.frombuffer(self.digests, dtype=np.int64) if self.n else np.zeros(0, np.int64))
        if self.index is not None:
            return self.index.clusters()[0]
        return np.arange(self.n, dtype=np.int64)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


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


@dataclass
class _Scan:
    """Pass 1 of a split: per original row its file index, label code and group; per augmented
    row its source row. Typed arrays only (no row text is kept)."""

    index: np.ndarray
    codes: np.ndarray
    label_names: list[str]
    groups: np.ndarray
    aug_source: np.ndarray  # per augmented row (file order): its ``source_row``, -1 when none
    rejected: int


def _scan(src, how: str, threshold: float, batch: int = 4096) -> _Scan:
    index, codes, aug_source = array("q"), array("q"), array("q")
    code: dict[Any, int] = {}
    rejected = 0
    grouper = _Grouper(how, threshold)
    try:
        keys: list[tuple[str, str]] = []
        for item in src.items():
            if item.record is None:
                rejected += 1
                continue
            if isinstance(item.raw, dict) and item.raw.get("augmented"):
                source = item.raw.get("source_row")
                aug_source.append(source if isinstance(source, int) and not isinstance(source, bool) else -1)
                continue
            label = item.record.label
            index.append(item.index)
            codes.append(-1 if label is None else code.setdefault(label, len(code)))
            keys.append(row_keys(item.record))
            if len(keys) >= batch:
                grouper.add(keys)
                keys = []
        grouper.add(keys)
        if not index:
            raise UserError(f"{src.path}: no usable row to split (got {rejected} rejected). Check the file and its format.")
        groups = grouper.groups()
    finally:
        grouper.close()
    # label codes in sorted-name order; rows without a label last
    names = sorted(code, key=str)
    remap = np.empty(len(code) + 1, dtype=np.int64)
    for new, name in enumerate(names):
        remap[code[name]] = new
    remap[-1] = len(names)
    raw_codes = np.frombuffer(codes, dtype=np.int64)
    return _Scan(np.frombuffer(index, dtype=np.int64).copy(), remap[raw_codes], [str(x) for x in names], groups,
                 np.frombuffer(aug_source, dtype=np.int64).copy() if aug_source else np.zeros(0, np.int64), rejected)


def split_names(kfold: int | None, n_ratios: int) -> list[str]:
    """The files a split writes, without the extension: ``train``, ``val``[, ``test``] or ``fold_<i>/...``."""
    if kfold:
        return [f"fold_{f}/{part}" for f in range(kfold) for part in ("train", "val")]
    return list(SPLIT_NAMES[:n_ratios])


def check_out_dir(out_dir: str | Path, input_path: str | Path, *, kfold: int | None = None, n_ratios: int = 3,
                  force: bool = False) -> Path:
    """Refuse an ``--out-dir`` that is a file, or that already holds split files (unless ``force``)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir: {out_dir} is a file, not a folder (got an existing file). "
                        "Name a new or existing folder to write the splits into.")
    ext = Path(input_path).suffix.lower()
    there = [n + ext for n in split_names(kfold, n_ratios) if (out_dir / f"{n}{ext}").exists()]
    for name in there:
        if (out_dir / name).is_dir():
            raise UserError(f"--out-dir: {out_dir / name} is a folder where a split file goes (got a folder). "
                            "Remove it or choose another --out-dir.")
    if there and not force:
        raise UserError(f"--out-dir: {out_dir} already holds split files (got {', '.join(there[:4])}"
                        f"{', ...' if len(there) > 4 else ''}). Choose another folder, or add --force to replace them.")
    for n in split_names(kfold, n_ratios):  # a file where a fold folder goes
        parent = (out_dir / n).parent
        if parent != out_dir and parent.exists() and not parent.is_dir():
            raise UserError(f"--out-dir: {parent} is a file, not a folder (got an existing file). "
                            "Remove it or choose another --out-dir.")
    return out_dir


def split_file(path: str | Path, out_dir: str | Path, settings: SplitSettings | None = None, *,
               kfold: int | None = None, format: str = "auto", columns: dict[str, str] | None = None) -> SplitReport:
    """Write ``train/val[/test]`` files (or ``fold_<i>/{train,val}``) in the input's format.

    Two streaming passes: the first keeps only typed arrays per row (:class:`_Scan`; the near
    duplicate index lives on disk), the assignment is computed on them, and the second pass
    streams every row into its split's writer. Memory does not depend on the rows' text.
    """
    s = settings or SplitSettings()
    if kfold is not None and kfold < 2:
        raise UserError(f"--kfold: needs at least 2 folds (got {kfold}).")
    src = open_source(path, format, columns)
    scan = _scan(src, s.group, s.threshold)
    has_labels = bool(scan.label_names)
    stratify = s.stratify and has_labels
    ratios = [1.0 / kfold] * kfold if kfold else list(s.ratios)
    which = assign_codes(scan.codes, scan.groups, ratios, s.seed, stratify)
    report = SplitReport(str(src.path), rejected=scan.rejected)
    report.groups = int(len(np.unique(scan.groups)))
    report.grouped_rows = int(len(scan.groups) - report.groups)
    # the split of each augmented row's source (-1: no such original row)
    pos = np.searchsorted(scan.index, scan.aug_source)
    found = (pos < len(scan.index)) & (scan.index[np.minimum(pos, len(scan.index) - 1)] == scan.aug_source)
    aug_split = np.where(found, which[np.minimum(pos, len(which) - 1)], -1)
    ext = src.path.suffix.lower()
    out_dir = Path(out_dir)

    names = split_names(kfold, len(ratios))
    writers = {n: RowWriter(out_dir / f"{n}{ext}", protect=[src.path]) for n in names}
    label_counts: dict[str, Counter] = {n: Counter() for n in names}
    try:
        k_orig = k_aug = 0
        for item in src.items():
            if item.record is None:
                continue
            if isinstance(item.raw, dict) and item.raw.get("augmented"):
                home = int(aug_split[k_aug])
                k_aug += 1
                if home < 0 or (not kfold and home != 0):
                    report.augmented_dropped += not kfold
                    continue
                targets = [f"fold_{f}/train" for f in range(kfold) if f != home] if kfold else ["train"]
            else:
                k = int(which[k_orig])
                label = scan.codes[k_orig]
                k_orig += 1
                if kfold:
                    targets = [f"fold_{k}/val"] + [f"fold_{f}/train" for f in range(kfold) if f != k]
                else:
                    targets = [names[k]]
                    if label < len(scan.label_names):
                        label_counts[names[k]][scan.label_names[label]] += 1
            for t in targets:
                writers[t].write(item.raw)
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
    """Exact and near overlaps of every later file with the first one (e.g. TRAIN then TEST...).

    Streaming: per row only two 8-byte digests and a file number are kept (the near-duplicate
    index is on disk); the ids of the few example rows are read back in a second pass.
    """
    if len(paths) < 2:
        raise UserError(f"leakage: give at least two files (got {len(paths)}). E.g. tunelab data leakage train.jsonl test.jsonl")
    full, prompt, file_of = array("q"), array("q"), array("q")
    sources = [open_source(path, format) for path in paths]
    with NearDupIndex(threshold=threshold) as index:
        for f, src in enumerate(sources):
            keys: list[tuple[str, str]] = []
            for item in src.items():
                if item.record is None:
                    continue
                keys.append(row_keys(item.record))
                if len(keys) >= 4096:
                    _leak_add(keys, f, full, prompt, file_of, index)
                    keys = []
            _leak_add(keys, f, full, prompt, file_of, index)
        file_arr = np.frombuffer(file_of, dtype=np.int64) if file_of else np.zeros(0, np.int64)
        root, sim = index.clusters(cross=file_arr)
    full_a = np.frombuffer(full, dtype=np.int64) if full else np.zeros(0, np.int64)
    prompt_a = np.frombuffer(prompt, dtype=np.int64) if prompt else np.zeros(0, np.int64)
    ref = file_arr == 0
    in_ref_full = np.isin(full_a, full_a[ref])
    in_ref_prompt = np.isin(prompt_a, prompt_a[ref])
    near_all = (file_arr[root] == 0) & (root != np.arange(len(root)))
    starts = np.searchsorted(file_arr, np.arange(len(paths)))  # rows are in file order
    report: dict[str, Any] = {"reference": str(paths[0]), "threshold": threshold, "files": []}
    wanted: dict[int, None] = {}
    shown: list[list[int]] = []
    for f in range(1, len(paths)):
        mine = np.flatnonzero(file_arr == f)
        near = mine[near_all[mine]]
        shown.append(near[:examples].tolist())
        wanted.update(dict.fromkeys(near[:examples].tolist() + root[near[:examples]].tolist()))
        report["files"].append({
            "path": str(paths[f]), "rows": len(mine), "exact": int(in_ref_full[mine].sum()),
            "same_input": int(in_ref_prompt[mine].sum()), "near": len(near),
            "near_share": round(len(near) / max(len(mine), 1), 4)})
    ids = _ids_of(sources, starts, set(wanted))
    for entry, rows in zip(report["files"], shown, strict=True):
        entry["examples"] = [{"row": ids[i], "matches": ids[int(root[i])], "similarity": round(float(sim[i]), 3)}
                             for i in rows]
    return report


def _leak_add(keys, f: int, full: array, prompt: array, file_of: array, index: NearDupIndex) -> None:
    full.extend(digest64(p + "\n" + a) for p, a in keys)
    prompt.extend(digest64(p) for p, _ in keys)
    file_of.extend([f] * len(keys))
    index.add([p for p, _ in keys], [a for _, a in keys])


def _ids_of(sources, starts: np.ndarray, wanted: set[int]) -> dict[int, str]:
    """Record ids of the given global row numbers (usable rows, numbered across the files)."""
    ids: dict[int, str] = {}
    for f, src in enumerate(sources):
        lo = int(starts[f])
        hi = int(starts[f + 1]) if f + 1 < len(starts) else None
        if not any(lo <= w and (hi is None or w < hi) for w in wanted):
            continue
        k = lo
        for item in src.items():
            if item.record is None:
                continue
            if k in wanted:
                ids[k] = item.record.id
            k += 1
    return ids
