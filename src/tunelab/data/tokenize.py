"""Render records through the chat template and build label masks.

transformers does the rendering (``tokenizer.apply_chat_template(..., tokenize=False)``)
and the tokenizers library (a *fast* tokenizer) does the tokenising, with character offsets.
This module only decides which tokens are trained:

1. render the whole conversation once and tokenise that string once, with
   ``add_special_tokens=False`` (the template supplies any BOS, so there is no double BOS)
   and ``return_offsets_mapping=True``;
2. find the character span of each assistant turn by rendering prefixes:
   ``prefix_i = render(messages[:i], add_generation_prompt=True)`` and
   ``full_i = render(messages[:i + 1])``; the span is the assistant's content plus the
   end-of-turn text, without trailing whitespace (``full_i[len(prefix_i):].rstrip()``);
3. a token is labelled iff its character span starts inside a trained span.

Masking is never decided by token id: SmolLM2's pad token is its eos token is
``<|im_end|>``, which ends user turns (not trained) as well as assistant turns (trained).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jinja2 import TemplateError
from rich.progress import Progress

from tunelab.data.records import Record, Reject
from tunelab.data.templates import describe_template
from tunelab.errors import UserError

IGNORE_INDEX = -100
TRAIN_ON: tuple[str, ...] = ("assistant", "last_assistant", "all")
TRUNCATION: tuple[str, ...] = ("truncate", "drop", "error")
TOOLS_HEADER = "\n\nYou have access to the following tools:\n"

_BATCH = 1024  # records rendered and tokenised per tokenizer call
_PROGRESS_ABOVE = 2000  # show a progress bar for more records than this


@dataclass
class Encoded:
    """One training sequence: token ids and labels (``-100`` = not trained)."""

    input_ids: list[int]
    labels: list[int]
    id: str
    weight: float = 1.0
    truncated: bool = False


# --------------------------------------------------------------------------- public API


def encode_chat(
    record: Record,
    tokenizer: Any,
    *,
    train_on: str = "assistant",
    max_length: int,
    truncation: str = "truncate",
) -> Encoded | Reject:
    """Tokenise one chat record with its label mask (see the module docstring).

    ``train_on``: ``assistant`` (every assistant turn), ``last_assistant`` (the final one),
    ``all`` (every token). ``truncation``: ``truncate`` keeps the first ``max_length``
    tokens, ``drop`` rejects the record (``too_long``), ``error`` raises :class:`UserError`.
    A record left without a labelled token is rejected (``no_trainable_tokens``).
    """
    if record.is_text:
        raise ValueError(f"{record.id}: encode_chat got a plain-text record; use encode_text")
    _check_options(train_on, max_length, truncation)
    return _encode_chats([record], tokenizer, train_on, max_length, truncation)[0]


def encode_text(
    record: Record, tokenizer: Any, *, max_length: int, truncation: str = "truncate"
) -> list[Encoded] | Reject:
    """Tokenise a plain-text record for continued pre-training: its tokens plus eos, all labelled.

    With ``truncation="truncate"`` a long document is **split into consecutive chunks** of
    ``max_length`` tokens instead of being cut, so no text is lost (chunk ids are
    ``"<id>#<k>"``; a final chunk of a single token is dropped, as it has nothing to
    predict from). ``drop`` rejects a document longer than ``max_length`` (``too_long``);
    ``error`` raises :class:`UserError`.
    """
    if not record.is_text:
        raise ValueError(f"{record.id}: encode_text got a chat record; use encode_chat")
    _check_options("all", max_length, truncation)
    return _encode_texts([record], tokenizer, max_length, truncation)[0]


def encode_records(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    train_on: str = "assistant",
    max_length: int,
    truncation: str = "truncate",
) -> tuple[list[Encoded], list[Reject]]:
    """Encode many records (chat or plain text), in order; returns ``(encoded, rejects)``.

    Records are rendered in Python and tokenised ``_BATCH`` at a time with one call of the
    fast tokenizer; a rich progress bar is shown for more than 2000 records.
    """
    _check_options(train_on, max_length, truncation)
    encoded: list[Encoded] = []
    rejects: list[Reject] = []
    with _Progress(len(records)) as advance:
        for start in range(0, len(records), _BATCH):
            batch = records[start : start + _BATCH]
            chats = [r for r in batch if not r.is_text]
            texts = [r for r in batch if r.is_text]
            results = iter(_encode_chats(chats, tokenizer, train_on, max_length, truncation) if chats else [])
            chunks = iter(_encode_texts(texts, tokenizer, max_length, truncation) if texts else [])
            for record in batch:
                result = next(chunks) if record.is_text else next(results)
                if isinstance(result, Reject):
                    rejects.append(result)
                elif isinstance(result, list):
                    encoded.extend(result)
                else:
                    encoded.append(result)
            advance(len(batch))
    if records and not encoded and rejects and all(r.reason == "template_error" for r in rejects):
        raise UserError(rejects[0].detail)
    return encoded, rejects


def chat_messages(record: Record, tokenizer: Any) -> tuple[list[dict[str, str]], list[dict] | None]:
    """The messages and ``tools=`` argument to render ``record`` with.

    When the record has tools and the template mentions ``tools``, they are passed as parsed
    JSON; otherwise they are appended to the system message (created if missing) as
    ``TOOLS_HEADER + record.tools``.
    """
    messages = [{"role": m.role, "content": m.content} for m in record.messages]
    if not record.tools:
        return messages, None
    if _template_handles_tools(tokenizer):
        tools = json.loads(record.tools)
        return messages, tools if isinstance(tools, list) else [tools]
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": messages[0]["content"] + TOOLS_HEADER + record.tools}
    else:
        messages.insert(0, {"role": "system", "content": TOOLS_HEADER.lstrip("\n") + record.tools})
    return messages, None


# --------------------------------------------------------------------------- chat records


@dataclass
class _Rendered:
    record: Record
    text: str
    spans: list[tuple[int, int]] | None  # trained character spans; None = train on every token


def _encode_chats(
    records: Sequence[Record], tokenizer: Any, train_on: str, max_length: int, truncation: str
) -> list[Encoded | Reject]:
    """Render each record, tokenise all renders in one call, then label by character offsets."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has no chat template "
            "(got chat_template=None). Set data.template: chatml (or alpaca for a base model)."
        )
    rendered = [_render(record, tokenizer, train_on) for record in records]
    ok = [r for r in rendered if isinstance(r, _Rendered)]
    batch = _tokenize([r.text for r in ok], tokenizer, offsets=True) if ok else {}
    out: list[Encoded | Reject] = []
    k = 0
    for item in rendered:
        if isinstance(item, Reject):
            out.append(item)
            continue
        ids = batch["input_ids"][k]
        labels = _labels(ids, batch["offset_mapping"][k], item.spans)
        k += 1
        out.append(_finish(item.record, ids, labels, max_length, truncation))
    return out


