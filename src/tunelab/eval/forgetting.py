"""``eval.forgetting``: what tuning cost in general ability, next to what it gained on the task.

After training, the base model and the tuned model are scored on the same things:

* the **task metric** on the run's validation data (``data.eval`` or ``data.eval_ratio``):
  accuracy of greedy answers for ``generative_classification`` (the training prompt, parsed to
  a label, as during training; Wilson interval), the mean loss per target token otherwise
  (lower is better; bootstrap interval);
* **general benchmarks** (MMLU / CMMLU / C-Eval layout, ``eval.choice``; subset by ``limit``):
  accuracy with Wilson intervals;
* **held-out general instruction loss** (``general`` files, e.g. alpaca): mean loss per assistant
  token, with a percentile bootstrap interval over examples (token-weighted ratio).

Each change (tuned - base) gets a paired bootstrap interval over the same questions / examples,
so a drop can be told from noise. Base scores are cached beside the run (``<output_dir>/
.forgetting_base/``) keyed by base model, dtype and settings: several runs from one base score
it once. Results go to ``<run>/forgetting.json``; ``tunelab report`` shows the trade-off table
and plot. :func:`task_metric` is shared with ``tunelab continual`` (the accuracy matrix).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tunelab import tasks
from tunelab.config import load_config
from tunelab.data.formats import read_records
from tunelab.data.templates import set_chat_template
from tunelab.data.workbench import prepare_records
from tunelab.errors import UserError
from tunelab.eval.choice import load_benchmark, score_benchmark
from tunelab.eval.metrics import wilson_interval
from tunelab.fsutil import atomic_write_text
from tunelab.rundocs import TRADEOFF_HEADERS, tradeoff_rows

__all__ = ["measure_forgetting", "task_metric", "general_scores", "print_tradeoff"]


# --------------------------------------------------------------------------- intervals


def ratio_ci(sums: list[float], counts: list[float], *, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(sums) / sum(counts)`` over examples (numpy, seeded)."""
    s, c = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    if s.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, s.size, size=(n_resamples, s.size))
    stats = s[idx].sum(axis=1) / np.maximum(c[idx].sum(axis=1), 1e-12)
    a = (1 - confidence) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def paired_change_ci(base: dict[str, Any], tuned: dict[str, Any], *, confidence: float = 0.95,
                     n_resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap interval of (tuned - base) resampling the shared examples together (paired)."""
    b, t = base.get("per_example"), tuned.get("per_example")
    if not b or not t:
        return None
    keys = sorted(set(b) & set(t))
    if not keys:
        return None
    bs = np.asarray([b[k][0] for k in keys], dtype=float)
    bc = np.asarray([b[k][1] for k in keys], dtype=float)
    ts = np.asarray([t[k][0] for k in keys], dtype=float)
    tc = np.asarray([t[k][1] for k in keys], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(keys), size=(n_resamples, len(keys)))
    diff = ts[idx].sum(1) / np.maximum(tc[idx].sum(1), 1e-12) - bs[idx].sum(1) / np.maximum(bc[idx].sum(1), 1e-12)
    a = (1 - confidence) / 2
    return float(np.quantile(diff, a)), float(np.quantile(diff, 1 - a))


# --------------------------------------------------------------------------- scoring one model


def _device_model(model):
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    return model.eval()


def task_metric(cfg, model, tokenizer, *, limit: int | None = None, batch_size: int = 16,
                confidence: float = 0.95, console: Console | None = None) -> dict[str, Any] | None:
    """The task metric of ``cfg`` (a TuneConfig) on ``model``: accuracy (generative classification)
    or mean target-token loss (sft, pretrain) on the config's validation data; None without one.

    The validation records are the training run's own (``data.eval`` or the seeded
    ``data.eval_ratio`` split, via ``prepare_records``); ``tokenizer`` must carry the chat
    template the run trained with.
    """

    console = console or Console(stderr=True)
    task = tasks.get(cfg.task)
    if task.pair_metric:
        return _pair_metric(cfg, model, tokenizer, limit=limit, batch_size=batch_size, confidence=confidence,
                            console=console)
    if not task.continual:
        raise UserError(f"task {cfg.task} (a class head) has no task metric here yet: forgetting supports sft, "
                        "pretrain, generative_classification and preference; continual runs the first three")
    prep = prepare_records(cfg, None, Console(quiet=True), True)
    records = prep.eval[:limit] if limit else prep.eval
    if not records:
        return None
    if task.labelled:
        from tunelab.data.tasks import generative_task_rows
        from tunelab.objectives.classification import GenerativeEval

        rows = generative_task_rows(cfg.data, cfg.classification, tokenizer, prep.train, records)  # cached tokens
        labels = rows.labels
        gen = GenerativeEval(_device_model(model), tokenizer, rows.eval_prompts, labels,
                             max_new_tokens=cfg.classification.max_new_tokens, batch_size=batch_size)
        if not rows.eval_prompts:
            return None
        metrics, answers = gen.run()
        n = len(answers)
        correct = [a["parsed"] == a["gold"] for a in answers]
        lo, hi = wilson_interval(sum(correct), n, confidence)
        return {"metric": "accuracy", "higher_is_better": True, "value": float(metrics["accuracy"]),
                "ci_low": lo, "ci_high": hi, "n": n, "macro_f1": float(metrics.get("macro_f1", float("nan"))),
                "per_example": {str(i): (float(c), 1.0) for i, c in enumerate(correct)}}
    return _loss_metric(model, tokenizer, records, max_length=cfg.data.max_length, batch_size=batch_size,
                        confidence=confidence, console=console)


def _pair_metric(cfg, model, tokenizer, *, limit: int | None, batch_size: int, confidence: float,
                 console) -> dict[str, Any] | None:
    """Pair accuracy on the run's held-out pairs: the chosen reply's summed log-probability above the
    rejected one's (:func:`tunelab.eval.tasks.eval_pairs`, as ``tunelab eval`` scores a tuned generator)."""
    from tunelab.eval.tasks import eval_pairs

    prep = prepare_records(cfg, None, Console(quiet=True), True)
    records = prep.eval[:limit] if limit else prep.eval
    if not records:
        return None
    res = eval_pairs(_device_model(model), tokenizer, records, batch_size=batch_size,
                     max_length=cfg.data.max_length, console=console)
    correct = [e["score"] for e in res["examples"]]
    lo, hi = wilson_interval(int(sum(correct)), len(correct), confidence)
    return {"metric": "pair accuracy", "higher_is_better": True, "value": res["metrics"]["pair_accuracy"],
            "ci_low": lo, "ci_high": hi, "n": len(correct),
            "per_example": {str(e["id"]): (c, 1.0) for e, c in zip(res["examples"], correct, strict=True)}}


