"""What every task does with its rows once made: count, report, write rejects and ``data.json``."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from tunelab.data.formats import summarize_rejects, write_rejects
from tunelab.errors import UserError


def refuse_empty(rows: list, rejects: list, run, is_main: bool, what: str) -> None:
    """No training row at all: write the rejects first (the error points at them), then stop."""
    if rows:
        return
    if run is not None and is_main and rejects:
        write_rejects(rejects, run.rejects_file, replace=True)
    raise UserError(f"data.train: no usable training {what} ({len(rejects)} rejected: {summarize_rejects(rejects)}). "
                    f"See the reasons in {run.rejects_file if run else 'the rejects file'}")


def report(summary: dict[str, Any], rejects: list, run, console: Console, is_main: bool, headline: str) -> None:
    """Write the rejects and ``data.json`` into the run; print ``headline`` and the rejects' count."""
    if run is not None and is_main:
        if rejects or run.rejects_file.exists():  # anew: a resumed run makes the same ones again
            write_rejects(rejects, run.rejects_file, replace=True)
        run.write_json("data.json", summary)
    if is_main:
        if rejects:
            headline += f"; [yellow]{len(rejects)} rejected[/] {summary['rejected_by_reason']}"
            if run is not None:
                headline += f" -> {run.rejects_file}"
        console.print(headline)


def reject_counts(rejects: list) -> dict[str, Any]:
    return {"rejected": len(rejects), "rejected_by_reason": summarize_rejects(rejects)}
