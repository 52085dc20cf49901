"""The documents of a run directory, read back and formatted: JSON/YAML only, no model code.

A low layer shared by the verbs that write these documents (``tunelab eval``, ``eval.forgetting``)
and those that only read them (``tunelab runs``, ``tunelab report``), so that the report never
imports the evaluation code:

* :func:`run_row`: one registry row of a run (``config.yaml``, ``summary.json``,
  ``metrics.jsonl``, the headline metrics of ``eval/*.json``);
* :func:`label_prompts`: the label sets and classification prompts a run trained with
  (``config.yaml`` + ``data.json``), so that ``tunelab eval`` renders what training rendered;
* :func:`trained_evaluations`: the run's own end-of-training classification metrics
  (``summary.json``'s ``eval_metrics``, per task for a multi-task run), which the report shows;
* :func:`pair_history` and :func:`final_pair_metrics`: the pair metrics of a preference or reward
  run over its steps (``metrics.jsonl``: margin, pair accuracy, rewards...), for the report's plots
  and the registry's ``pair_accuracy``;
* :func:`tradeoff_rows` and :data:`TRADEOFF_HEADERS`: the trade-off table of a
  ``forgetting.json`` (base vs tuned, with intervals), shown in the terminal and in the report;
* :func:`baseline_verdict`: the sentence saying whether a model beat the TF-IDF baseline of an
  evaluation (``versus_baseline``), in the terminal and in the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab import metrics_log

__all__ = ["PAIR_METRICS", "TRADEOFF_HEADERS", "baseline_verdict", "eval_headlines", "final_pair_metrics", "fmt_change",
           "fmt_value", "label_prompts", "pair_history", "read_json", "run_row", "trained_evaluations", "tradeoff_rows"]


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; None if there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------- the run registry


def _last_train_loss(path: Path) -> float | None:
    last = None
    for rec in metrics_log.read(path):
        if rec.get("kind") == "train" and "loss" in rec:
            last = rec["loss"]
    return last


def eval_headlines(run: Path) -> dict[str, float]:
    """``{"<source>/<metric>": value}`` of the tuned system's headline metrics in ``eval/*.json``."""
    out: dict[str, float] = {}
    for f in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        if f.name.startswith("compare-"):
            continue
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            system = doc["systems"].get("tuned") or next(iter(doc["systems"].values()))
        except (json.JSONDecodeError, KeyError, StopIteration):
            continue
        for k, v in system.get("headline", {}).items():
            if k not in ("ci_low", "ci_high"):
                out[f"{doc['name']}/{k}"] = v
    return out


# What a preference / reward run's loss logs at every evaluation (``kind: eval``) and, prefixed with
# ``train_``, in every train record (the means over the pairs since the previous record).
PAIR_METRICS = ("pair_accuracy", "margin", "reward_chosen", "reward_rejected", "score_chosen", "score_rejected",
                "logp_chosen", "logp_rejected", "reward_desirable", "reward_undesirable", "kl", "kl_estimate")


def pair_history(run: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{"train": {metric: [(step, value), ...]}, "eval": {...}}`` of :data:`PAIR_METRICS` in
    ``metrics.jsonl``; both empty for a run that logs none (every task but preference and reward)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"train": {}, "eval": {}}
    for rec in metrics_log.read(run / "metrics.jsonl"):
        kind, prefix = rec.get("kind"), "train_" if rec.get("kind") == "train" else ""
        if kind not in out or not isinstance(rec.get("step"), int):
            continue
        for m in PAIR_METRICS:
            v = rec.get(prefix + m)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[kind].setdefault(m, []).append((rec["step"], float(v)))
    return out


def final_pair_metrics(run: Path) -> dict[str, Any]:
    """The last pair metrics of a run: its last evaluation's (``source: "eval"``), else its last train
    record's (``source: "train"``: the pairs of the steps since the record before); ``{}`` for none."""
    history = pair_history(run)
    for source in ("eval", "train"):
        series = history[source]
        if series:
            step = max(points[-1][0] for points in series.values())
            return {"source": source, "step": step,
                    **{m: points[-1][1] for m, points in series.items() if points[-1][0] == step}}
    return {}


def run_row(run: Path) -> dict[str, Any]:
    """One registry row for a run directory."""
    row: dict[str, Any] = {"name": run.name, "path": str(run)}
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        return {**row, "status": f"unreadable config.yaml ({type(err).__name__})"}
    summary = read_json(run / "summary.json") or {}
    t, m = cfg.get("train", {}), cfg.get("method", {})
    started = (run / "config.yaml").stat().st_mtime
    row.update(
        date=time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), timestamp=started,
        status=summary.get("stop_reason", "finished") if (run / "final").is_dir() else
        ("running or stopped" if (run / "metrics.jsonl").is_file() else "not started"),
        model=cfg.get("model", {}).get("path"), method=m.get("name"),
        lr=t.get("lr"), epochs=t.get("epochs"), max_steps=t.get("max_steps"),
        batch=f"{t.get('batch_size')}x{t.get('grad_accum')}", seed=t.get("seed"),
        r=m.get("r"), steps=summary.get("step"), train_seconds=summary.get("train_seconds"),
        tokens_per_s=summary.get("tokens_per_s"), eval_loss=summary.get("best_eval_loss"),
        train_loss=_last_train_loss(run / "metrics.jsonl"),
    )
    pairs = final_pair_metrics(run)  # preference / reward runs: the last evaluation's pair accuracy
    if "pair_accuracy" in pairs:
        row.update(pair_accuracy=pairs["pair_accuracy"], margin=pairs.get("margin"),
                   pair_metrics_from=f"{pairs['source']} step {pairs['step']}")
    row["metrics"] = eval_headlines(run)
    return row


