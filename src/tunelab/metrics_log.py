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
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
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
    """Drop every record of a step after ``step`` (a resume from that step repeats them); returns how many."""
    recs = _records(path)
    keep = [r for r in recs if not (isinstance(r.get("step"), int) and r["step"] > step)]
    if len(keep) != len(recs) or (Path(path).is_file() and len(recs) != _line_count(path)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(recs) - len(keep)


def _line_count(path: Path) -> int:
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
