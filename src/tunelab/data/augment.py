"""``tunelab data augment``: EDA operations, sentence re-ordering, model paraphrase / back-translation.

EDA (Wei & Zou 2019): synonym replacement, random insertion (of a synonym), random swap and
random deletion, each changing about ``alpha`` of the words. Words come from ``jieba`` for
Chinese text and whitespace splitting otherwise; synonyms from a user file, else WordNet
(nltk) when its data is installed. Paraphrase and back-translation prompt any local causal LM
(``tunelab.ship.inference``). Augmented rows carry ``augmented: <op>``, ``source_id`` (the id
of the row they came from) and ``source_row`` (its index in the output file, which starts with
every original row), so ``tunelab data split`` keeps them out of validation and test.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from array import array
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.data.formats import open_source
from tunelab.data.jsonread import BadLine
from tunelab.data.records import Message
from tunelab.data.settings import AugmentSettings
from tunelab.data.stream import RowWriter
from tunelab.errors import UserError, require
from tunelab.fsutil import atomic_write_text

_CJK = re.compile(r"[\u4e00-\u9fff]")
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s*")


def is_chinese(text: str) -> bool:
    return len(_CJK.findall(text)) * 3 >= len(text.strip()) > 0


def words_of(text: str) -> tuple[list[str], str]:
    """(words, joiner): jieba segmentation for Chinese, whitespace otherwise."""
    if is_chinese(text):
        jieba = require("jieba", extra="data", verb="word segmentation of Chinese text (tunelab data augment)")

        jieba.setLogLevel(60)
        return [w for w in jieba.lcut(text) if w.strip()], ""
    return text.split(), " "


def load_synonyms(path: str | None) -> Callable[[str], list[str]]:
    """A synonym function from a JSON {word: [..]} or 'word syn1 syn2' file, else WordNet, else none."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"augment.synonyms: file not found (got {path!r}). Give a JSON or 'word syn1 syn2' file.")
        text = p.read_text(encoding="utf-8")
        try:
            table = json.loads(text)
        except json.JSONDecodeError:
            table = {}
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    table.setdefault(parts[0], []).extend(parts[1:])
        if not isinstance(table, dict):
            raise UserError(f"{p}: a synonym file is an object {{word: [synonyms]}} or lines 'word syn1 syn2'.")
        return lambda w: [s for s in table.get(w, []) if s != w]
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("good")
    except (ImportError, LookupError):
        return lambda w: []

    def wn(word: str) -> list[str]:
        names = {lem.name().replace("_", " ") for s in wordnet.synsets(word) for lem in s.lemmas()}
        return sorted(n for n in names if n.lower() != word.lower())

    return wn


def eda(text: str, op: str, alpha: float, rng: random.Random, synonyms: Callable[[str], list[str]]) -> str:
    words, joiner = words_of(text)
    if not words:
        return text
    n = max(1, round(alpha * len(words)))
    if op == "synonym":
        options = [i for i, w in enumerate(words) if synonyms(w)]
        for i in rng.sample(options, min(n, len(options))):
            words[i] = rng.choice(synonyms(words[i]))
    elif op == "insert":
        candidates = [s for w in words for s in synonyms(w)]
        for _ in range(n if candidates else 0):
            words.insert(rng.randrange(len(words) + 1), rng.choice(candidates))
    elif op == "swap":
        for _ in range(n if len(words) > 1 else 0):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        if len(words) > 1:
            kept = [w for w in words if rng.random() > alpha]
            words = kept or [rng.choice(words)]
    return joiner.join(words)


def reorder(text: str, rng: random.Random) -> str:
    parts = [p for p in _SENTENCE.split(text) if p.strip()]
    if len(parts) < 2:
        return text
    for _ in range(5):
        shuffled = parts[:]
        rng.shuffle(shuffled)
        if shuffled != parts:
            break
    return ("" if is_chinese(text) else " ").join(shuffled)