# --------------------------------------------------------------------------- classification runs


def label_prompts(run: Path) -> dict[str, dict[str, Any]]:
    """``{task: {"labels", "prompt", "max_new_tokens"}}`` of every labelled task a run trained.

    The labels are in the run's class order (``data.json`` keeps the label counts in it); the prompt
    is ``classification.prompt`` (a multi-task task's own ``prompt`` first), with ``{labels}`` and
    ``{text}`` as training filled them. Empty for a run without labels (sft, pretrain).
    """
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    data = read_json(run / "data.json") or {}
    cls = cfg.get("classification") or {}
    out: dict[str, dict[str, Any]] = {}
    if isinstance(data.get("labels"), dict) and data["labels"]:
        out[str(cfg.get("task"))] = {"labels": list(data["labels"]), "prompt": cls.get("prompt"),
                                     "max_new_tokens": cls.get("max_new_tokens")}
    for name, t in (data.get("tasks") or {}).items():
        if isinstance(t, dict) and isinstance(t.get("labels"), dict) and t["labels"]:
            spec = (cfg.get("tasks") or {}).get(name) or {}
            out[name] = {"labels": list(t["labels"]), "prompt": spec.get("prompt") or cls.get("prompt"),
                         "max_new_tokens": cls.get("max_new_tokens")}
    return out


def trained_evaluations(run: Path) -> dict[str, dict[str, Any]]:
    """``{name: metrics}`` of the run's last evaluation during training that scored classes (accuracy,
    macro-F1, per class, confusion): the run itself (its task's name), or each task of a multi-task run."""
    metrics = (read_json(run / "summary.json") or {}).get("eval_metrics") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, m in (metrics.get("tasks") or {}).items():
        if isinstance(m, dict) and m.get("accuracy") is not None:
            out[name] = {"step": metrics.get("step"), **m}
    if not out and metrics.get("accuracy") is not None:
        try:
            task = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("task")
        except (OSError, yaml.YAMLError):
            task = None
        out[str(task or "eval")] = metrics
    return out


# --------------------------------------------------------------------------- forgetting.json


TRADEOFF_HEADERS = ["measure", "metric", "base", "tuned", "change [paired CI]", "verdict", "n"]


def fmt_value(metric: str | None, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if metric == "accuracy" else f"{v:.4f}"


def fmt_change(metric: str | None, d: float | None, ci: list[float] | None = None) -> str:
    if d is None:
        return "-"
    if metric == "accuracy":
        text = f"{d * 100:+.1f} pts"
        return text + (f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]" if ci else "")
    return f"{d:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def tradeoff_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Rows of the trade-off table: measure, base [CI], tuned [CI], change [paired CI], verdict."""
    def cell(metric: str, s: dict | None) -> str:
        if not s:
            return "-"
        return f"{fmt_value(metric, s['value'])} [{fmt_value(metric, s['ci_low'])}, {fmt_value(metric, s['ci_high'])}]"

    out = []
    for r in doc["measures"]:
        verdict = "-"
        if "change" in r:
            verdict = ("better" if r["better"] else "worse") + ("" if r["significant"] else " (within noise)")
        out.append([r["name"], r["metric"] + ("" if r["higher_is_better"] else " (lower is better)"),
                    cell(r["metric"], r.get("base")), cell(r["metric"], r.get("tuned")), fmt_change(r["metric"], r.get("change"), r.get("change_ci")), verdict,
                    str((r.get("tuned") or r.get("base") or {}).get("n", "-"))])
    return out


def baseline_verdict(versus: dict[str, Any]) -> str:
    """One plain sentence from an evaluation's ``versus_baseline`` (``tunelab eval``, the report): does the scored
    model beat the TF-IDF + logistic-regression baseline, by how many accuracy points, and is it significant."""
    pts = versus["difference"] * 100
    sig = "significant" if versus["significant"] else "not significant"
    ci = f"{versus['confidence']:.0%} CI [{versus['ci_low'] * 100:+.1f}, {versus['ci_high'] * 100:+.1f}] points"
    who = "The tuned model" if versus["system"] == "tuned" else f"The {versus['system']}"
    if pts > 0:
        head = f"{who} beats the TF-IDF + logistic-regression baseline by {pts:.1f} accuracy points"
    elif pts == 0:
        head = f"{who} does not beat the TF-IDF + logistic-regression baseline: the same accuracy"
    else:
        head = f"{who} does NOT beat the TF-IDF + logistic-regression baseline: {-pts:.1f} accuracy points below it"
    return (f"{head} ({versus['mean_b']:.1%} vs {versus['mean_a']:.1%}, {ci}, McNemar p = {versus['p_value']:.3g}, "
            f"{sig}).")
