"""`tunelab demo` end to end on the tiny random model: data, base scoring, training through fine_tune, tuned
scoring, the baselines without a model, the files it writes, and a second run that reuses the trained model."""

from __future__ import annotations

import io
import json

import yaml
from rich.console import Console

from tunelab.demo.run import run_demo

TINY = {"model": "tiny-random-llama", "method": {"name": "freeze", "layers": 1}, "n_train": 48, "n_test": 12}


def test_the_demo_trains_scores_and_compares_then_reuses_the_run(tmp_path):
    out = io.StringIO()
    work = tmp_path / "demo"
    results = run_demo(work, console=Console(file=out, width=200), **TINY)

    config = yaml.safe_load((work / "policy.yaml").read_text())
    assert config["method"] == {"name": "freeze", "layers": 1} and config["model"]["path"] == "tiny-random-llama"
    run_dir = work / "runs" / "policy"
    assert results["run_dir"] == str(run_dir) and (run_dir / "final" / "tunelab.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] >= 1 and results["train_seconds"] == summary["train_seconds"]
    for system in ("base", "tuned", "tfidf", "heuristic"):
        assert 0.0 <= results[system]["accuracy"] <= 1.0 and "macro_f1" in results[system], system
    assert json.loads((work / "results.json").read_text()) == results

    test_rows = [json.loads(line) for line in (work / "data" / "test.jsonl").read_text().splitlines()]
    generations = [json.loads(line) for line in (work / "generations.jsonl").read_text().splitlines()]
    assert [g["gold"] for g in generations] == [r["label"] for r in test_rows] and len(generations) == 12
    tuned_accuracy = sum(g["tuned_label"] == g["gold"] for g in generations) / 12
    assert abs(tuned_accuracy - results["tuned"]["accuracy"]) < 1e-9  # the table scores the written answers
    text = out.getvalue()
    for row in ("(base)", "tuned (the top 1 layer trained)", "TF-IDF + logistic regression", "most clicked"):
        assert row in text, row

    again = io.StringIO()
    second = run_demo(work, console=Console(file=again, width=200), **TINY)
    assert "already trained: reusing it" in again.getvalue()
    assert second["tuned"] == results["tuned"] and second["base"] == results["base"]
