"""``tunelab data clean``: normalise, mask PII, filter lengths, resolve conflicts, de-duplicate.

Two passes over the file, bounded memory for any size:

1. stream the rows; normalise and mask each raw row (so the output keeps the input's format and
   columns), re-parse it, apply the length filter, spool the surviving rows to a temporary
   JSON Lines file, and keep only small per-row facts: 64-bit digests of the normalised full
   text, input and answer in typed arrays (33 bytes per row), and MinHash signatures and LSH
   band keys (in temporary files, :class:`~tunelab.data.dedup.NearDupIndex`);
2. decide conflicts, exact duplicates (``numpy.unique`` on digests) and near duplicates
   (:mod:`tunelab.data.dedup`), then stream the spool into the output and the removed-rows file.

Every removed row is written to the removed-rows file with its reason, and for a duplicate
the id of the row it duplicates. The input file is never modified.
"""

from __future__ import annotations

import html
import json
import re
import tempfile
import time
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from tunelab.data.dedup import NearDupIndex, dedup_key, digest64, exact_duplicates
from tunelab.data.formats import check_usable, open_source, parse
from tunelab.data.jsonread import BadLine
from tunelab.data.settings import CleanSettings, NormalizeSettings, PiiSettings
from tunelab.data.stream import RowWriter, answer_text, full_text, map_text, prompt_text
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text

# ----------------------------------------------------------------------------- normalisation

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_TRAILING = re.compile(r"[ \t]+(?=\n|$)")
_NEWLINES = re.compile(r"\n{3,}")
_TAGS = ("a|abbr|b|big|blockquote|body|br|center|code|div|em|font|h[1-6]|head|hr|html|i|img|li|meta|ol|p|"
         "pre|s|small|span|strike|strong|sub|sup|table|tbody|td|th|thead|tr|tt|u|ul")
_TAG = re.compile(rf"</?(?:{_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_BREAK = re.compile(r"<(?:br|/p|/div|/li|/tr|hr)\s*/?>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});")


def normalize_text(text: str, s: NormalizeSettings) -> str:
    """One string through the configured normalisation (stdlib ``unicodedata``, ``html``)."""
    if s.html:
        if "<" in text:
            text = _TAG.sub("", _BREAK.sub("\n", text))
        if "&" in text and _ENTITY.search(text):
            text = html.unescape(text)
    if s.unicode != "none":
        text = unicodedata.normalize(s.unicode, text)
    if s.control:
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if s.whitespace:
        text = _NEWLINES.sub("\n\n", _TRAILING.sub("", text)).strip()
    return text


