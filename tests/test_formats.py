"""Readers: real data in every format, CSV/Parquet, column mapping, and the bad-file corpus."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.data.formats import read_records, summarize_rejects, write_rejects
from tunelab.data.records import Message
from tunelab.errors import UserError

HERE = Path(__file__).resolve().parent
BAD = HERE / "data" / "bad"
GOOD = HERE / "data" / "good"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO = SHARED / "instruct" / "llamafactory_demo"

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared data not found at {SHARED} (only present on developer/CI machines)"
)


def roles(record) -> list[str]:
    return [m.role for m in record.messages]


# --------------------------------------------------------------------------- real data


@needs_shared
def test_alpaca_en_demo():
    result = read_records(DEMO / "alpaca_en_demo.json")
    assert (result.format, result.rows, len(result.records), result.rejects) == ("alpaca", 999, 999, [])
    first = result.records[0]
    assert first.id == "alpaca_en_demo.json:0"
    assert first.source == str(DEMO / "alpaca_en_demo.json")
    assert roles(first) == ["user", "assistant"]
    assert first.messages[0].content == "Describe a process of making crepes."
    assert first.messages[1].content.startswith("Making crepes is an easy and delicious process!")
    # a non-empty input is joined to the instruction with a newline
    raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())
    k = next(i for i, row in enumerate(raw) if row["input"])
    assert result.records[k].messages[0].content == raw[k]["instruction"] + "\n" + raw[k]["input"]
    assert sum(1 for row in raw if row["input"]) == 412


@needs_shared
def test_sharegpt_with_tools():
    result = read_records(DEMO / "glaive_toolcall_en_demo.json")
    assert (result.format, len(result.records), len(result.rejects)) == ("sharegpt", 300, 0)
    first = result.records[0]
    assert roles(first) == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert first.messages[3].content.startswith('{"name": "search_recipes"')  # function_call → assistant
    assert json.loads(first.tools)[0]["name"] == "search_recipes"
    turns = Counter(m.role for r in result.records for m in r.messages)
    assert turns == {"user": 746, "assistant": 746 + 211, "tool": 211}


@needs_shared
def test_messages_with_text_parts():
    result = read_records(DEMO / "v1_sft_demo.jsonl")
    assert (result.format, len(result.records), len(result.rejects)) == ("messages", 500, 0)
    first = result.records[0]
    assert first.messages == (
        Message("user", "hi"),
        Message(
            "assistant",
            "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?",
        ),
    )


@needs_shared
def test_text_jsonl_and_txt():
    c4 = read_records(DEMO / "c4_demo.jsonl")
    assert (c4.format, len(c4.records), len(c4.rejects)) == ("text", 300, 0)
    assert all(r.is_text and r.messages == () for r in c4.records)
    assert c4.records[0].text.startswith("Don’t think you need all the bells and whistles?")

    wiki = read_records(DEMO / "wiki_demo.txt")
    lines = (DEMO / "wiki_demo.txt").read_text().splitlines()
    assert (wiki.format, wiki.rows, len(wiki.records), len(wiki.rejects)) == ("text", 30, 30, 0)
    assert wiki.records[0].text == lines[0]
    assert all(lines[int(r.id.split(":")[1])] == r.text for r in wiki.records)


@needs_shared
def test_oaast_history_becomes_turns():
    result = read_records(SHARED / "instruct" / "oaast_sft_zh" / "oaast_sft_zh.json")
    assert (result.format, len(result.records), len(result.rejects)) == ("alpaca", 689, 0)
    turns = Counter(len(r.messages) for r in result.records)
    assert turns == {2: 299, 4: 331, 6: 59}  # 390 multi-turn
    record = result.records[25]
    assert roles(record) == ["user", "assistant"] * 3
    assert record.messages[0].content == "有哪些关于雪的古诗词？"
    assert record.messages[-1].content == "我是一个AI，没有特别的喜好。"


@needs_shared
def test_classification_sst2():
    result = read_records(SHARED / "classification" / "sst2" / "train.jsonl")
    assert (result.format, len(result.records), len(result.rejects)) == ("classification", 4000, 0)
    first = result.records[0]
    assert (first.text, first.label, first.messages) == (None, "positive", (Message("user", "a bonus"),))
    assert Counter(r.label for r in result.records) == {"positive": 2231, "negative": 1769}


@needs_shared
def test_limit_and_forced_format_mismatch():
    assert read_records(DEMO / "alpaca_en_demo.json", limit=10).rows == 10
    assert len(read_records(DEMO / "c4_demo.jsonl", limit=7).records) == 7
    with pytest.raises(UserError, match=r"c4_demo.jsonl: no row has the fields format 'alpaca' needs") as err:
        read_records(DEMO / "c4_demo.jsonl", format="alpaca")
    assert "\n" not in str(err.value) and "columns:" in str(err.value)


# --------------------------------------------------------------------------- the good corpus


def test_good_alpaca_system_and_history():
    result = read_records(GOOD / "alpaca.json")
    assert len(result.records) == 3 and not result.rejects
    assert result.records[1].messages == (
        Message("system", "You are a translator."),
        Message("user", "Translate to German.\nGood morning"),
        Message("assistant", "Guten Morgen."),
    )
    assert [m.content for m in result.records[2].messages] == [
        "Name the first Greek letter.", "Alpha.", "And the second?", "Beta.", "And the third?", "Gamma.",
    ]  # fmt: skip


def test_good_sharegpt_system_tools_and_roles():
    result = read_records(GOOD / "sharegpt.json")
    first, second = result.records
    assert roles(first) == ["system", "user", "assistant", "tool", "assistant"]
    assert first.messages[0].content == "You are a weather bot."
    assert json.loads(first.tools)[0]["name"] == "get_weather"
    assert roles(second) == ["user", "assistant"] and second.tools is None


def test_good_messages_parts_tool_calls_and_tools_value():
    first, second = read_records(GOOD / "messages.jsonl").records
    assert first.messages[1].content == "Two parts:\njoin them"
    assert roles(second) == ["user", "assistant", "tool", "assistant"]
    assert json.loads(second.messages[1].content) == [{"name": "now", "arguments": "{}"}]
    assert json.loads(second.tools)[0]["function"]["name"] == "now"  # a JSON value is kept as a JSON string


def test_good_text_and_classification():
    text = read_records(GOOD / "text.txt")
    assert [r.id for r in text.records] == ["text.txt:0", "text.txt:2"]
    labels = read_records(GOOD / "classification.jsonl").records
    assert [r.label for r in labels] == ["positive", "0"]  # label_text wins, else str(label)


def test_columns_rename_nested_keys():
    cols = {"conversations": "dialog", "from": "speaker", "value": "utterance"}
    result = read_records(GOOD / "renamed.jsonl", columns=cols)
    assert result.format == "sharegpt"
    assert result.records[0].messages == (Message("user", "Ping?"), Message("assistant", "Pong."))
    with pytest.raises(UserError, match="renamed.jsonl: cannot tell the data format"):
        read_records(GOOD / "renamed.jsonl")
    with pytest.raises(UserError, match="data.columns: unknown canonical field .got 'answer'"):
        read_records(GOOD / "renamed.jsonl", columns={"answer": "output"})


def test_columns_rename_role_and_content(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"turns": [{"who": "user", "said": "Hi"}, {"who": "assistant", "said": "Hello"}]}
    path.write_text(json.dumps(row) + "\n")
    cols = {"messages": "turns", "role": "who", "content": "said"}
    result = read_records(path, format="messages", columns=cols)
    assert result.records[0].messages == (Message("user", "Hi"), Message("assistant", "Hello"))


# --------------------------------------------------------------------------- CSV and Parquet


def test_csv_alpaca_with_columns_and_json_history(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(
        "question,context,answer,history\n"
        "What is 2+2?,,4,\n"
        '"Say ""hi"", please",,"Hi, there",\n'
        'And 3+3?,,6,"[[""What is 1+1?"", ""2""]]"\n'
        "Empty answer?,,,\n",
        encoding="utf-8",
    )
    cols = {"instruction": "question", "input": "context", "output": "answer"}
    result = read_records(path, columns=cols)
    assert (result.format, result.rows, len(result.records)) == ("alpaca", 4, 3)
    assert result.records[1].messages[0].content == 'Say "hi", please'
    assert [m.content for m in result.records[2].messages] == ["What is 1+1?", "2", "And 3+3?", "6"]
    assert [(r.row, r.reason) for r in result.rejects] == [(3, "empty_response")]


def test_csv_classification(tmp_path):
    path = tmp_path / "cls.csv"
    path.write_text("sentence,y\ngreat,1\nawful,0\n", encoding="utf-8")
    result = read_records(path, columns={"text": "sentence", "label": "y"})
    assert result.format == "classification"
    assert [(r.messages[0].content, r.label) for r in result.records] == [("great", "1"), ("awful", "0")]


def test_parquet_sharegpt_and_messages(tmp_path):
    path = tmp_path / "chat.parquet"
    rows = [
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
            "system": None,
        },
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}],
            "system": "Be kind.",
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = read_records(path)
    assert (result.format, result.rows, len(result.records)) == ("sharegpt", 2, 1)
    assert result.records[0].messages == (Message("user", "Hi"), Message("assistant", "Hello"))
    assert [r.reason for r in result.rejects] == ["empty_response"]

    path = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "Why?", "a": "Because."}]), path)
    result = read_records(path, columns={"instruction": "q", "output": "a"})
    assert result.records[0].messages[1].content == "Because."


def test_parquet_empty_and_corrupt(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(UserError, match="empty.parquet: the Parquet file has no rows"):
        read_records(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="corrupt.parquet: not a readable Parquet file"):
        read_records(corrupt)


# --------------------------------------------------------------------------- the bad corpus: rows


@pytest.mark.parametrize(
    ("name", "records", "rejects"),
    [
        ("bad_json_line.jsonl", 2, [(1, "bad_json")]),
        ("missing_output.json", 2, [(1, "missing_field")]),
        ("wrong_type.json", 1, [(0, "wrong_type"), (1, "wrong_type"), (2, "wrong_type")]),
        ("unknown_role.jsonl", 1, [(1, "unknown_role")]),
        ("empty_response.jsonl", 1, [(1, "empty_response")]),
        ("no_assistant.jsonl", 1, [(0, "no_assistant_turn"), (1, "no_assistant_turn")]),
        ("bad_history.json", 1, [(1, "bad_history"), (2, "bad_history")]),
        (
            "mixed_alpaca.json",
            2,
            [
                (1, "empty_prompt"),
                (2, "empty_response"),
                (3, "empty_response"),
                (4, "bad_history"),
                (5, "wrong_type"),
                (6, "wrong_type"),
            ],
        ),  # fmt: skip
        (
            "mixed_sharegpt.jsonl",
            3,
            [
                (1, "bad_json"),
                (2, "unknown_role"),
                (3, "empty_response"),
                (4, "no_assistant_turn"),
                (5, "no_assistant_turn"),
                (6, "wrong_type"),
                (8, "missing_field"),
                (10, "bad_turn_order"),
                (11, "bad_tools"),
                (12, "wrong_type"),
            ],
        ),  # fmt: skip
    ],
)
def test_bad_rows_are_rejected_with_reasons(name, records, rejects):
    result = read_records(BAD / name)
    assert len(result.records) == records
    assert [(r.row, r.reason) for r in result.rejects] == rejects
    assert result.rows == records + len(rejects)
    for reject in result.rejects:
        assert reject.source == str(BAD / name) and reject.stage == "read"
        assert "\n" not in reject.detail
        assert reject.detail.startswith(f"{name} row {reject.row}")
        assert "(got " in reject.detail and reject.raw
    surviving = {r.id for r in result.records}
    assert not surviving & {f"{name}:{row}" for row, _ in rejects}


def test_reject_details_name_field_value_and_fix():
    result = read_records(BAD / "wrong_type.json")
    assert result.rejects[1].detail == (
        "wrong_type.json row 1, field 'output': 'output' must be a string, not int (got 4). "
        "Write one response as text (preference pairs are not SFT data)."
    )
    unknown = read_records(BAD / "unknown_role.jsonl").rejects[0]
    assert (
        "conversations[1].from" in unknown.detail
        and '"robot"' in unknown.detail
        and "human" in unknown.detail
    )


def test_long_values_are_truncated_in_details(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": ["y" * 5000]}) + "\n")
    reject = read_records(path, format="alpaca").rejects[0]
    assert len(reject.detail) < 300 and "…" in reject.detail and len(reject.raw) <= 500


# --------------------------------------------------------------------------- whole-file errors


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("not_a_list.json", "the top level is not a list of rows"),
        ("broken.json", r"not valid JSON: .* in element 1 at byte \d+"),
        ("empty.json", "the file is empty"),
        ("not_utf8.jsonl", "not UTF-8"),
        ("unsupported.xml", "unsupported file type"),
        ("no_known_keys.jsonl", "cannot tell the data format"),
        ("all_missing.json", "no row has the fields format 'alpaca' needs"),
    ],
)
def test_whole_file_problems_raise_one_line_user_error(name, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        read_records(BAD / name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(BAD / name)) and "(got " in message


def test_missing_directory_and_other_file_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"missing_outpt.json: file not found .* Did you mean 'missing_output.json'"
    ):
        read_records(BAD / "missing_outpt.json")
    with pytest.raises(UserError, match="is a directory"):
        read_records(BAD)
    with pytest.raises(UserError, match="data.format: unknown format"):
        read_records(GOOD / "alpaca.json", format="chatml")
    with pytest.raises(UserError, match="a .txt file is read as plain text"):
        read_records(GOOD / "text.txt", format="alpaca")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(UserError, match="blank.jsonl: the file is empty"):
        read_records(blank)
    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text("1\n2\n")
    with pytest.raises(UserError, match="scalars.jsonl: no line is a JSON object"):
        read_records(scalars)
    empty_list = tmp_path / "empty_list.json"
    empty_list.write_text("[]")
    with pytest.raises(UserError, match="the JSON list is empty"):
        read_records(empty_list)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.jsonl"
    path.write_text('{"text": "x"}\n')
    path.chmod(0)
    try:
        with pytest.raises(UserError, match="secret.jsonl: cannot read the file"):
            read_records(path)
    finally:
        path.chmod(0o600)


def test_json_lines_saved_as_json(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    result = read_records(path)
    assert (len(result.records), [r.reason for r in result.rejects]) == (2, ["bad_json"])


# --------------------------------------------------------------------------- rejects file


def test_write_and_summarize_rejects(tmp_path):
    rejects = read_records(BAD / "mixed_sharegpt.jsonl").rejects
    out = tmp_path / "run" / "rejects.jsonl"
    write_rejects(rejects[:3], out)
    write_rejects(rejects[3:], out)  # appends
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["row"] for line in lines] == [r.row for r in rejects]
    assert set(lines[0]) == {"source", "row", "reason", "detail", "stage", "raw"}
    summary = summarize_rejects(rejects)
    assert summary == {"no_assistant_turn": 2, "wrong_type": 2, "bad_json": 1, "unknown_role": 1,
                       "empty_response": 1, "missing_field": 1, "bad_turn_order": 1, "bad_tools": 1}  # fmt: skip
    assert next(iter(summary.values())) == 2  # most frequent first


# --------------------------------------------------------------------------- one strict JSON parser


TWO_ARRAYS_ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(25)]


@pytest.mark.parametrize("tail", ["two_arrays", "garbage"])
def test_text_after_the_json_array_is_an_error_naming_the_byte(tmp_path, tail):
    head = json.dumps(TWO_ARRAYS_ROWS[:5], ensure_ascii=False)
    rest = json.dumps(TWO_ARRAYS_ROWS[5:]) if tail == "two_arrays" else "\nGARBAGE"
    path = tmp_path / "data.json"
    path.write_text(head + rest, encoding="utf-8")
    at = len(head.encode()) + (1 if tail == "garbage" else 0)
    with pytest.raises(UserError, match=rf"data.json: unexpected data after the JSON array at byte {at} ") as err:
        read_records(path)
    assert "\n" not in str(err.value)
    path.write_text(head + "\n  \n", encoding="utf-8")  # trailing whitespace is fine
    assert len(read_records(path).records) == 5


def test_text_after_a_json_object_is_an_error_naming_the_byte(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"text": "a"} trailing', encoding="utf-8")
    with pytest.raises(UserError, match="obj.json: unexpected data after the JSON value at byte 14 "):
        read_records(path)


def test_json_lines_split_only_at_line_ends_like_the_streaming_reader(tmp_path):
    from tunelab.data.formats import open_source

    # JSON strings may hold U+2028, U+0085 and form feeds raw: str.splitlines would cut the row there
    rows = [{"text": "a\u2028b"}, {"text": "c\x85d\x0ce"}, {"text": "f"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    result = read_records(path)
    assert (result.rows, result.rejects, [r.text for r in result.records]) == (3, [], [r["text"] for r in rows])
    assert [i.record for i in open_source(path).items()] == result.records


@pytest.mark.parametrize("format", ["auto", "alpaca"])
def test_a_mapping_to_a_column_the_file_lacks_is_named(tmp_path, format):
    from tunelab.data.clean import clean_file

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3)))
    expected = (r"rows.jsonl: the column mapping columns: \{instruction: question\} names column 'question', "
                r"which is not in the file \(got columns \[\"instruction\", \"output\"\]\)")
    with pytest.raises(UserError, match=expected):
        read_records(path, format=format, columns={"instruction": "question"})
    with pytest.raises(UserError, match=expected):  # the data verbs' streaming reader says the same
        clean_file(path, tmp_path / "out.jsonl", format=format, columns={"instruction": "question"})
