"""Preference data: pairs (chosen / rejected) and KTO's unpaired judgements, tokenised into rows.

A pair record (format ``preference``) holds the prompt turns and the chosen reply as its messages
and the rejected reply in ``meta["rejected"]``; a KTO record (format ``kto``) is a whole chat with
``meta["desirable"]``. Both are tokenised by :func:`tunelab.data.tokenize.encode_records` (the chat
template, the character-span masks), with ``train_on: last_assistant``: the reply's labelled tokens
are the reply and its end of turn, exactly as in SFT. The prompt is tokenised once (from the chosen
render) and shared by both replies, so chosen and rejected see the same prompt tokens.

Truncation (``data.max_length`` per sequence, prompt + reply): when the prompt plus the longer reply
is too long, the prompt keeps its *tail* (the turn being answered) of at most
``preference.max_prompt_length`` tokens, or more where the replies leave room, and both replies keep
their *heads*, cut to the same budget. ``data.truncation: drop`` rejects such a pair instead;
``error`` stops.

Rows: one pair is one row holding ``prompt + chosen`` and ``prompt + rejected`` as two packed
segments (position ids restart, so neither attends to the other): one forward for both replies.
``tags`` say which segment is which; ``units = 1`` makes the loop divide a step's loss by its
pairs. A KTO row holds the sample and its mismatched sample (the same prompt with the completion of
the previous sample in the file's order, wrapping around), whose log-ratio estimates the KL term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.batching import IGNORE, Row
from tunelab.data.cache import encode_records_cached
from tunelab.data.records import Message, Record, Reject
from tunelab.errors import UserError

# segment tags (Row.tags; the loss reads them per token)
CHOSEN, REJECTED, DESIRABLE, UNDESIRABLE, MISMATCHED = 0, 1, 2, 3, 4
TAGS = 5


@dataclass(frozen=True)
class PairSample:
    """One tokenised pair (``rejected`` is None for a KTO sample, whose ``desirable`` is set)."""

    id: str
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...] | None = None
    desirable: bool | None = None
    truncated: bool = False


def pair_kind(records: Sequence[Record]) -> str | None:
    """``pairs``, ``kto`` or None (no preference record), for the task's checks."""
    if any("rejected" in r.meta for r in records):
        return "pairs"
    if any("desirable" in r.meta for r in records):
        return "kto"
    return None


def unpaired(records: Sequence[Record]) -> list[Record]:
    """Pairs as KTO samples: the chosen reply desirable, the rejected one undesirable (ids ``#c`` / ``#r``)."""
    out = []
    for r in records:
        if "rejected" not in r.meta:
            out.append(r)
            continue
        meta = {k: v for k, v in r.meta.items() if k != "rejected"}
        out.append(dataclasses.replace(r, id=f"{r.id}#c", meta={**meta, "desirable": True}))
        rejected = (*r.messages[:-1], Message("assistant", r.meta["rejected"]))
        out.append(dataclasses.replace(r, id=f"{r.id}#r", messages=rejected, meta={**meta, "desirable": False}))
    return out


def _split(encoded) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(prompt tokens, reply tokens) of an encoded chat trained on its last assistant turn."""
    labelled = [i for i, x in enumerate(encoded.labels) if x != IGNORE]
    if not labelled:
        return None
    first, last = labelled[0], labelled[-1]
    return tuple(encoded.input_ids[:first]), tuple(encoded.input_ids[first : last + 1])


def _reject(record: Record, reason: str, what: str, fix: str) -> Reject:
    tail = record.id.split("#")[0].rsplit(":", 1)[-1]
    return Reject(source=record.source, row=int(tail) if tail.isdigit() else -1, reason=reason,
                  detail=f"{record.id}: {what}. {fix}.", stage="tokenize")


def fit(prompt: tuple[int, ...], replies: list[tuple[int, ...]], max_length: int,
        max_prompt_length: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The prompt's tail and the replies' heads within ``max_length`` per sequence (see the module doc)."""
    longest = max(len(r) for r in replies)
    if len(prompt) + longest <= max_length:
        return prompt, replies
    keep = min(len(prompt), max(max_length - longest, max_prompt_length))
    keep = min(keep, max_length - 1)  # at least one reply token
    budget = max_length - keep
    return prompt[len(prompt) - keep :], [r[:budget] for r in replies]


