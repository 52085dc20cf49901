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


@pytest.mark.parametrize("name", ["../../escaped_run", "", ".", "..", ".hidden", "a/b", "a\\b", "x" * 129, "sp ace"])
def test_run_name_must_be_one_safe_folder_name(tmp_path, name):
    """Defect 8: the run folder is <output_dir>/<run.name>; a name with '/' or '..' escaped output_dir and an
    empty one wrote into output_dir itself. Each is one config problem naming run.name."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, {**MINIMAL, "run": {"name": name}}))
    assert len(excinfo.value.problems) == 1
    problem = excinfo.value.problems[0]
    assert problem.startswith(f"run.name: {name!r} is not a usable name") and "\n" not in problem
    with pytest.raises(ConfigError, match="run.name"):  # --set goes through the same check
        load_config(write(tmp_path, MINIMAL), [f"run.name={name}"] if name else ["run.name=''"])


def test_safe_run_names_pass(tmp_path):
    for name in ("run", "my-run_2", "v1.2+lora", "x" * 128):
        assert load_config(write(tmp_path, {**MINIMAL, "run": {"name": name}}))[0].run_dir.name == name


def test_stage_names_must_be_safe(tmp_path):
    from tunelab.train.continual import load_continual

    stages = [{"name": "a", "data": {"eval_ratio": 0.5}}, {"name": "../../b", "data": {"eval_ratio": 0.5}}]
    with pytest.raises(ConfigError) as excinfo:
        load_continual(write(tmp_path, {**MINIMAL, "stages": stages}))
    assert excinfo.value.problems == [excinfo.value.problems[0]]
    assert excinfo.value.problems[0].startswith("stages.1.name: '../../b' is not a usable name")
    with pytest.raises(ConfigError, match=r"run.name: '\.\./x'"):  # the continual run's own folder too
        load_continual(write(tmp_path, {**MINIMAL, "run": {"name": "../x"},
                                          "stages": [stages[0], {**stages[0], "name": "b"}]}))


def test_union_field_error_is_one_problem(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, {**MINIMAL, "classification": {"class_weights": [1, 2]}}))
    assert excinfo.value.problems == [
        "classification.class_weights: Input should be 'balanced', or input should be a valid dictionary "
        "(got [1, 2]). Fix the value in the config or with --set classification.class_weights=..."]
