"""The run directory: the hand-off between training and everything after it.

``runs/<name>/`` holds ``config.yaml`` (resolved, with sources), ``env.json`` (versions,
device, precision), ``data.json`` (counts, rejects by reason, token totals),
``metrics.jsonl`` (one record per kind and step: see :mod:`tunelab.metrics_log`), ``rejects.jsonl``, ``checkpoints/``, ``best/`` and
``final/`` (a PEFT adapter folder or a full model, each with the tokenizer).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path
from typing import Any

from tunelab import metrics_log
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text


def make_folder(path: Path, field: str) -> Path:
    """``mkdir -p path``, or a one-line :class:`UserError` naming ``field`` when a file is in the way
    (``run.output_dir`` naming an existing file gives NotADirectoryError / FileExistsError otherwise)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # the deepest part of the path that exists is a file (or a link to one): name it
        blocker = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), path)
        raise UserError(f"{field}: {blocker} is a file, not a folder (got {path}). Remove or rename that file, "
                        f"or set {field} to another name") from None
    except PermissionError as err:
        raise UserError(f"{field}: cannot create the folder {path} (got permission denied on "
                        f"{err.filename or path}). Choose a writable {field}") from None
    return path


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # layout
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def rejects_file(self) -> Path:
        return self.path / "rejects.jsonl"

    @classmethod
    def create(cls, path: Path, *, resume: bool) -> RunDir:
        """A new run folder, or the existing one when resuming. Never clobbers a finished run."""
        run = cls.check(path, resume=resume)
        make_folder(run.path.parent, "run.output_dir")
        make_folder(run.path, "run.name")
        return run

    @classmethod
    def check(cls, path: Path, *, resume: bool) -> RunDir:
        """:meth:`create`'s refusals, creating nothing (the launcher's check before it starts the ranks)."""
        run = cls(path)
        if resume:
            if not (run.path / "config.yaml").is_file():
                raise UserError(f"{path}: no run to resume here (no config.yaml). Drop --resume to start a new run")
        elif run.path.exists() and run.has_trained():
            raise UserError(
                f"{path}: a run with this name already exists. Resume it with --resume, or choose another "
                f"name with --set run.name=NEW"
            )
        return run

    def has_trained(self) -> bool:
        """True once the run wrote weights or metrics (a start that failed before training can be reused)."""
        return any((self.path / p).exists() for p in ("final", "best", "metrics.jsonl")) or any(
            self.checkpoints.glob("step-*")
        )

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def log_metrics(self, record: dict[str, Any]) -> None:
        metrics_log.append(self.metrics_file, record)


def environment(device: str, precision: str, world_size: int) -> dict[str, Any]:
    import accelerate
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "device": device,
        "precision": precision,
        "processes": world_size,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_memory_mib() -> dict[str, float]:
    """This process's peak resident memory (``VmHWM``) and, on a GPU, the peak torch allocation, in MiB."""

    import torch

    rss = None
    try:
        with open("/proc/self/status") as fh:
            rss = next((int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    if rss is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    out = {"rss": round(rss, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