def _render(record: Record, tokenizer: Any, train_on: str) -> _Rendered | Reject:
    """The full render and the trained character spans, or a Reject."""
    if not any(m.role == "assistant" for m in record.messages):
        return _reject(
            record,
            "no_trainable_tokens",
            "the record has no assistant turn to train on",
            "Add an assistant answer (classification data goes to a classification objective)",
        )
    messages, tools = chat_messages(record, tokenizer)
    try:
        full = _apply(tokenizer, messages, tools, generation_prompt=False)
        if train_on == "all":
            return _Rendered(record, full, None)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            prefix = _apply(tokenizer, messages[:i], tools, generation_prompt=True)
            upto = _apply(tokenizer, messages[: i + 1], tools, generation_prompt=False)
            if not (full.startswith(prefix) and full.startswith(upto) and upto.startswith(prefix)):
                raise UserError(
                    f"{describe_template(tokenizer)}: rendering the first {i} messages of {record.id} is not a "
                    "prefix of rendering the whole conversation (got a template that rewrites earlier turns), "
                    "so assistant turns cannot be located for label masking. Set data.template: chatml."
                )
            spans.append((len(prefix), len(prefix) + len(upto[len(prefix) :].rstrip())))
    except TemplateError as err:
        return _reject(
            record,
            "template_error",
            f"{describe_template(tokenizer)} failed: {err}",
            "Fix the conversation (e.g. alternate user/assistant turns) or set data.template: chatml",
        )
    return _Rendered(record, full, spans)


def _apply(
    tokenizer: Any, messages: list[dict[str, str]], tools: list | None, *, generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )


