"""Classification metrics for generated answers.

A generative model answers in free text, so evaluation has two steps: :func:`parse_label`
maps each generation to one of the allowed labels (or ``None`` when it names none of
them), then :func:`classification_metrics` scores the parsed predictions. An unparseable
prediction counts as wrong: it is scored as the extra class ``"<unparsed>"``, which lowers
the recall of the true class but is left out of every average over the labels.
"""

from __future__ import annotations

import re
from typing import Any

from tunelab.errors import UserError

__all__ = ["UNPARSED", "classification_metrics", "parse_label"]

#: The class an unparseable prediction (``None``) is scored as.
UNPARSED = "<unparsed>"

# Characters stripped from both ends before the exact-match test: whitespace, quotes,
# brackets, sentence punctuation and markdown emphasis, ASCII and full-width.
_STRIP = " \t\r\n\"'`*_.,;:!?()[]{}<>。，；：！？“”‘’（）【】《》「」"


def parse_label(text: str, labels: list[str], aliases: dict[str, list[str]] | None = None) -> str | None:
    """Map a free-form generation to one of ``labels``, or ``None``.

    1. Exact match: the text, stripped of surrounding whitespace/punctuation and
       case-folded, equals a label (or one of its aliases) case-folded.
    2. Otherwise the label (or alias) that occurs earliest in the text, case-insensitively;
       when two start at the same place the longer wins (``"R&D subsidy"`` over ``"R&D"``).
       A candidate that starts/ends with an ASCII letter or digit must not be glued to
       another ASCII letter or digit there, so ``"Green"`` is not found in ``"Greenland"``
       (nor ``"Export"`` in ``"Exports"``); CJK candidates match anywhere.
    3. Otherwise ``None``.

    ``aliases`` maps a label to other spellings that mean it, e.g. the Chinese name
    ``{"R&D subsidy": ["研发补贴"]}``; an alias always resolves to its label.
    """
    if not text:
        return None
    candidates: list[tuple[str, str]] = [(label, label) for label in labels]
    for label, names in (aliases or {}).items():
        if label not in labels:
            continue
        candidates.extend((name, label) for name in names if name)

    stripped = text.strip(_STRIP).casefold()
    for name, label in candidates:
        if stripped == name.strip().casefold():
            return label

    folded = text.casefold()
    best: tuple[int, int, str] | None = None  # (position, -length, label)
    for name, label in candidates:
        pos = _find(folded, name.strip().casefold())
        if pos is None:
            continue
        key = (pos, -len(name), label)
        if best is None or key[:2] < best[:2]:
            best = key
    return best[2] if best is not None else None


def _find(haystack: str, needle: str) -> int | None:
    if not needle:
        return None
    left = r"(?<![a-z0-9])" if _is_wordish(needle[0]) else ""
    right = r"(?![a-z0-9])" if _is_wordish(needle[-1]) else ""
    m = re.search(left + re.escape(needle) + right, haystack)
    return m.start() if m else None


def _is_wordish(ch: str) -> bool:
    """An ASCII letter or digit: such label edges need a word boundary."""
    return ch.isascii() and ch.isalnum()


def classification_metrics(y_true: list[str], y_pred: list[str | None], labels: list[str]) -> dict[str, Any]:
    """Score parsed predictions against gold labels.

    ``None`` in ``y_pred`` is an unparseable answer: it is wrong, and is scored as the class
    :data:`UNPARSED`, which is excluded from the macro/micro/weighted averages (they run
    over ``labels`` only). Returns a JSON-friendly dict::

        {"n", "accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1",
         "weighted_f1", "n_unparsed", "unparsed_rate",
         "per_class": {label: {"precision", "recall", "f1", "support"}},
         "labels", "confusion"}

    ``confusion[i][j]`` counts gold ``labels[i]`` predicted as column ``j``, where the
    columns are ``labels`` followed by ``"<unparsed>"`` and ``"<other>"`` (a prediction that
    is not ``None`` but not one of ``labels`` either).
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if not labels:
        raise UserError("metrics: the label set is empty (got []). Pass the list of allowed labels.")
    if len(set(labels)) != len(labels):
        raise UserError(f"metrics: the label set has duplicates (got {labels!r}). List each label once.")
    if not y_true:
        raise UserError("metrics: there are no examples to score (got 0). Check the evaluation split.")
    unknown = sorted({t for t in y_true if t not in labels})
    if unknown:
        raise UserError(
            f"metrics: gold labels not in the label set (got {unknown[:5]!r}). "
            f"Add them to the labels or fix the data; allowed: {labels!r}."
        )

    pred = [UNPARSED if p is None else p for p in y_pred]
    n_unparsed = sum(1 for p in y_pred if p is None)

    p_c, r_c, f_c, s_c = precision_recall_fscore_support(
        y_true, pred, labels=labels, average=None, zero_division=0
    )
    macro = precision_recall_fscore_support(y_true, pred, labels=labels, average="macro", zero_division=0)
    micro = precision_recall_fscore_support(y_true, pred, labels=labels, average="micro", zero_division=0)
    weighted = precision_recall_fscore_support(
        y_true, pred, labels=labels, average="weighted", zero_division=0
    )

    columns = [*labels, UNPARSED, "<other>"]
    col_of = {c: i for i, c in enumerate(columns)}
    row_of = {c: i for i, c in enumerate(labels)}
    confusion = [[0] * len(columns) for _ in labels]
    for t, p in zip(y_true, pred, strict=True):
        confusion[row_of[t]][col_of.get(p, col_of["<other>"])] += 1

    n = len(y_true)
    return {
        "n": n,
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(macro[2]),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "micro_f1": float(micro[2]),
        "weighted_f1": float(weighted[2]),
        "n_unparsed": n_unparsed,
        "unparsed_rate": n_unparsed / n,
        "per_class": {
            label: {
                "precision": float(p_c[i]),
                "recall": float(r_c[i]),
                "f1": float(f_c[i]),
                "support": int(s_c[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion": confusion,
    }