class ModelRewriter:
    """Paraphrase / back-translate with a local causal LM (greedy, or sampled with a seed: repeatable).

    The model is loaded once by ``tunelab.ship.inference.load_for_inference`` (an alias such as
    ``smollm2-135m-instruct``, a model folder, or a tunelab run) and prompted through its chat
    template. An empty reply keeps the text unchanged, so no empty row is ever written (the
    row is counted under ``unchanged_skipped``). ``calls`` counts the model calls.
    """

    def __init__(self, model: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 0.95,
                 seed: int = 0):
        from tunelab.ship.inference import load_for_inference

        self.loaded = load_for_inference(model)
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.calls = 0

    @classmethod
    def from_settings(cls, s: AugmentSettings) -> ModelRewriter:
        return cls(s.model, s.max_new_tokens, s.temperature, s.top_p, s.seed)

    def ask(self, prompt: str) -> str:
        """The model's reply to one user message (sampled with seed ``seed + call number``)."""
        from tunelab.ship.inference import generate_reply

        self.calls += 1
        return generate_reply(self.loaded, [{"role": "user", "content": prompt}], max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed + self.calls if self.temperature > 0 else None).strip()

    def paraphrase(self, text: str) -> str:
        return self.ask(PARAPHRASE.format(text=text)) or text

    def backtranslate(self, text: str, pivot: str) -> str:
        there = self.ask(TRANSLATE.format(language=pivot, text=text))
        if not there:
            return text
        back = "Chinese" if is_chinese(text) else "English"
        return self.ask(TRANSLATE.format(language=back, text=there)) or text


PARAPHRASE = ("Rewrite the following text with different words, keeping its meaning. "
              "Reply with the rewritten text only.\n\n{text}")
TRANSLATE = "Translate into {language}. Reply with the translation only.\n\n{text}"


def _prompt_keys(fmt: str) -> tuple[str, ...]:
    return {"alpaca": ("instruction", "input"), "classification": ("text",), "text": ("text",)}.get(fmt, ())


def rewrite_row(raw: dict[str, Any], fmt: str, field: str, fn: Callable[[str], str]) -> dict[str, Any]:
    """The row with ``fn`` applied to its prompt and/or answer fields (format-aware)."""
    new = json.loads(json.dumps(raw))
    prompt, answer = field in ("prompt", "both"), field in ("answer", "both")
    if fmt in ("alpaca", "classification", "text"):
        for k in _prompt_keys(fmt) if prompt else ():
            if isinstance(new.get(k), str) and new[k].strip():
                new[k] = fn(new[k])
        if answer and fmt == "alpaca" and isinstance(new.get("output"), str):
            new["output"] = fn(new["output"])
        return new
    turns_key, role_key, text_key, user, bot = (
        ("conversations", "from", "value", ("human", "user"), ("gpt", "assistant"))
        if fmt == "sharegpt" else ("messages", "role", "content", ("user",), ("assistant",)))
    for turn in new.get(turns_key) or []:
        if isinstance(turn, dict) and isinstance(turn.get(text_key), str):
            if (prompt and turn.get(role_key) in user) or (answer and turn.get(role_key) in bot):
                turn[text_key] = fn(turn[text_key])
    return new


