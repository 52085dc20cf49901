"""Generation metrics, language-model metrics and intervals against the reference libraries."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunelab.errors import UserError
from tunelab.eval.metrics import (
    bootstrap_ci,
    exact_match,
    generation_metrics,
    is_chinese,
    lm_metrics,
    normalize_answer,
    token_f1,
    wilson_interval,
)

EN_PRED = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog", "Paris is the capital of France"]
EN_REF = [["The cat is on the mat."], ["The quick brown fox jumped over the lazy dog."], ["Paris"]]
ZH_PRED = ["北京是中国的首都", "今天天气很好，我们去公园散步吧", "上海"]
ZH_REF = [["中国的首都是北京"], ["今天天气不错，我们去公园散步"], ["上海市"]]


def test_english_metrics_equal_sacrebleu_and_rouge_score():
    m = generation_metrics(EN_PRED, EN_REF)
    assert m["lang"] == "en" and m["n"] == 3
    refs = [[r[0] for r in EN_REF]]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(EN_PRED, refs, tokenize="13a").score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(EN_PRED, refs).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r[0], p)[key].fmeasure for p, r in zip(EN_PRED, EN_REF, strict=True)) / 3
        assert m[key] == pytest.approx(expected)
    # SQuAD: "Paris is the capital of France" vs "Paris": 1 common token, p=1/5 ("the" dropped), r=1
    assert m["per_example"]["f1"][2] == pytest.approx(2 * 0.2 * 1 / 1.2)
    assert m["per_example"]["exact_match"] == [0.0, 0.0, 0.0]


def test_chinese_metrics_use_sacrebleu_zh_and_character_rouge():
    m = generation_metrics(ZH_PRED, ZH_REF)
    assert m["lang"] == "zh"
    refs = [[r[0] for r in ZH_REF]]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ZH_PRED, refs, tokenize="zh").score)
    assert m["bleu"] != pytest.approx(sacrebleu.corpus_bleu(ZH_PRED, refs, tokenize="13a").score)

    class Chars:
        def tokenize(self, text):
            return [c for c in text if not c.isspace()]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=Chars())
    expected = sum(scorer.score(r[0], p)["rouge1"].fmeasure for p, r in zip(ZH_PRED, ZH_REF, strict=True)) / 3
    assert m["rouge1"] == pytest.approx(expected) and m["rouge1"] > 0.5
    # the default rouge tokenizer drops CJK entirely: it would score 0
    assert rouge_scorer.RougeScorer(["rouge1"]).score(ZH_REF[0][0], ZH_PRED[0])["rouge1"].fmeasure == 0.0
    # character-level F1: "上海" vs "上海市" -> p=1, r=2/3
    assert m["per_example"]["f1"][2] == pytest.approx(0.8)


def test_exact_match_and_f1_take_the_best_reference():
    assert exact_match("the Eiffel Tower!", ["Eiffel tower", "tour Eiffel"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel tower"]) == 0.0
    assert token_f1("Eiffel", ["tour Eiffel", "Eiffel"]) == 1.0
    assert token_f1("", [""]) == 1.0 and token_f1("x", [""]) == 0.0
    assert normalize_answer("The  Answer, is: (A).") == "answer is"
    # several references: BLEU takes every reference stream into account
    multi = generation_metrics(["the cat"], [["a cat", "the cat"]])
    assert multi["exact_match"] == 1.0 and multi["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["the cat"], [["a cat"], ["the cat"]]).score)


def test_metric_selection_and_errors():
    m = generation_metrics(EN_PRED, EN_REF, metrics=["bleu"])
    assert "bleu" in m and "rouge1" not in m and "exact_match" not in m
    with pytest.raises(UserError, match="unknown generation metric"):
        generation_metrics(EN_PRED, EN_REF, metrics=["meteor"])
    with pytest.raises(UserError, match="no examples"):
        generation_metrics([], [])
    assert is_chinese(["中文 text"]) and not is_chinese(["English text 中"])


def test_lm_metrics():
    m = lm_metrics(loss_sum=20.0, n_tokens=10, n_correct=4)
    assert m == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0)), "token_accuracy": 0.4, "tokens": 10}
    with pytest.raises(UserError, match="no target tokens"):
        lm_metrics(0.0, 0, 0)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(30, 100)  # textbook value for 30/100 at 95%: [0.219, 0.396]
    assert lo == pytest.approx(0.2189, abs=1e-3) and hi == pytest.approx(0.3958, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(50, 100, 0.8), wilson_interval(50, 100, 0.99)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    values = [0.0, 1.0] * 100
    lo, hi = bootstrap_ci(values, seed=1)
    assert lo < 0.5 < hi and hi - lo < 0.2
    assert bootstrap_ci(values, seed=1) == (lo, hi)
