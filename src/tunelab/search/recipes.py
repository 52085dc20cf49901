"""Measured classification recipes: for data of a given shape, the settings that beat TF-IDF + LR.

A recipe is what ``benchmarks/bench_recipes.py`` measured on one of the shared classification sets
(THUCNews headlines, ChnSentiCorp hotel reviews, SST-2): model, method, epochs, learning rate, max
length, and the accuracy it reached against the TF-IDF + logistic-regression baseline trained on
the same rows (``docs/tasks.md``, "Recipes that beat the baseline"). ``tunelab advise`` finds the
recipe whose data shape matches the user's training rows (:func:`recipe_for`) and prints it with
its measured figures; the benchmark trains each recipe from :func:`recipe_sections`, so the advice
and the measurement are the same settings.

The shape is what decided the recipes here: the script (CJK or not: neither bundled model reads
Chinese well, so a Chinese set needs the decoder, whose byte-level BPE at least sees every
character), the number of labels, and the text length (long reviews cost a decoder far more
steps; their recipe truncates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.eval.classical import MOSTLY_CJK, cjk_share


@dataclass(frozen=True)
class Shape:
    """What a recipe is chosen by: rows, labels, CJK share of the letters, mean characters per text."""

    rows: int
    labels: int
    cjk_share: float
    mean_chars: float

    @property
    def cjk(self) -> bool:
        return self.cjk_share >= MOSTLY_CJK

    def describe(self) -> str:
        script = "Chinese/Japanese" if self.cjk else "non-CJK"
        return f"{self.rows:,} rows, {self.labels} labels, {script} text of {self.mean_chars:.0f} characters on average"


@dataclass(frozen=True)
class Recipe:
    """Settings measured on one shared set. ``model`` None: no bundled model beat TF-IDF + LR there, so the
    recipe is the baseline itself (``tunelab eval RUN --baselines`` / ``tunelab.eval.classical``)."""

    name: str
    fits: Callable[[Shape], bool]
    when: str  # the shape in words
    model: str | None
    method: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    max_length: int = 0
    measured: dict[str, Any] = field(default_factory=dict)  # the figures of docs/tasks.md
    why: str = ""  # why this recipe (and not a stronger-looking one)

    def summary(self) -> str:
        if self.model is None:
            return "TF-IDF + logistic regression (no fine-tuning)"
        t = self.train
        parts = [f"model {self.model}", f"method {self.method['name']}"
                 + "".join(f" {k}={v}" for k, v in self.method.items() if k != "name"),
                 f"max_length {self.max_length}"]
        parts += [f"{k} {t[k]}" for k in ("epochs", "lr", "batch_size") if k in t]
        return ", ".join(parts)

    def evidence(self) -> str:
        m = self.measured
        head = f"measured on {m['set']} ({m['train_rows']:,} training rows, {m['test_rows']:,} test rows): "
        if self.model is None:
            return head + f"TF-IDF + LR {m['tfidf']:.1%}; the best fine-tuned model {m['accuracy']:.1%} ({m['best_tried']})"
        return head + (f"{m['accuracy']:.1%} vs TF-IDF + LR {m['tfidf']:.1%}, {m['minutes']:.1f} min of fine_tune wall time on "
                       "a shared 2-core CPU")


def shape_of(texts: Sequence[str], labels: Sequence[str]) -> Shape:
    return Shape(len(texts), len(set(labels)), cjk_share(texts),
                 sum(len(t) for t in texts) / len(texts) if texts else 0.0)


RECIPES: list[Recipe] = [
    Recipe(
        "english-short-minilm-lr",
        lambda s: not s.cjk and s.labels <= 20 and s.mean_chars <= 400,
        "English (non-CJK) texts up to a few sentences",
        model="all-minilm-l6-v2", method={"name": "head", "fit": "sklearn"},
        train={"precision": "fp32", "batch_size": 32}, max_length=128,
        measured={"set": "sst2", "train_rows": 4000, "test_rows": 872, "accuracy": 0.7798, "tfidf": 0.7397,
                  "minutes": 6.8},
        why="the sentence encoder's frozen features, computed once and cached, with scikit-learn's logistic "
            "regression on them: no training loop at all, and 4 points above TF-IDF",
    ),
    Recipe(
        "chinese-headlines-tfidf",
        lambda s: s.cjk and s.mean_chars < 60,
        "short Chinese / Japanese texts (headlines, titles)",
        model=None,
        measured={"set": "thucnews_headlines", "train_rows": 4000, "test_rows": 1000, "accuracy": 0.665,
                  "tfidf": 0.802, "best_tried": "all-minilm-l6-v2 full fine-tuning, 5 epochs, lr 1e-4"},
        why="neither bundled model was pre-trained on Chinese: all-MiniLM-L6-v2 fully fine-tuned learns the "
            "characters from 4,000 rows no better than character n-grams do",
    ),
    Recipe(
        "chinese-reviews-tfidf",
        lambda s: s.cjk,
        "longer Chinese / Japanese texts (reviews, posts)",
        model=None,
        measured={"set": "chnsenticorp_htl", "train_rows": 4000, "test_rows": 1000, "accuracy": 0.728,
                  "tfidf": 0.860, "best_tried": "all-minilm-l6-v2 cached features + logistic regression"},
        why="all-MiniLM-L6-v2 reads Chinese character by character (2.6% [UNK] on these reviews) but was "
            "trained on English sentence pairs, so its frozen features do not separate the reviews' sentiment "
            "as well as character n-grams do",
    ),
]


def recipe_for(shape: Shape) -> Recipe | None:
    """The first recipe whose shape rule matches (None: no measured recipe for data like this)."""
    return next((r for r in RECIPES if r.fits(shape)), None)


def recipe_sections(recipe: Recipe) -> dict[str, Any] | None:
    """The config sections of ``recipe`` (``task``, ``model``, ``method``, ``train``, ``data.max_length``);
    None for a TF-IDF recipe (nothing to train)."""
    if recipe.model is None:
        return None
    return {"task": "classification", "model": {"path": recipe.model}, "method": dict(recipe.method),
            "train": dict(recipe.train), "data": {"max_length": recipe.max_length}}