# ----------------------------------------------------------------------------- PII

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_SSN = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")
_PHONES = [
    re.compile(r"(?<![\d+])(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?!\d)"),  # Chinese mobile
    re.compile(r"(?<![\d-])0\d{2,3}-\d{7,8}(?!\d)"),  # Chinese landline 010-12345678
    re.compile(r"(?<![\w+])\+\d{1,3}[- ]?(?:\(\d{1,4}\)[- ]?)?\d{2,4}[- ]?\d{3,4}[- ]?\d{3,4}(?!\d)"),  # +country
    re.compile(r"(?<!\d)\(\d{3}\)[ -]?\d{3}-\d{4}(?!\d)|(?<![\d-])\d{3}[-.]\d{3}[-.]\d{4}(?!\d)"),  # North America
]
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_id(number: str) -> bool:
    """ISO 7064 MOD 11-2 check digit of an 18-character Chinese resident ID number."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == number[17].upper()


def mask_pii(text: str, s: PiiSettings, counts: Counter | None = None) -> str:
    """``text`` with e-mails, ID numbers and phone numbers replaced by placeholders."""
    def sub(pattern: re.Pattern, token: str, kind: str, text: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            if counts is not None:
                counts[kind] += 1
            return token
        return pattern.sub(repl, text)

    if s.email and "@" in text:
        text = sub(_EMAIL, "[EMAIL]", "email", text)
    if s.id_number:
        text = sub(_CN_ID, "[ID_NUMBER]", "id_number", text, valid_cn_id)
        text = sub(_SSN, "[ID_NUMBER]", "id_number", text)
    if s.phone:
        for pattern in _PHONES:
            text = sub(pattern, "[PHONE]", "phone", text)
    return text


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class CleanReport:
    """What each step did; written as ``<out>.report.json``."""

    input: str
    output: str
    removed_file: str
    format: str
    rows_read: int = 0
    rows_written: int = 0
    steps: dict[str, dict[str, int]] = field(default_factory=dict)
    removed_by_reason: dict[str, int] = field(default_factory=dict)
    pii_masked: dict[str, int] = field(default_factory=dict)
    conflict_groups: int = 0
    conflicts_file: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Facts:
    """Per surviving row (in spool order): small facts in typed arrays (8 bytes per value)."""

    src: array = field(default_factory=lambda: array("q"))  # row index in the input file
    full: array = field(default_factory=lambda: array("q"))
    prompt: array = field(default_factory=lambda: array("q"))
    answer: array = field(default_factory=lambda: array("q"))
    has_answer: array = field(default_factory=lambda: array("b"))


def default_removed_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".removed.jsonl")


def clean_file(
    input_path: str | Path,
    out: str | Path,
    settings: CleanSettings | None = None,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    removed: str | Path | None = None,
    chunk: int = 4096,
    progress: bool = False,
    limit: int | None = None,
) -> CleanReport:
    """Clean ``input_path`` into ``out`` (same format as the extension of ``out``).

    Over 100 lines on purpose: the two streaming passes (decide, then write) share the per-step
    counters, the spool and the removed-rows writer, which keeps both passes in one place.
    """
    t0 = time.perf_counter()
    s = settings or CleanSettings()
    src = open_source(input_path, format, columns, limit)
    out = Path(out)
    removed_path = Path(removed) if removed else default_removed_path(out)
    protect = [src.path]
    if removed_path.resolve() == src.path.resolve():
        raise UserError(f"{removed_path}: the removed-rows file is the input file. Choose another path.")
    report = CleanReport(str(src.path), str(out), str(removed_path), src.format)
    steps = {name: {"changed": 0, "removed": 0} for name in ("read", "normalize", "pii", "length", "conflicts",
                                                             "exact_dedup", "near_dedup")}
    tokenizer = _length_tokenizer(s)
    pii_counts: Counter = Counter()
    reasons: Counter = Counter()
    facts = _Facts()
    need_near = s.dedup is not None and s.dedup.near
    need_conflict_near = s.conflicts is not None and s.conflicts.near
    dedup_index = NearDupIndex(s.dedup.threshold, s.dedup.num_perm, s.dedup.shingle) if need_near else None
    prompt_index = (NearDupIndex(s.conflicts.threshold, s.dedup.num_perm if s.dedup else 128,
                                 s.dedup.shingle if s.dedup else 5) if need_conflict_near else None)
    spool = tempfile.NamedTemporaryFile("w+", encoding="utf-8", suffix=".jsonl", prefix="tunelab-clean-")
    removed_writer = RowWriter(removed_path, protect=protect)
    name = src.path.name
    try:
        bar = _bar(progress)
        with bar:
            task = bar.add_task("clean: read", total=None)
            batch: list = []
            for item in src.items():
                report.rows_read += 1
                batch.append(item)
                if len(batch) >= chunk:
                    _first_pass(batch, s, tokenizer, steps, pii_counts, reasons, facts, spool, removed_writer,
                                dedup_index, prompt_index, src)
                    bar.update(task, advance=len(batch))
                    batch = []
            _first_pass(batch, s, tokenizer, steps, pii_counts, reasons, facts, spool, removed_writer,
                        dedup_index, prompt_index, src)
            bar.update(task, advance=len(batch))

            check_usable(src, report.rows_read, len(facts.src) + steps["length"]["removed"], reasons)
            n = len(facts.src)
            status = np.zeros(n, dtype=np.int8)  # 0 kept, else an index into _REASONS
            dup_of = np.full(n, -1, dtype=np.int64)
            sim = np.zeros(n, dtype=np.float32)
            conflicts = _conflicts(s, facts, status, dup_of, prompt_index) if s.conflicts else []
            if s.dedup is not None:
                _dedup(s, facts, status, dup_of, sim, dedup_index)
            report.conflict_groups = len(conflicts)
            for code, count in Counter(status.tolist()).items():
                if code:
                    reason = _REASONS[code]
                    reasons[reason] += count
                    steps[_STEP_OF[reason]]["removed"] += count

            # --- pass 2: the spool into the output and the removed-rows file
            spool.seek(0)
            with RowWriter(out, protect=protect) as writer:
                for i, line in enumerate(spool):
                    raw = json.loads(line)
                    if status[i] == 0:
                        writer.write(raw)
                        continue
                    reason = _REASONS[status[i]]
                    entry = {"id": f"{name}:{facts.src[i]}", "row": facts.src[i], "reason": reason,
                             "detail": _DETAILS[reason]}
                    if dup_of[i] >= 0:
                        entry["duplicate_of"] = f"{name}:{facts.src[dup_of[i]]}"
                    if reason == "near_duplicate":
                        entry["similarity"] = round(float(sim[i]), 3)
                    entry["raw"] = raw
                    removed_writer.write(entry)
            report.rows_written = writer.count
            removed_writer.close()
    except BaseException:
        removed_writer.abort()
        raise
    finally:
        spool.close()
        for index in (dedup_index, prompt_index):
            if index is not None:
                index.close()
    if conflicts and s.conflicts is not None and s.conflicts.policy == "flag":
        cpath = out.with_name(out.name.split(".")[0] + ".conflicts.jsonl")
        atomic_write_text(cpath, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conflicts))
        report.conflicts_file = str(cpath)
    report.steps = steps
    report.removed_by_reason = dict(reasons.most_common())
    report.pii_masked = dict(pii_counts)
    report.seconds = round(time.perf_counter() - t0, 2)
    atomic_write_text(out.with_name(out.name.split(".")[0] + ".report.json"),
                      json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report


_REASONS = ["", "conflict", "conflict_minority", "conflict_tie", "exact_duplicate", "near_duplicate"]
_STEP_OF = {"conflict": "conflicts", "conflict_minority": "conflicts", "conflict_tie": "conflicts",
            "exact_duplicate": "exact_dedup", "near_duplicate": "near_dedup"}
_DETAILS = {
    "conflict": "the same input has different answers/labels in other rows (policy drop)",
    "conflict_minority": "another answer/label for the same input is more common (policy majority)",
    "conflict_tie": "the answers/labels for this input are tied (policy majority): no majority to keep",
    "exact_duplicate": "same normalised text as an earlier row",
    "near_duplicate": "near duplicate (MinHash LSH) of an earlier row",
}


def _bar(enabled: bool):

    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.completed:,} rows"), TimeElapsedColumn(), disable=not enabled, transient=True)


def _length_tokenizer(s: CleanSettings):
    ls = s.length
    if ls is None or (ls.min_tokens is None and ls.max_tokens is None):
        return None
    if not ls.tokenizer:
        raise UserError("clean.length: min_tokens/max_tokens need a tokenizer (got none). "
                        "Pass --tokenizer MODEL (an alias or a model folder).")
    from tunelab.models.load import load_tokenizer

    return load_tokenizer(ls.tokenizer)


def _measure(record, which: str) -> str:
    if which == "prompt":
        return prompt_text(record)
    if which == "answer":
        return answer_text(record) or ""
    return full_text(record)


def _first_pass(batch, s: CleanSettings, tokenizer, steps, pii_counts, reasons, facts: _Facts, spool,
                removed_writer: RowWriter, dedup_index, prompt_index, src) -> None:
    name = src.path.name
    kept: list = []
    for item in batch:
        if item.reject is not None:
            _remove_now(removed_writer, reasons, steps, "read", name, item.index, item.reject.reason,
                        item.reject.detail, item.raw)
            continue
        raw, changed = item.raw, False
        if s.normalize is not None:
            new = map_text(raw, lambda t: normalize_text(t, s.normalize))
            if new != raw:
                steps["normalize"]["changed"] += 1
                raw, changed = new, True
        if s.pii is not None:
            new = map_text(raw, lambda t: mask_pii(t, s.pii, pii_counts))
            if new != raw:
                steps["pii"]["changed"] += 1
                raw, changed = new, True
        if changed:  # re-parse only what cleaning changed
            item = parse(item.index, raw, src)
            if item.reject is not None:  # e.g. an answer that was only HTML is empty now
                _remove_now(removed_writer, reasons, steps, "normalize", name, item.index,
                            f"{item.reject.reason}_after_cleaning", item.reject.detail, raw)
                continue
        kept.append(item)
    ls = s.length
    if ls is not None and kept:
        texts = [_measure(i.record, ls.field) for i in kept]
        chars = [len(t) for t in texts]
        tokens = ([len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
                  if tokenizer is not None else [0] * len(texts))
        survivors = []
        for item, c, t in zip(kept, chars, tokens, strict=True):
            why = None
            if ls.min_chars is not None and c < ls.min_chars:
                why = ("too_short", f"{c} characters < min_chars {ls.min_chars}")
            elif ls.max_chars is not None and c > ls.max_chars:
                why = ("too_long", f"{c} characters > max_chars {ls.max_chars}")
            elif ls.min_tokens is not None and t < ls.min_tokens:
                why = ("too_short", f"{t} tokens < min_tokens {ls.min_tokens}")
            elif ls.max_tokens is not None and t > ls.max_tokens:
                why = ("too_long", f"{t} tokens > max_tokens {ls.max_tokens}")
            if why:
                _remove_now(removed_writer, reasons, steps, "length", name, item.index, why[0], why[1], item.raw)
            else:
                survivors.append(item)
        kept = survivors
    key = s.dedup.key if s.dedup else "full"
    dedup_texts, answer_texts, prompt_texts = [], [], []
    for item in kept:
        r = item.record
        p, a = dedup_key(prompt_text(r)), answer_text(r)
        f = p if key == "prompt" else dedup_key(full_text(r))
        facts.src.append(item.index)
        facts.full.append(digest64(f))
        facts.prompt.append(digest64(p))
        facts.answer.append(digest64(dedup_key(a)) if a is not None else 0)
        facts.has_answer.append(a is not None)
        dedup_texts.append(p)
        answer_texts.append(dedup_key(a) if a is not None and key == "full" else "")
        prompt_texts.append(p)
        spool.write(json.dumps(item.raw, ensure_ascii=False) + "\n")
    if dedup_index is not None:
        dedup_index.add(dedup_texts, answer_texts)
    if prompt_index is not None:
        prompt_index.add(prompt_texts)


def _remove_now(writer: RowWriter, reasons: Counter, steps, step: str, name: str, index: int, reason: str,
                detail: str, raw: Any) -> None:
    reasons[reason] += 1
    steps[step]["removed"] += 1
    if isinstance(raw, BadLine):  # a line that is not JSON is kept as its text
        raw = raw.line
    writer.write({"id": f"{name}:{index}", "row": index, "reason": reason, "detail": detail, "raw": raw})


def _conflicts(s: CleanSettings, facts: _Facts, status, dup_of, prompt_index) -> list[dict]:
    """Groups of (near-)same inputs with more than one answer; applies the policy."""
    n = len(facts.src)
    if n == 0:
        return []
    has = np.asarray(facts.has_answer, dtype=bool)
    prompt = np.asarray(facts.prompt, dtype=np.int64)
    group = prompt_index.clusters()[0] if prompt_index is not None else exact_duplicates(prompt)
    answer = np.asarray(facts.answer, dtype=np.int64)
    idx = np.flatnonzero(has)
    if not len(idx):
        return []
    # distinct answers per group
    pairs = np.unique(np.stack([group[idx], answer[idx]], axis=1), axis=0)
    groups, n_answers = np.unique(pairs[:, 0], return_counts=True)
    bad = set(groups[n_answers > 1].tolist())
    if not bad:
        return []
    members: dict[int, list[int]] = {}
    for i in idx.tolist():
        g = int(group[i])
        if g in bad:
            members.setdefault(g, []).append(i)
    policy = s.conflicts.policy
    out = []
    for rows in members.values():
        counts = Counter(int(answer[i]) for i in rows)
        ranked = counts.most_common()
        tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
        out.append({"rows": [facts.src[i] for i in rows], "answers": len(counts),
                    "votes": [c for _, c in ranked]})
        if policy == "drop":
            status[rows] = _REASONS.index("conflict")
        elif policy == "majority":
            if tie:
                status[rows] = _REASONS.index("conflict_tie")
            else:
                winner = ranked[0][0]
                keep = next(i for i in rows if answer[i] == winner)
                for i in rows:
                    if answer[i] != winner:
                        status[i] = _REASONS.index("conflict_minority")
                        dup_of[i] = keep
    return out


def _dedup(s: CleanSettings, facts: _Facts, status, dup_of, sim, index: NearDupIndex | None) -> None:
    d = s.dedup
    if d.exact and len(facts.src):
        active = status == 0
        first = exact_duplicates(np.asarray(facts.full, dtype=np.int64), active)
        dupe = active & (first != np.arange(len(first)))
        status[dupe] = _REASONS.index("exact_duplicate")
        dup_of[dupe] = first[dupe]
    if index is not None and len(facts.src):
        active = status == 0
        root, similarity = index.clusters(active)
        dupe = active & (root != np.arange(len(root)))
        status[dupe] = _REASONS.index("near_duplicate")
        dup_of[dupe] = root[dupe]
        sim[dupe] = similarity[dupe]
