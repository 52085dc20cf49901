"""Atomic writes (a crash or a kill never leaves a half-written file or folder behind), and the checks
on paths tunelab writes: names that must be one path component, and user files never overwritten."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_folder(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` and move it to ``dest`` (replacing an older one).

    The old folder is renamed aside first and removed only after the new one is in place.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# A name that becomes one folder or file name under a directory tunelab owns (a run, a sweep trial,
# a continual stage, an export, a served adapter): letters, digits, '.', '_', '-' and '+', not
# starting with '.' (so never '', '.', '..' or a hidden file), at most 128 characters.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,127}")


def check_name(name: object, field: str) -> str:
    """``name`` if it is one safe path component, else a :class:`UserError` naming ``field``."""
    if isinstance(name, str) and _SAFE_NAME.fullmatch(name):
        return name
    raise UserError(
        f"{field}: {name!r} is not a usable name: it becomes a folder name, so use 1-128 letters, digits, "
        f"'.', '_', '-' or '+', not starting with '.' and with no '/' (e.g. my-run_2)"
    )


def refuse_existing(path: Path, field: str, *, force: bool) -> Path:
    """Refuse to overwrite a file the user already has unless ``force``: a one-line :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{field}: {path} is a folder; name a file to write")
    if path.exists() and not force:
        raise UserError(f"{field}: {path} already exists; choose another path, or add --force to replace it")
    return path
