"""``tunelab cv CONFIG --folds K``: k-fold cross-validation of a training config.

Each ``data.train`` file is cut into K folds by the data workbench's splitter
(:func:`tunelab.data.split.split_file` with ``kfold``: stratified by label when the rows have
labels, plain k-fold otherwise, and group-aware: near or exact duplicates stay in one fold, so
no fold validates on a copy of its training rows). Fold i trains on the other folds of every
file and validates on fold i (it becomes ``data.eval``; ``data.eval_ratio`` and
``data.prepare.split`` are switched off), with :func:`tunelab.train.recipe.fine_tune` into
``<run>/fold-<i>/``. The figures of each fold (final eval loss, accuracy and macro-F1 where the
task has them, per-task figures of a multi-task run, best eval loss, and the headline metrics of
the config's ``eval:`` section) are written to ``<run>/cv.json`` with their mean, standard
deviation (sample, ddof=1) and per-fold values, and shown as a table.

Resumable: a fold whose ``cv_fold.json`` exists is read, not re-run; a fold interrupted during
training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab import metrics_log
from tunelab.config import dump_config
from tunelab.data.settings import SplitSettings
from tunelab.data.split import split_file
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text
from tunelab.train.run import RunDir

FOLD_FILE = "cv_fold.json"


def _fold_files(cfg, cv_dir: Path, folds: int, group: str, seed: int, console: Console) -> list[dict[str, Any]]:
    """Split every data.train file into folds once (kept under ``<run>/folds/``); returns the split reports."""

    reports = []
    for k, spec in enumerate(cfg.data.train):
        if spec.limit is not None:
            raise UserError(f"data.train.{k}.limit: cross-validation splits the whole file. Remove limit (or cut the "
                            "file first) for tunelab cv")
        out = cv_dir / "folds" / str(k)
        done = out / "split.json"
        if done.is_file():
            reports.append(json.loads(done.read_text()))
            continue
        settings = SplitSettings(ratios=(0.5, 0.5), group=group, seed=seed)  # ratios unused with kfold
        rep = split_file(spec.path, out, settings, kfold=folds, format=spec.format, columns=spec.columns or None)
        report = rep.to_dict()
        atomic_write_text(done, json.dumps(report, indent=2, ensure_ascii=False))
        reports.append(report)
        console.print(f"cv: {spec.path} -> {folds} folds {[report['counts'].get(f'fold_{i}/val') for i in range(folds)]}"
                      f" validation rows", highlight=False)
    return reports


def fold_config(cfg, cv_dir: Path, fold: int, reports: list[dict[str, Any]]):
    """The config of fold ``fold``: its training parts as data.train, its validation parts as data.eval."""
    d = cfg.data
    train, evals = [], []
    for spec, rep in zip(d.train, reports, strict=True):
        train.append(spec.model_copy(update={"path": rep["outputs"][f"fold_{fold}/train"]}))
        evals.append(spec.model_copy(update={"path": rep["outputs"][f"fold_{fold}/val"], "ratio": None, "weight": 1.0}))
    prepare = d.prepare.model_copy(update={"split": None}) if d.prepare is not None else None
    data = d.model_copy(update={"train": train, "eval": evals, "eval_ratio": 0.0, "prepare": prepare})
    run = cfg.run.model_copy(update={"output_dir": str(cv_dir), "name": f"fold-{fold}"})
    return cfg.model_copy(update={"data": data, "run": run})


def fold_metrics(run_dir: Path) -> dict[str, float]:
    """The numbers of one finished fold: last evaluation, best eval loss, the eval section's headlines."""
    out: dict[str, float] = {}
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [e for e in metrics_log.read(run_dir / "metrics.jsonl") if e.get("kind") == "eval"]
    if evals:
        for key, value in evals[-1].items():
            if key in ("kind", "step", "best") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out[key] = float(value)
    if summary.get("best_eval_loss") is not None:
        out["best_eval_loss"] = float(summary["best_eval_loss"])
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else ():
        doc = json.loads(path.read_text())
        for key, value in (doc.get("systems", {}).get("tuned", {}).get("headline") or {}).items():
            out[f"eval:{doc.get('name', path.stem)}/{key}"] = float(value)
    return out


def aggregate(per_fold: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {mean, std, values}}`` over the folds that report it (std: sample, ddof=1)."""
    keys = sorted({k for m in per_fold for k in m}, key=lambda k: (k.count("/") + k.startswith("eval:"), k))
    out = {}
    for key in keys:
        values = [m[key] for m in per_fold if key in m]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "values": values, "folds": len(values)}
    return out


def cross_validate(cfg, sources: dict[str, str] | None = None, *, folds: int, group: str = "near",
                   console: Console | None = None) -> dict[str, Any]:
    """Train ``folds`` runs and write ``<run>/cv.json``; returns its content."""
    from tunelab.train.recipe import fine_tune

    console = console or Console()
    if folds < 2:
        raise UserError(f"--folds: needs at least 2 folds (got {folds}). Use e.g. --folds 5")
    if cfg.data.eval:
        console.print("[yellow]cv: data.eval is replaced by each fold's validation part[/]")
    cv_dir = cfg.run_dir
    cv_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cv_dir / "config.cv.yaml", dump_config(cfg, sources))
    reports = _fold_files(cfg, cv_dir, folds, group, cfg.train.seed, console)
    per_fold, sizes = [], []
    for i in range(folds):
        fcfg = fold_config(cfg, cv_dir, i, reports)
        fold_dir = fcfg.run_dir
        marker = fold_dir / FOLD_FILE
        if marker.is_file():
            console.print(f"cv: fold {i} already done ({fold_dir})", highlight=False)
        else:
            console.rule(f"[bold]fold {i + 1} of {folds}")
            resume = (fold_dir / "config.yaml").is_file() and RunDir(fold_dir).has_trained()
            fine_tune(fcfg, sources, resume=resume, console=console)
            metrics = fold_metrics(fold_dir)
            atomic_write_text(marker, json.dumps({"fold": i, "metrics": metrics}, indent=2))
        per_fold.append(json.loads(marker.read_text())["metrics"])
        sizes.append({"train": sum(r["counts"][f"fold_{i}/train"] for r in reports),
                      "eval": sum(r["counts"][f"fold_{i}/val"] for r in reports)})
    result = {"folds": folds, "group": group,
              "fold_sizes": sizes, "fold_dirs": [str(cv_dir / f"fold-{i}") for i in range(folds)],
              "metrics": aggregate(per_fold), "per_fold": per_fold}
    atomic_write_text(cv_dir / "cv.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print_cv(result, console, cv_dir / "cv.json")
    return result


def print_cv(result: dict[str, Any], console: Console, path: Path | None = None) -> None:
    k = result["folds"]
    table = Table(title=f"{k}-fold cross-validation" + (f" ({path})" if path else ""))
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    for i in range(k):
        table.add_column(f"fold {i}", justify="right")
    for key, m in result["metrics"].items():
        values = [f"{v:.4f}" for v in m["values"]] + [""] * (k - len(m["values"]))
        table.add_row(key, f"{m['mean']:.4f} ± {m['std']:.4f}", *values)
    console.print(table)
