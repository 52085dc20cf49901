"""parse_label and classification_metrics."""

from __future__ import annotations

import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from tunelab.demo.policy import LABEL_ALIASES, LABELS
from tunelab.errors import UserError
from tunelab.eval.metrics import UNPARSED, classification_metrics, parse_label


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Export", "Export"),  # exact
        ("  export.\n", "Export"),  # exact after strip/casefold
        ("**R&D subsidy**", "R&D subsidy"),
        ("TAX RELIEF", "Tax relief"),
        ("The answer is Green.", "Green"),  # embedded
        ("I'd say Financing, or maybe Talent", "Financing"),  # earliest wins
        ("Talent or Financing", "Talent"),
        ("R&D subsidy would help", "R&D subsidy"),  # longest at the same position
        ("R&D funding", "R&D subsidy"),  # alias "R&D"
        ("研发补贴", "R&D subsidy"),  # Chinese alias, exact
        ("建议推送：融资支持。", "Financing"),  # Chinese alias, embedded
        ("推荐Export", "Export"),  # Latin label glued to CJK still matches
        ("Greenland exports", None),  # no partial-word matches
        ("I don't know", None),
        ("", None),
    ],
)
def test_parse_label(text, expected):
    assert parse_label(text, LABELS, aliases=LABEL_ALIASES) == expected


def test_parse_label_without_aliases():
    assert parse_label("研发补贴", LABELS) is None
    assert parse_label("R&D", LABELS) is None
    assert parse_label("r&d subsidy!", LABELS) == "R&D subsidy"
    # aliases for labels outside the label set are ignored
    assert parse_label("融资支持", ["Export"], aliases=LABEL_ALIASES) is None


Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", None, "a"]
LABS = ["a", "b", "c"]


def test_metrics_hand_computed():
    m = classification_metrics(Y_TRUE, Y_PRED, LABS)
    # a: tp=2, predicted 3, true 3 -> p=2/3 r=2/3 f=2/3
    # b: tp=1, predicted 2, true 2 -> p=1/2 r=1/2 f=1/2
    # c: tp=0, predicted 0, true 1 -> 0
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["n_unparsed"] == 1 and m["unparsed_rate"] == pytest.approx(1 / 6)
    pc = m["per_class"]
    assert pc["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pc["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["c"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    # micro over the labels: tp=3, predicted-in-labels=5, true=6 -> p=3/5 r=1/2
    assert m["micro_f1"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.5 + 0) / 6)
    assert m["labels"] == LABS
    assert m["confusion"] == [
        [2, 1, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [1, 0, 0, 0, 0],
    ]


def test_metrics_match_sklearn():
    pred = [UNPARSED if p is None else p for p in Y_PRED]
    m = classification_metrics(Y_TRUE, Y_PRED, LABS)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, pred))
    for avg, key in (("macro", "macro_f1"), ("micro", "micro_f1"), ("weighted", "weighted_f1")):
        f = precision_recall_fscore_support(Y_TRUE, pred, labels=LABS, average=avg, zero_division=0)[2]
        assert m[key] == pytest.approx(f)


def test_metrics_perfect_and_other_predictions():
    m = classification_metrics(["a", "b"], ["a", "b"], ["a", "b"])
    assert m["accuracy"] == m["macro_f1"] == m["micro_f1"] == m["weighted_f1"] == 1.0
    assert m["n_unparsed"] == 0
    # a prediction outside the labels is wrong and lands in the "<other>" column
    m = classification_metrics(["a", "b"], ["a", "zzz"], ["a", "b"])
    assert m["accuracy"] == 0.5 and m["n_unparsed"] == 0
    assert m["confusion"][1] == [0, 0, 0, 1]


def test_metrics_errors():
    with pytest.raises(ValueError):
        classification_metrics(["a"], [], ["a"])
    with pytest.raises(UserError, match="empty"):
        classification_metrics(["a"], ["a"], [])
    with pytest.raises(UserError, match="no examples"):
        classification_metrics([], [], ["a"])
    with pytest.raises(UserError, match="not in the label set"):
        classification_metrics(["q"], ["a"], ["a"])
    with pytest.raises(UserError, match="duplicates"):
        classification_metrics(["a"], ["a"], ["a", "a"])
