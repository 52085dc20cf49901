"""Stratified, group-aware splits; leakage; augmentation never reaching val/test; kappa."""

from __future__ import annotations

import json
from collections import Counter

from conftest import shared
from tunelab.data.annotate import agreement, cohen_kappa, fleiss_kappa
from tunelab.data.augment import augment_file
from tunelab.data.settings import AugmentSettings, SplitSettings
from tunelab.data.split import leakage, split_file


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_stratified_split_keeps_class_shares_within_one_row(tmp_path):
    src = shared("classification", "thucnews_headlines", "train.jsonl")
    rep = split_file(src, tmp_path / "s", SplitSettings(group="none", seed=3))
    totals = Counter(r["label"] for r in _read(src))
    for k, ratio in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
        got = Counter(r["label"] for r in _read(rep.outputs[k]))
        assert all(abs(got[c] - ratio * n) <= 1 for c, n in totals.items()), (k, got)
    again = split_file(src, tmp_path / "t", SplitSettings(group="none", seed=3))
    assert _read(again.outputs["val"]) == _read(rep.outputs["val"])  # deterministic by seed


def test_group_aware_split_has_zero_near_duplicate_leakage(tmp_path):
    rows = _read(shared("classification", "sst2", "train.jsonl"))[:600]
    planted = rows + [{**r, "text": r["text"] + " !"} for r in rows[:150]]  # 150 near copies
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted))
    naive = split_file(path, tmp_path / "naive", SplitSettings(group="none"))
    grouped = split_file(path, tmp_path / "grouped", SplitSettings(group="near"))
    leaked = leakage([naive.outputs["train"], naive.outputs["test"]])["files"][0]
    assert leaked["near"] + leaked["exact"] > 0  # the planted copies do leak without groups
    for other in ("val", "test"):
        report = leakage([grouped.outputs["train"], grouped.outputs[other]])["files"][0]
        assert report["near"] == 0 and report["exact"] == 0, report


def test_kfold_and_augmented_rows_stay_in_train(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _read(shared("classification", "sst2", "train.jsonl"))[:200]))
    aug = augment_file(src, tmp_path / "aug.jsonl", AugmentSettings(ops=["swap", "delete"], seed=1))
    assert aug["augmented_rows"] > 250  # one-word rows cannot be swapped: skipped, counted
    rep = split_file(tmp_path / "aug.jsonl", tmp_path / "s", SplitSettings(group="none"))
    assert all(not r.get("augmented") for k in ("val", "test") for r in _read(rep.outputs[k]))
    train = _read(rep.outputs["train"])
    assert sum(1 for r in train if r.get("augmented")) + rep.augmented_dropped == aug["augmented_rows"]
    assert rep.augmented_dropped > 0
    folds = split_file(src, tmp_path / "k", kfold=4)
    vals = [_read(folds.outputs[f"fold_{f}/val"]) for f in range(4)]
    assert sum(len(v) for v in vals) == 200 and {len(v) for v in vals} <= {50, 49, 51}


def test_kappa_equals_hand_computed_values():
    # Fleiss (1971) worked example on Wikipedia: 10 items, 14 raters, 5 categories -> 0.20993
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[c for c, n in enumerate(row) for _ in range(n)] for row in table]
    assert abs(fleiss_kappa(ratings) - 0.20993) < 1e-5
    # Cohen by hand: A = yyyyyynnnn, B = yyyynnynnn agree on 7 of 10 (p_o = 0.7); A says y 6x, B 5x:
    # p_e = 0.6 * 0.5 + 0.4 * 0.5 = 0.5, kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    assert abs(cohen_kappa(list("yyyyyynnnn"), list("yyyynnynnn")) - 0.4) < 1e-12
    report, voted = agreement([{"labels": ["a", "a", "b"]}, {"labels": ["a", "b"]}, {"labels": ["b", "b", "b"]}])
    assert report.annotators == 3 and report.skipped == 1 and report.ties == 1
    assert voted[0]["label"] == "a" and voted[1]["label_tie"] and voted[1]["label"] is None
    assert [d["row"] for d in report.disagreements] == [0, 1]
