"""Multiple-choice benchmarks (MMLU, CMMLU, C-Eval and anything in their CSV layout).

:func:`load_benchmark` reads a zip or a folder of ``<split>/<subject>[_<split>].csv`` files
(any depth: MMLU's zip nests them under ``data/``) and the ``mapping.json`` beside it
(``subject -> {"name", "category"}``). A CSV either has no header and the columns
``question, A, B, C, D, answer`` (MMLU), or a header naming ``question``, the choice letters
and ``answer`` in any case and order, extra columns ignored (CMMLU's leading index, C-Eval's
``id`` and ``explanation``). A split without an answer column (C-Eval's test) cannot be
scored: ``split="auto"`` takes ``test`` when it has answers, else ``val``.

:func:`score_benchmark` builds the standard k-shot prompt (the first k questions of the
subject's ``dev`` split, answers shown), and picks the choice letter with the highest
log-likelihood after ``Answer:`` (``答案：`` for Chinese benchmarks), in one forward pass
per question. Results: accuracy with a Wilson interval overall, per subject and per category.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.eval.metrics import is_chinese, wilson_interval
from tunelab.eval.progress import progress_bar

__all__ = ["Benchmark", "Question", "load_benchmark", "score_benchmark", "subset"]


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: str  # a letter: "A", "B", ...
    index: int  # row within its subject's split

    @property
    def id(self) -> str:
        return f"{self.subject}:{self.index}"


@dataclass
class Benchmark:
    name: str
    path: str
    splits: dict[str, dict[str, list[Question]]]  # split -> subject -> questions
    mapping: dict[str, dict[str, str]]  # subject -> {"name", "category"}

    def subjects(self, split: str) -> list[str]:
        return sorted(self.splits.get(split, {}))

    def subject_name(self, subject: str) -> str:
        return self.mapping.get(subject, {}).get("name", subject.replace("_", " "))

    def category(self, subject: str) -> str:
        return self.mapping.get(subject, {}).get("category", "other")

    def chinese(self) -> bool:
        some = [q.question for qs in next(iter(self.splits.values()), {}).values() for q in qs[:2]]
        return is_chinese(some)


_SPLITS = ("dev", "val", "validation", "test", "train")


def _split_and_subject(name: str) -> tuple[str, str] | None:
    parts = Path(name).parts
    if len(parts) < 2 or not parts[-1].lower().endswith(".csv"):
        return None
    split = parts[-2].lower()
    if split not in _SPLITS:
        return None
    split = "val" if split == "validation" else split
    stem = Path(parts[-1]).stem
    for suffix in (f"_{parts[-2]}", f"_{split}"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return split, stem


def _parse_csv(text: str, where: str, subject: str) -> list[Question]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    letters: list[str]
    if "question" in head and "a" in head:
        q_col = head.index("question")
        letters = [c.upper() for c in head if len(c) == 1 and c.isalpha()]
        cols = [head.index(x.lower()) for x in letters]
        a_col = head.index("answer") if "answer" in head else None
        body = rows[1:]
    else:
        width = len(rows[0])
        if width < 4:
            raise UserError(f"{where}: expected question, choices and answer columns (got {width} columns). "
                            "Use the MMLU layout question,A,B,C,D,answer or a header row")
        q_col, a_col = 0, width - 1
        cols = list(range(1, width - 1))
        letters = [chr(ord("A") + i) for i in range(len(cols))]
        body = rows
    out = []
    for i, r in enumerate(body):
        try:
            answer = r[a_col].strip().upper() if a_col is not None else ""
            q = Question(subject, r[q_col], tuple(r[c] for c in cols), answer, i)
        except IndexError:
            raise UserError(f"{where}: row {i + 1} has {len(r)} columns, fewer than the header's. Fix the CSV") from None
        if answer and answer not in letters:
            raise UserError(f"{where}: row {i + 1}: the answer must be one of {letters} (got {answer!r}). Fix the CSV")
        out.append(q)
    return out


def load_benchmark(path: str | Path) -> Benchmark:
    """Read a benchmark from a zip or a folder (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: benchmark not found. Pass a zip or folder of <split>/<subject>.csv files, "
                        "e.g. ../shared/data/benchmarks/mmlu/mmlu.zip")
    files: dict[str, str] = {}
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not a zip file. Pass a zip or a folder of <split>/<subject>.csv files")
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if _split_and_subject(name):
                    files[name] = zf.read(name).decode("utf-8-sig")
        folder = path.parent
    else:
        for f in sorted(path.rglob("*.csv")):
            rel = f.relative_to(path).as_posix()
            if _split_and_subject(rel):
                files[rel] = f.read_text(encoding="utf-8-sig")
        folder = path
    if not files:
        raise UserError(f"{path}: no <split>/<subject>.csv files found (splits: dev, val, test). "
                        "Check the layout against ../shared/README.md")
    splits: dict[str, dict[str, list[Question]]] = {}
    for name, text in sorted(files.items()):
        split, subject = _split_and_subject(name)  # type: ignore[misc]
        splits.setdefault(split, {})[subject] = _parse_csv(text, f"{path}:{name}", subject)
    mapping: dict[str, dict[str, str]] = {}
    for candidate in (folder / "mapping.json", path / "mapping.json" if path.is_dir() else None):
        if candidate is not None and candidate.is_file():
            mapping = json.loads(candidate.read_text(encoding="utf-8"))
            break
    name = path.stem if path.is_file() else path.name
    return Benchmark(name, str(path), splits, mapping)


