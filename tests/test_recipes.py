"""The measured classification recipes: `tunelab advise` recommends, for each shared set's shape, the recipe that
docs/tasks.md documents for that set (the settings bench_recipes.py trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import shared
from tunelab.config import load_config
from tunelab.search.advise import data_recipe
from tunelab.search.recipes import RECIPES, recipe_for, shape_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tasks.md"
SETS = ("thucnews_headlines", "chnsenticorp_htl", "sst2")


def docs_row(name: str) -> str:
    rows = [line for line in DOCS.read_text(encoding="utf-8").splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"docs/tasks.md has {len(rows)} recipe rows for {name}"
    return rows[0]


@pytest.mark.parametrize("name", SETS)
def test_advise_recommends_the_documented_recipe_for_each_shared_set(tmp_path, name):
    train = shared("classification", name, "train.jsonl")
    cfg = {"task": "classification", "run": {"name": "r", "output_dir": str(tmp_path)},
           "model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": str(train)}], "max_length": 64}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got = data_recipe(load_config(path)[0])
    assert got is not None and got["name"] is not None, got
    recipe = next(r for r in RECIPES if r.name == got["name"])
    assert recipe.measured["set"] == name  # each set's shape picks the recipe measured on it
    row = docs_row(name)
    assert f"`{recipe.name}`" in row and recipe.summary() in row, (row, recipe.summary())
    assert f"{recipe.measured['accuracy']:.1%}" in row and f"{recipe.measured['tfidf']:.1%}" in row
    if recipe.model is None:  # no bundled model beat the baseline on this set: the baseline is the advice
        assert recipe.measured["accuracy"] < recipe.measured["tfidf"] and got["sections"] is None
        assert "TF-IDF" in got["settings"] and recipe.measured["best_tried"] in row
    else:  # a model recipe is one that beat the baseline, and advise hands out its exact sections
        assert recipe.measured["accuracy"] > recipe.measured["tfidf"]
        assert got["sections"]["model"]["path"] == recipe.model and got["sections"]["method"] == recipe.method


def test_shapes_the_recipes_do_not_cover_get_none():
    odd = shape_of(["x" * 5000] * 4, ["a", "b", "c", "d"])  # four huge English texts
    assert recipe_for(odd) is None


def test_shape_rules_follow_script_and_length():
    assert recipe_for(shape_of(["新闻标题一则"] * 6, list("abcabc"))).name == "chinese-headlines-tfidf"
    assert recipe_for(shape_of(["这家酒店的房间很干净，服务也很好，下次还会再来。" * 4] * 4, list("abab"))).name \
        == "chinese-reviews-tfidf"
    assert recipe_for(shape_of(["a fine film"] * 4, list("abab"))).name == "english-short-minilm-lr"
