"""A rich progress bar (rate, ETA) for evaluation loops, as a context manager yielding ``advance(n)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(label: str, total: int, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    progress = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console or Console(stderr=True), transient=True)
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)
