"""Streaming readers and writers of every format, and the bounded-memory pieces of the workbench."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.data import formats, jsonread
from tunelab.data.dedup import NearDupIndex, dedup_key
from tunelab.data.formats import open_source, read_records
from tunelab.data.inspect import Lengths, inspect_file
from tunelab.data.split import assign, assign_codes
from tunelab.data.stream import RowWriter
from tunelab.errors import UserError

ROWS = [
    {"instruction": "Say [hi], {please}", "input": "", "output": "hi, \"friend\" ]"},
    {"instruction": "翻译：你好，世界", "input": "中文", "output": "Hello, world"},
    {"instruction": "escape \\ and \u2028 and emoji 😀", "input": "x", "output": "y"},
    {"instruction": "numbers", "input": "12345678901234567890", "output": "3.25e10", "weight": 2.5},
] * 3


def test_json_array_streams_element_by_element_across_chunk_boundaries(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    for chunk in (3, 7, 64, 1 << 20):  # elements split anywhere, even inside strings and escapes
        assert [r for _, r in jsonread.iter_json_array(path, None, chunk=chunk)] == ROWS
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1234567, 89, {\"a\": 1}]")
    assert [r for _, r in jsonread.iter_json_array(numbers, None, chunk=3)] == [1234567, 89, {"a": 1}]
    assert [r for _, r in jsonread.iter_json_array(path, 5, chunk=7)] == ROWS[:5]
    # the workbench's reader gives the same records as the whole-file reader
    src = open_source(path)
    assert src.format == "alpaca"
    assert [i.record for i in src.items()] == read_records(path).records


@pytest.mark.parametrize(("text", "message"), [
    ("[]", "the JSON list is empty"),
    ('[{"a": 1}, {"a": 2]', "element 1"),
    ('[{"a": 1} {"a": 2}]', "expected ',' or ']'"),
    ('[{"a": 1},', "element 1"),
    ('[{"a": "unterminated}]', "element 0"),
])
def test_json_array_syntax_errors_are_one_line_user_errors(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match="bad.json") as err:
        list(jsonread.iter_json_array(path, None, chunk=4))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_json_lines_saved_as_json_still_reads(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    assert [i.raw for i in open_source(path).items()] == ROWS[:3]


def test_csv_and_parquet_stream_like_the_whole_file_readers(tmp_path, monkeypatch):
    rows = [{k: str(v) for k, v in r.items()} for r in ROWS]
    c = tmp_path / "rows.csv"
    with c.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[3]))
        w.writeheader()
        w.writerows(rows)
    assert [i.raw for i in open_source(c).items()] == [{**{"weight": ""}, **r} for r in rows]
    assert [i.record for i in open_source(c).items()] == read_records(c).records
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet", row_group_size=5)
    p = tmp_path / "rows.parquet"
    got = [r for _, r in formats._stream_parquet(p, None, batch_size=4)]  # several batches and row groups
    assert got == pa.Table.from_pylist(ROWS).to_pylist()
    assert [r for _, r in formats._stream_parquet(p, 6, batch_size=4)] == got[:6]
    assert [i.record for i in open_source(p).items()] == read_records(p).records
    (tmp_path / "header.csv").write_text("instruction,output\n")
    with pytest.raises(UserError, match="header but no rows"):
        list(open_source(tmp_path / "header.csv", format="alpaca").items())


def test_writers_stream_csv_and_parquet_with_unified_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(RowWriter, "batch_rows", 3)  # several batches, one schema
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": None}, {"text": "c"}, {"text": "d", "label": 2},
            {"text": "e", "label": 3, "tags": ["x", "y"]}, {"text": "f", "label": None}, {"text": "g", "label": 4}]
    for ext in (".csv", ".parquet"):
        path = tmp_path / f"out{ext}"
        with RowWriter(path) as w:
            for r in rows:
                w.write(r)
        assert w.count == len(rows)
        back = [i.raw for i in open_source(path, format="classification").items()]
        if ext == ".parquet":
            assert back == [{"text": r["text"], "label": r.get("label"), "tags": r.get("tags")} for r in rows]
        else:
            assert [b["text"] for b in back] == list("abcdefg") and back[4]["tags"] == '["x", "y"]'
            assert back[2]["label"] == "" and back[3]["label"] == "2"
    with pytest.raises(UserError, match="cannot hold together"):  # one column, two types
        with RowWriter(tmp_path / "mixed.parquet") as w:
            w.write({"label": 1})
            w.write({"label": {"a": 1}})
    with pytest.raises(UserError, match="output is the input"):
        RowWriter(tmp_path / "out.csv", protect=[tmp_path / "out.csv"])
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_length_histogram_gives_numpy_percentiles():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 999):
        values = rng.integers(0, 40, n)
        h = Lengths()
        for part in np.array_split(values, 3):
            h.add(part)
        st = h.summary()
        assert [st["p50"], st["p90"], st["p99"]] == pytest.approx(np.percentile(values, [50, 90, 99]).tolist())
        assert st["max"] == values.max() and st["n"] == n and h.share_over(20) == pytest.approx((values > 20).mean())


def test_inspect_counts_fields_and_duplicates_streaming(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(400)]
    rows = [{"text": " ".join(rng.choice(words, 16)), "label": i % 3} for i in range(40)]  # distinct rows
    rows += rows[:4] + [{**r, "text": r["text"] + " indeed"} for r in rows[10:13]]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = inspect_file(path, chunk=8)
    assert rep["exact_duplicates"] == 4 and rep["near_duplicates"] == 3
    assert rep["fields"] == {"text": 47, "label": 47} and rep["labels"] == {"0": 17, "1": 15, "2": 15}
    assert rep["chars"]["user"]["n"] == 47


def test_near_index_verifies_in_chunks_with_the_same_clusters():
    texts = [dedup_key(f"the {w} quick brown fox jumps over the lazy dog number {i % 7}")
             for i, w in enumerate(["red", "red", "blue", "red", "green"] * 6)]
    results = []
    for chunk in (1, 3, 100_000):
        with NearDupIndex(threshold=0.7, verify_chunk=chunk) as index:
            index.add(texts[:11])
            index.add(texts[11:])
            results.append(index.clusters())
    for root, sim in results[1:]:
        assert np.array_equal(root, results[0][0]) and np.allclose(sim, results[0][1])
    assert (results[0][0] != np.arange(len(texts))).sum() > 0


def test_numpy_assignment_keeps_groups_and_class_shares():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 2000)
    groups = np.arange(2000)
    groups[1::5] = groups[0::5][: len(groups[1::5])]  # pairs of rows share a group
    which = assign_codes(labels, groups, [0.7, 0.15, 0.15], seed=0)
    for g in np.unique(groups):
        assert len(set(which[groups == g].tolist())) == 1
    single = assign_codes(labels, np.arange(2000), [0.7, 0.15, 0.15], seed=0)
    for c in range(4):
        n = (labels == c).sum()
        for k, r in enumerate((0.7, 0.15, 0.15)):
            assert abs(((labels == c) & (single == k)).sum() - r * n) <= 1
    assert np.array_equal(assign([str(x) for x in labels], np.arange(2000), [0.7, 0.15, 0.15], 0), single)
    assert not np.array_equal(assign_codes(labels, np.arange(2000), [0.7, 0.15, 0.15], seed=1), single)


@pytest.mark.parametrize("tail", ['[{"a": 3}]', "garbage", ", {\"a\": 3}]"])
def test_json_array_text_after_the_closing_bracket_is_an_error(tmp_path, tail):
    path = tmp_path / "two.json"
    head = '[{"a": 1}, {"a": 2}]'
    path.write_text(head + tail)
    for chunk in (4, 1 << 20):
        with pytest.raises(UserError, match=rf"two.json: unexpected data after the JSON array at byte {len(head)} "):
            list(jsonread.iter_json_array(path, None, chunk=chunk))
