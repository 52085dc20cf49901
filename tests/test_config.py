"""Config: strict schema, every problem at once, --set overrides, provenance, examples validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunelab.config import dump_config, load_config
from tunelab.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


MINIMAL = {"model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": "x.jsonl"}]}}


def test_minimal_config_gets_defaults_and_sources(tmp_path):
    cfg, sources = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "method.r=8"])
    assert cfg.method.name == "lora" and cfg.method.r == 8
    assert cfg.train.lr == pytest.approx(1e-4)
    assert sources["train.lr"] == "--set"
    assert sources["model.path"].endswith("c.yaml")
    assert sources["train.batch_size"] == "default"
    text = dump_config(cfg, sources)
    assert "train.lr = --set" in text and yaml.safe_load(text)["train"]["lr"] == pytest.approx(1e-4)


def test_every_problem_is_reported_at_once(tmp_path):
    bad = {
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": "x.jsonl", "formt": "alpaca"}], "max_length": "long"},
        "method": {"name": "lora", "rr": 4},
        "train": {"lrr": 1},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad), ["train.batch_size=zero"])
    problems = info.value.problems
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    assert "data.train.0.formt: unknown key" in joined and "did you mean 'format'" in joined
    assert "method.rr: unknown key" in joined and "did you mean 'r'" in joined
    assert "train.lrr: unknown key" in joined and "did you mean 'lr'" in joined
    assert "data.max_length" in joined and "'long'" in joined
    assert "train.batch_size" in joined and "'zero'" in joined


def test_unknown_method_and_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="method.name: unknown method .*'lorax'.*full, lora"):
        load_config(write(tmp_path, {**MINIMAL, "method": {"name": "lorax"}}))
    both = {**MINIMAL, "train": {"warmup_steps": 3, "warmup_ratio": 0.1, "early_stopping_patience": 2}}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, both))
    assert any("warmup_steps and train.warmup_ratio" in p for p in info.value.problems)
    assert any("early_stopping_patience needs validation data" in p for p in info.value.problems)


def test_method_options_are_per_method(tmp_path):
    with pytest.raises(ConfigError, match="method.r: unknown key for method 'full'. Remove it; its keys are: "):
        load_config(write(tmp_path, {**MINIMAL, "method": {"name": "full", "r": 4}}))


@pytest.mark.parametrize(
    "text, match",
    [("model: [unclosed", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping")],
)
def test_unreadable_config_files(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["train.lr"])


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(example):
    cfg, _ = load_config(example)
    assert cfg.data.train
