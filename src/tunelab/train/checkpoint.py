"""Checkpoints that survive SIGKILL, and exact resume.

A checkpoint is ``<run>/checkpoints/step-000123/`` with

* ``trainable.safetensors``: every parameter that requires grad (the adapter, or all
  weights for full fine-tuning);
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict``;
* ``rng-<rank>.pt``: Python, NumPy and torch (CPU and CUDA) RNG states of each process;
* ``state.json``: the step, counters, best eval loss, and the data position (the data order
  is a pure function of seed and step, so the step *is* the position);
* ``manifest.json``: the SHA-256 of every other file, written last. A checkpoint whose files
  do not match it (a truncated copy, a disk error) is refused by name, and ``--resume`` falls
  back to the newest one that verifies.

With a sharded engine (``train.distributed: fsdp`` / ``deepspeed``) the weights and optimiser are in
``shards/`` instead, each rank writing its own part (``torch.distributed.checkpoint`` files, or
DeepSpeed's per-rank ZeRO files), into the same temp folder; ``state.json`` records the engine and
the number of processes, and resuming with another of either is refused in one line.

It is written into ``.tmp-step-000123`` and renamed when complete, so a kill at any moment
leaves either the previous checkpoints or a complete new one; stale temp folders are
removed on the next save. Only the newest ``limit`` checkpoints are kept. A write that fails (a full disk) stops the run
with a one-line error; the previous checkpoints are left as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import UserError, first_line
from tunelab.fsutil import sha256_file

MANIFEST = "manifest.json"
SHARDS = "shards"  # a sharded engine's folder in a checkpoint


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:06d}"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    state: dict[str, Any],
    rank: int,
    is_main: bool,
    barrier,
    limit: int,
    shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (all processes call this; ``barrier`` syncs them). ``shards(folder)``:
    every rank writes its part of a sharded model and optimiser there (instead of the whole trainable tensors)."""
    final = step_dir(ckpt_root, step)
    tmp = ckpt_root / f".tmp-step-{step:06d}"

    def write(fill) -> None:
        """Run the writes in ``fill``; a failed one (a full disk) becomes a one-line error. Only writes run
        here: an error of a collective (a rank that died) is not a disk problem and passes through."""
        try:
            fill()
        except (OSError, RuntimeError) as err:  # torch.save reports a short write as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            done = list_checkpoints(ckpt_root)
            kept = f"the previous checkpoint {done[-1]} is intact" if done else "no earlier checkpoint exists"
            reason = (err.strerror if isinstance(err, OSError) and err.strerror
                      else "a file was cut short: the disk is full or a file size limit was reached")
            raise UserError(f"{tmp}: could not write checkpoint step {step} ({reason}); {kept}. Free disk space "
                            f"(or lower train.save_total_limit), then continue with: tunelab train CONFIG "
                            f"--resume") from None

    def start() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def fill_and_rename() -> None:
        if shards is None:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        (tmp / MANIFEST).write_text(json.dumps({n: sha256_file(tmp / n) for n in files}, indent=1))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        prune(ckpt_root, limit)

    if is_main:
        write(start)
    barrier()
    write(lambda: torch.save(rng_state(), tmp / f"rng-{rank}.pt"))
    if shards is not None:  # collective: every rank writes its part (the engine synchronises them itself)
        shards(tmp / SHARDS)
    barrier()
    if is_main:
        write(fill_and_rename)
    barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders are never complete)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune(ckpt_root: Path, limit: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted (a file missing, cut short or changed), or None."""
    manifest = path / MANIFEST
    if not manifest.is_file():  # written by an older tunelab: only the files' presence can be checked
        missing = [n for n in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
                   if not (path / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    for name, digest in expected.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_file(path / name) != digest:
            return f"{name} does not match its checksum (cut short or changed)"
    return None


def newest_valid(ckpt_root: Path, warn) -> Path | None:
    """The newest checkpoint that verifies; each newer corrupt one is named through ``warn``.

    Raises a :class:`UserError` when checkpoints exist but none verifies.
    """
    done = list_checkpoints(ckpt_root)
    problems = []
    for path in reversed(done):
        problem = verify(path)
        if problem is None:
            for bad, why in problems:
                warn(f"checkpoint {bad} is corrupt ({why}): resuming from {path.name} instead")
            return path
        problems.append((path.name, problem))
    if problems:
        bad, why = problems[0]
        raise UserError(f"{ckpt_root}: no checkpoint verifies ({bad}: {why}; {len(problems)} checked). Start the "
                        f"run again without --resume under a new run.name, or restore the checkpoint files")
    return None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler, rank: int,
                    shards: Callable[[Path], None] | None = None, layout: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this process's RNG; return ``state.json``.

    ``path`` comes from :func:`newest_valid`, which has checked the files against the manifest. With a sharded
    engine, ``shards(folder)`` reads every rank's part and ``layout`` ({processes, distributed}) must be the
    checkpoint's."""
    if shards is not None:
        _check_layout(path, layout or {})
        try:
            shards(path / SHARDS)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{path}: the sharded checkpoint is unreadable ({type(err).__name__}: "
                            f"{first_line(err)}). Move this folder away and run with --resume again to continue from "
                            "the previous checkpoint") from None
        return _load_rest(path, scheduler=scheduler, rank=rank)
    try:
        return _load(path, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
    except UserError:
        raise
    except Exception as err:  # e.g. an older checkpoint without a manifest, damaged in a way its presence hides
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: checkpoint is unreadable ({type(err).__name__}: {first}). Move this folder away "
                        f"and run with --resume again to continue from the previous checkpoint") from None


def _load(path: Path, *, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict[str, Any]:
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise UserError(
            f"{path}: checkpoint does not match this model/method ({len(missing)} trainable tensors missing, "
            f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]}). Resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    return _load_rest(path, scheduler=scheduler, rank=rank)


def _check_layout(path: Path, layout: dict[str, Any]) -> None:
    """A sharded checkpoint resumes only with the engine and the number of processes that wrote it."""
    saved = json.loads((path / "state.json").read_text())
    for key, what in (("distributed", "train.distributed"), ("processes", "the number of processes")):
        if saved.get(key, "ddp" if key == "distributed" else None) != layout.get(key):
            raise UserError(f"{path}: this checkpoint was written with {what} = {saved.get(key)}, and this run has "
                            f"{layout.get(key)}; a sharded checkpoint (each rank's part of the weights and "
                            f"optimiser, and the data split) resumes only as it was written. Resume with {what} = "
                            f"{saved.get(key)}")


def _load_rest(path: Path, *, scheduler, rank: int) -> dict[str, Any]:
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.exists():
        rng_file = path / "rng-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text())
