"""Paired comparison: a known difference is significant, a null one is not; the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from eval_fixtures import make_lora_run, write_classification_data
from tunelab.eval.compare import paired_test


def test_mcnemar_finds_a_known_difference():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.55).astype(float)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 0), size=50, replace=False)  # B fixes 50 of A's errors
    b[flip] = 1.0
    b[rng.choice(np.flatnonzero(a == 1), size=10, replace=False)] = 0.0  # and breaks 10 of its successes
    r = paired_test(list(a), list(b))
    assert r["test"] == "mcnemar-exact" and r["b_only_correct"] == 50 and r["a_only_correct"] == 10
    assert r["p_value"] == pytest.approx(binomtest(50, 60, 0.5).pvalue)
    assert r["significant"] and r["difference"] == pytest.approx(40 / 300)
    assert 0 < r["ci_low"] < r["difference"] < r["ci_high"]


def test_null_difference_is_not_significant():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.6).astype(float)
    b = (rng.random(300) < 0.6).astype(float)  # same accuracy, independent errors
    r = paired_test(list(a), list(b))
    assert not r["significant"] and r["ci_low"] < 0 < r["ci_high"]
    same = paired_test(list(a), list(a))
    assert same["p_value"] == 1.0 and same["difference"] == 0.0


def test_paired_bootstrap_for_continuous_scores():
    rng = np.random.default_rng(2)
    a = rng.random(200)
    r = paired_test(list(a), list(a + 0.05 + rng.normal(0, 0.05, 200)))
    assert r["test"] == "paired-bootstrap" and r["significant"] and r["p_value"] < 0.01
    null = paired_test(list(a), list(a + rng.normal(0, 0.05, 200)))
    assert not null["significant"] and null["p_value"] > 0.05


def test_compare_cli_on_two_runs(tmp_path, capsys):
    from tunelab.cli import main

    data = write_classification_data(tmp_path / "cls.jsonl", n=6)
    run_a = make_lora_run(tmp_path / "runs" / "a", data, seed=1)
    run_b = make_lora_run(tmp_path / "runs" / "b", data, seed=2, scale=40.0)
    assert main(["compare", str(run_a), str(run_b), "--data", str(data), "--mode", "constrained"]) == 0
    out = capsys.readouterr().out
    assert "paired examples" in out and "mcnemar-exact" in out
    doc = json.loads(next((run_a / "eval").glob("compare-a-vs-b-cls.json")).read_text())
    assert doc["n"] == 6 and doc["task"] == "classification" and doc["test"] == "mcnemar-exact"
    assert doc["n_disagree"] == len(doc["disagreements"])
    assert all(d["a"] != d["b"] for d in doc["disagreements"])
    # the TF-IDF baseline, fitted on run A's training data, tested against each side on the same examples
    base = doc["baseline"]
    assert base["name"] == "tfidf-lr" and base["a"]["n"] == base["b"]["n"] == 6
    assert base["a"]["mean_b"] == doc["mean_a"] and base["b"]["mean_b"] == doc["mean_b"]
    assert "against tfidf-lr" in out
