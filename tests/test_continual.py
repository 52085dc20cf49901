"""tunelab continual: stages in one config, the accuracy matrix, ACC / BWT / FWT, resume, --compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import shared
from tunelab.cli import main
from tunelab.errors import ConfigError, UserError
from tunelab.train import continual
from tunelab.train.continual import (
    load_continual,
    parse_variants,
    run_compare,
    transfer_metrics,
)


def test_transfer_metrics_follow_lopez_paz_and_ranzato():
    r = [[0.8, 0.1, 0.2],
         [0.6, 0.9, 0.3],
         [0.5, 0.7, 0.95]]
    b = [0.1, 0.2, 0.25]
    m = transfer_metrics(r, b)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.25)) / 2)
    assert transfer_metrics([[0.5, None], [0.4, 0.6]], [0.1, 0.2])["fwt"] is None


def test_variants_parse_with_default_and_given_weights():
    assert parse_variants("naive,ewc:5000,replay:0.3,distill") == [
        ("naive", {}), ("ewc:5000", {"ewc": {"weight": 5000.0}}), ("replay:0.3", {"replay": {"ratio": 0.3}}),
        ("distill:1", {"distill": {"weight": 1.0}})]
    for bad, msg in (("bogus", "unknown variant"), ("ewc:lots", "must be a number"), ("naive,naive", "twice")):
        with pytest.raises(UserError, match=msg):
            parse_variants(bad)


def _config(tmp_path: Path, **top) -> Path:
    a = shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    b = shared("instruct", "llamafactory_demo", "alpaca_zh_demo.json")
    cfg = {
        "run": {"name": "cl", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"max_length": 64, "eval_ratio": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 5e-2, "batch_size": 4, "max_steps": 2, "precision": "fp32", "seed": 0, "schedule": "constant"},
        "stages": [{"name": "english", "data": {"train": [{"path": str(a), "limit": 16}]}},
                   {"name": "chinese", "data": {"train": [{"path": str(b), "limit": 16}]}}],
        **top,
    }
    path = tmp_path / "cl.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def test_continual_compare_naive_and_replay_writes_the_matrices_and_resumes(tmp_path, monkeypatch):
    path = _config(tmp_path)
    assert main(["continual", str(path), "--compare", "naive,replay:0.25"]) == 0
    root = tmp_path / "runs" / "cl"
    naive, replay = (json.loads((root / "compare" / n / "continual.json").read_text()) for n in ("naive", "replay-0.25"))

    # the matrix: R[i][j] = -loss on task j after stage i; ACC / BWT / FWT from it and the base row
    assert naive["task_names"] == ["english", "chinese"]
    assert naive["metrics"] == {"english": "-loss", "chinese": "-loss"}
    r, b = naive["matrix"], naive["base_scores"]
    assert len(r) == 2 and all(len(row) == 2 for row in r)
    assert r[0][0] > b[0]  # stage 0 learnt its task: a lower loss than the base model
    assert naive["summary"]["acc"] == pytest.approx((r[1][0] + r[1][1]) / 2)
    assert naive["summary"]["bwt"] == pytest.approx(r[1][0] - r[0][0])
    assert naive["summary"]["fwt"] == pytest.approx(r[0][1] - b[1])
    assert "| stage 1 (chinese) |" in (root / "compare" / "naive" / "continual.md").read_text()
    # stage 1 started from stage 0's weights (the LoRA adapter merged into its base)
    stage0 = Path(naive["stages"][0]["run_dir"])
    stage1 = yaml.safe_load((Path(naive["stages"][1]["run_dir"]) / "config.yaml").read_text())
    assert stage1["model"]["path"] == str(stage0 / "merged") and (stage0 / "merged" / "config.json").is_file()

    # the replay variant shares the first stage and replays its buffer in the second
    assert replay["stages"][0]["run_dir"] == naive["stages"][0]["run_dir"] and replay["matrix"][0] == r[0]
    run1 = Path(replay["stages"][1]["run_dir"])
    info = json.loads((run1 / "replay.json").read_text())
    assert info["replay_rows_per_step"] == 1 and info["files"][0]["path"].endswith("00-english.jsonl")
    metrics = [json.loads(x) for x in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/replay" in m for m in metrics if m["kind"] == "train")
    assert replay["matrix"][1] != r[1]
    table = (root / "compare.md").read_text()
    assert "| naive |" in table and "| replay:0.25 |" in table

    # again: finished stages are neither re-trained nor re-scored
    calls = []
    monkeypatch.setattr("tunelab.train.recipe.fine_tune", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(continual, "_score_model", lambda *a, **k: calls.append(a))
    again = run_compare(path, "naive,replay:0.25")
    assert calls == [] and again["variants"][0]["matrix"] == r


def test_stage_errors_name_the_stage(tmp_path):
    path = _config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["stages"][1]["train"] = {"lrr": 1.0}
    raw["stages"][0]["colour"] = "red"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(ConfigError) as err:
        load_continual(path)
    assert "stages.0.colour" in str(err.value)
    raw["stages"][0].pop("colour")
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(ConfigError, match=r"stages.1 \(chinese\): train.lrr: unknown key"):
        load_continual(path)
    raw["stages"] = raw["stages"][:1]
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(UserError, match="at least 2 stages"):
        load_continual(path)
    with pytest.raises(ConfigError, match="tunelab continual"):  # tunelab train refuses a stages config
        from tunelab.config import load_config

        load_config(_config(tmp_path, data={"train": [{"path": "x.json"}]}))


def test_the_example_validates_with_three_stages():
    from conftest import REPO

    plan = load_continual(REPO / "examples" / "continual" / "news_then_hotels.yaml")
    assert [c.run.name for c in plan.stages] == ["00-news", "01-hotels", "02-alpaca"]
    assert [c.task for c in plan.stages] == ["generative_classification"] * 2 + ["sft"]
    assert plan.stages[1].objectives.replay.ratio == 0.25 and plan.stages[0].objectives.replay is None
    assert plan.stages[2].train.lr == 1e-4 and plan.stages[2].train.batch_size == 8  # merged over the top level
    assert plan.stages[2].run.output_dir.endswith("news-then-hotels/stages")


def test_buffer_keeps_the_stage_samples_as_trained_and_stage_objectives_use_it(tmp_path):
    from rich.console import Console

    from tunelab.train.continual import StageRun, stage_objectives, write_buffer

    thuc = shared("classification", "thucnews_headlines", "train.jsonl")
    raw = yaml.safe_load(_config(tmp_path).read_text())
    raw["stages"][0] = {"name": "news", "task": "generative_classification",
                        "data": {"train": [{"path": str(thuc), "limit": 40}]}}
    raw["stages"][1]["objectives"] = {"replay": {"ratio": 0.25, "buffer": 5}, "ewc": {"weight": 10.0}}
    plan = load_continual(None, raw=raw)
    root = tmp_path / "runs" / "cl"
    first = StageRun(0, "news", plan.stages[0], root / "stages" / "00-news", root / "w")
    path = write_buffer(first, 5, root)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 5 and path.name == "00-news.jsonl"
    labels = {json.loads(x)["label_text"] for x in thuc.read_text().splitlines()[:40]}
    for r in rows:  # the chat the stage trained on: its prompt with the label list, the label as the answer
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert answer in labels and all(lab in user for lab in labels)
    assert write_buffer(first, 5, root).read_text() == path.read_text()  # seeded: the same samples again

    second = plan.stages[1]
    obj = stage_objectives(first, second, root, Console(quiet=True))
    assert [d.path for d in obj.replay.data] == [str(path)]
    assert [d.path for d in obj.ewc.data] == [str(thuc)]  # the Fisher on the previous stage's data
    assert stage_objectives(None, second, root, Console(quiet=True)).replay is None  # nothing to replay yet


def test_online_ewc_carries_the_fisher_across_three_stages(tmp_path):
    """Stage k's EWC Fisher is estimated on stage k-1's data and combined with stage k-1's own Fisher."""
    from tunelab.objectives.keep import load_fisher

    path = _config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    third = shared("instruct", "llamafactory_demo", "identity.json")
    cfg["stages"].append({"name": "identity", "data": {"train": [{"path": str(third), "limit": 16}]}})
    cfg["train"]["max_steps"] = 1
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert main(["continual", str(path), "--compare", "ewc:100"]) == 0
    out = json.loads((tmp_path / "runs" / "cl" / "compare" / "ewc-100" / "continual.json").read_text())
    runs = [Path(s["run_dir"]) for s in out["stages"]]
    assert not (runs[0] / "fisher.safetensors").exists()  # variants act from the second stage on
    _, _, meta1 = load_fisher(runs[1] / "fisher.safetensors")
    assert "online" not in meta1
    _, _, meta2 = load_fisher(runs[2] / "fisher.safetensors")
    assert meta2["online"] and meta2["gamma"] == 1.0 and meta2["previous"] == str(runs[1] / "fisher.safetensors")
    stage2 = yaml.safe_load((runs[2] / "config.yaml").read_text())
    assert stage2["objectives"]["ewc"]["data"][0]["path"].endswith("alpaca_zh_demo.json")  # stage 1's task
    assert len(out["matrix"]) == 3 and all(len(row) == 3 for row in out["matrix"])