def _scorable_split(bench: Benchmark, split: str) -> str:
    def has_answers(s: str) -> bool:
        return any(q.answer for qs in bench.splits.get(s, {}).values() for q in qs)

    if split == "auto":
        for s in ("test", "val"):
            if has_answers(s):
                return s
        raise UserError(f"{bench.path}: no split with answers (have {sorted(bench.splits)}). Use a benchmark with answers")
    if split not in bench.splits:
        raise UserError(f"{bench.path}: no split {split!r} (have {sorted(bench.splits)}). Choose one of them or auto")
    if not has_answers(split):
        raise UserError(f"{bench.path}: split {split!r} has no answers to score (C-Eval withholds its test answers). "
                        "Use --split val")
    return split


def subset(questions_by_subject: dict[str, list[Question]], limit: int | None,
           subjects: list[str] | None = None) -> list[Question]:
    """The questions to score: round-robin over the subjects (the first question of every
    subject, then the second, ...), so a ``limit`` of a few hundred still covers them all."""
    names = sorted(subjects or questions_by_subject)
    missing = [s for s in names if s not in questions_by_subject]
    if missing:
        raise UserError(f"--subjects: unknown subject(s) {missing[:5]} (have e.g. {sorted(questions_by_subject)[:5]}). "
                        "Use names as in the CSV file names")
    out: list[Question] = []
    depth = 0
    while True:
        added = False
        for s in names:
            qs = questions_by_subject[s]
            if depth < len(qs):
                out.append(qs[depth])
                added = True
                if limit is not None and len(out) >= limit:
                    return out
        if not added:
            return out
        depth += 1


def _format_question(q: Question, answer_word: str, with_answer: bool) -> str:
    lines = [q.question.strip()] + [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(q.choices)]
    sep = "" if answer_word.endswith("：") else " "
    return "\n".join(lines) + f"\n{answer_word}" + (f"{sep}{q.answer}\n\n" if with_answer else "")


def build_prompt(bench: Benchmark, q: Question, shots: list[Question], zh: bool) -> str:
    """The k-shot prompt in the format of the benchmarks' own papers (Chinese wording for CMMLU/C-Eval)."""
    name = bench.subject_name(q.subject)
    if zh:
        head = f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
        word = "答案："
    else:
        head = f"The following are multiple choice questions (with answers) about {name}.\n\n"
        word = "Answer:"
    return head + "".join(_format_question(s, word, True) for s in shots) + _format_question(q, word, False)


