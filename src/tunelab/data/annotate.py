"""Annotation quality: agreement between annotators, disagreements, majority vote.

Rows carry several annotations, either as a list column (``labels: ["pos", "neg", "pos"]``)
or as one column per annotator (``--annotators a1 a2 a3``). Cohen's kappa (two annotators)
comes from scikit-learn; Fleiss' kappa (any number of annotators, the same number per item)
is computed here (scikit-learn has none; statsmodels is not a dependency) with the textbook
formula (Fleiss 1971). A majority vote with ties flagged gives each row its label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.formats import check_file, json_value, raw_rows
from tunelab.data.stream import write_rows
from tunelab.errors import UserError


def fleiss_kappa(ratings: Sequence[Sequence[Any]]) -> float:
    """Fleiss' kappa of items each rated by the same number n >= 2 of raters."""
    if not ratings:
        raise ValueError("no items")
    n = len(ratings[0])
    if n < 2 or any(len(r) != n for r in ratings):
        raise ValueError("every item needs the same number (>= 2) of ratings")
    categories = sorted({c for r in ratings for c in r}, key=str)
    counts = [[Counter(r)[c] for c in categories] for r in ratings]
    n_items = len(ratings)
    p_j = [sum(row[j] for row in counts) / (n_items * n) for j in range(len(categories))]
    p_i = [(sum(x * x for x in row) - n) / (n * (n - 1)) for row in counts]
    p_bar = sum(p_i) / n_items
    p_e = sum(p * p for p in p_j)
    if p_e == 1.0:
        return 1.0
    return (p_bar - p_e) / (1 - p_e)


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two annotators (scikit-learn)."""
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score([str(x) for x in a], [str(x) for x in b]))


def interpret(kappa: float) -> str:
    """Landis & Koch (1977) wording."""
    for bound, word in ((0.0, "poor"), (0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial")):
        if kappa <= bound:
            return word
    return "almost perfect"


def majority(labels: Sequence[Any]) -> tuple[Any, bool]:
    """(the most common label, whether it is tied with another)."""
    ranked = Counter(labels).most_common()
    tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
    return (None if tie else ranked[0][0]), tie


@dataclass
class AgreementReport:
    items: int
    annotators: int
    kappa: float | None
    kind: str  # cohen | fleiss
    interpretation: str
    observed_agreement: float
    unanimous: int
    ties: int
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # rows with another number of annotations (not in the kappa)
    label_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def annotations_of(row: dict[str, Any], column: str, annotators: Sequence[str] | None) -> list[Any]:
    if annotators:
        return [row[a] for a in annotators if row.get(a) not in (None, "")]
    value = row.get(column)
    if isinstance(value, list):
        return [v for v in value if v not in (None, "")]
    return []


def agreement(rows: Sequence[dict[str, Any]], *, column: str = "labels", annotators: Sequence[str] | None = None,
              where: str = "data") -> tuple[AgreementReport, list[dict[str, Any]]]:
    """The agreement report and the rows with ``label`` set by majority vote (``label_tie`` flags ties)."""
    ann = [annotations_of(r, column, annotators) for r in rows]
    if not any(len(a) >= 2 for a in ann):
        got = f"columns {list(annotators)}" if annotators else f"column {column!r}"
        raise UserError(f"{where}: no row has two or more annotations (got {got}). Put the annotations in a list "
                        "column (--column labels) or name one column per annotator (--annotators a1 a2).")
    n = Counter(len(a) for a in ann if len(a) >= 2).most_common(1)[0][0]
    full = [(i, a) for i, a in enumerate(ann) if len(a) == n]
    if n == 2 and annotators and len(annotators) == 2:
        kappa, kind = cohen_kappa([a[0] for _, a in full], [a[1] for _, a in full]), "cohen"
    elif n == 2:
        kappa, kind = fleiss_kappa([a for _, a in full]), "fleiss"  # unordered pairs: raters are not fixed
    else:
        kappa, kind = fleiss_kappa([a for _, a in full]), "fleiss"
    out_rows, disagreements, ties, unanimous = [], [], 0, 0
    pair_agree, pairs = 0, 0
    for i, (row, a) in enumerate(zip(rows, ann, strict=True)):
        new = dict(row)
        if a:
            label, tie = majority(a)
            new["label"], new["label_tie"] = label, tie
            new["label_votes"] = dict(Counter(str(x) for x in a))
            ties += tie
            if len(set(map(str, a))) == 1:
                unanimous += 1
            else:
                disagreements.append({"row": i, "annotations": a, "majority": label, "tie": tie})
            c = Counter(map(str, a))
            pair_agree += sum(v * (v - 1) for v in c.values())
            pairs += len(a) * (len(a) - 1)
        out_rows.append(new)
    labels = Counter(str(x) for a in ann for x in a)
    report = AgreementReport(
        items=len(full), annotators=n, kappa=round(kappa, 6), kind=kind, interpretation=interpret(kappa),
        observed_agreement=round(pair_agree / max(pairs, 1), 6), unanimous=unanimous, ties=ties,
        disagreements=disagreements, skipped=sum(1 for a in ann if len(a) != n), label_counts=dict(labels),
    )
    return report, out_rows


def agreement_file(path: str | Path, *, column: str = "labels", annotators: Sequence[str] | None = None,
                   out: str | Path | None = None) -> AgreementReport:
    """Read raw rows of a .jsonl/.json/.csv/.parquet file, report agreement, optionally write voted rows."""

    p = Path(path)
    check_file(p)
    rows = [r for _, r in raw_rows(p, None) if isinstance(r, dict)]
    if annotators is None:
        for r in rows:  # CSV list columns arrive as JSON text
            if isinstance(r.get(column), str):
                r[column] = json_value(r[column])
    report, voted = agreement(rows, column=column, annotators=annotators, where=str(p))
    if out is not None:
        write_rows(out, voted, protect=[p])
    return report
