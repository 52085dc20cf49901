"""Continued pre-training rows and generative classification, end to end on tiny-random-llama."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import shared
from tunelab.config import load_config
from tunelab.data.batching import IGNORE, collate
from tunelab.data.tasks import pretrain_rows
from tunelab.train.recipe import fine_tune


def run(tmp_path: Path, cfg: dict):
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    return fine_tune(config, sources)


def test_pretrain_rows_join_documents_and_target_every_token():
    eos = 0
    docs = [[11, 12, 13, eos], [21, 22, eos], [31, 32, 33, 34, 35, 36, eos], [41, 42, eos]]
    rows = pretrain_rows(docs, max_length=5)
    stream = [t for d in docs for t in d]
    assert [t for r in rows for t in r.input_ids] == stream  # nothing lost, nothing reordered
    assert [len(r) for r in rows] == [5, 5, 5, 2]
    assert rows[0].input_ids == (11, 12, 13, eos, 21) and rows[0].segments == (4, 1)
    assert rows[1].input_ids == (22, eos, 31, 32, 33) and rows[1].segments == (2, 3)  # doc 2 spans two rows
    for r in rows:  # every token a target, except the row's first (nothing before it)
        assert r.labels[0] == IGNORE and r.labels[1:] == r.input_ids[1:]
        assert r.n_targets == len(r) - 1
    # the packed collate restarts positions at each document: no attention across documents
    batch = collate(rows[:2], pad_id=eos, packed=True)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2]


def test_pretrain_run_on_c4(tmp_path):
    c4 = shared("instruct", "llamafactory_demo", "c4_demo.jsonl")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    cfg = {
        "task": "pretrain",
        "run": {"name": "pt", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(c4), "limit": 12}, {"path": str(chat)}], "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 3, "precision": "fp32", "seed": 0},
    }
    out = run(tmp_path, cfg)
    data = json.loads((out.run_dir / "data.json").read_text())
    from tunelab.models.load import load_tokenizer

    tok = load_tokenizer("tiny-random-llama")
    texts = [json.loads(line)["text"] for line in c4.read_text().splitlines()[:12]]
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + eos each
    assert data["task"] == "pretrain" and data["documents"] == 12
    assert data["train_tokens"] == n_tokens
    assert data["train_rows"] == -(-n_tokens // 64)
    assert data["train_target_tokens"] == n_tokens - data["train_rows"]
    assert data["rejected_by_reason"] == {"not_text": 1}  # the chat row is reported, not silently dropped
    assert out.summary["step"] == 3


def test_generative_classification_end_to_end_on_thucnews(tmp_path):
    thuc = shared("classification", "thucnews_headlines")
    cfg = {
        "task": "generative_classification",
        "run": {"name": "gen", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(thuc / "train.jsonl"), "limit": 40}],
                 "eval": [{"path": str(thuc / "test.jsonl"), "limit": 12}], "max_length": 160},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "classification": {"prompt": "Labels: {labels}\nHeadline: {text}"},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 4, "eval_every": 2, "precision": "fp32", "seed": 0},
    }
    out = run(tmp_path, cfg)
    rows = [json.loads(line) for line in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:  # answers were generated, parsed against the 10 labels and scored
        assert e["n"] == 12 and 0.0 <= e["accuracy"] <= 1.0 and "macro_f1" in e
        assert len(e["per_class_f1"]) == 10 and 0 <= e["n_unparsed"] <= 12
    data = json.loads((out.run_dir / "data.json").read_text())
    labels = list(data["labels"])
    assert len(labels) == 10 and out.summary["eval_metrics"]["step"] == 4

    # the records became chats: user = the prompt listing every label, assistant = the label only
    from tunelab.data.formats import read_records
    from tunelab.data.tasks import generative_records

    recs = read_records(str(thuc / "train.jsonl"), limit=2).records
    chat = generative_records(recs, labels, "Labels: {labels}\nHeadline: {text}")[0]
    assert chat.messages[0].content == f"Labels: {', '.join(labels)}\nHeadline: {recs[0].messages[0].content}"
    assert chat.messages[1].role == "assistant" and chat.messages[1].content == recs[0].label
