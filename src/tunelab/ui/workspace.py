"""Paths a user types in the web UI, confined to the workspace folder.

Every path field of the UI goes through :meth:`Workspace.resolve`: relative paths are read from the
workspace, ``..`` components are refused outright, absolute paths must lie inside the workspace, and
symlinks are resolved before the check (a link inside the workspace pointing outside is refused).
Names that become folders go through :func:`tunelab.fsutil.check_name`. Our own code: pathlib does the
resolving; no library decides "inside this folder" for a web form.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from tunelab.errors import UserError
from tunelab.fsutil import check_name

#: Extensions of the data files the Train and Data tabs list (the formats tunelab.data.formats reads).
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")

#: Folders not listed as data (run directories, caches, the UI's own files).
_SKIP_DIRS = {"runs", ".tunelab-ui", ".git", "__pycache__", ".venv", "node_modules"}


class Workspace:
    """The folder the UI works in (``tunelab ui --workspace DIR``)."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"--workspace: {root} is not a folder. Create it, or name an existing folder")
        self.root = root.resolve()

    def resolve(self, value: str, field: str, *, must_exist: bool = False) -> Path:
        """``value`` as an absolute path inside the workspace, or a one-line :class:`UserError` naming ``field``."""
        text = (value or "").strip()
        if not text:
            raise UserError(f"{field}: empty path. Pick a file under the workspace {self.root}")
        if ".." in PurePath(text).parts:
            raise UserError(f"{field}: {text!r} contains '..'. Use a path under the workspace {self.root}")
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.root / path).resolve()
        if path != self.root and self.root not in path.parents:
            raise UserError(f"{field}: {text!r} is outside the workspace {self.root} (links are followed). "
                            "Use a path under the workspace")
        if must_exist and not path.exists():
            raise UserError(f"{field}: {text!r} does not exist in the workspace {self.root}. Check the name")
        return path

    def relative(self, path: Path) -> str:
        """``path`` (inside the workspace) as the workspace-relative text the UI shows and configs hold."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def name(self, value: str, field: str) -> str:
        """A user-entered name that becomes one path component (check_name's rule)."""
        return check_name((value or "").strip(), field)

    def data_files(self, limit: int = 500) -> list[str]:
        """Workspace-relative data files (not under run directories or hidden folders), sorted."""
        found: list[str] = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
                continue
            inside = self.root in path.resolve().parents  # a link out of the workspace is not listed
            if inside and path.is_file() and path.suffix.lower() in DATA_EXTENSIONS \
                    and not path.name.endswith(".removed.jsonl"):
                found.append(rel.as_posix())
                if len(found) >= limit:
                    break
        return found

    def model_paths(self, limit: int = 50) -> list[str]:
        """Workspace-relative model folders (a Hugging Face ``config.json``) and ``.gguf`` files, for model.path."""
        found = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if rel.parts[0] in _SKIP_DIRS or any(part.startswith(".") for part in rel.parts):
                continue
            if path.name == "config.json" and path.parent != self.root:
                found.append(self.relative(path.parent))
            elif path.suffix == ".gguf":
                found.append(rel.as_posix())
            if len(found) >= limit:
                break
        return found

    def run_dirs(self, output_dir: str = "runs") -> list[str]:
        """Workspace-relative run directories (those with a config.yaml) under ``output_dir``."""
        base = self.resolve(output_dir, "run.output_dir")
        if not base.is_dir():
            return []
        return sorted(self.relative(p.parent) for p in base.glob("*/config.yaml"))
