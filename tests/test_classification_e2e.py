"""The classification path after training, end to end through the CLI, per task.

Each case trains a tiny model (``classification`` with ``head`` and with ``lora``,
``generative_classification``, ``multitask``), then: ``tunelab report RUN`` shows training's own
evaluation (accuracy, macro-F1, per class, confusion); ``tunelab eval RUN --data FILE --baselines``
gives every system metrics and the tuned model the metrics of training's own end-of-run evaluation
on the same rows (asked with the prompt training rendered); ``tunelab train CONFIG --dry-run``
runs; ``tunelab predict`` writes one row per input. The label count is parametrised (2, 4, 15) on
the cheapest path; the unknown-token warning is checked with Chinese text on an English WordPiece
vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main

FILLER = ["the", "a", "one", "then", "we", "saw", "near", "old"]
PROMPT = "Pick one of {labels} for: {text}"


def write_rows(path: Path, labels: list[str], per_class: int, seed: int) -> Path:
    """A learnable task: each class has its own words, after a few filler words."""
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(FILLER) for _ in range(3)) + f" {lab}{rng.choice('ab')}", "label_text": lab}
            for _ in range(per_class) for lab in labels]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def class_names(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


def config(tmp_path: Path, name: str, task: str, method: dict, n_labels: int, model: str = "tiny-random-llama") -> dict:
    labels = class_names(n_labels)
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    train = write_rows(d / "train.jsonl", labels, 3, 0)
    evals = write_rows(d / "eval.jsonl", labels, 2, 1)
    cfg = {
        "task": task, "run": {"name": name, "output_dir": str(tmp_path / "runs")}, "model": {"path": model},
        "data": {"train": [{"path": str(train)}], "eval": [{"path": str(evals)}], "max_length": 128},
        "method": method,
        "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 3, "precision": "fp32", "seed": 0, "eval_every": 3,
                  "schedule": "constant"},
        "classification": {"prompt": PROMPT},
    }
    return cfg


def multitask_config(tmp_path: Path) -> dict:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    chat = d / "chat.jsonl"
    chat.write_text("".join(json.dumps({"instruction": f"Repeat: {w}", "output": w}) + "\n" for w in FILLER))
    return {
        "task": "multitask", "run": {"name": "mt", "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "tasks": {"kind": {"type": "classification"}, "mood": {"type": "classification"}, "chat": {"type": "sft"}},
        "task_sampling": {"strategy": "round_robin"},
        "data": {"train": [{"path": str(write_rows(d / "kind.jsonl", ["colour", "animal"], 6, 0)), "task": "kind"},
                           {"path": str(write_rows(d / "mood.jsonl", ["good", "bad", "meh"], 4, 1)), "task": "mood"},
                           {"path": str(chat), "task": "chat"}],
                 "eval": [{"path": str(write_rows(d / "eval.jsonl", ["colour", "animal"], 4, 2)), "task": "kind"},
                          {"path": str(write_rows(d / "mood_eval.jsonl", ["good", "bad", "meh"], 2, 3)),
                           "task": "mood"}],
                 "max_length": 96},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "precision": "fp32", "seed": 0, "eval_every": 3,
                  "schedule": "constant"},
    }


def cli(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, args


def tiny_bert(folder: Path, vocab: list[str] | None = None) -> Path:
    """A random 2-layer BERT (hidden 32) with the all-MiniLM-L6-v2 tokenizer, or a WordPiece one over ``vocab``."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from tunelab.models.registry import minilm_folder

    folder.mkdir(parents=True)
    if vocab is None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(minilm_folder() / name, folder / name)
        size = 30522
    else:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]
        BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
        size = len(words)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


