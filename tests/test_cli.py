"""The other verbs: config show, generate, chat; and the LR schedules."""

from __future__ import annotations

import pytest
import yaml

import warm
from conftest import tiny_config
from tunelab.cli import main
from tunelab.train.schedule import lr_factor, warmup_steps


def test_config_show_prints_values_and_sources(tmp_path, alpaca_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path)))
    assert main(["config", "show", str(path), "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "0.5" in out and "--set" in out and "default" in out
    assert main(["config", "show", str(path), "--yaml"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"]["r"] == 4 and shown["train"]["schedule"] == "cosine"


def test_generate_and_chat_on_a_trained_run(tmp_path, alpaca_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, train={"max_steps": 1})))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    gen = warm.run(["generate", str(run), "--prompt", "hello", "--prompt", "again", "--max-new-tokens", "5"],
                   timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.count("\n") == 2  # one reply per prompt (a random model may reply with nothing)
    chat = warm.run(["chat", str(run), "--max-new-tokens", "4", "--system", "be brief"],
                    input="hi\n/reset\nhello there\n\n", timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 2 and "lora on tiny-random-llama" in chat.stdout
    missing = warm.run(["generate", str(run), "--checkpoint", "best", "--prompt", "x"], timeout=120)
    assert missing.returncode == 2 and "no 'best' weights" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedules(kind):
    total, warm = 10, warmup_steps(10, None, 0.2)
    assert warm == 2
    f = [lr_factor(s, total_steps=total, warmup=warm, kind=kind) for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    if kind == "constant":
        assert all(x == 1.0 for x in f[1:])
    else:
        assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False)) and f[-1] < 0.2
    if kind == "linear":
        assert f[6] == pytest.approx(1 - 4 / 8)
    if kind == "cosine":
        assert f[6] == pytest.approx(0.5)
    assert warmup_steps(10, 3, None) == 3 and warmup_steps(10, None, None) == 0


def test_tensorboard_logging(tmp_path, alpaca_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, alpaca_path, train={"max_steps": 3, "tensorboard": True},
                                               data={"eval_ratio": 0.2})))
    assert main(["train", str(path)]) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [3]


# ----------------------------------------------------------------------------- cli_args: flags from a settings model


def _toy_parser():
    import argparse
    from typing import Literal

    from pydantic import BaseModel, Field, field_validator

    from tunelab.cli_args import POSITIONAL, add_options

    class Toy(BaseModel):
        input: str = Field(description="The input file.", json_schema_extra=POSITIONAL)
        out_dir: str = Field(description="Where results go.")
        ratios: tuple[float, ...] = Field((0.5, 0.5), description="Shares.")
        mode: Literal["fast", "slow"] = Field("fast", description="How to run.")
        near: bool = Field(True, description="Look for near duplicates.")
        pii: bool = Field(False, description="Mask personal data.")
        ops: list[str] = Field(default_factory=lambda: ["a"], json_schema_extra={"cli": {"nargs": "+"}})
        tag: list[str] = Field(default_factory=list, json_schema_extra={"cli": {"repeat": True}})
        limit: int | None = Field(None, ge=1, description="At most this many rows.")
        timeout_s: float = Field(3.0, json_schema_extra={"cli": {"flag": "--timeout"}})

        @field_validator("ratios")
        @classmethod
        def _sum(cls, v):
            if abs(sum(v) - 1) > 1e-6:
                raise ValueError(f"ratios must sum to 1 (got {list(v)})")
            return v

    p = argparse.ArgumentParser(prog="tunelab toy")
    add_options(p, Toy)
    return Toy, p


def test_cli_args_builds_flags_from_the_model_and_parses_back():
    from tunelab.cli_args import parse_options

    Toy, p = _toy_parser()
    help_text = p.format_help()
    for text in ("--out-dir OUT_DIR", "--no-near", "--pii", "{fast,slow}", "--timeout TIMEOUT", "At most this many rows",
                 "comma-separated; default 0.5,0.5", "repeatable"):
        assert text in help_text, text
    o = parse_options(Toy, p.parse_args(["in.jsonl", "--out-dir", "o", "--ratios", "0.25, 0.75", "--mode", "slow",
                                         "--no-near", "--pii", "--ops", "x", "y", "--tag", "t1", "--tag", "t2",
                                         "--limit", "3", "--timeout", "9"]), prog="tunelab toy")
    assert (o.input, o.out_dir, o.ratios, o.mode, o.near, o.pii) == ("in.jsonl", "o", (0.25, 0.75), "slow", False, True)
    assert (o.ops, o.tag, o.limit, o.timeout_s) == (["x", "y"], ["t1", "t2"], 3, 9.0)
    d = parse_options(Toy, p.parse_args(["in.jsonl", "--out-dir", "o"]))  # what is not given keeps its default
    assert (d.ratios, d.mode, d.near, d.pii, d.ops, d.tag, d.limit) == ((0.5, 0.5), "fast", True, False, ["a"], [], None)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--ratios", "0.9,0.9"], "--ratios: ratios must sum to 1 (got '0.9,0.9'). See `tunelab toy --help`."),
    (["--ratios", "0.5,x"], "--ratios: not a comma-separated list of numbers (item 2: 'x') (got '0.5,x')"),
    (["--limit", "0"], "--limit: Input should be greater than or equal to 1 (got 0)"),
])
def test_cli_args_validation_errors_name_the_flag_on_one_line(argv, expected):
    from tunelab.cli_args import parse_options
    from tunelab.errors import UserError

    Toy, p = _toy_parser()
    with pytest.raises(UserError) as err:
        parse_options(Toy, p.parse_args(["in.jsonl", "--out-dir", "o", *argv]), prog="tunelab toy")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_every_verb_parses_its_defaults_and_documents_every_flag():
    """Each verb of the table: every field of its options model is a documented flag, and the model
    accepts what argparse gives it for the required arguments alone."""
    import argparse

    from tunelab.cli import VERBS, build_parser
    from tunelab.cli_args import cli_fields, flag_of, parse_options

    parser = build_parser()
    for key, verb in VERBS.items():
        sub = parser
        for word in key.split():
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        help_text = sub.format_help()
        argv = []
        for spec in cli_fields(verb.options):
            assert flag_of(spec) in help_text, (key, spec.name)
            if spec.field.is_required():
                value = ["x"] if spec.meta.get("positional") else [flag_of(spec), "x"]
                argv += value
        options = parse_options(verb.options, sub.parse_args(argv), prog=sub.prog)
        assert isinstance(options, verb.options)


def test_main_keeps_the_documented_flags(capsys):
    """Flags that README / docs use keep their names (a sample across verbs)."""
    for argv, flags in ((["data", "clean"], ["--no-normalize", "--no-exact", "--no-near", "--length-field", "--pii"]),
                        (["data", "split"], ["--out-dir", "--no-stratify", "--kfold", "--ratios"]),
                        (["export"], ["--merge", "--gguf", "--no-verify", "--dtype"]),
                        (["serve"], ["--api-key", "--queue-timeout", "--request-timeout", "--max-concurrency"]),
                        (["eval"], ["--data", "--benchmark", "--k-shot", "--baselines", "--stop"]),
                        (["predict"], ["--data", "--out", "--batch-size", "--task"]),
                        (["runs"], ["--dir", "--filter", "--sort", "--json"])):
        assert main([*argv, "--help"]) == 0
        out = capsys.readouterr().out
        for flag in flags:
            assert flag in out, (argv, flag)