def _template_handles_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default", "")
    return "tools" in (template or "")


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]] | None) -> list[int]:
    """``ids`` where the token's first character lies in a trained span, else ``IGNORE_INDEX``."""
    if spans is None:
        return list(ids)
    if not ids:
        return []
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    trained = np.zeros(len(ids), dtype=bool)
    for begin, end in spans:
        trained |= (starts >= begin) & (starts < end)
    return np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


# --------------------------------------------------------------------------- text records


def _encode_texts(
    records: Sequence[Record], tokenizer: Any, max_length: int, truncation: str
) -> list[list[Encoded] | Reject]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has no eos token (got None), "
            "needed to end each document. Use a tokenizer that defines eos_token."
        )
    batch = _tokenize([r.text or "" for r in records], tokenizer, offsets=False)
    out: list[list[Encoded] | Reject] = []
    for record, ids in zip(records, batch["input_ids"], strict=True):
        ids = list(ids) + [eos]
        if len(ids) <= max_length:
            out.append([Encoded(ids, list(ids), record.id, record.weight)])
        elif truncation == "truncate":
            pieces = [ids[k : k + max_length] for k in range(0, len(ids), max_length)]
            pieces = [p for p in pieces if len(p) > 1]
            out.append([Encoded(p, list(p), f"{record.id}#{n}", record.weight) for n, p in enumerate(pieces)])
        else:
            out.append(_too_long(record, len(ids), max_length, truncation))
    return out


# --------------------------------------------------------------------------- shared


def _tokenize(texts: list[str], tokenizer: Any, *, offsets: bool) -> Any:
    """One call of the (fast) tokenizer over many strings, never adding special tokens."""
    try:
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    except NotImplementedError as err:
        raise UserError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: label masking needs character offsets "
            f"(got a slow tokenizer, {type(tokenizer).__name__}). Load the fast tokenizer (use_fast=True)."
        ) from err


def _finish(
    record: Record, ids: list[int], labels: list[int], max_length: int, truncation: str
) -> Encoded | Reject:
    """Apply the length policy, then reject a sequence with nothing to train on."""
    truncated = len(ids) > max_length
    if truncated:
        if truncation != "truncate":
            return _too_long(record, len(ids), max_length, truncation)
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        why = "after truncation to" if truncated else "within"
        return _reject(
            record,
            "no_trainable_tokens",
            f"no labelled token is left {why} max_length={max_length}",
            "Raise data.max_length or shorten the prompt",
        )
    return Encoded(list(ids), labels, record.id, record.weight, truncated)


def _too_long(record: Record, length: int, max_length: int, truncation: str) -> Reject:
    if truncation == "error":
        raise UserError(
            f"{record.id}: the record is {length} tokens, longer than data.max_length (got {max_length}). "
            "Raise data.max_length, or set data.truncation to truncate (cut it) or drop (skip it)."
        )
    return _reject(
        record,
        "too_long",
        f"the record is {length} tokens, longer than max_length={max_length}",
        "Raise data.max_length or set data.truncation: truncate",
    )


def _reject(record: Record, reason: str, what: str, fix: str) -> Reject:
    detail = f"{record.id}: {what}. {fix}."
    raw = json.dumps(record.to_dict(), ensure_ascii=False, default=str)[:500]
    return Reject(
        source=record.source,
        row=_row(record),
        reason=reason,
        detail=detail.replace("\n", " "),
        stage="tokenize",
        raw=raw,
    )


def _row(record: Record) -> int:
    """The row index from ``"<file name>:<row>"`` (``-1`` when the id has another shape)."""
    tail = record.id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _check_options(train_on: str, max_length: int, truncation: str) -> None:
    if train_on not in TRAIN_ON:
        raise UserError(f"data.train_on: unknown value (got {train_on!r}). Use one of {', '.join(TRAIN_ON)}.")
    if truncation not in TRUNCATION:
        raise UserError(
            f"data.truncation: unknown value (got {truncation!r}). Use one of {', '.join(TRUNCATION)}."
        )
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"data.max_length: must be an integer of at least 2 (got {max_length!r}). E.g. 2048.")


class _Progress:
    """A rich progress bar for long runs; a no-op for short ones."""

    def __init__(self, total: int):
        self.total = total
        self.bar: Any = None

    def __enter__(self):
        if self.total <= _PROGRESS_ABOVE:
            return lambda n: None

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("tokenizing", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
