"""A rich progress bar (rate, ETA) for evaluation, prediction and generation loops.

A low layer (no tunelab imports), so that the training loop's evaluation and the objectives'
generative evaluation can show progress as well as ``tunelab eval`` and ``tunelab predict``.
``progress_bar`` is a context manager yielding ``advance(n)``. A bar opened while another live
display runs (the training loop's own bar) nests under it; a rich that cannot nest live displays
runs the loop without a bar rather than failing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(label: str, total: int, console: Console | None = None, *,
                 enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A transient bar over ``total`` items; ``enabled=False`` (e.g. on ranks other than 0) shows nothing."""
    progress = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console or Console(stderr=True), transient=True, disable=not enabled)
    task = progress.add_task(label, total=total)
    try:
        progress.start()
    except LiveError:  # an older rich with another live display running: no bar, the loop still runs
        yield lambda n: None
        return
    try:
        yield lambda n: progress.advance(task, n)
    finally:
        progress.stop()