def augment_file(path: str | Path, out: str | Path, settings: AugmentSettings | None = None, *,
                 format: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Write the original rows, then the augmented ones, to ``out``; return counts per operation."""
    s = settings or AugmentSettings()
    src = open_source(path, format)
    needs_model = {"paraphrase", "backtranslate"} & set(s.ops)
    if needs_model and not s.model:
        raise UserError(f"augment: {', '.join(sorted(needs_model))} need a model (got none). "
                        "Pass --model smollm2-135m-instruct (or any local causal LM).")
    rewriter = ModelRewriter.from_settings(s) if needs_model else None
    synonyms = load_synonyms(s.synonyms)
    if {"synonym", "insert"} & set(s.ops) and not s.synonyms and not synonyms("good"):
        raise UserError("augment: synonym/insert need synonyms (got no --synonyms file and no WordNet data). "
                        "Pass --synonyms FILE (JSON {word: [..]} or 'word syn1 syn2' lines), or install WordNet data.")
    rng = random.Random(s.seed)
    made: Counter = Counter()
    unchanged: Counter = Counter()
    def is_original(item) -> bool:
        return item.record is not None and isinstance(item.raw, dict) and not item.raw.get("augmented")

    unreadable: list[dict[str, Any]] = []  # lines that are not JSON cannot be copied: their rejects
    with RowWriter(out, protect=[src.path]) as w:
        positions = array("q")  # pass 1: every row as it is; where each original row landed
        for item in src.items():
            if isinstance(item.raw, BadLine):
                unreadable.append(item.reject.to_dict())
                continue
            w.write(item.raw)
            if is_original(item):
                positions.append(w.count - 1)
        originals = (item for item in src.items() if is_original(item))  # pass 2: streamed again
        for position, item in zip(positions[: s.limit] if s.limit else positions, originals, strict=False):
            for op in s.ops:
                for _ in range(s.copies):
                    fn = _rewrite_fn(op, s, rng, synonyms, rewriter)
                    new = rewrite_row(item.raw, src.format, s.field, fn)
                    if new == item.raw:
                        unchanged[op] += 1
                        continue
                    new.update({"augmented": op, "source_id": item.record.id, "source_row": position})
                    w.write(new)
                    made[op] += 1
    report = {"output": str(out), "original_rows": len(positions), "augmented_rows": sum(made.values()),
              "by_op": dict(made), "unchanged_skipped": dict(unchanged)}
    if unreadable:
        rejects = Path(out).with_name(Path(out).name.split(".")[0] + ".rejects.jsonl")
        atomic_write_text(rejects, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unreadable))
        report.update(rejected_rows=len(unreadable), rejects_file=str(rejects))
    if rewriter is not None:
        report["model_calls"] = rewriter.calls
    return report


def _rewrite_fn(op: str, s: AugmentSettings, rng: random.Random, synonyms, rewriter):
    """The text -> text function of one augmentation operation."""
    if op == "paraphrase":
        return rewriter.paraphrase
    if op == "backtranslate":
        return lambda t: rewriter.backtranslate(t, s.pivot)
    if op == "reorder":
        return lambda t: reorder(t, rng)
    return lambda t: eda(t, op, s.alpha, rng, synonyms)


def augment_records(records, s: AugmentSettings):
    """Augmented copies of records (for the training config): ``(new records, counts per op)``."""


    rng = random.Random(s.seed)
    synonyms = load_synonyms(s.synonyms)
    rewriter = ModelRewriter.from_settings(s) if {"paraphrase", "backtranslate"} & set(s.ops) else None
    if rewriter is None and {"paraphrase", "backtranslate"} & set(s.ops):
        raise UserError("data.prepare.augment: paraphrase/backtranslate need data.prepare.augment.model.")
    made: Counter = Counter()
    out = []
    for r in records[: s.limit] if s.limit else records:
        for op in s.ops:
            for copy in range(s.copies):
                fn = _rewrite_fn(op, s, rng, synonyms, rewriter)
                if r.is_text:
                    new = dataclasses.replace(r, text=fn(r.text or ""))
                else:
                    last = max(i for i, m in enumerate(r.messages) if m.role == "assistant") if r.label is None else -1
                    msgs = tuple(
                        Message(m.role, fn(m.content)) if (
                            (m.role == "user" and s.field in ("prompt", "both"))
                            or (m.role == "assistant" and i == last and s.field in ("answer", "both"))) else m
                        for i, m in enumerate(r.messages))
                    new = dataclasses.replace(r, messages=msgs)
                if new == r:
                    continue
                out.append(dataclasses.replace(new, id=f"{r.id}#aug-{op}-{copy}",
                                               meta={**r.meta, "augmented": op, "source_id": r.id}))
                made[op] += 1
    return out, dict(made)
