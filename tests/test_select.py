"""tunelab select: candidates scored on validation data, ranked with reasons."""

from __future__ import annotations

import json

import pytest

from conftest import shared
from tunelab.errors import UserError
from tunelab.search.select import Candidate, SelectRequest, rank, read_validation, select_model


def test_ranking_puts_models_that_do_not_fit_last_then_orders_by_few_shot_metric_and_loss():
    def cand(name, metric, loss, lora_mib, tps=100.0):
        return Candidate(name, parameters=1, task="classification", loss_zero=loss + 0.5, loss_few=loss,
                         metric_name="accuracy", metric_zero=metric - 0.1, metric_few=metric,
                         memory_mib={"lora": lora_mib}, tokens_per_s=tps)

    ranked = rank([cand("big", 0.9, 1.0, 50_000), cand("a", 0.7, 2.0, 100), cand("b", 0.7, 1.5, 100, tps=400),
                   Candidate("broken", error="not found")], available_mib=1_000, method="lora")
    assert [c.name for c in ranked] == ["b", "a", "big", "broken"]
    assert [c.rank for c in ranked] == [1, 2, 3, 4]
    assert any("more than 80%" in r for r in ranked[2].reasons)  # big does not fit
    assert any("examples help" in r for r in ranked[0].reasons)
    assert any("0.25x the fastest" in r for r in ranked[1].reasons)


def test_classification_rows_become_label_questions_and_shots_are_not_scored():
    shots, rows, task, labels = read_validation(str(shared("classification", "sst2", "test.jsonl")), 2, 12)
    assert task == "classification" and labels == ["negative", "positive"]
    assert len(shots) == 2 and len(rows) == 12 and not {s.id for s in shots} & {r.id for r in rows}
    assert "Classify the text" in rows[0].messages[0].content and rows[0].messages[1].content in labels


def test_too_few_rows_is_a_user_error(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"instruction": "hi", "output": "hello"}\n')
    with pytest.raises(UserError, match="need more than --shots 3"):
        read_validation(str(path), 3, 10)


@pytest.mark.slow
def test_select_scores_and_ranks_two_candidates_and_reports_a_missing_one(tmp_path, capsys):
    data = shared("classification", "sst2", "test.jsonl")
    out = tmp_path / "ranking.json"
    req = SelectRequest(candidates=["tiny-random-llama", str(tmp_path / "missing-model")], data=str(data), shots=2,
                        limit=6, max_length=32, batch_size=2, out=str(out), memory_methods=("lora",))
    ranked = select_model(req)
    assert [c.name for c in ranked][0] == "tiny-random-llama" and ranked[1].error
    c = ranked[0]
    assert c.metric_name == "accuracy" and 0 <= c.metric_zero <= 1 and 0 <= c.metric_few <= 1
    assert c.loss_zero > 5  # a random model: near log(vocab) per label token
    assert c.parameters > 3_000_000 and c.memory_mib["lora"] > 1 and c.tokens_per_s > 0
    saved = json.loads(out.read_text())
    assert saved[0]["name"] == "tiny-random-llama" and saved[0]["rank"] == 1
    printed = capsys.readouterr().out
    assert "ranked" in printed and "1. tiny-random-llama" in printed


@pytest.mark.real_model
@pytest.mark.extended  # 30 s: -m extended (make test's 15 minutes, with llama.cpp's build and tests in them)
def test_smollm2_outranks_a_random_model_on_real_instructions(tmp_path):
    data = shared("instruct", "llamafactory_demo", "alpaca_en_demo.json")
    req = SelectRequest(candidates=["tiny-random-llama", "smollm2-135m-instruct"], data=str(data), shots=1, limit=4,
                        max_length=32, batch_size=1, max_new_tokens=8, memory_methods=("lora",),
                        out=str(tmp_path / "r.json"))
    select_model(req)
    ranked = json.loads((tmp_path / "r.json").read_text())
    assert ranked[0]["name"] == "smollm2-135m-instruct"
    assert ranked[0]["loss_few"] < ranked[1]["loss_few"] - 3  # a trained model vs ~log(49152)
