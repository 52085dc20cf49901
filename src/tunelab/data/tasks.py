"""Records -> rows for the tasks other than SFT: pretrain, classification, generative classification.

* ``pretrain``: every text record is tokenised (with the shared tokenise cache) and ends with
  eos; the documents are laid end to end in one stream, which is cut into rows of
  ``max_length`` tokens (a document may continue in the next row, as in pre-training; only the
  last row may be shorter). Each row's ``segments`` are its document pieces, so the packed
  collate restarts position ids at every document and no token attends across documents.
  Every token is a target except a row's first (nothing precedes it to predict it from).
* ``classification``: one row per example: the text tokenised with the tokenizer's special
  tokens (``[CLS] ... [SEP]`` for BERT), and the class id placed as the label of the row's
  last token (every other label is -100). So ``Row.n_targets == 1`` and the loop's per-step
  normaliser counts examples, and the shared ``collate`` pads the rows as for SFT.
* ``generative_classification``: each example becomes a chat record, user = the configured
  prompt listing the labels, assistant = the label; the SFT path then tokenises and masks it.

Labels are checked against the label set: a training row without a label, or an evaluation row
whose label the training data never had, is rejected with the reason (never dropped silently).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.batching import IGNORE, Row, rows_packed, rows_unpacked
from tunelab.data.cache import encode_records_cached
from tunelab.data.records import Message, Record, Reject
from tunelab.errors import UserError


@dataclass
class TaskRows:
    """What the ``*_task_rows`` functions hand back to their task (``tunelab.tasks``)."""

    train: list[Row]
    eval: list[Row]
    rejects: list[Reject]
    summary: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    eval_prompts: list[tuple[list[int], str]] = field(default_factory=list)  # generative: (prompt ids, gold label)


def _reject(record: Record, reason: str, detail: str, stage: str = "tokenize") -> Reject:
    src, _, row = record.id.rpartition(":")
    return Reject(source=record.source or src, row=int(row) if row.isdigit() else -1, reason=reason,
                  detail=detail, stage=stage, raw=(record.text or " ".join(m.content for m in record.messages))[:500])


def record_text(record: Record) -> str:
    """The text of a classification record (the reader stores it as one user turn)."""
    if record.text is not None:
        return record.text
    return "\n".join(m.content for m in record.messages if m.role == "user")


# --------------------------------------------------------------------------- labels


def label_set(records: Sequence[Record], configured: list[str] | None) -> list[str]:
    """The configured labels, or every training label sorted (numerically when all are integers)."""
    if configured:
        if len(set(configured)) != len(configured):
            raise UserError(f"classification.labels: duplicates in {configured!r}. List each label once")
        return list(configured)
    seen = {r.label for r in records if r.label is not None}
    if not seen:
        raise UserError("data.train: no row has a label. Use format: classification files with label or label_text")
    if all(re.fullmatch(r"-?\d+", s) for s in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def split_labelled(records: Sequence[Record], labels: list[str], which: str) -> tuple[list[Record], list[Reject]]:
    """Keep records whose label is in ``labels``; reject the rest with the reason."""
    known, kept, rejects = set(labels), [], []
    for r in records:
        if r.label is None:
            rejects.append(_reject(r, "missing_label", f"{which} row has no label; classification needs one. "
                                   "Use format: classification with a label or label_text column", "read"))
        elif r.label not in known:
            rejects.append(_reject(r, "unknown_label", f"{which} label {r.label!r} is not in the label set "
                                   f"{labels!r}. Fix the row, or list the label in classification.labels"))
        else:
            kept.append(r)
    return kept, rejects


def class_weights(spec: str | dict[str, float] | None, labels: list[str], counts: dict[str, int]) -> list[float] | None:
    """Per-class weights in label order: ``balanced`` (scikit-learn's n / (k * count)) or a mapping."""
    if spec is None:
        return None
    if spec == "balanced":
        import numpy as np
        from sklearn.utils.class_weight import compute_class_weight

        present = [lab for lab in labels if counts.get(lab, 0) > 0]
        y = np.array([lab for lab in present for _ in range(counts[lab])])
        w = dict(zip(present, compute_class_weight("balanced", classes=np.array(present), y=y), strict=True))
        return [float(w.get(lab, 0.0)) for lab in labels]
    unknown = sorted(set(spec) - set(labels))
    if unknown:
        raise UserError(f"classification.class_weights: labels {unknown!r} are not in the label set {labels!r}. Fix the keys")
    return [float(spec.get(lab, 1.0)) for lab in labels]


# --------------------------------------------------------------------------- classification rows


def classification_rows(records: Sequence[Record], tokenizer: Any, label2id: dict[str, int], *, max_length: int,
                        truncation: str) -> tuple[list[Row], list[Reject], int]:
    """One row per labelled record (see the module docstring). Returns rows, rejects, truncated count."""
    texts = [record_text(r) for r in records]
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    rows, rejects, truncated = [], [], 0
    for record, text, ids in zip(records, texts, enc, strict=True):
        if not text.strip():
            rejects.append(_reject(record, "empty_text", "the text is empty. Remove the row or fill its text", "read"))
            continue
        if len(ids) > max_length:
            if truncation == "error":
                raise UserError(f"{record.id}: {len(ids)} tokens > data.max_length={max_length}. Raise data.max_length "
                                "or set data.truncation: truncate")
            if truncation == "drop":
                rejects.append(_reject(record, "too_long", f"{len(ids)} tokens > data.max_length={max_length}. "
                                       "Raise data.max_length or set data.truncation: truncate"))
                continue
            truncated += 1
        ids = class_input_ids(ids, tokenizer, max_length)
        labels = (IGNORE,) * (len(ids) - 1) + (label2id[record.label],)
        rows.append(Row(tuple(ids), labels, (len(ids),)))
    return rows, rejects, truncated


def class_input_ids(ids: Sequence[int], tokenizer: Any, max_length: int) -> list[int]:
    """A text's token ids (with the tokenizer's special tokens) as a classification row holds them: cut to
    ``max_length`` keeping the closing special token (eos / [SEP]) where the tokenizer added one, and at
    least two tokens (the class label sits on the last; a row needs a token before it). Training and
    ``tunelab eval`` both build a head's input with it."""
    ids = list(ids)
    if len(ids) > max_length:
        ids = ids[: max_length - 1] + ids[-1:] if ids[-1] in _specials(tokenizer) else ids[:max_length]
    if len(ids) < 2:
        ids.append(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id)
    return ids


def _specials(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def row_class(row: Row) -> int:
    """The class id of a classification row."""
    return row.labels[-1]


# --------------------------------------------------------------------------- pretrain rows


def pretrain_rows(docs: Sequence[Sequence[int]], max_length: int) -> list[Row]:
    """Documents (each already ending with eos) laid end to end and cut into rows of ``max_length``."""
    rows: list[Row] = []
    ids: list[int] = []
    segments: list[int] = []
    for doc in docs:
        pos = 0
        while pos < len(doc):
            take = min(len(doc) - pos, max_length - len(ids))
            ids.extend(doc[pos : pos + take])
            segments.append(take)
            pos += take
            if len(ids) == max_length:
                rows.append(_pretrain_row(ids, segments))
                ids, segments = [], []
    if len(ids) > 1:  # a last row of one token has nothing to predict
        rows.append(_pretrain_row(ids, segments))
    return rows


def _pretrain_row(ids: list[int], segments: list[int]) -> Row:
    return Row(tuple(ids), (IGNORE, *ids[1:]), tuple(segments))


# --------------------------------------------------------------------------- generative classification


def generative_records(records: Sequence[Record], labels: list[str], prompt: str) -> list[Record]:
    """Classification records -> chat records: user = ``prompt`` with {labels} and {text}, assistant = the label."""
    listed = ", ".join(labels)
    out = []
    for r in records:
        try:
            user = prompt.format(labels=listed, text=record_text(r))
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"classification.prompt: cannot fill the template ({err}). Use only {{labels}} and "
                            "{text} as fields (write {{ and }} for literal braces)") from None
        out.append(Record(id=r.id, messages=(Message("user", user), Message("assistant", r.label or "")),
                          label=r.label, weight=r.weight, source=r.source))
    return out


# --------------------------------------------------------------------------- the entry point


def pretrain_task_rows(data_cfg: Any, tokenizer: Any, train_records: list[Record], eval_records: list[Record], *,
                       seed_rejects: list[Reject] | None = None) -> TaskRows:
    """Rows of ``task: pretrain``: documents joined and cut into ``max_length`` rows (see :func:`pretrain_rows`)."""
    d = data_cfg
    rejects: list[Reject] = list(seed_rejects or [])
    texts, chats = [r for r in train_records if r.is_text], [r for r in train_records if not r.is_text]
    rejects += [_reject(r, "not_text", "task: pretrain reads plain text; this row is a chat/instruction record. "
                        "Use format: text, or task: sft", "read") for r in chats]
    enc, rej, hit = encode_documents(texts, tokenizer, use_cache=d.cache)
    eval_enc, eval_rej, _ = encode_documents([r for r in eval_records if r.is_text], tokenizer, use_cache=d.cache)
    rejects += rej + eval_rej
    train = pretrain_rows([e.input_ids for e in enc], d.max_length)
    evals = pretrain_rows([e.input_ids for e in eval_enc], d.max_length)
    return TaskRows(train, evals, rejects, {
        "train_samples": len(enc), "eval_samples": len(eval_enc), "documents": len(enc),
        "train_tokens": sum(len(e.input_ids) for e in enc), "truncated": 0, "tokenized_from_cache": hit})


def encode_documents(records: list[Record], tokenizer: Any, *, use_cache: bool):
    """Whole documents, every token a target: no per-document cut (rows are cut at their boundaries)."""
    return encode_records_cached(records, tokenizer, train_on="all", max_length=1 << 30, truncation="truncate",
                                 use_cache=use_cache)


def _labelled(cls_cfg: Any, train_records: list[Record], eval_records: list[Record], rejects: list[Reject]):
    labels = label_set(train_records, cls_cfg.labels)
    train_records, rej = split_labelled(train_records, labels, "training")
    eval_records, eval_rej = split_labelled(eval_records, labels, "evaluation")
    rejects += rej + eval_rej
    counts = Counter(r.label for r in train_records)
    return labels, {lab: counts.get(lab, 0) for lab in labels}, train_records, eval_records


def classification_task_rows(data_cfg: Any, cls_cfg: Any, tokenizer: Any, train_records: list[Record],
                             eval_records: list[Record], *, seed_rejects: list[Reject] | None = None) -> TaskRows:
    """Rows of ``task: classification``: one example a row, its class id the last token's label."""
    d = data_cfg
    rejects: list[Reject] = list(seed_rejects or [])
    labels, label_counts, train_records, eval_records = _labelled(cls_cfg, train_records, eval_records, rejects)
    l2i = {lab: i for i, lab in enumerate(labels)}
    train, rej, trunc = classification_rows(train_records, tokenizer, l2i, max_length=d.max_length,
                                            truncation=d.truncation)
    evals, eval_rej, eval_trunc = classification_rows(eval_records, tokenizer, l2i, max_length=d.max_length,
                                                      truncation=d.truncation)
    rejects += rej + eval_rej
    return TaskRows(train, evals, rejects, {
        "train_samples": len(train), "eval_samples": len(evals), "train_tokens": sum(len(r) for r in train),
        "truncated": trunc + eval_trunc, "tokenized_from_cache": False, "labels": label_counts},
        labels, label_counts)


def generative_task_rows(data_cfg: Any, cls_cfg: Any, tokenizer: Any, train_records: list[Record],
                         eval_records: list[Record], *, seed_rejects: list[Reject] | None = None) -> TaskRows:
    """Rows of ``task: generative_classification``: chats whose answer is the label, and the eval prompts."""
    d = data_cfg
    rejects: list[Reject] = list(seed_rejects or [])
    labels, label_counts, train_records, eval_records = _labelled(cls_cfg, train_records, eval_records, rejects)
    chat_train = generative_records(train_records, labels, cls_cfg.prompt)
    chat_eval = generative_records(eval_records, labels, cls_cfg.prompt)
    settings = dict(train_on=d.train_on, max_length=d.max_length, truncation=d.truncation, use_cache=d.cache)
    enc, rej, hit = encode_records_cached(chat_train, tokenizer, **settings)
    eval_enc, eval_rej, _ = encode_records_cached(chat_eval, tokenizer, **settings)
    rejects += rej + eval_rej
    if d.packing:
        train, evals = rows_packed(enc, d.max_length), rows_packed(eval_enc, d.max_length)
    else:
        train, evals = rows_unpacked(enc), rows_unpacked(eval_enc)
    kept = {e.id for e in eval_enc}
    prompts = []
    for r in chat_eval:
        if r.id in kept:
            msgs = [{"role": "user", "content": r.messages[0].content}]
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
            prompts.append((list(ids["input_ids"]), r.label))
    return TaskRows(train, evals, rejects, {
        "train_samples": len(enc), "eval_samples": len(eval_enc), "train_tokens": sum(len(e.input_ids) for e in enc),
        "truncated": sum(1 for e in enc + eval_enc if e.truncated), "tokenized_from_cache": hit,
        "labels": label_counts}, labels, label_counts, prompts)
