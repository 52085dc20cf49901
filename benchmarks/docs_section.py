"""Rewrite the marked section of a markdown file: what the benchmark scripts' ``--out`` does."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.fsutil import atomic_write_text  # noqa: E402


def write_section(path: Path, start: str, end: str, body: str, *, append: bool = False) -> bool:
    """Put ``start + body + end`` in place of the markers' old section (atomically). Without the
    markers: append the section when ``append``, else leave the file alone and return False."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    i, j = text.find(start), text.find(end)
    section = start + body + end
    if i != -1 and j > i:
        text = text[:i] + section + text[j + len(end):]
    elif append:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section + "\n"
    else:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return True
