"""``metrics.jsonl``: the run's log, one JSON record a line, appended as training goes.

Each record has a ``kind`` (``train``, ``eval``, ``resume``) and the optimiser ``step`` it belongs
to. A resumed run repeats the steps after its checkpoint, so on resume the log is cut back to the
checkpoint's step (atomically) before anything is appended: the log then holds one record per
kind and step, as if the run had never stopped. :func:`read` is what every reader (report,
registry, cross-validation, tracking) uses; it also skips a line cut short by a kill and keeps
the last record per kind and step of a log written before this rule.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.fsutil import atomic_write_text


def append(path: Path, record: dict[str, Any]) -> None:
    record = {"time": round(time.time(), 3), **record}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[dict[str, Any]]:
    return _parse(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else []


def _parse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read(path: Path) -> list[dict[str, Any]]:
    """The records in order, one per (kind, step): a later record replaces an earlier one."""
    recs = _records(path)
    last = {(r.get("kind"), r.get("step")): i for i, r in enumerate(recs) if isinstance(r.get("step"), int)}
    return [r for i, r in enumerate(recs) if not isinstance(r.get("step"), int) or last[(r.get("kind"), r["step"])] == i]


def truncate_after(path: Path, step: int) -> int:
    """Drop every record of a step after ``step`` (a resume from that step repeats them), and a line cut
    short by a kill; returns how many records were dropped."""
    if not Path(path).is_file():
        return 0
    text = Path(path).read_text(encoding="utf-8")
    lines, recs = [line for line in text.splitlines() if line.strip()], _parse(text)
    keep = [r for r in recs if not (isinstance(r.get("step"), int) and r["step"] > step)]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(recs) - len(keep)
