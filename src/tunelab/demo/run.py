"""``tunelab demo``: the main job on the bundled model, end to end.

1. generate the enterprise-policy data (:mod:`tunelab.demo.policy`) into ``<workdir>/data``;
2. score the *base* SmolLM2-135M-Instruct on the held-out split (greedy generation, the
   answer parsed against the label set);
3. fine-tune its top 15 decoder layers (``method: freeze``) through the same
   :func:`~tunelab.train.recipe.fine_tune` as ``tunelab train`` (the config is written to
   ``<workdir>/policy.yaml``);
4. score the tuned model the same way, fit the baselines that need no model, and print the four
   side by side; write ``<workdir>/results.json`` and every generation to
   ``<workdir>/generations.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from tunelab.config import load_config
from tunelab.demo.policy import LABEL_ALIASES, LABELS, most_clicked_baseline, write_demo_data
from tunelab.eval.metrics import classification_metrics, parse_label
from tunelab.fsutil import atomic_write_text

# One pass over 2,400 distinct rows, one packed row per optimiser step, the top 15 of SmolLM2's 30 layers trained:
# 85.8% on the held-out rows in the time LoRA took for 83.3% (the backward pass stops at layer 15, so it costs what
# LoRA's input gradients through all 30 layers cost). docs/demo.md lists every try (measured 2026-12-05).
N_TRAIN, N_TEST = 2400, 120
MODEL = "smollm2-135m-instruct"

DEMO_CONFIG = {
    "run": {"name": "policy", "output_dir": "runs"},
    "model": {"path": MODEL},
    "data": {
        "train": [{"path": "data/train.jsonl", "format": "messages"}],
        "eval_ratio": 0.05,
        "max_length": 512,
        "packing": True,
    },
    "method": {"name": "freeze", "layers": 15},
    "train": {
        # one packed row (~4 examples) per optimiser step: twice the steps of 2 rows per step, for the same compute
        "lr": 1e-4, "epochs": 1, "batch_size": 1, "grad_accum": 1, "warmup_ratio": 0.05,
        "schedule": "cosine", "eval_every": 250, "save_every": 250, "precision": "auto", "seed": 0,
    },
}


def score(loaded, rows: list[dict], labels: list[str], aliases) -> tuple[dict, list[str], list[str | None]]:
    """Greedy answers for the prompts of ``rows``, parsed to labels, with metrics."""
    from tunelab.ship.inference import generate_batch

    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
    replies = generate_batch(loaded, prompts, max_new_tokens=12, batch_size=24)
    preds = [parse_label(text, labels, aliases) for text in replies]
    gold = [r["label"] for r in rows]
    return classification_metrics(gold, preds, labels), replies, preds


def baselines(train: list[dict], test: list[dict]) -> dict[str, dict]:
    """What no fine-tuning gets on the held-out rows: TF-IDF + logistic regression trained on the demo's
    training prompts (:mod:`tunelab.eval.classical`), and the heuristic "the most clicked category, ties to
    the most recent click" (:func:`tunelab.demo.policy.most_clicked_baseline`)."""
    from tunelab.eval.classical import TrainingText, fit_baseline

    def prompt(r: dict) -> str:
        return r["messages"][0]["content"]

    pipe, _ = fit_baseline(TrainingText([prompt(r) for r in train], [r["label"] for r in train], "train.jsonl"))
    gold = [r["label"] for r in test]
    tfidf = classification_metrics(gold, [str(p) for p in pipe.predict([prompt(r) for r in test])], LABELS)
    heuristic = classification_metrics(gold, [most_clicked_baseline(r["meta"]["clicks"]) for r in test], LABELS)
    return {"tfidf": _headline(tfidf), "heuristic": _headline(heuristic)}


