"""Exact / near duplicates and cleaning, on the real shared files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from datasketch import MinHash

from conftest import shared
from tunelab.data.clean import clean_file, mask_pii, normalize_text
from tunelab.data.dedup import MinHasher, dedup_key, near_duplicate_roots, shingle_hash, shingles
from tunelab.data.settings import CleanSettings, ConflictSettings, NormalizeSettings, PiiSettings
from tunelab.errors import UserError


def _rows(path, n):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def _jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = set(shingles(dedup_key(a), k)), set(shingles(dedup_key(b), k))
    return len(sa & sb) / max(len(sa | sb), 1)


def test_vectorised_signatures_equal_datasketch():
    texts = [dedup_key(t) for t in ["Hello, world: a test.", "", "ab", "发改委治理涉企收费每年为企业减负超百亿", "x" * 40]]
    sigs = MinHasher(num_perm=64, k=5, seed=1).signatures(texts)
    for text, sig in zip(texts, sigs, strict=True):
        m = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=shingle_hash)
        for sh in shingles(text, 5):
            m.update(sh)
        assert np.array_equal(m.hashvalues, sig)


@pytest.fixture(scope="module")
def distinct_zh():
    """400 rows of two THUCNews headlines each, no pair above Jaccard 0.5 (checked by brute force)."""
    heads = _rows(shared("classification", "thucnews_headlines", "train.jsonl"), 900)
    rows = [{**a, "text": a["text"] + "，" + b["text"]} for a, b in zip(heads[::2], heads[1::2], strict=True)]
    keep: list[dict] = []
    for r in rows:
        if all(_jaccard(r["text"], k["text"]) < 0.5 for k in keep):
            keep.append(r)
    return keep[:400]


def test_no_false_positives_on_known_distinct_rows(distinct_zh):
    roots = near_duplicate_roots([r["text"] for r in distinct_zh], threshold=0.8)
    assert (roots == np.arange(len(roots))).all()


def test_planted_exact_and_near_duplicates_are_found(tmp_path, distinct_zh):
    rng = random.Random(0)
    rows = [dict(r) for r in distinct_zh[:300]]
    planted = {}
    for src in rng.sample(range(300), 40):
        text = rows[src]["text"]
        kind = "exact" if src % 2 else "near"
        if kind == "near":  # a source tag added, spacing and punctuation noise
            text = "  " + text.replace("，", " , ") + rng.choice(["（图）", "|新华网", "(组图)", "--转载"])
            assert _jaccard(text, rows[src]["text"]) >= 0.88
        rows.append({**rows[src], "text": text})
        planted[len(rows) - 1] = (src, kind)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    before = path.read_bytes()
    report = clean_file(path, tmp_path / "out.jsonl", CleanSettings(conflicts=None))
    assert path.read_bytes() == before  # the input is never modified
    removed = {r["row"]: r for r in map(json.loads, (tmp_path / "out.removed.jsonl").read_text().splitlines())}
    missing = {r: planted[r] for r in set(planted) - set(removed)}
    assert set(removed) == set(planted), missing  # every planted copy, nothing else
    for row, (src, kind) in planted.items():
        assert removed[row]["duplicate_of"] == f"in.jsonl:{src}"
        assert removed[row]["reason"] == ("exact_duplicate" if kind == "exact" else "near_duplicate")
    assert report.rows_written == 300
    assert report.steps["normalize"]["changed"] >= 20  # the planted leading spaces were stripped


def test_clean_on_english_instructions_and_conflicts(tmp_path):
    rows = _rows(shared("classification", "sst2", "train.jsonl"), 200)
    rows += [{**rows[0], "label": 1 - rows[0]["label"], "label_text": "x"}, dict(rows[0])]
    rows.append({**rows[3], "label": 1 - rows[3]["label"], "label_text": "y"})  # 1 against 1: a tie
    path = tmp_path / "sst.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = clean_file(path, tmp_path / "maj.jsonl", CleanSettings(conflicts=ConflictSettings(policy="majority")))
    removed = [json.loads(x) for x in (tmp_path / "maj.removed.jsonl").read_text().splitlines()]
    reasons = {(x["row"], x["reason"]) for x in removed}
    assert (200, "conflict_minority") in reasons  # 2 votes against 1 for row 0's label
    assert {(3, "conflict_tie"), (202, "conflict_tie")} <= reasons
    assert r.steps["conflicts"]["removed"] == 3
    flag = clean_file(path, tmp_path / "flag.jsonl", CleanSettings(conflicts=ConflictSettings(policy="flag")))
    assert flag.conflict_groups == 2 and flag.conflicts_file


def test_normalize_and_pii():
    s = NormalizeSettings()
    assert normalize_text("ＡＢＣ１２３&amp;<br>next<b>bold</b>\x07  \n\n\n\nend ", s) == "ABC123&\nnextbold\n\nend"
    assert normalize_text("List<String> x = a < b;", s) == "List<String> x = a < b;"  # code survives
    text = "mail me: zhang.san@example.com.cn, 手机 13812345678 或 +86 138-1234-5678, 身份证 11010519491231002X, (415) 555-2671"
    out = mask_pii(text, PiiSettings())
    assert "[EMAIL]" in out and out.count("[PHONE]") == 3 and "[ID_NUMBER]" in out
    assert "11010519491231002" not in out and "5678" not in out
    assert mask_pii("订单号 110105194912310021", PiiSettings()) == "订单号 110105194912310021"  # bad checksum


def test_output_over_input_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "hello", "label": 1}\n')
    with pytest.raises(UserError, match="the input is never modified"):
        clean_file(path, path)
