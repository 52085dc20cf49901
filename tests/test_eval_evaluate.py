"""`tunelab eval`: classification (heads; generative constrained and generated), generation, lm,
baselines in the same table, the eval: config section and the after-training hook."""

from __future__ import annotations

import json

import pytest
import yaml

from eval_fixtures import make_lora_run, write_chat_data, write_classification_data, write_run_files
from tunelab.errors import ConfigError, UserError
from tunelab.eval.evaluate import EvalRequest, evaluate
from tunelab.eval.generate import GenerationSettings

LABELS = ["positive", "negative", "neutral"]


def test_generative_classification_with_baselines(tmp_path):
    data = write_classification_data(tmp_path / "cls.jsonl", n=6)
    run = make_lora_run(tmp_path / "runs" / "cls", data)
    req = EvalRequest(data=[str(data)], baselines=True, few_shot=2, generation=GenerationSettings(max_new_tokens=2))
    [doc] = evaluate(run, req)
    assert doc["task"] == "classification" and doc["data"]["labels"] == sorted(LABELS)
    assert list(doc["systems"]) == ["tuned", "base 0-shot", "base 2-shot", "tfidf-lr"]
    assert doc["systems"]["tfidf-lr"]["metrics"]["primary"] == "tfidf" and "versus_baseline" in doc
    for name, system in doc["systems"].items():
        if name == "tfidf-lr":  # the classical baseline (tests/test_eval_baseline.py)
            continue
        m = system["metrics"]
        for mode in ("constrained", "generated"):  # side by side
            assert set(m[mode]["per_class"]) == set(LABELS) and m[mode]["n"] == 6
            assert sum(map(sum, m[mode]["confusion"])) == 6
        assert m["constrained"]["n_unparsed"] == 0  # constrained scoring always names a label
        assert system["headline"]["accuracy"] == m["generated"]["accuracy"]
    rows = [json.loads(x) for x in (run / "eval" / "cls.examples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["system"] for r in rows} == set(doc["systems"])
    assert all(r["constrained"] in LABELS and r["score"] in (0.0, 1.0) for r in rows if r["system"] != "tfidf-lr")
    assert json.loads((run / "eval" / "cls.json").read_text())["settings"]["few_shot"] == 2


def test_generation_and_lm_on_a_plain_model(tmp_path):
    data = write_chat_data(tmp_path / "chat.jsonl", n=4)
    out = tmp_path / "out"
    req = EvalRequest(data=[str(data)], task="generation", generation=GenerationSettings(max_new_tokens=4))
    [gen] = evaluate("tiny-random-llama", req, out_dir=out)
    m = gen["systems"]["model"]["metrics"]
    assert {"exact_match", "f1", "bleu", "rouge1", "rouge2", "rougeL", "chrf"} <= set(m) and m["n"] == 4
    [lm] = evaluate("tiny-random-llama", EvalRequest(data=[str(data)], task="lm"), out_dir=out)
    m = lm["systems"]["model"]["metrics"]
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6) and 0 <= m["token_accuracy"] <= 1
    assert m["loss"] > 5  # a random model over a 49k vocabulary
    with pytest.raises(UserError, match="not a run directory"):
        evaluate("tiny-random-llama", EvalRequest(data=[str(data)], baselines=True), out_dir=out)
    with pytest.raises(UserError, match="nothing to evaluate"):
        evaluate("tiny-random-llama", EvalRequest(), out_dir=out)


def test_eval_cli_errors_are_one_line(capsys):
    from tunelab.cli import main

    assert main(["eval", "tiny-random-llama"]) == 2
    err = capsys.readouterr().err
    assert "nothing to evaluate" in err and "Traceback" not in err
    assert main(["eval", "tiny-random-llama", "--benchmark", "/nonexistent/mmlu.zip"]) == 2
    assert "benchmark not found" in capsys.readouterr().err


def test_classification_head_run_reports_per_class_metrics(tmp_path):
    """A run whose final/ is a sequence-classification model with id2label (the heads' hand-off)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.load import load_model, load_tokenizer

    data = write_classification_data(tmp_path / "cls.jsonl", n=6)
    run = write_run_files(tmp_path / "runs" / "head", data=str(data), method="head")
    tok = load_tokenizer("tiny-random-llama")
    cfg = load_model("tiny-random-llama").config
    cfg.id2label, cfg.label2id = dict(enumerate(LABELS)), {v: k for k, v in enumerate(LABELS)}
    torch.manual_seed(0)
    head = AutoModelForSequenceClassification.from_config(cfg)
    head.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    (run / "final" / "tunelab.json").write_text(json.dumps({"base_model": "tiny-random-llama", "method": "head",
                                                            "task": "classification"}))
    [doc] = evaluate(run, EvalRequest(data=[str(data)]))
    m = doc["systems"]["tuned"]["metrics"]
    assert m["primary"] == "head" and set(m["head"]["per_class"]) == set(LABELS)
    assert doc["systems"]["tuned"]["headline"]["accuracy"] == m["head"]["accuracy"]
    with pytest.raises(UserError, match="classification head"):
        evaluate(run, EvalRequest(data=[str(data)], task="generation"))


def test_eval_config_section_is_strict(tmp_path):
    from tunelab.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": "x.jsonl"}]},
                                    "eval": {"data": ["t.jsonl"], "baselnes": True,
                                             "benchmarks": [{"path": "m.zip", "kshot": 1}]}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "eval.baselnes: unknown key. Remove it; did you mean 'baselines'?" in text
    assert "eval.benchmarks.0.kshot: unknown key" in text and "k_shot" in text


def test_training_runs_the_eval_section_then_reports(tmp_path):
    """The recipe's hook: evaluation, report and MLflow after training, as eval: says."""
    from conftest import tiny_config
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    cfg = tiny_config(tmp_path, data, train={"max_steps": 1, "batch_size": 4, "grad_accum": 1},
                      eval={"data": [str(data)], "task": "lm", "report": True})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = fine_tune(*load_config(path))
    doc = json.loads((out.run_dir / "eval" / "chat.json").read_text())
    assert doc["task"] == "lm" and doc["systems"]["tuned"]["metrics"]["tokens"] > 0
    page = (out.run_dir / "report.html").read_text()
    assert "Before vs after" in page and "perplexity" in page