def _loss_metric(model, tokenizer, records, *, max_length: int, batch_size: int, confidence: float,
                 console) -> dict[str, Any]:
    from tunelab.eval.tasks import eval_lm

    res = eval_lm(_device_model(model), tokenizer, records, batch_size=batch_size, max_length=max_length,
                  console=console)
    ex = res["examples"]
    sums, counts = [e["loss"] * e["tokens"] for e in ex], [e["tokens"] for e in ex]
    lo, hi = ratio_ci(sums, counts, confidence=confidence)
    return {"metric": "loss", "higher_is_better": False, "value": float(res["metrics"]["loss"]), "ci_low": lo,
            "ci_high": hi, "n": len(ex), "tokens": int(sum(counts)),
            "per_example": {str(e["id"]): (s, c) for e, s, c in zip(ex, sums, counts, strict=True)}}


def general_scores(model, tokenizer, settings, *, confidence: float = 0.95, console: Console | None = None) -> dict:
    """``{measure name: score}`` of ``model`` on the benchmarks and general files of ``settings``."""

    console = console or Console(stderr=True)
    model = _device_model(model)
    out: dict[str, dict[str, Any]] = {}
    for b in settings.benchmarks:
        bench = load_benchmark(b.path)
        r = score_benchmark(model, tokenizer, bench, k_shot=b.k_shot, limit=b.limit, split=b.split,
                            subjects=b.subjects, batch_size=settings.batch_size, confidence=confidence,
                            console=console)
        rows = r["per_question"]
        out[f"{bench.name} {b.k_shot}-shot"] = {
            "kind": "benchmark", "metric": "accuracy", "higher_is_better": True, "value": r["accuracy"],
            "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n"], "chance": r["chance"],
            "per_example": {q["id"]: (float(q["correct"]), 1.0) for q in rows}}
    for path in settings.general:
        res = read_records(path, limit=settings.general_limit)
        if not res.records:
            raise UserError(f"eval.forgetting.general: {path} has no usable record ({len(res.rejects)} rejected). "
                            "Check the file")
        m = _loss_metric(model, tokenizer, res.records, max_length=settings.max_length,
                         batch_size=settings.batch_size, confidence=confidence, console=console)
        out[f"{Path(path).stem} loss"] = {"kind": "general_loss", **m}
    return out


# --------------------------------------------------------------------------- base vs tuned


@dataclass
class _Scored:
    task: dict[str, Any] | None
    general: dict[str, dict[str, Any]]


