"""Optional MLflow logging of a finished run: parameters, per-step metrics, evaluations, artifacts.

:func:`log_to_mlflow` reads the run directory (it never needs the training process) and logs,
through MLflow's client API, one MLflow run per tunelab run:

* params: the resolved config flattened to ``section.key`` (values over MLflow's 6,000-char
  limit are cut);
* metrics per step from ``metrics.jsonl``: ``train/loss``, ``train/lr``, ``train/grad_norm``,
  ``train/tokens_per_s``, ``eval/loss``;
* the tuned system's headline evaluation metrics (``eval/<source>/<metric>``), and of the
  baselines (``baseline/<system>/<source>/<metric>``);
* artifacts: ``config.yaml``, ``summary.json``, ``data.json``, ``env.json``, ``metrics.jsonl``,
  ``eval/``, and ``report.html`` / ``report.md`` when present (weights are not copied).

By default the store is local: ``sqlite:///<runs folder>/mlflow.db`` with artifacts in
``<runs folder>/mlartifacts`` (any ``sqlite:///`` store keeps its artifacts in ``mlartifacts/``
beside the database file); pass ``tracking_uri`` (or set ``MLFLOW_TRACKING_URI``) for a
server. MLflow is an optional dependency (``mlflow-skinny`` suffices).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab import metrics_log
from tunelab.errors import UserError, require

__all__ = ["log_to_mlflow"]

_STEP_KEYS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s"}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _mlflow_key(key: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . / space``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_to_mlflow(run_dir: str | Path, *, tracking_uri: str | None = None, experiment: str = "tunelab") -> str:
    """Log ``run_dir`` to MLflow; returns the MLflow run id (see the module docstring)."""
    require("mlflow", extra="mlflow", verb="MLflow logging (eval.mlflow, tunelab runs mlflow)", package="mlflow-skinny")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    run = Path(run_dir).resolve()
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no config.yaml). Pass runs/<name>")
    root = run.parent
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None  # a tracking server chooses its own artifact store
        if uri.startswith("sqlite:///"):  # a local database: artifacts beside it, never in the working directory
            location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    ml_run = client.create_run(exp_id, run_name=run.name, tags={"tunelab.run_dir": str(run),
                                                                  "tunelab.model": str(cfg.get("model", {}).get("path")),
                                                                  "tunelab.method": str(cfg.get("method", {}).get("name"))})
    rid = ml_run.info.run_id
    try:
        params = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in _flatten(cfg).items()]
        metrics: list = []
        now = int(time.time() * 1000)
        if (run / "metrics.jsonl").is_file():
            for rec in metrics_log.read(run / "metrics.jsonl"):
                ts = int(rec.get("time", now / 1000) * 1000)
                if rec.get("kind") == "train":
                    metrics += [Metric(name, float(rec[k]), ts, int(rec["step"])) for k, name in _STEP_KEYS.items()
                                if isinstance(rec.get(k), int | float)]
                elif rec.get("kind") == "eval" and isinstance(rec.get("eval_loss"), int | float):
                    metrics.append(Metric("eval/loss", float(rec["eval_loss"]), ts, int(rec["step"])))
        for f in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
            doc = json.loads(f.read_text(encoding="utf-8"))
            if "systems" not in doc:
                continue
            for system, res in doc["systems"].items():
                prefix = "eval" if system in ("tuned", "model") else f"baseline/{system}"
                for k, v in res.get("headline", {}).items():
                    if isinstance(v, int | float):
                        metrics.append(Metric(_mlflow_key(f"{prefix}/{doc['name']}/{k}"), float(v), now, 0))
        for start in range(0, len(params), 100):  # the batch API takes <= 100 params, <= 1000 metrics
            client.log_batch(rid, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[start : start + 1000])
        for name in ("config.yaml", "summary.json", "data.json", "env.json", "metrics.jsonl", "report.html",
                     "report.md"):
            if (run / name).is_file():
                client.log_artifact(rid, str(run / name))
        if (run / "eval").is_dir():
            client.log_artifacts(rid, str(run / "eval"), artifact_path="eval")
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    return rid
