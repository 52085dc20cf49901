"""Classification metrics for generated answers.

A generative model answers in free text, so evaluation has two steps: :func:`parse_label`
maps each generation to one of the allowed labels (or ``None`` when it names none of
them), then :func:`classification_metrics` scores the parsed predictions. An unparseable
prediction counts as wrong: it is scored as the extra class ``"<unparsed>"``, which lowers
the recall of the true class but is left out of every average over the labels.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from statistics import NormalDist
from typing import Any

import numpy as np

from tunelab.errors import UserError

__all__ = ["UNPARSED", "classification_metrics", "parse_label"]  # extended below

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


# --------------------------------------------------------------------------- generation metrics

__all__ += [
    "bootstrap_ci", "exact_match", "generation_metrics", "is_chinese", "lm_metrics", "normalize_answer",
    "token_f1", "wilson_interval",
]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")
_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") | set("。，、；：？！“”‘’（）【】《》「」『』—…·～")


def is_chinese(texts: list[str], share: float = 0.3) -> bool:
    """True when at least ``share`` of the non-space characters of ``texts`` are CJK."""
    chars = [c for t in texts for c in t if not c.isspace()]
    return bool(chars) and sum(1 for c in chars if _CJK.match(c)) / len(chars) >= share


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower-case, drop punctuation (ASCII and CJK) and English articles, squeeze spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answer_tokens(text: str) -> list[str]:
    """Tokens for token-F1: each CJK character is a token (CMRC 2018's rule), other runs split on spaces."""
    out: list[str] = []
    for word in normalize_answer(text).split():
        buf = ""
        for ch in word:
            if _CJK.match(ch):
                if buf:
                    out.append(buf)
                    buf = ""
                out.append(ch)
            else:
                buf += ch
        if buf:
            out.append(buf)
    return out


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference (SQuAD)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD token-overlap F1, the best over the references (CJK scored per character)."""

    pred = _answer_tokens(prediction)
    best = 0.0
    for ref in references:
        gold = _answer_tokens(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


class _CharTokenizer:
    """rouge-score tokenizer for Chinese: one token per non-space character, lower-cased."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


GENERATION_METRICS = ("exact_match", "f1", "bleu", "rouge1", "rouge2", "rougeL", "chrf")


def generation_metrics(
    predictions: list[str], references: list[list[str]], *, lang: str = "auto", metrics: list[str] | None = None
) -> dict[str, Any]:
    """Corpus scores for generated text against one or more references per example.

    exact match and token F1 (SQuAD-style, max over references; CJK per character), BLEU and
    chrF by sacrebleu (``tokenize="zh"`` for Chinese, ``13a`` otherwise), ROUGE-1/2/L F-measure
    by rouge-score (max over references; character tokens for Chinese). Every value is in
    [0, 100] for BLEU/chrF (sacrebleu's scale) and [0, 1] for the others. ``per_example``
    holds ``exact_match`` and ``f1`` per example, for paired comparisons.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise UserError("metrics: there are no examples to score (got 0). Check the evaluation data.")
    wanted = list(metrics or GENERATION_METRICS)
    unknown = [m for m in wanted if m not in GENERATION_METRICS]
    if unknown:
        raise UserError(f"metrics: unknown generation metric(s) {unknown}. Choose from {', '.join(GENERATION_METRICS)}")
    refs = [[r for r in rs] or [""] for rs in references]
    zh = is_chinese([r[0] for r in refs]) if lang == "auto" else lang == "zh"
    out: dict[str, Any] = {"n": len(predictions), "lang": "zh" if zh else "en"}
    em = [exact_match(p, r) for p, r in zip(predictions, refs, strict=True)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, refs, strict=True)]
    if "exact_match" in wanted:
        out["exact_match"] = sum(em) / len(em)
    if "f1" in wanted:
        out["f1"] = sum(f1) / len(f1)
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]  # a repeated reference changes nothing
    if "bleu" in wanted:
        out["bleu"] = sacrebleu.corpus_bleu(predictions, streams, tokenize="zh" if zh else "13a").score
    if "chrf" in wanted:
        out["chrf"] = sacrebleu.corpus_chrf(predictions, streams).score
    rouge_types = [m for m in ("rouge1", "rouge2", "rougeL") if m in wanted]
    if rouge_types:
        scorer = rouge_scorer.RougeScorer(rouge_types, tokenizer=_CharTokenizer() if zh else None)
        sums = dict.fromkeys(rouge_types, 0.0)
        for p, r in zip(predictions, refs, strict=True):
            scores = scorer.score_multi(r, p)
            for t in rouge_types:
                sums[t] += scores[t].fmeasure
        out.update({t: s / len(predictions) for t, s in sums.items()})
    out["per_example"] = {"exact_match": em, "f1": f1}
    return out


# --------------------------------------------------------------------------- language-model metrics


def lm_metrics(loss_sum: float, n_tokens: int, n_correct: int) -> dict[str, float]:
    """Mean loss per target token, its perplexity (exp of the mean), and next-token accuracy."""

    if n_tokens <= 0:
        raise UserError("metrics: no target tokens to score (got 0). Check that the data has assistant replies.")
    loss = loss_sum / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": n_correct / n_tokens,
            "tokens": n_tokens}


# --------------------------------------------------------------------------- intervals


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (the standard library's normal quantile)."""
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def bootstrap_ci(values: list[float], *, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (numpy, seeded)."""

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


# --------------------------------------------------------------------------- paired tests

__all__ += ["paired_test"]


def paired_test(a: list[float], b: list[float], *, binary: bool | None = None, n_resamples: int = 5000,
                confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired difference ``mean(b) - mean(a)`` with a paired-bootstrap interval and a p-value: McNemar's exact
    test when every score is 0/1 (``binary``; scipy's binomial test on the discordant pairs), else the paired
    bootstrap's two-sided p-value. ``tunelab compare`` and the TF-IDF baseline of ``tunelab eval`` use it."""

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise UserError(f"compare: need the same, non-zero number of paired scores (got {x.size} and {y.size})")
    if binary is None:
        binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    boot = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    out: dict[str, Any] = {"n": int(d.size), "mean_a": float(x.mean()), "mean_b": float(y.mean()),
                           "difference": float(d.mean()), "ci_low": float(np.quantile(boot, alpha)),
                           "ci_high": float(np.quantile(boot, 1 - alpha)), "confidence": confidence}
    if binary:
        b_only = int(((x == 0) & (y == 1)).sum())  # B right, A wrong
        a_only = int(((x == 1) & (y == 0)).sum())
        # lazy: scipy takes about 0.4 s to import, in every process that trains (the task modules import this one)
        from scipy.stats import binomtest

        p = 1.0 if a_only + b_only == 0 else float(binomtest(b_only, a_only + b_only, 0.5).pvalue)
        out.update(test="mcnemar-exact", a_only_correct=a_only, b_only_correct=b_only, p_value=p)
    else:
        centred = (d - d.mean())[idx].mean(axis=1)
        p = float((np.abs(centred) >= abs(d.mean()) - 1e-12).mean())
        out.update(test="paired-bootstrap", p_value=max(p, 1.0 / n_resamples))
    out["significant"] = out["p_value"] < 1 - confidence
    return out