CASES = {  # id: (task, method, labels, model)
    "head-bert-15": ("classification", {"name": "head", "dropout": 0.0}, 15, "bert"),
    "head-llama-2": ("classification", {"name": "head", "dropout": 0.0}, 2, "tiny-random-llama"),
    "lora-llama-4": ("classification", {"name": "lora", "r": 4, "alpha": 8}, 4, "tiny-random-llama"),
    "generative-llama-4": ("generative_classification", {"name": "lora", "r": 4, "alpha": 8}, 4, "tiny-random-llama"),
    "multitask-llama": ("multitask", None, 2, "tiny-random-llama"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_report_eval_dry_run_predict(tmp_path, case, capsys):
    task, method, n_labels, model = CASES[case]
    if model == "bert":
        model = str(tiny_bert(tmp_path / "bert"))
    raw = multitask_config(tmp_path) if task == "multitask" else config(tmp_path, case, task, method, n_labels, model)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = Path(raw["run"]["output_dir"]) / raw["run"]["name"]
    eval_file = raw["data"]["eval"][0]["path"]

    cli("train", cfg_path)
    trained = json.loads((run / "summary.json").read_text())["eval_metrics"]
    if task == "multitask":
        trained = trained["tasks"]["kind"]

    # the report shows training's own evaluation before any `tunelab eval`
    cli("report", run)
    page = (run / "report.html").read_text()
    assert "training&#39;s own evaluation" in page and "macro_f1" in page and "accuracy" in page
    assert "confusion matrix (training&#39;s evaluation)" in page and "No evaluation yet" not in page

    cli("eval", run, "--data", eval_file, "--baselines")
    doc = json.loads((run / "eval" / "eval.json").read_text())
    systems = doc["systems"]
    baselines = model.startswith("tiny-random")  # an encoder's base cannot answer a prompt: no base systems
    assert set(systems) == ({"tuned", "base 0-shot", "base 3-shot", "tfidf-lr"} if baselines else {"tuned", "tfidf-lr"})
    assert "versus_baseline" in doc
    for name, s in systems.items():
        assert {"accuracy", "macro_f1"} <= set(s["headline"]), name
    tuned = systems["tuned"]["headline"]
    assert tuned["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-9)
    assert tuned["macro_f1"] == pytest.approx(trained["macro_f1"], abs=1e-9)
    examples = [json.loads(x) for x in (run / "eval" / "eval.examples.jsonl").read_text().splitlines()]
    if task != "multitask" and baselines:  # every prompted system is asked with the prompt training rendered
        listed = ", ".join(sorted(class_names(n_labels)))  # the run's label order: sorted names
        asked = [x for x in examples if x["system"] != "tfidf-lr"  # the classical baseline reads the plain text
                 and (x["system"] != "tuned" or task == "generative_classification")]
        assert asked and all(x["prompt"].startswith(f"Pick one of {listed} for: ") for x in asked)
    cli("report", run)
    assert "Classification: eval" in (run / "report.html").read_text()

    cli("train", cfg_path, "--dry-run")
    out = tmp_path / "pred.jsonl"
    cli("predict", run, "--data", eval_file, "--out", out, *(["--task", "kind"] if task == "multitask" else []),
        "--max-new-tokens", "4")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(Path(eval_file).read_text().splitlines())
    assert all(("label" in r) != (task == "generative_classification") for r in rows)
    if task == "generative_classification":  # predict asks each text with the prompt training rendered
        listed = ", ".join(sorted(class_names(n_labels)))
        assert all(r["messages"][-1]["content"].startswith(f"Pick one of {listed} for: ") for r in rows)
        assert all(r["reference"] in class_names(n_labels) for r in rows)


def test_eval_of_a_bare_model_asks_with_the_prompt_and_the_data_labels(tmp_path):
    data = write_rows(tmp_path / "eval.jsonl", ["yes", "no"], 2, 0)
    out = tmp_path / "out"
    cli("eval", "tiny-random-llama", "--data", data, "--prompt", "Is it {labels}? {text}", "--out", out)
    examples = [json.loads(x) for x in (out / "eval.examples.jsonl").read_text().splitlines()]
    assert len(examples) == 4 and all(x["prompt"].startswith("Is it no, yes? ") for x in examples)
    assert main(["eval", "tiny-random-llama", "--data", str(data), "--prompt", "no fields", "--out", str(out)]) == 2


def test_unknown_token_rate_warns_on_chinese_text_with_an_english_vocabulary(tmp_path, capsys):
    bert = tiny_bert(tmp_path / "en-bert", vocab=["the", "a", "cat", "dog", "good", "bad", "is", "very"])
    rng = random.Random(0)
    zh = ["这部电影非常好看", "服务态度很差", "今天天气不错", "质量一般般"]
    rows = [{"text": rng.choice(zh) + " the cat", "label_text": rng.choice(["pos", "neg"])} for _ in range(16)]
    data = tmp_path / "zh.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    cli("data", "inspect", data, "--model", bert)
    said = capsys.readouterr().out
    assert "vocabulary does not cover this text" in said and "smollm2-135m-instruct" in said
    assert "unknown tokens" in said

    raw = {"task": "classification", "run": {"name": "zh", "output_dir": str(tmp_path / "runs")},
           "model": {"path": str(bert)}, "data": {"train": [{"path": str(data)}], "max_length": 32},
           "method": {"name": "head"}, "train": {"max_steps": 1, "batch_size": 8, "precision": "fp32"}}
    cfg = tmp_path / "zh.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cli("train", cfg)
    said = capsys.readouterr().out
    assert "vocabulary does not cover this text" in said
    unknown = json.loads((tmp_path / "runs" / "zh" / "data.json").read_text())["unknown_tokens"]
    assert unknown["rate"] > 0.5 and unknown["unknown"] > 0
    cli("advise", cfg, "--probe-steps", "1", "--methods", "head")
    assert "vocabulary does not cover this text" in capsys.readouterr().out

    # an English text on the same vocabulary: no warning
    en = tmp_path / "en.jsonl"
    en.write_text("".join(json.dumps({"text": "the cat is very good", "label_text": "pos"}) + "\n" for _ in range(4)))
    cli("data", "inspect", en, "--model", bert)
    assert "does not cover" not in capsys.readouterr().out


def test_training_evaluation_and_generative_answers_show_progress(tmp_path, monkeypatch):
    """The loop's evaluation pass and the generative evaluation's answers each run under a progress bar."""
    from contextlib import contextmanager

    import tunelab.objectives.classification as objective
    import tunelab.train.loop as loop

    bars: list[tuple[str, int, int]] = []

    @contextmanager
    def recording(label, total, console=None, *, enabled=True):
        done = [0]
        yield lambda n: done.__setitem__(0, done[0] + n)
        bars.append((label, total, done[0]))

    monkeypatch.setattr(loop, "progress_bar", recording)
    monkeypatch.setattr(objective, "progress_bar", recording)
    raw = config(tmp_path, "progress", "generative_classification", {"name": "lora", "r": 4, "alpha": 8}, 2)
    raw["train"].update(max_steps=1, eval_every=1)
    cfg = tmp_path / "progress.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cli("train", cfg)
    assert ("eval", 4, 4) in bars and ("eval: generate", 4, 4) in bars  # 2 labels x 2 eval rows each
