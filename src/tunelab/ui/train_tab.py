"""The Train tab: the config form (generated from the schema), live YAML and problems, dry-run / start / stop
/ resume, and the live view of the selected run (progress, curves, log tail, data summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tunelab.data.formats import open_source
from tunelab.data.templates import set_chat_template
from tunelab.errors import UserError
from tunelab.ui import form
from tunelab.ui.jobs import Jobs, RunState
from tunelab.ui.workspace import Workspace

#: The sections of the form, in order, each one accordion (method options follow method.name).
SECTIONS = ("run", "model", "task", "data", "method", "train", "classification", "preference", "eval", "objectives",
            "tasks", "task_sampling", "stages", "sweep")
OPEN = ("run", "model", "task", "data", "method", "train")


def elem_id(path: str) -> str:
    """The HTML id of a form field (``train.lr`` -> ``f-train-lr``; the browser tests find fields by it)."""
    return "f-" + path.replace("[", "-").replace("]", "").replace(".", "-")


def widget(gr, f: form.FormField):
    """The Gradio component of one form field."""
    common = {"label": f.path, "info": (f.help[:300] + ("…" if len(f.help) > 300 else "")) or None,
              "elem_id": elem_id(f.path)}
    value = form.shown_value(f)
    if f.kind == "choice":
        choices = list(f.choices) + ([""] if f.optional else [])
        return gr.Dropdown(choices=choices, value=value if value is not None else "", **common)
    if f.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if f.kind in ("int", "float") and not f.optional:
        return gr.Number(value=value, precision=0 if f.kind == "int" else None, **common)
    lines = 2 if f.kind == "yaml" else 1
    return gr.Textbox(value="" if value is None else str(value), lines=lines, max_lines=12, **common)


def form_state(fields: list[form.FormField], ws: Workspace, values: list[Any]) -> tuple[dict, str, str]:
    """(config tree, YAML, problems text) of the widget values, in the order of ``fields``."""
    try:
        tree = form.config_tree(fields, dict(zip([f.path for f in fields], values, strict=True)))
    except UserError as err:
        return {}, "", str(err)
    problems = form.validate(tree, ws)
    return tree, form.to_yaml(tree), "\n".join(problems)


def preview(ws: Workspace, files: list[str], model: str, template: str, train_on: str, max_length: Any) -> list:
    """The first rendered samples of the first chosen file with their loss masks, as highlighted text."""
    from tunelab.data.tokenize import encode_chat, encode_text
    from tunelab.models.load import load_tokenizer

    if not files:
        raise UserError("data files: pick a file first")
    path = ws.resolve(files[0], "data files", must_exist=True)
    source = open_source(path, limit=3)
    tok = load_tokenizer(model or "tiny-random-llama")
    set_chat_template(tok, None if template in ("", "auto") else template)
    out: list[tuple[str, str | None]] = [(f"{files[0]}: format {source.format}\n", "info")]
    for item in source.items():
        if item.record is None:
            out.append((f"row {item.index}: rejected ({item.reject.reason})\n", "reject"))
            continue
        length = int(max_length or 1024)
        enc = (encode_text(item.record, tok, max_length=length) if item.record.is_text
               else encode_chat(item.record, tok, train_on=train_on or "assistant", max_length=length))
        enc = enc[0] if isinstance(enc, list) else enc
        if not hasattr(enc, "labels"):
            out.append((f"row {item.index}: rejected ({enc.reason})\n", "reject"))
            continue
        for ids, target in _runs_of(enc.input_ids, enc.labels):
            out.append((tok.decode(ids), "loss" if target else None))
        out.append(("\n――――――\n", None))
    return out


def _runs_of(ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels, strict=True):
        target = label != -100
        if runs and runs[-1][1] == target:
            runs[-1][0].append(token)
        else:
            runs.append(([token], target))
    return runs


def dry_run(ws: Workspace, yaml_text: str) -> str:
    """``tunelab train CONFIG --dry-run`` (the advisor) on the form's YAML; its printed table."""
    path = ws.root / ".tunelab-ui" / "dry-run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml_text, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(path), "--dry-run"], cwd=ws.root,
                          capture_output=True, text=True, timeout=900, env=_env())
    return (done.stdout + done.stderr).strip()


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120"}


def curves_frame(st: RunState, keys: tuple[str, ...]):
    """The run's curves of ``keys`` as one long table (step, value, series) for a line plot."""
    import pandas as pd

    rows = [(step, value, key) for key in keys for step, value in st.curves.get(key, [])]
    # no points: no value at all (Gradio 6.31 never draws the lines of a plot whose first value was an empty table)
    return typed_frame(pd.DataFrame(rows, columns=["step", "value", "series"])) if rows else None


def typed_frame(frame):
    """Numeric step and value columns even when empty (an object column would make the plot's axes categorical)."""
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


def live(jobs: Jobs, run_rel: str | None) -> tuple[str, Any, Any, Any, str, str]:
    """(progress line, loss plot data, lr plot data, task-metric plot data, log tail, data summary) of a run."""
    if not run_rel:
        return "", None, None, None, "", ""
    run = jobs.ws.resolve(run_rel, "run")
    st = jobs.state(run)
    loss_keys = tuple(k for k in st.curves if k == "loss" or k.endswith("_loss"))
    metric_keys = tuple(k for k in st.curves if k.startswith("eval_") and not k.endswith("_loss"))
    line = f"{st.progress_line()} · {len(st.curves.get('loss', []))} loss points"
    return (line, curves_frame(st, loss_keys or ("loss",)), curves_frame(st, ("lr",)), curves_frame(st, metric_keys),
            jobs.log_tail(run), _data_summary(run))


def _data_summary(run: Path) -> str:
    try:
        data = json.loads((run / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    keep = {k: data[k] for k in ("files", "train_samples", "eval_samples", "train_tokens", "truncated", "rejected",
                                 "rejected_by_reason") if k in data}
    rejects = sorted(run.glob("rejects*.jsonl"))
    text = yaml.safe_dump(keep, sort_keys=False, allow_unicode=True)
    for path in rejects[:2]:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        text += f"\n{path.name}: {len(lines)} rejected rows\n" + "\n".join(lines[:5])
    return text
