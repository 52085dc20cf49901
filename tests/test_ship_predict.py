"""``tunelab predict`` (batched, resumable, rejects) and ``tunelab chat --compare-base``."""

from __future__ import annotations

import json

import pytest
import torch

from ship_fixtures import ship_runs  # noqa: F401 - the session fixture
from tunelab.cli import main
from tunelab.errors import UserError
from tunelab.ship.inference import base_only, classify, generate_batch, generate_reply, load_for_inference
from tunelab.ship.predict import predict

ROWS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]},
    "not an object",
    {"prompt": "Count to three."},
    {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    {"question": "no usable field"},
    {"instruction": "Give a tip.", "input": "about sleep"},
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_writes_inputs_and_generations_and_resumes_after_a_kill(ship_runs, tmp_path):  # noqa: F811
    data, out = tmp_path / "in.jsonl", tmp_path / "pred.jsonl"
    write_jsonl(data, ROWS)
    assert main(["predict", str(ship_runs["lora"]), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--max-new-tokens", "6"]) == 0
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["reference"] == "Blue." and rows[0]["messages"] == [{"role": "user", "content": "Name a colour."}]
    assert rows[3]["reference"] == "4" and rows[3]["messages"][-1]["content"] == "What is 2+2?"
    rejects = read_jsonl(tmp_path / "pred.jsonl.rejects.jsonl")
    assert [(r["row"], r["reason"]) for r in rejects] == [(2, "wrong_type"), (5, "bad_row")]
    # the generations are the model's greedy replies to exactly these chats
    loaded = load_for_inference(ship_runs["lora"])
    assert [r["generation"] for r in rows] == generate_batch(loaded, [r["messages"] for r in rows], max_new_tokens=6)

    # a kill while writing the 4th row: two full lines and a torn one remain; the re-run continues
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:17])
    summary = predict(ship_runs["lora"], data, out, batch_size=2, max_new_tokens=6, loaded=loaded,
                      show_progress=False)
    assert (summary.done_before, summary.written, summary.rows, summary.rejected) == (3, 2, 5, 2)
    assert out.read_text() == full
    again = predict(ship_runs["lora"], data, out, max_new_tokens=6, loaded=loaded, show_progress=False)
    assert again.written == 0 and out.read_text() == full

    write_jsonl(data, ROWS[3:])  # other inputs: the old --out is not continued, nor overwritten
    with pytest.raises(UserError, match="other inputs"):
        predict(ship_runs["lora"], data, out, loaded=loaded, show_progress=False)
    assert out.read_text() == full


@pytest.mark.parametrize("run", ["cls", "cls_lora"])
def test_predict_classification_gives_labels_with_probabilities(ship_runs, tmp_path, run):  # noqa: F811
    data, out = tmp_path / "in.jsonl", tmp_path / "pred.jsonl"
    texts = ["my invoice is wrong", "the site is down again", "hello there", "refund please"]
    write_jsonl(data, [{"text": t, "label": "billing"} for t in texts] + [{"text": "  "}])
    summary = predict(ship_runs[run], data, out, batch_size=3, show_progress=False)
    assert (summary.written, summary.rejected) == (4, 1)
    rows = read_jsonl(out)
    loaded = load_for_inference(ship_runs[run])
    assert loaded.kind == "classification"
    with torch.no_grad():
        enc = loaded.tokenizer(texts[:1], return_tensors="pt")
        direct = torch.softmax(loaded.model(**enc).logits, -1)[0]
    for row, text in zip(rows, texts, strict=True):
        assert row["text"] == text and row["reference"] == "billing"
        assert set(row["probs"]) == {"billing", "outage", "other"}
        assert abs(sum(row["probs"].values()) - 1) < 1e-5
        assert row["label"] == max(row["probs"], key=row["probs"].get) and row["score"] == row["probs"][row["label"]]
    # batched with padding = one at a time, straight through the model
    assert rows[0]["probs"] == pytest.approx({loaded.id2label[i]: p for i, p in enumerate(direct.tolist())}, abs=1e-5)
    assert classify(loaded, texts)[1]["probs"] == pytest.approx(rows[1]["probs"], abs=1e-5)


def test_chat_compare_base_shows_the_base_answer_from_the_same_model(ship_runs, monkeypatch, capsys):  # noqa: F811
    answers = iter(["Say something.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(ship_runs["lora"]), "--compare-base", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    tuned_line = next(line for line in out.splitlines() if line.startswith("tuned> "))
    base_line = next(line for line in out.splitlines() if line.startswith("base>  "))

    loaded = load_for_inference(ship_runs["lora"])
    chat = [{"role": "user", "content": "Say something."}]
    assert tuned_line[7:].strip() == generate_reply(loaded, chat, max_new_tokens=5)
    with base_only(loaded):
        via_disable = generate_reply(loaded, chat, max_new_tokens=5)
    base = load_for_inference("tiny-random-llama")
    assert base_line[7:].strip() == via_disable == generate_reply(base, chat, max_new_tokens=5)
    ids = loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.no_grad(), base_only(loaded):
        base_logits = loaded.model(input_ids=ids).logits
    with torch.no_grad():
        assert not torch.allclose(loaded.model(input_ids=ids).logits, base_logits)  # the adapters matter
        assert torch.allclose(base.model(input_ids=ids).logits, base_logits)

    with pytest.raises(UserError, match="--compare-base needs an adapter run"):
        base_only(load_for_inference(ship_runs["cls"]))
