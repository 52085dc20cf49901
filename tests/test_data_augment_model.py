"""Model-based augmentation (paraphrase, back-translation) with a real local causal LM.

tiny-random-llama writes nonsense, but the mechanics are the ones a real model goes through:
the model is called once per paraphrase and twice per back-translation, its reply becomes the
row's text, augmented rows are marked with their source, and they never reach validation/test.
"""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from tunelab.data.augment import PARAPHRASE, TRANSLATE, ModelRewriter, augment_file
from tunelab.data.settings import AugmentSettings, SplitSettings
from tunelab.data.split import split_file

ROWS = [{"text": f"the room {i} was {'clean and quiet' if i % 2 else 'noisy, dirty and cold'}", "label": i % 2}
        for i in range(12)]


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def spy(monkeypatch):
    """Every (prompt, reply) the model gives, in call order (the real model still answers)."""
    calls: list[tuple[str, str]] = []
    real = ModelRewriter.ask

    def ask(self, prompt):
        reply = real(self, prompt)
        calls.append((prompt, reply))
        return reply

    monkeypatch.setattr(ModelRewriter, "ask", ask)
    return calls


def test_paraphrase_and_backtranslate_call_the_model_and_mark_rows(tmp_path, spy):
    src = tmp_path / "in.jsonl"
    rows = ROWS[:6]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    s = AugmentSettings(ops=["paraphrase", "backtranslate"], model="tiny-random-llama", temperature=1.0,
                        max_new_tokens=4, pivot="German", seed=7)
    rep = augment_file(src, tmp_path / "aug.jsonl", s)
    assert rep["model_calls"] == len(spy) == 6 + 2 * 6  # one call per paraphrase, two per back-translation
    out = _read(tmp_path / "aug.jsonl")
    assert out[:6] == rows  # the originals first, untouched
    aug = out[6:]
    assert rep["augmented_rows"] == len(aug) == 12 and rep["by_op"] == {"paraphrase": 6, "backtranslate": 6}
    replies = iter(spy)
    for i, row in enumerate(rows):  # file order: per source row, its paraphrase then its back-translation
        para, back = aug[2 * i], aug[2 * i + 1]
        prompt, reply = next(replies)
        assert prompt == PARAPHRASE.format(text=row["text"]) and para["text"] == reply != row["text"]
        there_prompt, there = next(replies)
        assert there_prompt == TRANSLATE.format(language="German", text=row["text"])
        back_prompt, back_reply = next(replies)
        assert back_prompt == TRANSLATE.format(language="English", text=there) and back["text"] == back_reply
        for new, op in ((para, "paraphrase"), (back, "backtranslate")):
            assert new["augmented"] == op and new["label"] == row["label"]  # the label is kept
            assert new["source_id"] == f"in.jsonl:{i}" and new["source_row"] == i
    again = ModelRewriter.from_settings(s)  # seeded sampling: the same reply to the same first call
    assert again.paraphrase(rows[0]["text"]) == aug[0]["text"]

    split = split_file(tmp_path / "aug.jsonl", tmp_path / "split", SplitSettings(ratios=[0.5, 0.25, 0.25], seed=1))
    train = _read(split.outputs["train"])
    for other in ("val", "test"):
        assert _read(split.outputs[other]) and not any(r.get("augmented") for r in _read(split.outputs[other]))
    in_train = {r["text"] for r in train if not r.get("augmented")}
    kept = [r for r in train if r.get("augmented")]
    assert all(rows[r["source_row"]]["text"] in in_train for r in kept)  # only augmented copies of train rows
    assert len(kept) == 2 * len(in_train) and len(kept) + split.augmented_dropped == 12


def test_an_empty_model_reply_never_becomes_an_empty_row(tmp_path, spy):
    # greedy decoding of tiny-random-llama yields only newlines: an empty reply after stripping
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]), encoding="utf-8")
    rep = augment_file(src, tmp_path / "aug.jsonl", AugmentSettings(ops=["paraphrase"], model="tiny-random-llama",
                                                                     max_new_tokens=4))
    assert [reply for _, reply in spy] == [""] * 4
    assert rep["augmented_rows"] == 0 and rep["unchanged_skipped"] == {"paraphrase": 4}
    assert _read(tmp_path / "aug.jsonl") == ROWS[:4]


def test_training_config_paraphrases_train_rows_only(tmp_path, spy):
    from tunelab.config import load_config
    from tunelab.data.workbench import prepare_records

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:8]), encoding="utf-8")
    raw = tiny_config(tmp_path, src, data={
        "train": [{"path": str(src)}], "max_length": 64,
        "prepare": {"split": {"ratios": [0.75, 0.25], "group": "none"},
                    "augment": {"ops": ["paraphrase"], "model": "tiny-random-llama", "temperature": 1.0,
                                "max_new_tokens": 5}}})
    cfg, _ = load_config(None, base=raw)
    prep = prepare_records(cfg)
    originals = [r for r in prep.train if "augmented" not in r.meta]
    augmented = [r for r in prep.train if r.meta.get("augmented") == "paraphrase"]
    assert len(originals) + len(prep.eval) == 8 and len(prep.eval) >= 2 and len(spy) == len(originals)
    assert prep.report["augment"] == {"paraphrase": len(originals)}
    assert {r.meta["source_id"] for r in augmented} == {r.id for r in originals}
    assert not any("augmented" in r.meta for r in prep.eval)
    assert {r.messages[0].content for r in augmented} == {reply for _, reply in spy}