def encode_pairs(records: Sequence[Record], tokenizer: Any, *, max_length: int, truncation: str,
                 max_prompt_length: int | None, use_cache: bool = True) -> tuple[list[PairSample], list[Reject]]:
    """Tokenise pair and KTO records (see the module doc); returns ``(samples, rejects)``."""
    max_prompt = max_prompt_length or max_length // 2
    rejected = [dataclasses.replace(r, messages=(*r.messages[:-1], Message("assistant", r.meta["rejected"])))
                for r in records if "rejected" in r.meta]
    settings = dict(train_on="last_assistant", max_length=1 << 30, truncation="truncate")
    enc, rejects, _ = encode_records_cached(list(records), tokenizer, use_cache=use_cache, **settings)
    enc_r, rejects_r, _ = encode_records_cached(rejected, tokenizer, use_cache=use_cache, **settings)
    by_id, by_id_r = {e.id: e for e in enc}, {e.id: e for e in enc_r}
    rejects = list(rejects)
    out: list[PairSample] = []
    for record in records:
        e = by_id.get(record.id)
        if e is None:
            continue
        parts = _split(e)
        if parts is None:
            rejects.append(_reject(record, "no_trainable_tokens", "the reply has no token to train on",
                                   "Check the chat template"))
            continue
        prompt, chosen = parts
        replies = [chosen]
        if "rejected" in record.meta:
            er = by_id_r.get(record.id)
            parts_r = _split(er) if er is not None else None
            if parts_r is None:  # the rejected reply's own reject (template error...), or ours
                own = [r for r in rejects_r if r.detail.startswith(f"{record.id}:")]
                rejects += own[:1] or [_reject(record, "no_trainable_tokens", "the rejected reply has no token to "
                                               "train on", "Check the chat template")]
                continue
            replies.append(parts_r[1])  # after the shared prompt: the chosen render's prompt tokens
        too_long = len(prompt) + max(len(r) for r in replies) > max_length
        if too_long and truncation != "truncate":
            length = len(prompt) + max(len(r) for r in replies)
            if truncation == "error":
                raise UserError(f"{record.id}: the prompt plus its longer reply is {length} tokens, longer than "
                                f"data.max_length (got {max_length}). Raise data.max_length, or set data.truncation "
                                "to truncate (keep the prompt's tail and the replies' heads) or drop")
            rejects.append(_reject(record, "too_long", f"the prompt plus its longer reply is {length} tokens, longer "
                                   f"than max_length={max_length}", "Raise data.max_length or set data.truncation: "
                                   "truncate"))
            continue
        if too_long:
            prompt, replies = fit(prompt, replies, max_length, max_prompt)
        out.append(PairSample(record.id, prompt, replies[0], replies[1] if len(replies) > 1 else None,
                              record.meta.get("desirable"), too_long))
    return out, rejects


def _segment(prompt: tuple[int, ...], reply: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids, labels) of ``prompt + reply`` with the reply labelled."""
    return prompt + reply, (IGNORE,) * len(prompt) + reply


def pair_rows(samples: Sequence[PairSample]) -> list[Row]:
    """One row per pair: ``prompt + chosen`` then ``prompt + rejected``, packed (position ids restart)."""
    rows = []
    for s in samples:
        ids_c, lab_c = _segment(s.prompt, s.chosen)
        ids_r, lab_r = _segment(s.prompt, s.rejected)
        rows.append(Row(ids_c + ids_r, (IGNORE,) + lab_c[1:] + (IGNORE,) + lab_r[1:], (len(ids_c), len(ids_r)),
                        tags=(CHOSEN, REJECTED), units=1))
    return rows


def kto_rows(samples: Sequence[PairSample]) -> list[Row]:
    """One row per KTO sample: the sample, then its prompt with the previous sample's completion."""
    rows = []
    for i, s in enumerate(samples):
        other = samples[i - 1]  # i = 0 takes the last one: every completion is used once as a mismatch
        ids_s, lab_s = _segment(s.prompt, s.chosen)
        ids_m, lab_m = _segment(s.prompt, other.chosen)
        rows.append(Row(ids_s + ids_m, (IGNORE,) + lab_s[1:] + (IGNORE,) + lab_m[1:], (len(ids_s), len(ids_m)),
                        tags=(DESIRABLE if s.desirable else UNDESIRABLE, MISMATCHED), units=1))
    return rows
