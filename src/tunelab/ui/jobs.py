"""Training runs started from the UI: ``tunelab train`` subprocesses, and their state read back from the
run directories.

A run is started as its own process group (``start_new_session``) writing its output to
``<run>/train.log``, so closing the browser or stopping the UI neither kills nor loses it. Its process id
goes to ``<run>/ui-job.json``; a restarted UI re-attaches to every run directory it finds (running: the
process is alive and is that run's ``tunelab train``; else finished / stopped / failed from the run's own
files). Stop sends SIGINT, the same clean stop as Ctrl-C (the loop finishes its step, saves a checkpoint
and exits); resume runs ``tunelab train CONFIG --resume``. The UI writes the form's YAML to
``configs/<run name>.yaml`` in the workspace, the file the CLI would be given.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab import metrics_log
from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_text
from tunelab.ui.workspace import Workspace

JOB_FILE = "ui-job.json"
LOG_FILE = "train.log"

#: The child resets SIGINT to Python's default before running the CLI: a UI started in the background
#: (``tunelab ui &``) has SIGINT ignored, which its children would inherit, and then Stop could not stop them.
_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from tunelab.cli import main; sys.exit(main(sys.argv[1:]))")


@dataclass
class RunState:
    """What the live view shows of one run."""

    run: str  # workspace-relative run directory
    state: str  # running, finished, stopped, failed, not started
    step: int = 0
    total_steps: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    detail: str = ""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def progress_line(self) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"{self.state}", f"step {self.step}{total}"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.eta_s is not None and self.state == "running":
            parts.append(f"ETA {_duration(self.eta_s)}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval loss {self.eval_loss:.4f}")
        return " · ".join(parts) + (f" · {self.detail}" if self.detail else "")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Jobs:
    """The runs of one workspace: start, stop, resume, state."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._procs: dict[Path, subprocess.Popen] = {}  # runs this UI process started (reaped with poll)

    # ------------------------------------------------------------------ starting and stopping
    def run_dir(self, tree: dict[str, Any]) -> Path:
        run = tree.get("run") or {}
        name = self.ws.name(str(run.get("name", "run")), "run.name")
        return self.ws.resolve(str(run.get("output_dir", "runs")), "run.output_dir") / name

    def start(self, tree: dict[str, Any], yaml_text: str) -> Path:
        """Write ``configs/<name>.yaml`` and start ``tunelab train`` on it; returns the run directory."""
        run = self.run_dir(tree)
        if self.is_running(run):
            raise UserError(f"run.name: {run.name} is running. Stop it first, or choose another run.name")
        config = self.ws.root / "configs" / f"{run.name}.yaml"
        if config.exists() and config.read_text(encoding="utf-8") != yaml_text:
            raise UserError(f"run.name: configs/{run.name}.yaml already exists with another config. Choose another "
                            "run.name (the UI never overwrites a config)")
        config.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config, yaml_text)
        return self._launch(run, config, resume=False)

    def resume(self, run: Path) -> Path:
        """``tunelab train <its config> --resume`` for a stopped run."""
        if self.is_running(run):
            raise UserError(f"{self.ws.relative(run)}: already running")
        job = _read_json(run / JOB_FILE)
        config = Path(job.get("config") or self.ws.root / "configs" / f"{run.name}.yaml")
        if not config.is_file():
            raise UserError(f"{self.ws.relative(run)}: its config {config} is gone. Start it again from the Train tab")
        return self._launch(run, config, resume=True)

    def _launch(self, run: Path, config: Path, *, resume: bool) -> Path:
        run.mkdir(parents=True, exist_ok=True)
        argv = ["train", str(config), *(["--resume"] if resume else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
        with open(run / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"\n$ tunelab {' '.join(argv)}    # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], cwd=self.ws.root, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self._procs[run] = proc
        atomic_write_text(run / JOB_FILE, json.dumps({"pid": proc.pid, "config": str(config), "argv": argv,
                                                      "started": time.time()}))
        return run

    def stop(self, run: Path) -> bool:
        """SIGINT to the run's process (Ctrl-C): it stops at the end of its step with a checkpoint."""
        pid = self.pid(run)
        if pid is None:
            return False
        os.kill(pid, signal.SIGINT)
        return True

    # ------------------------------------------------------------------ reading back
    def pid(self, run: Path) -> int | None:
        """The process id of the run's ``tunelab train`` while it runs, else None."""
        proc = self._procs.get(run)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        pid = _read_json(run / JOB_FILE).get("pid")
        return pid if isinstance(pid, int) and _is_train_process(pid) else None

    def is_running(self, run: Path) -> bool:
        return self.pid(run) is not None

    def state(self, run: Path) -> RunState:
        """Progress, speed, ETA and curves from ``metrics.jsonl`` as the run writes it."""
        rel = self.ws.relative(run) if run.exists() else str(run)
        records = metrics_log.read(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        curves: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            for key in ("loss", "lr", "eval_loss", "grad_norm", *(k for k in r if k.startswith("eval_") or k.endswith("_loss"))):
                if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int):
                    curves.setdefault(key, []).append((r["step"], float(r[key])))
        for points in curves.values():
            points[:] = sorted(dict(points).items())
        train = [r for r in records if r.get("kind") == "train"]
        last = train[-1] if train else {}
        st = RunState(rel, self._state_word(run), step=int(last.get("step", 0)), curves=curves,
                      tokens_per_s=last.get("tokens_per_s"), loss=last.get("loss"),
                      eval_loss=(curves.get("eval_loss") or [(0, None)])[-1][1])
        st.total_steps = _total_steps(run, last)
        if st.state == "running" and st.total_steps and len(train) >= 2:
            rate = (train[-1]["elapsed_s"] - train[0]["elapsed_s"]) / max(1, train[-1]["step"] - train[0]["step"]) \
                if "elapsed_s" in train[0] else None
            st.eta_s = rate * (st.total_steps - st.step) if rate else None
        if st.state == "failed":
            st.detail = _last_error(run / LOG_FILE)
        return st

    def _state_word(self, run: Path) -> str:
        if self.is_running(run):
            return "running"
        summary = _read_json(run / "summary.json")
        if (run / "final").is_dir() and summary:
            return "finished"
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
            return "stopped"
        if (run / LOG_FILE).is_file() and _last_error(run / LOG_FILE).startswith(("error:", "Traceback")):
            return "failed"
        if (run / "metrics.jsonl").is_file():
            return "stopped"  # ended without a checkpoint (killed): resume starts it over
        return "failed" if (run / LOG_FILE).is_file() else "not started"

    def log_tail(self, run: Path, lines: int = 40) -> str:
        path = run / LOG_FILE
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64_000))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def _total_steps(run: Path, last: dict) -> int | None:
    """The run's step count: summary.json's when finished; while it runs, train.max_steps, or epochs x the steps
    per epoch that the metrics' ``epoch`` (= step / steps per epoch) implies."""
    summary = _read_json(run / "summary.json")
    if summary.get("total_steps"):
        return int(summary["total_steps"])
    try:
        train = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("train", {})
    except (OSError, yaml.YAMLError):
        return None
    if train.get("max_steps"):
        return int(train["max_steps"])
    if last.get("epoch") and last.get("step"):
        per_epoch = round(last["step"] / last["epoch"])
        return max(1, math.ceil(float(train.get("epochs") or 1.0) * per_epoch))
    return None


def _last_error(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = [t for t in log.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    errors = [t for t in lines if t.startswith(("error:", "Traceback"))]
    return (errors or lines or [""])[-1][:300]


def _is_train_process(pid: int) -> bool:
    """Whether ``pid`` is alive (not a zombie) and is a ``tunelab train`` (not a reused process id)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    return b"train" in cmdline and any(b"tunelab" in part for part in cmdline)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
