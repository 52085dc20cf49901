"""The run registry: every ``runs/<name>/`` folder, read back into one row each.

Nothing is stored besides the run directories themselves: :func:`list_runs` reads each
folder's ``config.yaml`` (model, method, key hyperparameters), ``summary.json`` (steps, stop
reason, best eval loss, speed), ``metrics.jsonl`` (the last train loss; for preference and reward
runs the last pair accuracy and margin) and ``eval/*.json`` (headline metrics of each evaluation),
so a run copied from another machine shows up as it is.
A folder that is not a run (no ``config.yaml``) is skipped; a run whose files cannot be read
is listed with the reason in ``status``, never hidden.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from tunelab.errors import UserError
from tunelab.rundocs import eval_headlines, read_json, run_row

__all__ = ["eval_headlines", "list_runs", "run_row", "show_run", "filter_runs", "sort_runs"]

COLUMNS = ("name", "date", "status", "model", "method", "lr", "steps", "batch", "train_loss", "eval_loss")
PAIR_COLUMNS = ("pair_accuracy",)  # shown when a listed run has them (preference and reward runs)


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no runs folder here. Pass --dir PATH (the run.output_dir of your configs)")
    return [run_row(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.yaml").is_file()]


def _value(row: dict, key: str) -> Any:
    return row["metrics"].get(key) if key not in row and key in row.get("metrics", {}) else row.get(key)


def filter_runs(rows: list[dict], filters: list[str]) -> list[dict]:
    """Keep rows matching every ``KEY=VALUE`` (substring, case-insensitive) or ``KEY<N`` / ``KEY>N``."""
    out = rows
    for f in filters:
        for op in ("<=", ">=", "=", "<", ">"):
            if op in f:
                key, value = (s.strip() for s in f.split(op, 1))
                break
        else:
            raise UserError(f"--filter {f!r}: expected KEY=VALUE, KEY<NUMBER or KEY>NUMBER (e.g. method=lora)")
        if op == "=":
            out = [r for r in out if value.lower() in str(_value(r, key)).lower()]
            continue
        try:
            num = float(value)
        except ValueError:
            raise UserError(f"--filter {f!r}: {op} needs a number (got {value!r})") from None

        cmp = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}[op]
        out = [r for r in out if isinstance(_value(r, key), int | float) and cmp(_value(r, key), num)]
    return out


def sort_runs(rows: list[dict], key: str) -> list[dict]:
    """Sort by a column or a metric (``-key`` for descending); missing values last."""
    desc = key.startswith("-")
    key = key.lstrip("-")
    if key == "date":
        key = "timestamp"
    present = [r for r in rows if _value(r, key) is not None]
    missing = [r for r in rows if _value(r, key) is None]
    try:
        present.sort(key=lambda r: _value(r, key), reverse=desc)
    except TypeError:
        present.sort(key=lambda r: str(_value(r, key)), reverse=desc)
    return present + missing


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_runs(rows: list[dict], console: Console | None = None, metrics: int = 3) -> None:
    """The registry as a table: the fixed columns plus the first ``metrics`` evaluation headlines."""
    console = console or Console()
    metric_keys: list[str] = []
    for r in rows:
        metric_keys += [k for k in r.get("metrics", {}) if k not in metric_keys]
    metric_keys = metric_keys[:metrics]
    columns = (*COLUMNS, *[c for c in PAIR_COLUMNS if any(r.get(c) is not None for r in rows)])
    table = Table(title=f"{len(rows)} run(s)")
    for c in (*columns, *metric_keys):
        table.add_column(c, justify="right" if c not in ("name", "status", "model", "method", "date") else "left")
    for r in rows:
        table.add_row(*[_cell(r.get(c)) for c in columns], *[_cell(r.get("metrics", {}).get(k)) for k in metric_keys])
    console.print(table)


def show_run(root: str | Path, name: str, console: Console | None = None) -> dict[str, Any]:
    """Everything about one run: config, data summary, training summary, evaluations."""
    console = console or Console()
    run = Path(root) / name if not (Path(name) / "config.yaml").is_file() else Path(name)
    if not (run / "config.yaml").is_file():
        known = [r["name"] for r in list_runs(root)] if Path(root).is_dir() else []
        raise UserError(f"runs show: no run {name!r} in {root} (runs: {', '.join(known[:10]) or 'none'}). "
                        "Check the name or pass --dir")
    row = run_row(run)
    info = {"row": row, "config": yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")),
            "summary": read_json(run / "summary.json"), "data": read_json(run / "data.json"),
            "env": read_json(run / "env.json"),
            "evaluations": [json.loads(f.read_text(encoding="utf-8")) for f in sorted((run / "eval").glob("*.json"))]
            if (run / "eval").is_dir() else []}
    table = Table(title=f"run {name}", show_header=False)
    for k in ("path", "date", "status", "model", "method", "lr", "epochs", "max_steps", "batch", "r", "seed", "steps",
              "train_seconds", "tokens_per_s", "train_loss", "eval_loss"):
        table.add_row(k, _cell(row.get(k)))
    if row.get("pair_accuracy") is not None:
        table.add_row("pair accuracy / margin", f"{_cell(row['pair_accuracy'])} / {_cell(row.get('margin'))} "
                                                f"({row['pair_metrics_from']})")
    if info["data"]:
        d = info["data"]
        table.add_row("data", f"{d.get('train_samples')} train / {d.get('eval_samples')} eval samples, "
                              f"{d.get('rejected', 0)} rejected")
    for k, v in row["metrics"].items():
        table.add_row(f"eval {k}", _cell(v))
    console.print(table)
    return info
