"""Multi-task runs (``task: multitask``): two classification heads + SFT on one shared tiny-random-llama.

Covers the task sampling plan (exact per-epoch proportions, temperature, round-robin, resume
purity), gradient isolation between heads, per-task metrics, and save -> reload per head.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.config import load_config
from tunelab.data.task_mix import TaskPlan, quotas, shares
from tunelab.errors import ConfigError
from tunelab.train.recipe import fine_tune

FILLER = ["the", "a", "one", "then", "we", "saw", "near", "old", "house", "river", "today", "very"]


def _cls_file(path: Path, n: int, seed: int, classes: dict[str, list[str]]) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(classes))
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))] + [rng.choice(classes[label])]
        rows.append({"text": " ".join(words), "label_text": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_file(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = [{"instruction": f"Repeat: {rng.choice(FILLER)} {rng.choice(FILLER)}", "output": rng.choice(FILLER)}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


KINDS = {"kind": {"colour": ["red", "blue", "green"], "animal": ["cat", "dog", "horse"]}}
MOODS = {"mood": {"good": ["great", "fine", "happy"], "bad": ["awful", "sad", "poor"], "meh": ["so-so", "okay"]}}


def mt_config(tmp_path: Path, name: str, *, method: dict | None = None, sampling: dict | None = None,
              train: dict | None = None, generative: bool = False) -> dict:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    cfg = {
        "task": "multitask",
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "model": {"path": "tiny-random-llama"},
        "tasks": {"kind": {"type": "classification"},
                  "mood": {"type": "classification", "weight": 2.0, "head_layers": 1, "head_width": 16},
                  "chat": {"type": "sft", "weight": 0.5}},
        "task_sampling": sampling or {"strategy": "round_robin"},
        "data": {"train": [{"path": str(_cls_file(d / "kind.jsonl", 32, 0, KINDS["kind"])), "task": "kind"},
                           {"path": str(_cls_file(d / "mood.jsonl", 24, 1, MOODS["mood"])), "task": "mood"},
                           {"path": str(_sft_file(d / "chat.jsonl", 16, 2)), "task": "chat"}],
                 "eval": [{"path": str(_cls_file(d / "kind_eval.jsonl", 12, 3, KINDS["kind"])), "task": "kind"},
                          {"path": str(_cls_file(d / "mood_eval.jsonl", 12, 4, MOODS["mood"])), "task": "mood"},
                          {"path": str(_sft_file(d / "chat_eval.jsonl", 6, 5)), "task": "chat"}],
                 "max_length": 48},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 1e-2, "batch_size": 4, "grad_accum": 2, "max_steps": 6, "precision": "fp32", "seed": 0,
                  "eval_every": 3, "schedule": "constant", **(train or {})},
    }
    if generative:  # a fourth task answered through the LM head: the label is the assistant's reply
        cfg["tasks"]["pick"] = {"type": "generative_classification", "prompt": "Colour or animal? {text}"}
        cfg["data"]["train"].append({"path": str(_cls_file(d / "pick.jsonl", 12, 6, KINDS["kind"])), "task": "pick"})
        cfg["data"]["eval"].append({"path": str(_cls_file(d / "pick_eval.jsonl", 4, 7, KINDS["kind"])), "task": "pick"})
    return cfg


def _load(tmp_path: Path, cfg: dict):
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # tasks keep their config order
    return load_config(path)


# --------------------------------------------------------------------------- the plan


def test_proportional_and_temperature_quotas_are_exact_per_epoch():
    sizes = [300, 100, 20]
    rows = tuple(tuple(range(sum(sizes[:i]), sum(sizes[: i + 1]))) for i in range(3))
    plan = TaskPlan(rows, batch_size=4, grad_accum=1, world_size=1, seed=3, strategy="proportional")
    assert plan.steps_per_epoch == 105
    for epoch in range(3):
        counts = Counter(plan.epoch_tasks(epoch))
        assert [counts[t] for t in range(3)] == quotas(shares(sizes, "proportional", 1.0), 105) == [75, 25, 5]
    temp = TaskPlan(rows, 4, 1, 1, 3, strategy="temperature", temperature=2.0)
    expected = [s**0.5 / sum(x**0.5 for x in sizes) for s in sizes]
    counts = Counter(temp.epoch_tasks(0))
    assert [counts[t] for t in range(3)] == quotas(expected, 105)
    assert abs(counts[2] / 105 - expected[2]) < 0.01 and counts[2] > 5  # the small task gets more than its size


def test_steps_hold_one_task_cover_its_rows_and_depend_only_on_seed_and_step():
    rows = (tuple(range(10)), tuple(range(10, 16)))
    plan = TaskPlan(rows, batch_size=2, grad_accum=2, world_size=1, seed=1, strategy="proportional")
    seen: Counter = Counter()
    for step in range(40):
        got = plan.step_rows(step)
        task = plan.step_task(step)
        assert len(got) == 4 and set(got) <= set(rows[task])
        seen.update(got)
    assert set(seen) == set(range(16))  # every row is used
    counts_a = Counter(i for i in seen.elements() if i < 10)
    assert max(counts_a.values()) - min(counts_a.values()) <= 1 + 1  # passes over a task's rows are permutations
    fresh = TaskPlan(rows, 2, 2, 1, 1, strategy="proportional")  # a resumed run rebuilds the plan
    assert [fresh.step_rows(s) for s in (37, 5, 22)] == [plan.step_rows(s) for s in (37, 5, 22)]
    assert plan.micro_rows(7, 0, 0) + plan.micro_rows(7, 1, 0) == plan.step_rows(7)


def test_round_robin_cycles_through_tasks_in_config_order():
    rows = (tuple(range(50)), tuple(range(50, 55)), tuple(range(55, 60)))
    plan = TaskPlan(rows, 2, 1, 1, 0, strategy="round_robin")
    assert [plan.step_task(s) for s in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [plan.step_task(s) for s in range(plan.steps_per_epoch, plan.steps_per_epoch + 3)] == [
        plan.steps_per_epoch % 3, (plan.steps_per_epoch + 1) % 3, (plan.steps_per_epoch + 2) % 3]


# --------------------------------------------------------------------------- config


def test_config_rules(tmp_path):
    cfg = mt_config(tmp_path, "bad")
    cfg["data"]["train"][0]["task"] = "kinds"
    cfg["data"]["packing"] = True
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, cfg)
    text = str(err.value)
    assert "data.train.0.task: unknown task 'kinds'" in text
    assert "tasks.kind: no data.train entry" in text
    assert "data.packing with task: multitask" in text
    cfg = mt_config(tmp_path, "bad3", method={"name": "head"})
    with pytest.raises(ConfigError, match=r"method head freezes the whole LM, so tasks \['chat'\]"):
        _load(tmp_path, cfg)
    cfg = mt_config(tmp_path, "bad2")
    cfg["task"] = "sft"
    with pytest.raises(ConfigError, match="tasks is set but task is 'sft'"):
        _load(tmp_path, cfg)


# --------------------------------------------------------------------------- training


def test_two_heads_and_sft_train_together_with_isolated_head_gradients_and_per_task_metrics(tmp_path):
    cfg, sources = _load(tmp_path, mt_config(tmp_path, "mt", train={"max_steps": 4, "eval_every": 2}, generative=True))
    out = fine_tune(cfg, sources)
    model = out.model
    assert set(model.heads) == {"kind", "mood"}
    run = out.run_dir
    summary = json.loads((run / "summary.json").read_text())
    tasks = summary["eval_metrics"]["tasks"]
    assert set(tasks) == {"kind", "mood", "chat", "pick"}
    assert tasks["pick"]["n"] == 4 and "accuracy" in tasks["pick"]  # parsed from greedy answers
    for name in ("kind", "mood"):
        assert {"eval_loss", "accuracy", "macro_f1", "n"} <= set(tasks[name]) and tasks[name]["n"] == 12
    assert "eval_loss" in tasks["chat"] and "accuracy" not in tasks["chat"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    # round robin in config order, and the step loss is that task's loss
    assert [next(k for k in m if k.startswith("loss/")) for m in train] == [
        "loss/kind", "loss/mood", "loss/chat", "loss/pick"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert len(evals) == 2 and all("kind/accuracy" in m and "chat/eval_loss" in m for m in evals)
    # the loop's eval loss is the task-weighted mean of the task eval losses
    last = evals[-1]
    w = {"kind": 1.0, "mood": 2.0, "chat": 0.5, "pick": 1.0}
    mean = sum(w[t] * last[f"{t}/eval_loss"] for t in w) / sum(w.values())
    assert last["eval_loss"] == pytest.approx(mean, rel=1e-5)


def test_each_head_only_gets_gradient_from_its_own_task(tmp_path):
    from tunelab.data.batching import collate
    from tunelab.models.load import load_tokenizer
    from tunelab.tasks import multitask, prepare_data

    cfg, _ = _load(tmp_path, mt_config(tmp_path, "grads"))
    tok = load_tokenizer("tiny-random-llama")
    from rich.console import Console

    data = prepare_data(cfg, tok, None, Console(quiet=True))
    model, loss, _ = multitask.model_and_loss(cfg, data, torch.float32, tok)
    plan = multitask.plan(cfg, data, 1)
    for step in range(3):
        task = data.task.tasks[plan.step_task(step)]
        model.zero_grad(set_to_none=True)
        batch = collate([data.train[i] for i in plan.step_rows(step)], pad_id=tok.pad_token_id or 0, packed=False)
        out = loss(**batch)
        part, per_task = out.total, out.groups
        assert list(per_task) == [plan.step_task(step)]
        part.backward()
        for name, head in model.heads.items():
            has = any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
            assert has == (name == task), (step, task, name)
        lora_grads = [p.grad for n, p in model.lm.named_parameters() if "lora_" in n and p.grad is not None]
        assert lora_grads  # the shared backbone learns from every task
    # data.eval_ratio holds out a share of every task's own rows
    raw = mt_config(tmp_path, "ratio")
    raw["data"]["eval"], raw["data"]["eval_ratio"] = [], 0.25
    held = prepare_data(_load(tmp_path, raw)[0], tok, None, Console(quiet=True))
    assert {t: v["eval_rows"] for t, v in held.summary["tasks"].items()} == {"kind": 8, "mood": 6, "chat": 4}
    assert {t: v["train_rows"] for t, v in held.summary["tasks"].items()} == {"kind": 24, "mood": 18, "chat": 12}


SAVE_METHODS = {"full": {"name": "full"}, "head": {"name": "head", "dropout": 0.0}}


@pytest.mark.parametrize("method", sorted(SAVE_METHODS))
def test_save_reload_gives_the_same_outputs_per_head_and_predict_picks_a_task(tmp_path, method):
    from tunelab.ship.inference import load_for_inference, select_task
    from tunelab.ship.predict import predict

    raw = mt_config(tmp_path, f"mtsave-{method}", method=SAVE_METHODS[method],
                    train={"max_steps": 3, "eval_every": 0, "lr": 1e-3})
    if method == "head":  # a frozen LM: the sft task would train nothing (a config error), so heads only
        del raw["tasks"]["chat"]
        raw["data"]["train"], raw["data"]["eval"] = raw["data"]["train"][:2], raw["data"]["eval"][:2]
    cfg, sources = _load(tmp_path, raw)
    out = fine_tune(cfg, sources)
    files = {p.name for p in (out.run_dir / "final").iterdir()}
    assert {"heads.safetensors", "multitask.json", "tunelab.json"} <= files
    assert ("model.safetensors" in files) == (method == "full")  # head: the frozen LM is the base model's
    texts = ["we saw the red", "a very sad", "then one dog"]
    enc = out.tokenizer(texts, padding=True, return_tensors="pt")
    out.model.eval()
    with torch.no_grad():
        before = {t: out.model.classify(t, enc["input_ids"], enc["attention_mask"]) for t in ("kind", "mood")}
    loaded = load_for_inference(out.run_dir)
    assert loaded.tasks == list(raw["tasks"])
    for task in ("kind", "mood"):
        with torch.no_grad():
            after = loaded.model.classify(task, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(after, before[task], rtol=1e-5, atol=1e-5)
    if method != "full":
        return
    data = tmp_path / "to_predict.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    s = predict(out.run_dir, data, tmp_path / "pred.jsonl", task="mood", show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert s.written == 3 and {r["label"] for r in rows} <= {"good", "bad", "meh"}
    probs = torch.softmax(before["mood"], -1)
    for row, p in zip(rows, probs.tolist(), strict=True):
        assert row["probs"]["bad"] == pytest.approx(p[0], abs=1e-5)
    chat = select_task(loaded, "chat")
    assert chat.kind == "generation" and chat.model is loaded.model.lm
    from tunelab.eval.evaluate import load_target

    target = load_target(out.run_dir)  # tunelab eval scores the shared LM of a multi-task run
    assert hasattr(target.model, "generate") and "[chat]" in target.description
    with pytest.raises(Exception, match="nope"):
        select_task(loaded, "nope")


@pytest.mark.slow
def test_one_process_equals_two_processes(tmp_path):
    """DDP (gloo, 2 processes x batch 2) = 1 process x batch 4: the same per-task losses and heads,
    although each step leaves the other tasks' heads without a gradient."""
    from safetensors.torch import load_file

    from conftest import train_one_and_two

    one, two = (mt_config(tmp_path, name, train={"batch_size": batch, "max_steps": 3, "eval_every": 0, "threads": 1,
                                                 "lr": 1e-3}) for name, batch in (("one", 4), ("two", 2)))
    runs = dict(zip(("one", "two"), train_one_and_two(tmp_path, one, two), strict=True))
    losses = {n: [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "train"] for n, p in runs.items()}
    assert losses["one"] == pytest.approx(losses["two"], abs=1e-5)
    h1, h2 = (load_file(str(p / "final" / "heads.safetensors")) for p in runs.values())
    for k in h1:
        torch.testing.assert_close(h1[k], h2[k], atol=1e-5, rtol=1e-4)
