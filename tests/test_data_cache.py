"""The tokenised-data cache: same inputs -> the same samples from disk; any change -> a new entry."""

from __future__ import annotations

from tunelab.data.cache import encode_records_cached, fingerprint
from tunelab.data.formats import read_records
from tunelab.models.load import load_tokenizer


def test_cache_hit_gives_identical_samples_and_changes_miss(tmp_path, monkeypatch, alpaca_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer("tiny-random-llama")
    records = read_records(alpaca_path, limit=20).records
    settings = {"train_on": "assistant", "max_length": 64, "truncation": "drop"}
    first, rejects1, hit1 = encode_records_cached(records, tok, **settings)
    second, rejects2, hit2 = encode_records_cached(records, tok, **settings)
    assert (hit1, hit2) == (False, True)
    assert [(e.input_ids, e.labels, e.id, e.truncated) for e in first] == [
        (e.input_ids, e.labels, e.id, e.truncated) for e in second
    ]
    assert rejects1 and [r.to_dict() for r in rejects1] == [r.to_dict() for r in rejects2]  # too_long rows
    key = fingerprint(records, tok, settings)
    assert fingerprint(records, tok, {**settings, "max_length": 65}) != key
    assert fingerprint(records[:-1], tok, settings) != key
    tok.chat_template = "{# another template #}" + tok.chat_template  # renders the same, hashes differently
    assert fingerprint(records, tok, settings) != key
    _, _, hit3 = encode_records_cached(records, tok, **settings, use_cache=False)
    assert hit3 is False