def _base_cache_key(cfg, settings, dtype: str) -> str:
    blob = json.dumps({"model": cfg.model.path, "dtype": dtype, "settings": settings.model_dump(mode="json"),
                       "task": cfg.task, "data": cfg.data.model_dump(mode="json"),
                       "classification": cfg.classification.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _score(cfg, model, tokenizer, settings, console) -> _Scored:
    task = task_metric(cfg, model, tokenizer, limit=settings.task_limit, batch_size=settings.batch_size,
                       confidence=settings.confidence, console=console)
    return _Scored(task, general_scores(model, tokenizer, settings, confidence=settings.confidence, console=console))


def _base_scores(cfg, settings, dtype: str, cache_dir: Path, console) -> _Scored:
    from tunelab.models.load import load_model, load_tokenizer

    path = cache_dir / f"{_base_cache_key(cfg, settings, dtype)}.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        console.print(f"forgetting: base scores from the cache ({path})")
        return _Scored(doc["task"], doc["general"])
    tokenizer = load_tokenizer(cfg.model.path)
    set_chat_template(tokenizer, cfg.data.template)
    model = load_model(cfg.model.path, dtype=getattr(torch, dtype))
    scored = _score(cfg, model, tokenizer, settings, console)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"model": cfg.model.path, "task": scored.task, "general": scored.general}))
    return scored


def _row(name: str, kind: str, base: dict | None, tuned: dict | None, confidence: float) -> dict[str, Any]:
    slim = {k: v for k, v in (base or {}).items() if k != "per_example"}
    row: dict[str, Any] = {"name": name, "kind": kind, "metric": slim.get("metric") or (tuned or {}).get("metric"),
                           "higher_is_better": (base or tuned or {}).get("higher_is_better", True),
                           "base": slim or None,
                           "tuned": {k: v for k, v in (tuned or {}).items() if k != "per_example"} or None}
    if base and tuned:
        row["change"] = tuned["value"] - base["value"]
        ci = paired_change_ci(base, tuned, confidence=confidence)
        row["change_ci"] = list(ci) if ci else None
        good = row["change"] if row["higher_is_better"] else -row["change"]
        row["better"] = good > 0
        row["significant"] = bool(ci) and (ci[0] > 0 or ci[1] < 0)
    return row


def measure_forgetting(run_dir: str | Path, settings=None, *, checkpoint: str = "final", dtype: str = "float32",
                       console: Console | None = None) -> dict[str, Any]:
    """Score the base and the tuned model of ``run_dir`` (see the module docstring); write and return the doc.

    The run's own ``config.yaml`` gives the base model, task and validation data; ``settings``
    (an ``eval.forgetting`` section) defaults to the run's.
    """
    from tunelab.eval.evaluate import load_target

    console = console or Console()
    run_dir = Path(run_dir)
    cfg, _ = load_config(run_dir / "config.yaml")
    settings = settings or cfg.eval.forgetting
    if settings is None:
        raise UserError(f"{run_dir}: its config has no eval.forgetting section. Add one (benchmarks and/or general)")
    tuned_target = load_target(run_dir, checkpoint=checkpoint, dtype=dtype)
    tuned = _score(cfg, tuned_target.model, tuned_target.tokenizer, settings, console)
    tuned_target.model = None
    base = _base_scores(cfg, settings, dtype, run_dir.parent / ".forgetting_base", console)
    rows = []
    if tuned.task is not None or base.task is not None:
        rows.append(_row(f"task ({cfg.task})", "task", base.task, tuned.task, settings.confidence))
    for name in tuned.general:
        rows.append(_row(name, tuned.general[name]["kind"], base.general.get(name), tuned.general[name],
                         settings.confidence))
    doc = {"run": str(run_dir), "base_model": cfg.model.path, "method": cfg.method.name, "checkpoint": checkpoint,
           "dtype": dtype, "confidence": settings.confidence, "settings": settings.model_dump(mode="json"),
           "objectives": {k: v for k, v in cfg.objectives.model_dump(mode="json").items() if v},
           "measures": rows}
    atomic_write_text(run_dir / "forgetting.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print_tradeoff(doc, console)
    return doc


# --------------------------------------------------------------------------- showing it


def print_tradeoff(doc: dict[str, Any], console: Console) -> None:
    table = Table(title=f"forgetting: {doc['run']} ({doc['confidence']:.0%} intervals)")
    for h in TRADEOFF_HEADERS:
        table.add_column(h, justify="left" if h in ("measure", "metric", "verdict") else "right")
    for row in tradeoff_rows(doc):
        table.add_row(*row)
    console.print(table)
    console.print(f"[dim]written: {Path(doc['run']) / 'forgetting.json'}[/]")
