"""``tunelab predict``: run a tuned model over a data file, batched and resumable.

Each input row becomes one JSON line in ``--out``: the row's ``index`` and ``id``, its input
(chat ``messages`` or classification ``text``), the reference answer or label when the row has
one, and the model's ``generation`` (generation runs) or ``label`` + ``score`` + ``probs``
(classification runs, softmax over the head). Lines are appended and flushed batch by batch,
so a killed run loses at most the batch in flight; running the same command again keeps the
rows already in ``--out`` (a torn last line is cut off) and continues after them. Rows that
cannot be used are counted, shown and written with the reason to ``<out>.rejects.jsonl``.

Inputs (``.jsonl``, ``.json``, ``.csv``, ``.parquet``; read by :mod:`tunelab.data.formats`):
OpenAI ``messages`` (a final assistant turn is the reference), alpaca ``instruction`` /
``input`` / ``system`` / ``history`` (``output`` is the reference), sharegpt
``conversations``, or a bare ``prompt`` / ``text``; ``label`` / ``label_text`` is the
reference of a classification row.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tunelab.data import formats
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text
from tunelab.rundocs import label_prompts
from tunelab.ship.inference import SCORE, Loaded, classify, generate_batch, load_for_inference, select_task

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "function_call": "assistant", "tool": "tool"}


@dataclass
class Item:
    index: int
    id: str
    input: Any  # list of chat messages (generation) or a string (classification)
    reference: Any = None


@dataclass
class PredictSummary:
    out: Path
    rows: int
    done_before: int
    written: int
    rejected: int
    rejects_file: Path | None = None
    reject_reasons: dict[str, int] = field(default_factory=dict)


def _messages_from(row: dict, system: str | None) -> tuple[list[dict], Any]:
    """(chat messages to answer, reference answer) from one generation row, or raise ValueError."""
    if isinstance(row.get("messages"), list):
        msgs = [{"role": str(m["role"]), "content": _content(m.get("content"))} for m in row["messages"]]
    elif isinstance(row.get("conversations"), list):
        msgs = [{"role": _SHAREGPT_ROLES.get(str(m.get("from")), "user"), "content": str(m.get("value", ""))}
                for m in row["conversations"]]
    elif isinstance(row.get("instruction"), str):
        msgs = []
        for pair in row.get("history") or []:
            msgs += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
        prompt = "\n".join(p for p in (row["instruction"], row.get("input") or "") if p)
        msgs.append({"role": "user", "content": prompt})
        if row.get("system"):
            msgs.insert(0, {"role": "system", "content": str(row["system"])})
        if row.get("output") is not None:
            msgs.append({"role": "assistant", "content": str(row["output"])})
    elif isinstance(row.get("prompt"), str) or isinstance(row.get("text"), str):
        msgs = [{"role": "user", "content": row.get("prompt") or row["text"]}]
    else:
        raise ValueError("no input field: expected messages, conversations, instruction, prompt or text")
    reference = None
    if msgs and msgs[-1]["role"] == "assistant":
        reference = msgs.pop()["content"]
    if not msgs or msgs[-1]["role"] not in ("user", "tool") or not msgs[-1]["content"].strip():
        raise ValueError("the conversation does not end with a non-empty user turn to answer")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs, reference if reference is not None else row.get("reference")


def _content(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _text_from(row: dict) -> tuple[str, Any]:
    """(text to classify, reference label) from one classification row, or raise ValueError."""
    for key in ("text", "input", "prompt", "instruction"):
        if isinstance(row.get(key), str) and row[key].strip():
            label = row.get("label_text", row.get("label"))
            return row[key], None if label in (None, "") else str(label)
    raise ValueError("no text to classify: expected a non-empty text (or input/prompt) field")


def _asked(row: dict, spec: dict[str, Any]) -> tuple[list[dict], Any]:
    """A text row asked as a ``generative_classification`` run was trained: its prompt with {labels} and
    {text} (the row's text), the label as the reference."""
    text, reference = _text_from(row)
    user = spec["prompt"].format(labels=", ".join(spec["labels"]), text=text)
    return [{"role": "user", "content": user}], reference


def read_items(path: Path, kind: str, system: str | None,
               label_prompt: dict[str, Any] | None = None) -> tuple[list[Item], list[dict]]:
    """Every usable row as an :class:`Item`, and a reject (with its reason) for every other row.

    ``label_prompt`` (``{"labels", "prompt"}`` of a run trained to answer with a label): rows that are a
    bare text (no chat) are asked with that prompt, as training asked them."""

    formats.check_file(path)
    items: list[Item] = []
    rejects: list[dict] = []
    for index, row in formats.raw_rows(path, None):
        rid = f"{path.name}:{index}"
        if isinstance(row, formats.BadLine):
            rejects.append({"row": index, "id": rid, "reason": "bad_json", "detail": row.error, "raw": row.line})
            continue
        if not isinstance(row, dict):
            rejects.append({"row": index, "id": rid, "reason": "wrong_type", "detail": "the row is not an object",
                            "raw": str(row)[:500]})
            continue
        chat = any(isinstance(row.get(k), list) for k in ("messages", "conversations")) or "instruction" in row
        try:
            if kind == "classification":
                value, reference = _text_from(row)
            elif label_prompt is not None and not chat:
                value, reference = _asked(row, label_prompt)
            else:
                value, reference = _messages_from(row, system)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            reason = "bad_row" if isinstance(err, ValueError) else "malformed_turns"
            rejects.append({"row": index, "id": rid, "reason": reason, "detail": str(err),
                            "raw": json.dumps(row, ensure_ascii=False)[:500]})
            continue
        items.append(Item(len(items), str(row.get("id", rid)), value, reference))
    return items, rejects


def _resume(out: Path, items: list[Item]) -> int:
    """How many rows ``out`` already holds for these inputs (a torn last line is cut off)."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with out.open("r+b") as fh:  # a kill mid-write: drop the partial line
            fh.truncate(len(keep))
    lines = keep.decode("utf-8").splitlines()
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"--out {out}: line {n + 1} is not JSON (got {line[:60]!r}). Move the file away or choose "
                            "another --out") from None
        if n >= len(items) or row.get("index") != n or row.get("id") != items[n].id:
            raise UserError(f"--out {out}: it holds predictions for other inputs (line {n + 1} is row "
                            f"{row.get('id')!r}). Choose another --out, or delete it to start over")
    return len(lines)


def _progress():

    return Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn())


def predict(target: str | Path, data: str | Path, out: str | Path, *, checkpoint: str = "final",
            batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, system: str | None = None, loaded: Loaded | None = None,
            show_progress: bool = True, task: str | None = None) -> PredictSummary:
    """Predict every row of ``data`` into ``out`` (JSON Lines), continuing after rows already there."""

    import torch

    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1 (got {batch_size}). Use e.g. 8")
    data, out = Path(data), Path(out)
    loaded = select_task(loaded or load_for_inference(target, checkpoint=checkpoint), task)  # multi-task: one head
    if loaded.kind == SCORE:
        raise UserError(f"{loaded.description}: a reward model scores replies; it neither generates nor classifies. "
                        "Score pairs with: tunelab eval RUN --data PAIRS, or serve it (tunelab serve: POST /v1/score)")
    items, rejects = read_items(data, loaded.kind, system, _label_prompt(target, loaded, task))
    rejects_file = out.with_name(out.name + ".rejects.jsonl") if rejects else None
    if rejects_file is not None:
        atomic_write_text(rejects_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    done = _resume(out, items)
    todo = items[done:]
    if seed is not None:
        torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    started, written = time.perf_counter(), 0
    with out.open("a", encoding="utf-8") as fh, _progress() as bar:
        task = bar.add_task("predict", total=len(items), completed=done, rate="", visible=show_progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            rows = _predict_chunk(loaded, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
            written += len(rows)
            rate = written / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=len(rows), rate=f"{rate:.2f} rows/s")
    return PredictSummary(out, len(items), done, written, len(rejects), rejects_file,
                          dict(sorted(_count(r["reason"] for r in rejects).items())))


def _label_prompt(target: str | Path, loaded: Loaded, task: str | None) -> dict[str, Any] | None:
    """The prompt a run that answers with a label (``generative_classification``, a multi-task run's such
    task) was trained with, read from the run directory; None for a head, a chat model or a bare model."""
    if loaded.kind == "classification":
        return None
    path = Path(target)
    run = next((p for p in (path, path.parent) if (p / "config.yaml").is_file()), None)
    specs = {n: s for n, s in (label_prompts(run) if run is not None else {}).items() if s.get("prompt")}
    if task is not None and task in specs:
        return specs[task]
    return next(iter(specs.values())) if len(specs) == 1 else None


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _predict_chunk(loaded: Loaded, chunk: list[Item], **gen) -> list[dict]:
    if loaded.kind == "classification":
        scored = classify(loaded, [it.input for it in chunk], batch_size=len(chunk))
        return [{"index": it.index, "id": it.id, "text": it.input, **s, "reference": it.reference}
                for it, s in zip(chunk, scored, strict=True)]
    replies = generate_batch(loaded, [it.input for it in chunk], batch_size=len(chunk), **gen)
    return [{"index": it.index, "id": it.id, "messages": it.input, "generation": reply, "reference": it.reference}
            for it, reply in zip(chunk, replies, strict=True)]
