"""``tunelab cv``: k-fold cross-validation on tiny-random-llama (3 folds, a few steps each)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.eval.cv import aggregate, cross_validate

WORDS = {"colour": ["red", "blue", "green", "yellow"], "animal": ["cat", "dog", "horse", "sheep"]}


def _data(path: Path, n: int) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = "colour" if i % 3 else "animal"  # 2:1 imbalance, to see stratification
        rows.append({"text": f"{rng.choice(['the', 'a', 'one'])} {i} {rng.choice(WORDS[label])}", "label_text": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path) -> Path:
    cfg = {"task": "classification", "run": {"name": "cv", "output_dir": str(tmp_path / "runs")},
           "model": {"path": "tiny-random-llama"},
           "data": {"train": [{"path": str(_data(tmp_path / "train.jsonl", 30))}], "max_length": 16},
           "method": {"name": "head"},
           "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 2, "precision": "fp32", "seed": 0}}
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_three_folds_stratified_disjoint_aggregated_and_resumable(tmp_path, monkeypatch):
    path = _config(tmp_path)
    assert main(["cv", str(path), "--folds", "3", "--group", "none"]) == 0
    cv_dir = tmp_path / "runs" / "cv"
    result = json.loads((cv_dir / "cv.json").read_text())
    sizes = [s["eval"] for s in result["fold_sizes"]]
    assert result["folds"] == 3 and sum(sizes) == 30 and all(s["train"] + s["eval"] == 30 for s in result["fold_sizes"])
    # the validation parts are disjoint, cover every row, and keep the 2:1 label shares
    seen = []
    for i in range(3):
        rows = [json.loads(x) for x in (cv_dir / "folds" / "0" / f"fold_{i}" / "val.jsonl").read_text().splitlines()]
        seen += [r["text"] for r in rows]
        counts = Counter(r["label_text"] for r in rows)  # 20 colour / 10 animal rows: within one of a third each
        assert counts["colour"] in (6, 7) and counts["animal"] in (3, 4) and len(rows) == sizes[i]
        train = (cv_dir / "folds" / "0" / f"fold_{i}" / "train.jsonl").read_text().splitlines()
        assert len(train) == 30 - sizes[i] and not {json.loads(x)["text"] for x in train} & {r["text"] for r in rows}
        assert (cv_dir / f"fold-{i}" / "final" / "head.safetensors").is_file()
    assert len(set(seen)) == 30
    m = result["metrics"]
    for key in ("eval_loss", "accuracy", "macro_f1", "best_eval_loss"):
        values = m[key]["values"]
        assert len(values) == 3
        mean = sum(values) / 3
        assert m[key]["mean"] == pytest.approx(mean)
        assert m[key]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    per_fold_loss = [json.loads((cv_dir / f"fold-{i}" / "summary.json").read_text())["best_eval_loss"]
                     for i in range(3)]
    assert m["best_eval_loss"]["values"] == pytest.approx(per_fold_loss)

    # resumable: finished folds are not re-run; an unfinished one resumes from its checkpoint
    import tunelab.train.recipe as recipe

    (cv_dir / "fold-1" / "cv_fold.json").unlink()  # as if killed after training, before the fold was recorded
    calls = []
    monkeypatch.setattr(recipe, "fine_tune", lambda cfg, *a, **k: calls.append((cfg.run.name, k.get("resume"))))
    cfg, sources = load_config(path)
    again = cross_validate(cfg, sources, folds=3, group="none")
    assert calls == [("fold-1", True)]
    assert again["metrics"]["eval_loss"]["values"] == pytest.approx(m["eval_loss"]["values"])


def test_aggregate_and_errors(tmp_path):
    agg = aggregate([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert agg["a"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "values": [1.0, 3.0], "folds": 2}
    assert agg["b"]["folds"] == 1 and agg["b"]["std"] == 0.0
    assert main(["cv", str(_config(tmp_path)), "--folds", "1"]) == 2
