"""The classical baseline of every classification evaluation: TF-IDF features + logistic regression.

A tuned model should beat what a few seconds of scikit-learn get from the same training rows;
``tunelab eval --baselines``, the ``eval:`` section, ``tunelab compare`` and the report show
this baseline next to the model so that nobody has to find out on their own that it does not.

* **Features**: scikit-learn's ``TfidfVectorizer`` with sublinear term frequencies; character
  1-3-grams when the training text is mostly CJK (:func:`cjk_share` at least
  :data:`MOSTLY_CJK`: Chinese and Japanese have no spaces between words, so word n-grams would
  be whole clauses), word 1-2-grams otherwise (scikit-learn's default tokenisation).
* **Classifier**: ``LogisticRegression`` (L2, ``C=1``, lbfgs, ``max_iter=1000``).
* **Training data**: the run's own training split, rebuilt from its ``config.yaml`` by
  :func:`tunelab.data.workbench.prepare_records` (the same files, ``eval_ratio`` / split,
  cleaning and augmentation as training; of a multi-task run, the files of the task whose
  labels the evaluation data has), or a file the user names (``--train FILE``).
* **Scoring**: the evaluation rows' text (:func:`tunelab.data.tasks.record_text`, the text a
  classification head reads), the same metrics as every system
  (:func:`tunelab.eval.metrics.classification_metrics`) and per-example 0/1 scores for the
  paired test (:func:`tunelab.eval.metrics.paired_test`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config import load_config
from tunelab.data.formats import read_records
from tunelab.data.records import Record
from tunelab.data.tasks import record_text
from tunelab.data.workbench import prepare_records
from tunelab.errors import UserError, first_line
from tunelab.eval.metrics import classification_metrics
from tunelab.eval.tasks import gold_label

__all__ = ["BASELINE", "MOSTLY_CJK", "TrainingText", "cjk_share", "describe", "features_for", "fit_baseline",
           "score_baseline", "training_text"]

#: The system name of the baseline in result files, tables and the report.
BASELINE = "tfidf-lr"

#: Character n-grams when at least this share of the training text's letters are CJK.
MOSTLY_CJK = 0.5

# Han ideographs (with extension A and compatibility forms), kana and Hangul syllables
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def cjk_share(texts: Sequence[str]) -> float:
    """The share of the letters of ``texts`` (``str.isalpha``) that are CJK characters; 0 without letters."""
    letters = cjk = 0
    for t in texts:
        for c in t:
            if c.isalpha():
                letters += 1
                cjk += bool(_CJK.match(c))
    return cjk / letters if letters else 0.0


def features_for(texts: Sequence[str]) -> dict[str, Any]:
    """The vectoriser settings for training text: char 1-3-grams when mostly CJK, else word 1-2-grams."""
    share = cjk_share(texts)
    if share >= MOSTLY_CJK:
        return {"analyzer": "char", "ngram_range": (1, 3), "cjk_share": round(share, 4)}
    return {"analyzer": "word", "ngram_range": (1, 2), "cjk_share": round(share, 4)}


@dataclass
class TrainingText:
    """The baseline's training rows (text, label) and where they came from."""

    texts: list[str]
    labels: list[str]
    source: str


