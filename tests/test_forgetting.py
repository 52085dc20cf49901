"""eval.forgetting: base vs tuned on general benchmarks and general loss next to the task metric."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from rich.console import Console

from conftest import shared, tiny_config
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.eval.forgetting import measure_forgetting, paired_change_ci, ratio_ci
from tunelab.train.recipe import fine_tune


def test_ratio_interval_brackets_the_token_weighted_mean():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 50, size=200).tolist()
    sums = [c * (2.0 + rng.normal(0, 0.3)) for c in counts]
    lo, hi = ratio_ci(sums, counts)
    mean = sum(sums) / sum(counts)
    assert lo < mean < hi and hi - lo < 0.2


def test_paired_change_interval_of_a_constant_shift_is_that_shift():
    base = {"per_example": {str(i): (float(i % 7), 1.0) for i in range(50)}}
    tuned = {"per_example": {k: (v + 0.5, 1.0) for k, (v, _) in base["per_example"].items()}}
    lo, hi = paired_change_ci(base, tuned)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # paired: the example-to-example spread cancels
    assert paired_change_ci(base, {"per_example": {"x": (1.0, 1.0)}}) is None


def test_forgetting_block_is_written_and_reported(tmp_path):
    from tunelab.report.html import build_report

    thuc = shared("classification", "thucnews_headlines", "train.jsonl")
    mmlu = shared("benchmarks", "mmlu", "mmlu.zip")
    alpaca = shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    forgetting = {"benchmarks": [{"path": str(mmlu), "limit": 8}], "general": [str(alpaca)], "general_limit": 6,
                  "task_limit": 6, "batch_size": 8}
    cfg = tiny_config(tmp_path, thuc, task="generative_classification",
                      data={"train": [{"path": str(thuc), "limit": 30}], "eval_ratio": 0.3, "max_length": 256},
                      classification={"max_new_tokens": 3},
                      train={"max_steps": 2, "batch_size": 4, "grad_accum": 1},
                      eval={"forgetting": forgetting, "report": True})
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = fine_tune(*load_config(path))
    doc = json.loads((out.run_dir / "forgetting.json").read_text())
    names = [m["name"] for m in doc["measures"]]
    assert names == ["task (generative_classification)", "mmlu 0-shot", "alpaca_en_demo loss"]
    for m in doc["measures"]:
        assert m["base"]["ci_low"] <= m["base"]["value"] <= m["base"]["ci_high"]
        assert m["change"] == pytest.approx(m["tuned"]["value"] - m["base"]["value"])
        assert len(m["change_ci"]) == 2 and "per_example" not in m["tuned"]
    by = {m["name"]: m for m in doc["measures"]}
    assert by["mmlu 0-shot"]["base"]["n"] == 8 and 0 < by["task (generative_classification)"]["tuned"]["n"] <= 6
    assert by["alpaca_en_demo loss"]["higher_is_better"] is False
    # a second run from the same base reuses the base scores
    assert len(list((tmp_path / "runs" / ".forgetting_base").glob("*.json"))) == 1
    other = tmp_path / "runs" / "b"
    shutil.copytree(out.run_dir, other)
    console = Console(record=True, width=200)
    again = measure_forgetting(other, console=console)
    assert "base scores from the cache" in console.export_text()
    assert [m["base"] for m in again["measures"]] == [m["base"] for m in doc["measures"]]
    _, sections = build_report([out.run_dir, other])
    titles = [s.title for s in sections]
    assert "Forgetting trade-off (base vs tuned)" in titles and "Forgetting trade-off across runs" in titles
    assert (out.run_dir / "report.html").is_file()


def test_forgetting_settings_are_strict(tmp_path, alpaca_path):
    cfg = tiny_config(tmp_path, alpaca_path, eval={"forgetting": {"benchmark": []}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="eval.forgetting.benchmark: unknown key"):
        load_config(path)


# -m extended: make test's 15 minutes (with llama.cpp's build and tests now in it) leave this out
@pytest.mark.slow
@pytest.mark.extended
def test_bench_forgetting_tiny_end_to_end(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    shared("benchmarks", "mmlu", "mmlu.zip")
    docs = tmp_path / "forgetting.md"
    docs.write_text("before\n<!-- bench:forgetting:start -->\nold\n<!-- bench:forgetting:end -->\nafter\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_forgetting.py"), "--model", "tiny-random-llama",
         "--variants", "naive,replay", "--steps", "2", "--train", "16", "--task-test", "8", "--mmlu-limit", "8",
         "--general-limit", "8", "--replay-records", "16", "--precision", "fp32", "--quiet",
         "--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--out", str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "results").glob("forgetting-*.json")).read_text())
    assert [r["variant"] for r in result["results"]] == ["naive", "replay"] and all(r["acted"] for r in result["results"])
    text = docs.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| base model |" in text and "| replay |" in text
