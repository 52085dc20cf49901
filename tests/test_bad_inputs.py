"""A table of bad inputs: configs, data files, CLI arguments and model paths.

Each case writes its bad files into a fresh input folder (``tmp_path/in``) with the small helpers
below, runs ``tunelab.cli.main`` in-process and checks what a user sees:

* exit status 2 with one ``error: ...`` line (a config error: a head line and one ``  - `` line per
  problem) naming the file / row / field, and no traceback; or, where the good rows of a data file
  train, status 0 with every bad row in the run's ``rejects.jsonl`` with its reason;
* no file that was in the input folder before is changed (SHA-256 of every file, before and after),
  and nothing is written outside the case's folders.

Training only starts in
the few cases whose good rows train (``train.max_steps: 1``, a tiny random model).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunelab.cli import main

# ----------------------------------------------------------------------------- helpers that write bad files


def write(folder: Path, name: str, content: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``content`` (text in ``encoding``, or bytes as they are) to ``folder/name``."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# Good rows of each format (a few, short: max_length is small).
ALPACA = [{"instruction": f"Say number {i}.", "output": f"Number {i}."} for i in range(4)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}"}]}
            for i in range(4)]
MESSAGES = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}
            for i in range(4)]
TEXT = [{"text": f"Plain document number {i}, café."} for i in range(4)]
CLASSIFY = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(4)]
CSV = "instruction,output\n" + "".join(f"Say {i},Number {i}\n" for i in range(4))


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base`` key by key; a value of None deletes the key."""
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config(d: Path, out: Path, file: Path | str | None = None, name: str = "c.yaml", **sections) -> str:
    """A tiny training config in ``d/name`` (1 step, tiny model) training on ``file``; ``sections`` are
    merged over it."""
    if file is None:
        file = write(d, "train.jsonl", jsonl(MESSAGES))
    cfg = {
        "run": {"name": "bad", "output_dir": str(out / "runs")},
        "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(file)}], "max_length": 64, "cache": False},
        "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
    }
    cfg = deep_merge(cfg, sections)
    return str(write(d, name, yaml.safe_dump(cfg, sort_keys=False)))


def raw_config(d: Path, text: str | bytes, encoding: str = "utf-8") -> str:
    """A config file with exactly this text (for syntax and encoding errors)."""
    return str(write(d, "c.yaml", text, encoding))


def train(cfg: str, *extra: str) -> list[str]:
    return ["train", cfg, *extra]


def train_on(d: Path, out: Path, file: Path, **sections) -> list[str]:
    """``tunelab train`` on a config whose only training file is ``file``."""
    return train(config(d, out, file, **sections))


def fake_run(d: Path) -> Path:
    """A run folder that never finished: config.yaml only (no final/ or best/ weights)."""
    run = d / "runs" / "unfinished"
    write(run, "config.yaml", "run: {name: unfinished}\n")
    return run


def stages_config(d: Path, out: Path, stage_names=("a", "b"), run_name="cont", output_dir: Path | None = None) -> str:
    """A continual config (``stages:``) with a stage per name."""
    data = write(d, "train.jsonl", jsonl(MESSAGES))
    stages = [{"name": n, "data": {"train": [{"path": str(data)}], "eval_ratio": 0.5}} for n in stage_names]
    return config(d, out, data, run={"name": run_name, "output_dir": str(output_dir or out / "runs")}, stages=stages)


def run_name_taken(d: Path) -> Path:
    """An output folder where the run's name is already a file of the user's."""
    write(d, "outs/taken", "mine")
    return d / "outs"