def score_benchmark(model, tokenizer, bench: Benchmark, *, k_shot: int = 0, limit: int | None = None,
                    split: str = "auto", subjects: list[str] | None = None, batch_size: int = 8,
                    max_length: int | None = None, confidence: float = 0.95, console=None) -> dict[str, Any]:
    """Accuracy of ``model`` on ``bench`` (log-likelihood of each choice letter); see the module docstring.

    A prompt longer than ``max_length`` tokens (default: the model's context) drops shots
    until it fits; the number of prompts that lost shots is reported.
    """
    from tunelab.eval.generate import loglik_continuations

    split = _scorable_split(bench, split)
    questions = subset(bench.splits[split], limit, subjects)
    if not questions:
        raise UserError(f"{bench.path}: no questions to score in split {split!r}")
    dev = bench.splits.get("dev", {})
    if k_shot and not dev:
        raise UserError(f"{bench.path}: k-shot prompts need a dev split (have {sorted(bench.splits)}). Use --k-shot 0")
    zh = bench.chinese()
    limit_len = max_length or int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048)
    contexts, shortened = [], 0
    for q in questions:
        shots = dev.get(q.subject, [])[:k_shot] if split != "dev" else [
            s for s in dev.get(q.subject, []) if s.index != q.index][:k_shot]
        while True:
            ids = list(tokenizer(build_prompt(bench, q, shots, zh), add_special_tokens=False)["input_ids"])
            if len(ids) < limit_len or not shots:
                break
            shots = shots[:-1]
        shortened += len(shots) < k_shot
        contexts.append(ids[-(limit_len - 1):])
    letter_ids = []
    for i in range(max(len(q.choices) for q in questions)):
        letter = chr(ord("A") + i)
        letter_ids.append(list(tokenizer((" " if not zh else "") + letter, add_special_tokens=False)["input_ids"]))
    conts = [[letter_ids[i] for i in range(len(q.choices))] for q in questions]
    with progress_bar(f"{bench.name} {k_shot}-shot", len(questions), console) as advance:
        scores = loglik_continuations(model, tokenizer, contexts, conts, batch_size=batch_size, progress=advance)
    per_question = []
    for q, s in zip(questions, scores, strict=True):
        pred = chr(ord("A") + max(range(len(s)), key=s.__getitem__))
        per_question.append({"id": q.id, "subject": q.subject, "answer": q.answer, "pred": pred,
                             "correct": pred == q.answer})
    return {"benchmark": bench.name, "path": bench.path, "split": split, "k_shot": k_shot,
            "n": len(per_question), "prompts_with_fewer_shots": shortened,
            "chance": sum(1 / len(q.choices) for q in questions) / len(questions),
            **_accuracy_tables(bench, per_question, confidence), "per_question": per_question}


def _acc(rows: list[dict], confidence: float) -> dict[str, Any]:
    k, n = sum(r["correct"] for r in rows), len(rows)
    lo, hi = wilson_interval(k, n, confidence)
    return {"accuracy": k / n if n else 0.0, "correct": k, "n": n, "ci_low": lo, "ci_high": hi}


def _accuracy_tables(bench: Benchmark, rows: list[dict], confidence: float) -> dict[str, Any]:
    by_subject: dict[str, list[dict]] = {}
    by_category: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
        by_category.setdefault(bench.category(r["subject"]), []).append(r)
    return {**_acc(rows, confidence), "confidence": confidence,
            "per_subject": {s: _acc(v, confidence) for s, v in sorted(by_subject.items())},
            "per_category": {c: _acc(v, confidence) for c, v in sorted(by_category.items())}}


def question_dict(q: Question) -> dict[str, Any]:
    return asdict(q)
