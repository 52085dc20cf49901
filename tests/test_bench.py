"""The LoRA benchmark script end to end, on the tiny random model (both sides, real subprocesses)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, shared

pytestmark = pytest.mark.slow


def test_bench_lora_tiny_end_to_end(tmp_path):
    shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    results = tmp_path / "results"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nbefore\n<!-- bench:lora:start -->\nold\n<!-- bench:lora:end -->\nafter\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_lora.py"), "--model", "tiny-random-llama",
         "--records", "16", "--eval-records", "8", "--max-length", "128",
         "--results-dir", str(results), "--out", str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = list(results.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    sides = result["sides"]
    assert set(sides) == {"ours", "baseline"}
    for name, side in sides.items():
        # the figure is the dataset tokens over the training time, as documented
        assert side["tokens_per_s"] == pytest.approx(side["train_tokens"] / side["train_seconds"], rel=1e-2), name
        assert side["peak_rss_mib"] > 0, name
        assert side["eval_loss"] is not None and math.isfinite(side["eval_loss"]), name
        assert side["optimiser_steps"] >= 1, name
        assert side["train_samples"] == 16 and side["eval_samples"] == 8, name
        # every training token exactly once, no padding counted
        assert side["tokens_trained"] == side["train_tokens"], name
    assert sides["ours"]["train_tokens"] == sides["baseline"]["train_tokens"]
    assert sides["ours"]["train_target_tokens"] == sides["baseline"]["train_target_tokens"]
    assert sides["ours"]["eval_target_tokens"] == sides["baseline"]["eval_target_tokens"]
    assert result["comparison"]["same_tokens"] is True
    assert result["comparison"]["tokens_per_s_ratio"] == pytest.approx(
        sides["ours"]["tokens_per_s"] / sides["baseline"]["tokens_per_s"])

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("after\n")
    assert "old" not in text and "dataset tokens/s" in text and "tiny-random-llama" in text
    assert "dataset tokens/s" in proc.stdout


# -m extended: make test's 15 minutes (with llama.cpp's build and tests now in it) leave this out
@pytest.mark.slow
@pytest.mark.extended
def test_bench_lora_ours_with_two_processes(tmp_path):
    """`--ours-processes 2`: the same tokens through `tunelab train` with train.processes: 2; the
    peak RSS is the ranks' sum plus the launcher's."""
    shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_lora.py"), "--model", "tiny-random-llama",
         "--records", "16", "--eval-records", "8", "--max-length", "128", "--only", "ours", "--threads", "2",
         "--ours-processes", "2", "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = json.loads(next(results.glob("*.json")).read_text())["sides"]["ours"]
    assert ours["processes"] == 2 and ours["threads"] == 1
    assert ours["tokens_trained"] == ours["train_tokens"] and ours["optimiser_steps"] >= 1
    per = ours["peak_rss_mib_per_process"]
    assert len(per) == 2 and ours["peak_rss_mib"] >= sum(per) > 0


@pytest.mark.extended  # 52 s; DPO against TRL's own code stays in make test (test_preference.py)
def test_bench_preference_quick_end_to_end(tmp_path):
    """`bench_preference.py --quick`: tunelab and TRL's DPOTrainer on the same tiny-random-llama pairs, each
    in its own process; the result JSON and the docs section."""
    pytest.importorskip("trl")
    shared("preference", "llamafactory_demo", "dpo_en_demo.json")
    results = tmp_path / "results"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nbefore\n<!-- bench:preference:start -->\nold\n<!-- bench:preference:end -->\n"
                    "after\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_preference.py"), "--quick", "--threads", "1",
         "--results-dir", str(results), "--out", str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(results.glob("preference-*.json")).read_text())
    assert result["workload"]["model"] == "tiny-random-llama"
    sides = result["sides"]
    assert set(sides) == {"ours", "trl"}
    for name, side in sides.items():
        assert side["tokens_per_s"] == pytest.approx(side["train_tokens"] / side["train_seconds"], rel=1e-2), name
        assert side["peak_rss_mib"] > 0 and side["optimiser_steps"] == 2, name  # 16 pairs, 8 per step
        assert side["eval_loss"] is not None and math.isfinite(side["eval_loss"]), name
        assert side["train_pairs"] == 16 and side["eval_pairs"] == 8, name
        assert side["tokens_trained"] == side["train_tokens"], name  # every pair once, no padding counted
    assert result["comparison"]["same_tokens"] is True
    # both start from the same model and the same reference: the held-out losses are close
    assert abs(result["comparison"]["eval_loss_rel_diff"]) < 0.05
    for when in ("matmul_before", "matmul_after"):
        assert result[when]["bf16"] > 0 and result[when]["fp32"] > 0
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("after\n") and "old" not in text
    assert "held-out DPO loss" in text and "tiny-random-llama" in text and "GFLOP/s" in text


def test_measure_preference_table_in_the_docs_is_the_one_its_result_file_gives(tmp_path):
    """docs/preference.md's quality table is written from the committed result file (`--from-json`), so every
    figure in it traces back to a run."""
    docs = (REPO / "docs" / "preference.md").read_text()
    start, end = "<!-- bench:preference-quality:start -->", "<!-- bench:preference-quality:end -->"
    stamp = docs[docs.index(start):docs.index(end)].split("result file `")[1].split("`")[0]
    out = tmp_path / "p.md"
    out.write_text(f"{start}\n{end}\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "measure_preference.py"), "--from-json",
                           str(REPO / stamp), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert len(table) >= 8  # header, rule, base and the five runs
    assert table == [line for line in docs[docs.index(start):docs.index(end)].splitlines() if line.startswith("|")]


@pytest.mark.extended
def test_measure_preference_end_to_end_on_the_tiny_model(tmp_path):
    """`measure_preference.py` through the CLI (train, eval, forgetting) on tiny-random-llama: a DPO policy and a
    reward model scored on held-out pairs, the result JSON and its table."""
    shared("preference", "llamafactory_demo", "dpo_en_demo.json")
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "measure_preference.py"), "--model", "tiny-random-llama",
         "--runs", "dpo,reward", "--limit", "12", "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(results.glob("preference-quality-*.json")).read_text())
    assert result["model"] == "tiny-random-llama" and result["held_out"] == 10
    assert [r["run"] for r in result["runs"]] == ["dpo", "reward"]
    for r in result["runs"]:
        scores = r["scores"].get("metrics", r["scores"])
        assert 0.0 <= scores["pair_accuracy"] <= 1.0 and math.isfinite(scores["margin"]), r["run"]
        assert r["tokens_per_s"] > 0
    dpo = result["runs"][0]
    assert any(m["kind"] == "general_loss" for m in dpo["forgetting"]["measures"])
    assert "| base (tiny-random-llama) |" in proc.stdout and "| reward |" in proc.stdout