def fit_baseline(train: TrainingText):
    """The fitted scikit-learn pipeline (``TfidfVectorizer`` -> ``LogisticRegression``) and its settings."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(train.labels)) < 2:
        raise UserError(f"{BASELINE}: the training rows of {train.source} have {len(set(train.labels))} label(s); "
                        "logistic regression needs at least 2. Pass --train FILE with labelled rows of every class")
    feats = features_for(train.texts)
    pipe = make_pipeline(TfidfVectorizer(analyzer=feats["analyzer"], ngram_range=feats["ngram_range"],
                                         sublinear_tf=True),
                         LogisticRegression(C=1.0, max_iter=1000))
    pipe.fit(train.texts, train.labels)
    settings = {"features": f"{feats['analyzer']} {feats['ngram_range'][0]}-{feats['ngram_range'][1]}-grams",
                "cjk_share": feats["cjk_share"], "sublinear_tf": True, "C": 1.0, "train_rows": len(train.texts),
                "train_source": train.source, "vocabulary": len(pipe[0].vocabulary_)}
    return pipe, settings


def score_baseline(train: TrainingText, records: Sequence[Record], labels: list[str]) -> dict[str, Any]:
    """Fit on ``train``, predict each record's label; ``{"metrics", "examples"}`` as every system returns."""
    pipe, settings = fit_baseline(train)
    texts = [record_text(r) for r in records]
    pred = [str(p) for p in pipe.predict(texts)] if texts else []
    gold = [gold_label(r) for r in records]
    metrics = {"labels": list(labels), "tfidf": classification_metrics(gold, pred, list(labels)), "primary": "tfidf",
               "baseline": settings}
    examples = [{"id": r.id, "prompt": t, "reference": g, "pred": p, "score": float(p == g)}
                for r, t, g, p in zip(records, texts, gold, pred, strict=True)]
    return {"metrics": metrics, "examples": examples}


def describe(settings: dict[str, Any]) -> str:
    return (f"TF-IDF ({settings['features']}) + logistic regression, trained on {settings['train_rows']:,} rows of "
            f"{settings['train_source']}")


# --------------------------------------------------------------------------- training data


def _pairs(records: Sequence[Record]) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for r in records:
        g = gold_label(r)
        if g is not None and record_text(r).strip():
            texts.append(record_text(r))
            labels.append(g)
    return texts, labels


def training_text(run_dir: Path | None, labels: Sequence[str], train_file: str | None = None,
                  fmt: str = "auto") -> TrainingText:
    """The baseline's training rows: ``train_file`` when given, else the run's own training split.

    Raises :class:`UserError` (one line, with the fix) when there is none to read.
    """
    if train_file is not None:
        res = read_records(train_file, format=fmt)
        texts, labs = _pairs(res.records)
        if not texts:
            raise UserError(f"--train: {train_file} has no labelled row ({len(res.rejects)} rejected). Pass a "
                            "classification file (text + label) or chat data with a final assistant label")
        return TrainingText(texts, labs, train_file)
    if run_dir is None:
        raise UserError(f"{BASELINE}: the target is not a run, so it has no training data. Pass --train FILE")
    quiet = Console(quiet=True)
    try:
        cfg, _ = load_config(run_dir / "config.yaml")
        tasks_of = [s.task for s in cfg.data.train]
        if any(tasks_of):  # a multi-task run: the files of the task whose labels the evaluation data has
            best: tuple[float, TrainingText] | None = None
            for task in dict.fromkeys(t for t in tasks_of if t):
                specs = [s for s in cfg.data.train if s.task == task]
                sub = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": specs, "prepare": None})})
                texts, labs = _pairs(prepare_records(sub, None, quiet, True).train)
                overlap = len(set(labs) & set(labels)) / max(1, len(set(labels)))
                if texts and (best is None or overlap > best[0]):
                    best = (overlap, TrainingText(texts, labs, f"task {task} of {run_dir}"))
            if best is None or best[0] == 0:
                raise UserError(f"{BASELINE}: no task of {run_dir} has the labels of the data. Pass --train FILE")
            return best[1]
        texts, labs = _pairs(prepare_records(cfg, None, quiet, True).train)
    except (OSError, UserError) as err:
        if isinstance(err, UserError) and str(err).startswith(BASELINE):
            raise
        raise UserError(f"{BASELINE}: cannot read the training data of {run_dir} from here ({first_line(err)}). "
                        "Pass --train FILE") from None
    if not texts:
        raise UserError(f"{BASELINE}: the training split of {run_dir} has no labelled row. Pass --train FILE")
    return TrainingText(texts, labs, f"the training split of {run_dir}")
