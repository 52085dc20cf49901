"""The evaluation loops' progress bar: :func:`tunelab.progress.progress_bar` (a lower layer, shared with training)."""

from __future__ import annotations

from tunelab.progress import progress_bar

__all__ = ["progress_bar"]