def run_demo(workdir: str | Path = "demo_run", *, fresh: bool = False, console: Console | None = None,
             model: str = MODEL, method: dict | None = None, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict:
    """The demo end to end. ``model``, ``method`` (the config's method section) and the row counts are there
    for the tests: a tiny model with fewer layers, a few rows."""
    from tunelab.ship.inference import load_for_inference
    from tunelab.train.recipe import fine_tune

    console = console or Console()
    work = Path(workdir).resolve()
    t0 = time.perf_counter()
    paths = write_demo_data(work / "data", n_train=n_train, n_test=n_test, seed=0)
    test = [json.loads(line) for line in paths["test"].read_text(encoding="utf-8").splitlines()]
    console.rule("[bold]tunelab demo: enterprise policy recommendation")
    console.print(f"data: {paths['train']} ({n_train} rows), {paths['test']} ({n_test} held-out rows), 6 categories, "
                  "half Chinese, half English")

    cfg_dict = json.loads(json.dumps(DEMO_CONFIG))
    cfg_dict["run"]["output_dir"] = str(work / "runs")
    cfg_dict["model"]["path"] = model
    cfg_dict["method"] = method or cfg_dict["method"]
    cfg_dict["data"]["train"][0]["path"] = str(paths["train"])
    run_dir = work / "runs" / cfg_dict["run"]["name"]
    if fresh and run_dir.exists():
        cfg_dict["run"]["name"] += time.strftime("-%Y%m%d-%H%M%S")
        run_dir = work / "runs" / cfg_dict["run"]["name"]
    config_path = work / "policy.yaml"
    atomic_write_text(config_path, yaml.safe_dump(cfg_dict, sort_keys=False))

    console.print("[bold]1/3[/] scoring the base model on the held-out split ...")
    base = load_for_inference(model)
    base_metrics, base_replies, base_preds = score(base, test, LABELS, LABEL_ALIASES)
    del base

    what = _describe(cfg_dict["method"])
    console.print(f"[bold]2/3[/] fine-tuning ({what}; config {config_path}) ...")
    if (run_dir / "final" / "tunelab.json").is_file():
        console.print(f"[dim]{run_dir} is already trained: reusing it (tunelab demo --fresh to retrain)[/]")
        train_summary = json.loads((run_dir / "summary.json").read_text())
    else:
        cfg, sources = load_config(config_path)
        resume = (run_dir / "config.yaml").is_file()
        train_summary = fine_tune(cfg, sources, resume=resume, console=console).summary

    console.print("[bold]3/3[/] scoring the tuned model on the held-out split ...")
    tuned = load_for_inference(run_dir)
    tuned_metrics, tuned_replies, tuned_preds = score(tuned, test, LABELS, LABEL_ALIASES)

    train_rows = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    without_model = baselines(train_rows, test)
    lines = [
        json.dumps({"prompt": r["messages"][0]["content"], "gold": r["label"], "base_reply": br, "base_label": bp,
                    "tuned_reply": tr, "tuned_label": tp}, ensure_ascii=False)
        for r, br, bp, tr, tp in zip(test, base_replies, base_preds, tuned_replies, tuned_preds, strict=True)
    ]
    atomic_write_text(work / "generations.jsonl", "\n".join(lines) + "\n")
    results = {
        "base": _headline(base_metrics), "tuned": _headline(tuned_metrics), **without_model, "run_dir": str(run_dir),
        "train_seconds": train_summary.get("train_seconds"), "tokens_per_s": train_summary.get("tokens_per_s"),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(work / "results.json", json.dumps(results, indent=2) + "\n")

    table = Table(title=f"held-out policy recommendation ({n_test} enterprises)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    table.add_column("unparsed answers", justify="right")
    for name, m in (("SmolLM2-135M-Instruct (base)", base_metrics), (f"tuned ({what})", tuned_metrics),
                    ("TF-IDF + logistic regression", without_model["tfidf"]),
                    ("heuristic: most clicked category", without_model["heuristic"])):
        table.add_row(name, f"{m['accuracy']:.1%}", f"{m['macro_f1']:.3f}", str(m.get("n_unparsed", 0)))
    console.print(table)
    console.print(f"run: {run_dir}\ngenerations: {work / 'generations.jsonl'}\nresults: {work / 'results.json'}\n"
                  f"chat with it: tunelab chat {run_dir}")
    return results


def _describe(method: dict) -> str:
    if method["name"] == "freeze" and method.get("layers"):
        n = method["layers"]
        return f"the top {n} layer{'s' if n != 1 else ''} trained"
    return f"method {method['name']}"


def _headline(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "macro_f1", "n_unparsed") if k in m}