def tiny_model_folder(d: Path, *, weights: bool) -> Path:
    """A copy of the tiny-random-llama folder, with or without its weights."""
    from tunelab.models.registry import resolve_alias

    src = resolve_alias("tiny-random-llama")
    dest = d / "model"
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and (weights or not f.name.endswith((".safetensors", ".bin"))):
            shutil.copyfile(f, dest / f.name)
    return dest


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One bad input. ``build(inputs, outputs)`` writes the files into ``inputs`` and returns the argv."""

    id: str
    build: Callable[[Path, Path], list[str]]
    expect: tuple[str, ...]  # substrings of the error line (code 2), or of the rejects' reasons (code 0)
    code: int = 2
    marks: tuple = field(default_factory=tuple)
    rejects: str = "runs/bad/rejects.jsonl"  # where a code-0 case's bad rows go, under the output folder


def case(id: str, build, *expect: str, code: int = 2, marks=(), rejects: str = "runs/bad/rejects.jsonl") -> Case:
    return Case(id, build, expect, code, tuple(marks) if isinstance(marks, list | tuple) else (marks,), rejects)


CASES: list[Case] = [
    # ------------------------------------------------------------------ config: unknown keys
    case("cfg-unknown-section", lambda d, o: train(config(d, o, trian={"lr": 1})), "trian: unknown key",
         "did you mean 'train'"),
    case("cfg-unknown-train-key", lambda d, o: train(config(d, o, train={"learning_rate": 1e-4})),
         "train.learning_rate: unknown key"),
    case("cfg-unknown-method-key", lambda d, o: train(config(d, o, method={"rank": 4})),
         "method.rank: unknown key for method 'lora'"),
    case("cfg-unknown-method", lambda d, o: train(config(d, o, method={"name": "lorax", "r": None})),
         "method.name: unknown method", "lorax"),
    case("cfg-unknown-dataset-key", lambda d, o: train(config(d, o, data={"train": [{"path": "x.jsonl", "pth": 1}]})),
         "data.train.0.pth: unknown key"),
    case("cfg-unknown-run-key", lambda d, o: train(config(d, o, run={"dir": "x"})), "run.dir: unknown key"),
    # ------------------------------------------------------------------ config: wrong types
    case("cfg-lr-string", lambda d, o: train(config(d, o, train={"lr": "fast"})), "train.lr", "'fast'"),
    case("cfg-batch-size-string", lambda d, o: train(config(d, o, train={"batch_size": "four"})),
         "train.batch_size", "'four'"),
    case("cfg-data-train-string", lambda d, o: train(config(d, o, data={"train": "file.jsonl"})), "data.train"),
    case("cfg-packing-string", lambda d, o: train(config(d, o, data={"packing": "sometimes"})), "data.packing"),
    case("cfg-betas-one", lambda d, o: train(config(d, o, train={"betas": [0.9]})), "train.betas"),
    case("cfg-columns-list", lambda d, o: train(config(d, o, data={"train": [{"path": "a.json", "columns": ["q"]}]})),
         "data.train.0.columns"),
    case("cfg-class-weights-list", lambda d, o: train(config(d, o, classification={"class_weights": [1, 2]})),
         "classification.class_weights"),
    case("cfg-run-name-int", lambda d, o: train(config(d, o, run={"name": 5})), "run.name"),
    # ------------------------------------------------------------------ config: out-of-range and bad choices
    case("cfg-lr-negative", lambda d, o: train(config(d, o, train={"lr": -1})), "train.lr", "greater than 0"),
    case("cfg-batch-size-zero", lambda d, o: train(config(d, o, train={"batch_size": 0})), "train.batch_size"),
    case("cfg-eval-ratio-big", lambda d, o: train(config(d, o, data={"eval_ratio": 1.5})), "data.eval_ratio"),
    case("cfg-max-length-tiny", lambda d, o: train(config(d, o, data={"max_length": 4})), "data.max_length"),
    case("cfg-momentum-one", lambda d, o: train(config(d, o, train={"momentum": 1.0})), "train.momentum"),
    case("cfg-dtype-bogus", lambda d, o: train(config(d, o, model={"dtype": "float8"})), "model.dtype", "float8"),
    case("cfg-precision-bogus", lambda d, o: train(config(d, o, train={"precision": "int4"})), "train.precision"),
    case("cfg-format-bogus", lambda d, o: train(config(d, o, data={"train": [{"path": "a.json", "format": "xml"}]})),
         "data.train.0.format"),
    case("cfg-limit-zero", lambda d, o: train(config(d, o, data={"train": [{"path": "a.json", "limit": 0}]})),
         "data.train.0.limit"),
    case("cfg-replay-ratio-big", lambda d, o: train(config(d, o, objectives={"replay": {"ratio": 1.5}})),
         "objectives.replay.ratio"),
    case("cfg-lora-r-zero", lambda d, o: train(config(d, o, method={"r": 0})), "method.r"),
    case("cfg-max-steps-zero", lambda d, o: train(config(d, o, train={"max_steps": 0})), "train.max_steps"),
    # ------------------------------------------------------------------ config: missing and impossible combinations
    case("cfg-no-model", lambda d, o: train(config(d, o, model=None)), "model: required field is missing"),
    case("cfg-no-data", lambda d, o: train(config(d, o, data=None)), "data: required field is missing"),
    case("cfg-empty-train-list", lambda d, o: train(config(d, o, data={"train": []})), "data.train"),
    case("cfg-warmup-both", lambda d, o: train(config(d, o, train={"warmup_steps": 2, "warmup_ratio": 0.1})),
         "train.warmup_steps and train.warmup_ratio"),
    case("cfg-packing-and-grouping", lambda d, o: train(config(d, o, data={"packing": True, "group_by_length": True})),
         "data.packing and data.group_by_length"),
    case("cfg-compile-unpacked", lambda d, o: train(config(d, o, train={"compile": True})), "train.compile"),
    case("cfg-early-stop-no-eval", lambda d, o: train(config(d, o, train={"early_stopping_patience": 2})),
         "train.early_stopping_patience"),
    case("cfg-eval-and-ratio", lambda d, o: train(config(d, o, data={"eval": [{"path": "e.jsonl"}], "eval_ratio": 0.1})),
         "data.eval and data.eval_ratio"),
    case("cfg-head-on-sft", lambda d, o: train(config(d, o, method={"name": "head", "r": None})),
         "method.name=head"),
    case("cfg-stages-in-train", lambda d, o: train(stages_config(d, o)), "tunelab continual"),
    case("cfg-no-epochs-no-steps", lambda d, o: train(config(d, o), "--set", "train.epochs=null", "--set",
                                                      "train.max_steps=null"), "train.epochs and train.max_steps"),
    # ------------------------------------------------------------------ config files: syntax, empty, not a mapping
    case("cfg-yaml-syntax", lambda d, o: train(raw_config(d, "run: {name: x\nmodel: [\n")), "not valid YAML", "line"),
    case("cfg-yaml-tab", lambda d, o: train(raw_config(d, "run:\n\tname: x\n")), "not valid YAML"),
    case("cfg-empty-file", lambda d, o: train(raw_config(d, "")), "model: required field is missing"),
    case("cfg-not-mapping", lambda d, o: train(raw_config(d, "- a\n- b\n")), "top level must be a mapping", "list"),
    case("cfg-scalar", lambda d, o: train(raw_config(d, "just a string\n")), "top level must be a mapping"),
    case("cfg-latin1", lambda d, o: train(raw_config(d, "run: {name: caf\xe9}\n", "latin-1")), "not a UTF-8"),
    case("cfg-missing-file", lambda d, o: train(str(d / "nope.yaml")), "nope.yaml: config file not found"),
    case("cfg-is-folder", lambda d, o: train(str(d)), "config file not found"),
    # ------------------------------------------------------------------ --set overrides
    case("set-no-equals", lambda d, o: train(config(d, o), "--set", "train.lr"), "--set 'train.lr'", "KEY=VALUE"),
    case("set-unknown-path", lambda d, o: train(config(d, o), "--set", "train.lrr=1"), "train.lrr: unknown key"),
    case("set-bad-type", lambda d, o: train(config(d, o), "--set", "train.max_steps=abc"), "train.max_steps", "'abc'"),
    case("set-path-into-scalar", lambda d, o: train(config(d, o), "--set", "train.lr.x=1"), "train.lr"),
    # ------------------------------------------------------------------ run names and output folders (defects 8, 6a)
    case("run-name-escapes", lambda d, o: train(config(d, o, run={"name": "../../escaped_run"})),
         "run.name: '../../escaped_run' is not a usable name"),
    case("run-name-empty", lambda d, o: train(config(d, o, run={"name": ""})), "run.name: '' is not a usable name"),
    case("run-name-slash", lambda d, o: train(config(d, o, run={"name": "a/b"})), "run.name: 'a/b'"),
    case("run-name-dotdot", lambda d, o: train(config(d, o, run={"name": ".."})), "run.name: '..'"),
    case("run-name-hidden", lambda d, o: train(config(d, o, run={"name": ".hidden"})), "run.name: '.hidden'"),
    case("run-name-set", lambda d, o: train(config(d, o), "--set", "run.name=../../escaped_run"), "run.name"),
    case("run-name-config-show", lambda d, o: ["config", "show", config(d, o, run={"name": "../x"})], "run.name"),
    case("run-name-advise", lambda d, o: ["advise", config(d, o, run={"name": "../x"}), "--probe-steps", "0"],
         "run.name"),
    case("sweep-run-name", lambda d, o: ["sweep", config(d, o, run={"name": "../../escaped_run"}, data={
        "eval_ratio": 0.5}, sweep={"params": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}})],
         "run.name: '../../escaped_run'"),
    case("sweep-unknown-param", lambda d, o: ["sweep", config(d, o, data={"eval_ratio": 0.5}, sweep={
        "params": {"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}})], "sweep.params.train.lrr"),
    case("sweep-low-above-high", lambda d, o: ["sweep", config(d, o, data={"eval_ratio": 0.5}, sweep={
        "params": {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}})], "sweep.params.train.lr: low"),
    case("continual-stage-name", lambda d, o: ["continual", stages_config(d, o, stage_names=("a", "../../x"))],
         "stages.1.name: '../../x' is not a usable name"),
    case("continual-stage-name-empty", lambda d, o: ["continual", stages_config(d, o, stage_names=("", "b"))],
         "stages.0.name: ''"),
    case("continual-run-name", lambda d, o: ["continual", stages_config(d, o, run_name="../../escaped_run")],
         "run.name: '../../escaped_run'"),
    case("continual-compare-run-name", lambda d, o: ["continual", stages_config(d, o, run_name="../../escaped_run"),
                                                     "--compare", "naive"], "run.name: '../../escaped_run'"),
    case("continual-one-stage", lambda d, o: ["continual", stages_config(d, o, stage_names=("a",))],
         "at least 2 stages"),
    case("continual-bad-compare", lambda d, o: ["continual", stages_config(d, o), "--compare", "magic:3"],
         "--compare magic:3"),
    case("output-dir-is-file", lambda d, o: train(config(d, o, run={"output_dir": str(write(d, "runs.txt", "x"))})),
         "run.output_dir", "runs.txt", "is a file, not a folder"),
    case("output-dir-under-file", lambda d, o: train(config(d, o, run={
        "output_dir": str(write(d, "runs.txt", "x") / "sub")})), "run.output_dir", "runs.txt is a file"),
    case("sweep-output-dir-is-file", lambda d, o: ["sweep", config(d, o, run={"output_dir": str(write(d, "runs.txt", "x"))},
                                                                data={"eval_ratio": 0.5}, sweep={"params": {
                                                                    "train.lr": {"type": "float", "low": 1e-4,
                                                                                 "high": 1e-3}}})],
         "run.output_dir", "runs.txt is a file"),
    case("continual-output-dir-is-file", lambda d, o: ["continual", stages_config(
        d, o, output_dir=write(d, "runs.txt", "x"))], "run.output_dir", "runs.txt is a file"),
    case("run-dir-is-file", lambda d, o: train(config(d, o, run={"output_dir": str(run_name_taken(d)),
                                                                "name": "taken"})), "run.name", "taken"),
    # ------------------------------------------------------------------ data files x {empty, truncated, encoding, columns, garbage}
    # alpaca JSON
    case("alpaca-empty", lambda d, o: train_on(d, o, write(d, "a.json", "")), "a.json", "empty"),
    case("alpaca-truncated", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(ALPACA)[:-30])), "a.json"),
    case("alpaca-latin1", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(ALPACA, ensure_ascii=False)
                                                            .replace("Say", "Sagen Sie café"), "latin-1")),
         "a.json", "UTF-8"),
    case("alpaca-utf16", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(ALPACA), "utf-16")), "a.json"),
    case("alpaca-wrong-columns", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(
        [{"question": "q", "answer": "a"}] * 3))), "a.json"),
    case("alpaca-trailing-garbage", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(ALPACA) + "\nxyz")),
         "a.json"),
    case("alpaca-two-arrays", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(ALPACA) + json.dumps(ALPACA))),
         "a.json"),
    case("alpaca-not-a-list", lambda d, o: train_on(d, o, write(d, "a.json", '"just a string"')), "a.json"),
    case("alpaca-column-map-vague", lambda d, o: train_on(d, o, write(d, "a.json", json.dumps(ALPACA)), data={
        "train": [{"path": str(d / "a.json"), "columns": {"instruction": "question"}}]}),
         "a.json", "'question'"),
    # ShareGPT JSON
    case("sharegpt-empty", lambda d, o: train_on(d, o, write(d, "s.json", "[]")), "s.json", "empty"),
    case("sharegpt-truncated", lambda d, o: train_on(d, o, write(d, "s.json", json.dumps(SHAREGPT)[:-15])), "s.json"),
    case("sharegpt-latin1", lambda d, o: train_on(d, o, write(d, "s.json", json.dumps(SHAREGPT, ensure_ascii=False)
                                                              .replace("Hi", "Salut ça"), "latin-1")), "s.json"),
    case("sharegpt-utf16", lambda d, o: train_on(d, o, write(d, "s.json", json.dumps(SHAREGPT), "utf-16")), "s.json"),
    case("sharegpt-wrong-roles", lambda d, o: train_on(d, o, write(d, "s.json", json.dumps(
        [{"conversations": [{"from": "alien", "value": "x"}, {"from": "robot", "value": "y"}]}] * 2))),
         "data.train: no usable training sample", "unknown_role"),
    case("sharegpt-trailing-garbage", lambda d, o: train_on(d, o, write(d, "s.json", json.dumps(SHAREGPT) + " ]]")),
         "s.json"),
    # OpenAI messages JSONL
    case("messages-empty", lambda d, o: train_on(d, o, write(d, "m.jsonl", "\n\n")), "m.jsonl", "empty"),
    case("messages-truncated-line", lambda d, o: train_on(d, o, write(d, "m.jsonl", jsonl(MESSAGES)[:-20])),
         "m.jsonl", code=0),
    case("messages-latin1", lambda d, o: train_on(d, o, write(d, "m.jsonl", jsonl(MESSAGES).replace("Hi", "Olá"),
                                                              "latin-1")), "m.jsonl"),
    case("messages-utf16", lambda d, o: train_on(d, o, write(d, "m.jsonl", jsonl(MESSAGES), "utf-16")), "m.jsonl"),
    case("messages-wrong-columns", lambda d, o: train_on(d, o, write(d, "m.jsonl", jsonl(
        [{"msgs": [{"role": "user", "content": "x"}]}] * 3))), "m.jsonl"),
    case("messages-trailing-garbage", lambda d, o: train_on(d, o, write(d, "m.jsonl", jsonl(MESSAGES) + "garbage!!\n")),
         "m.jsonl", code=0),
    case("messages-all-bad", lambda d, o: train_on(d, o, write(d, "m.jsonl", "{oops\n[1, 2\n")), "m.jsonl"),
    case("messages-no-assistant", lambda d, o: train_on(d, o, write(d, "m.jsonl", jsonl(
        [{"messages": [{"role": "user", "content": "only a question"}]}] * 3))), "data.train: no usable training sample", "no_assistant_turn"),
    # plain text (.txt and {"text": ...} JSONL, task: pretrain)
    case("txt-empty", lambda d, o: train_on(d, o, write(d, "t.txt", ""), task="pretrain"), "t.txt", "empty"),
    case("txt-whitespace", lambda d, o: train_on(d, o, write(d, "t.txt", "  \n\n \n"), task="pretrain"), "t.txt"),
    case("txt-latin1", lambda d, o: train_on(d, o, write(d, "t.txt", "caf\xe9 cr\xe8me\n" * 5, "latin-1"),
                                             task="pretrain"), "t.txt"),
    case("txt-utf16", lambda d, o: train_on(d, o, write(d, "t.txt", "plain text\n" * 5, "utf-16"), task="pretrain"),
         "t.txt"),
    case("text-jsonl-wrong-columns", lambda d, o: train_on(d, o, write(d, "t.jsonl", jsonl(
        [{"body": "x"}] * 3)), task="pretrain", data={"train": [{"path": str(d / "t.jsonl"), "format": "text"}]}),
         "t.jsonl"),
    case("text-jsonl-trailing-garbage", lambda d, o: train_on(d, o, write(d, "t.jsonl", jsonl(TEXT) + '{"text": '),
                                                              task="pretrain"), "t.jsonl", code=0),
    # classification JSONL
    case("cls-empty", lambda d, o: train_on(d, o, write(d, "c.jsonl", ""), task="classification",
                                            method={"name": "head", "r": None}), "c.jsonl", "empty"),
    case("cls-truncated", lambda d, o: train_on(d, o, write(d, "c.jsonl", jsonl(CLASSIFY[:1])[:-8]),
                                                task="classification", method={"name": "head", "r": None}), "c.jsonl"),
    case("cls-latin1", lambda d, o: train_on(d, o, write(d, "c.jsonl", jsonl(CLASSIFY).replace("review", "critique é"),
                                                         "latin-1"), task="classification",
                                             method={"name": "head", "r": None}), "c.jsonl"),
    case("cls-utf16", lambda d, o: train_on(d, o, write(d, "c.jsonl", jsonl(CLASSIFY), "utf-16"),
                                            task="classification", method={"name": "head", "r": None}), "c.jsonl"),
    case("cls-wrong-columns", lambda d, o: train_on(d, o, write(d, "c.jsonl", jsonl(
        [{"sentence": "x", "y": 1}] * 3)), task="classification", method={"name": "head", "r": None}), "c.jsonl"),
    case("cls-no-label", lambda d, o: train_on(d, o, write(d, "c.jsonl", jsonl([{"text": "x"}] * 3)),
                                               task="classification", method={"name": "head", "r": None},
                                               data={"train": [{"path": str(d / "c.jsonl"), "format": "classification"}]}),
         "c.jsonl"),
    case("cls-trailing-garbage", lambda d, o: train_on(d, o, write(d, "c.jsonl", jsonl(CLASSIFY[:1]) + "]]]\n"),
                                                       task="classification", method={"name": "head", "r": None}),
         "c.jsonl", code=0),
    # CSV
    case("csv-empty", lambda d, o: train_on(d, o, write(d, "a.csv", "")), "a.csv", "empty"),
    case("csv-header-only", lambda d, o: train_on(d, o, write(d, "a.csv", "instruction,output\n")), "a.csv"),
    case("csv-truncated-quote", lambda d, o: train_on(d, o, write(d, "a.csv", 'instruction,output\n"Say 1,Num')),
         "a.csv"),
    case("csv-latin1", lambda d, o: train_on(d, o, write(d, "a.csv", CSV.replace("Say", "Dites café"), "latin-1")),
         "a.csv"),
    case("csv-utf16", lambda d, o: train_on(d, o, write(d, "a.csv", CSV, "utf-16")), "a.csv"),
    case("csv-wrong-columns", lambda d, o: train_on(d, o, write(d, "a.csv", "q,a\nx,y\nz,w\n")), "a.csv"),
    case("csv-trailing-garbage", lambda d, o: train_on(d, o, write(d, "a.csv", CSV + "\x00\x01garbage,,,,,\n")),
         "a.csv", code=0),
    # other files
    case("data-missing", lambda d, o: train_on(d, o, d / "nope.jsonl"), "nope.jsonl", "not found"),
    case("data-is-folder", lambda d, o: train_on(d, o, d), str(Path("in"))),
    case("data-unsupported-ext", lambda d, o: train_on(d, o, write(d, "a.xml", "<rows/>")), "a.xml", "unsupported"),
    case("data-binary-parquet", lambda d, o: train_on(d, o, write(d, "a.parquet", b"not parquet at all")),
         "a.parquet"),
    case("eval-file-bad", lambda d, o: train(config(d, o, data={"eval": [{"path": str(write(d, "e.json", "{"))}]})),
         "e.json"),
    # ------------------------------------------------------------------ data workbench verbs
    case("inspect-missing", lambda d, o: ["data", "inspect", str(d / "nope.jsonl")], "nope.jsonl"),
    case("inspect-broken-json", lambda d, o: ["data", "inspect", str(write(d, "b.json", '[{"instruction": '))],
         "b.json"),
    case("inspect-trailing-garbage", lambda d, o: ["data", "inspect", str(write(d, "a.json", json.dumps(ALPACA) +
                                                                              "xyz"))],
         "a.json"),
    case("inspect-two-arrays", lambda d, o: ["data", "inspect", str(write(d, "a.json", json.dumps(ALPACA) * 2))],
         "a.json"),
    case("clean-trailing-garbage", lambda d, o: ["data", "clean", str(write(d, "a.json", json.dumps(ALPACA) + "xyz")),
                                                 "--out", str(o / "clean.jsonl")],
         "a.json"),
    case("clean-broken-lines", lambda d, o: ["data", "clean", str(write(d, "m.jsonl", jsonl(MESSAGES) + "{oops\n")),
                                             "--out", str(o / "clean.jsonl")],
         "bad_json", "{oops", code=0, rejects="clean.removed.jsonl"),  # the broken line is a removed row
    case("clean-out-exists", lambda d, o: ["data", "clean", str(write(d, "a.json", json.dumps(ALPACA))),
                                           "--out", str(write(d, "mine.jsonl", "precious\n"))],
         "mine.jsonl", "exists"),
    case("clean-out-is-input", lambda d, o: ["data", "clean", str(write(d, "a.json", json.dumps(ALPACA))),
                                             "--out", str(d / "a.json")], "a.json"),
    case("clean-missing", lambda d, o: ["data", "clean", str(d / "nope.json"), "--out", str(o / "x.jsonl")],
         "nope.json"),
    case("split-ratios-text", lambda d, o: ["data", "split", str(write(d, "a.json", json.dumps(ALPACA))),
                                            "--out-dir", str(o / "split"), "--ratios", "abc"], "--ratios", "'abc'"),
    case("split-ratios-negative", lambda d, o: ["data", "split", str(write(d, "a.json", json.dumps(ALPACA))),
                                                "--out-dir", str(o / "split"), "--ratios", "0.9,0.9,-0.8"],
         "--ratios"),
    case("split-out-dir-file", lambda d, o: ["data", "split", str(write(d, "a.json", json.dumps(ALPACA))),
                                             "--out-dir", str(write(d, "taken.txt", "mine"))],
         "taken.txt"),
    case("split-trailing-garbage", lambda d, o: ["data", "split", str(write(d, "a.json", json.dumps(ALPACA) + "]")),
                                                 "--out-dir", str(o / "split")],
         "a.json"),
    case("split-kfold-text", lambda d, o: ["data", "split", str(d / "a.json"), "--out-dir", str(o), "--kfold", "x"],
         "--kfold", "invalid int value"),
    case("leakage-missing", lambda d, o: ["data", "leakage", str(d / "nope.jsonl"), str(d / "nope2.jsonl")],
         "nope.jsonl"),
    # ------------------------------------------------------------------ CLI arguments
    case("cli-unknown-verb", lambda d, o: ["trian", config(d, o)], "invalid choice: 'trian'"),
    case("cli-unknown-flag", lambda d, o: train(config(d, o), "--bogus"), "unrecognized arguments: --bogus"),
    case("cli-train-no-config", lambda d, o: ["train"], "the following arguments are required: config"),
    case("cli-set-no-value", lambda d, o: train(config(d, o), "--set"), "--set", "expected one argument"),
    case("cli-generate-no-prompt", lambda d, o: ["generate", "tiny-random-llama"], "--prompt"),
    case("cli-generate-bad-temperature", lambda d, o: ["generate", "tiny-random-llama", "--prompt", "hi",
                                                       "--temperature", "hot"], "--temperature", "'hot'"),
    case("cli-eval-not-a-run", lambda d, o: ["eval", str(write(d, "folder/notes.txt", "hi").parent), "--data",
                                             str(write(d, "v.jsonl", jsonl(MESSAGES)))], "folder"),
    case("cli-generate-not-a-run", lambda d, o: ["generate", str(write(d, "folder/notes.txt", "hi").parent),
                                                 "--prompt", "hi"], "folder"),
    case("cli-export-not-a-run", lambda d, o: ["export", str(write(d, "folder/notes.txt", "hi").parent),
                                               "--out", str(o / "exp")], "folder"),
    case("cli-generate-unfinished-run", lambda d, o: ["generate", str(fake_run(d)), "--prompt", "hi"],
         "unfinished", "no 'final' weights"),
    case("cli-export-unfinished-run", lambda d, o: ["export", str(fake_run(d)), "--out", str(o / "exp")],
         "unfinished"),
    case("cli-eval-missing", lambda d, o: ["eval", str(d / "no_such_run"), "--data",
                                           str(write(d, "v.jsonl", jsonl(MESSAGES)))], "no_such_run"),
    case("cli-eval-nothing", lambda d, o: ["eval", "tiny-random-llama"], "eval: nothing to evaluate"),
    case("cli-runs-show-missing", lambda d, o: ["runs", "show", "no_such_run", "--dir", str(d)], "no_such_run"),
    case("cli-predict-missing-data", lambda d, o: ["predict", "tiny-random-llama", "--data", str(d / "nope.jsonl"),
                                                   "--out", str(o / "p.jsonl")], "nope.jsonl"),
    # ------------------------------------------------------------------ model paths
    case("model-missing-folder", lambda d, o: train(config(d, o, model={"path": str(d / "no" / "model")})),
         "no such file or folder"),
    case("model-garbage-gguf", lambda d, o: train(config(d, o, model={"path": str(write(d, "model.gguf",
                                                                                       b"garbage" * 10))})),
         "model.gguf: not a GGUF file", "bad magic b'garb'"),
    case("model-empty-gguf", lambda d, o: ["generate", str(write(d, "model.gguf", b"")), "--prompt", "hi"],
         "model.gguf: not a GGUF file", "empty"),
    case("model-truncated-gguf", lambda d, o: ["generate", str(write(d, "model.gguf", b"GGUF\x03\x00")),
                                               "--prompt", "hi"], "model.gguf", "cannot read"),
    case("model-invalid-config-json", lambda d, o: train(config(d, o, model={"path": str(write(
        d, "m/config.json", '{"model_type": ,}').parent)})), "config.json: invalid JSON at line 1 column 16"),
    case("model-config-json-list", lambda d, o: ["generate", str(write(d, "m/config.json", "[]").parent),
                                                 "--prompt", "hi"], "config.json: the top level must be a JSON object"),
    case("model-no-config-json", lambda d, o: train(config(d, o, model={"path": str(write(
        d, "m/weights.bin", b"x").parent)})), "has no config.json"),
    case("model-no-weights", lambda d, o: ["generate", str(tiny_model_folder(d, weights=False)), "--prompt", "hi"],
         "model", "cannot load this folder"),
    case("model-not-gguf-file", lambda d, o: train(config(d, o, model={"path": str(write(d, "model.bin", b"x"))})),
         "not a .gguf file"),
    case("model-alias-typo", lambda d, o: train(config(d, o, model={"path": "tiny-random-lama"})),
         "Did you mean 'tiny-random-llama'"),
    case("model-hub-offline", lambda d, o: train(config(d, o, model={"path": "no-such-org/no-such-model"})),
         "no-such-org/no-such-model"),
]


# ----------------------------------------------------------------------------- the test


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # main returns its status; a stray sys.exit is still a status
        return stop.code if isinstance(stop.code, int) else 2


def _assert_one_error(err: str, expect: tuple[str, ...]) -> None:
    """One ``error:`` line, or a config error: its head line and one ``  - `` line per problem."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and lines[0].startswith("error:"), err
    if len(lines) > 1:
        assert "problem(s) in the config" in lines[0] and all(x.startswith("  - ") for x in lines[1:]), err
    assert "pydantic.dev" not in err and "Traceback" not in err, err
    for text in expect:
        assert text in err, f"expected {text!r} in:\n{err}"


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(c: Case, tmp_path, capsys, monkeypatch):
    inputs, outputs, work = tmp_path / "in", tmp_path / "out", tmp_path / "work"
    for f in (inputs, outputs, work):
        f.mkdir()
    monkeypatch.chdir(work)  # anything written to a relative path lands here, not in the repository
    argv = c.build(inputs, outputs)
    before = _checksums(inputs)

    code = _run(argv)

    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == c.code, f"exit {code}, expected {c.code}; stderr:\n{err}"
    if code == 0:  # the good rows went through; every bad row is in the rejects file with its reason
        rows = [json.loads(x) for x in (outputs / c.rejects).read_text().splitlines()]
        assert rows and all(r["reason"] and (r.get("detail") or r.get("row") or r.get("raw")) for r in rows), rows
        text = json.dumps(rows)
        for want in c.expect:
            assert want in text, f"expected {want!r} in the rejects: {text}"
    else:
        _assert_one_error(err, c.expect)
        if "no usable training sample" in err:  # every row was bad: each is in the rejects file, with its reason
            rejects = outputs / "runs" / "bad" / "rejects.jsonl"
            assert rejects.is_file() and rejects.read_text().strip(), err
    after = _checksums(inputs)
    assert {k: after.get(k) for k in before} == before, "a file in the input folder was changed or removed"
    assert not (tmp_path / "escaped_run").exists() and not (tmp_path.parent / "escaped_run").exists()


def test_corpus_size():
    """The docs quote the size of this corpus: keep it at 80 cases or more, each id unique."""
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


# The corpus: len(CASES) == 160 bad inputs (docs/reliability.md quotes the figure).
