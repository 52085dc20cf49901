"""The process the launcher forks its ranks from: it imports the model stack once, then forks N ranks.

``python -m tunelab.train.zygote REPORT_FD SPEC`` (started by :func:`tunelab.train.launch.run_processes`
on Linux; a launcher that imported the preload itself may instead fork and call :func:`main`:
``launch.FORK_ZYGOTE_HERE``). ``SPEC`` is JSON: ``module`` (each rank exits with ``module.main(argv)``, as ``python -m
tunelab.cli`` does), ``argv``, ``preload`` (modules to import before forking) and ``ranks`` (each rank's
own environment variables, added to this process's). On ``REPORT_FD`` it writes one line per event: ``start PID`` after each fork,
``exit PID CODE`` when a rank ends (``CODE`` as ``Popen.returncode``: negative for a signal).

Why: importing torch, transformers and peft costs about 9 CPU-seconds per process on the 2-core
development host, and every rank used to pay it; forked ranks share one import (and its pages,
copy-on-write). A 2-process tiny LoRA run (16 steps) confined to one core took 18.4 s from the command
to its last line, against 27.5 s with an interpreter per rank; on 2 idle cores both take about 16 s, as the
two imports ran side by side anyway.

Fork safety: the only threads the imports leave are idle BLAS worker pools (numpy's OpenBLAS; it stops
them around a fork), and nothing touches a GPU before the fork. On a CUDA or ROCm build of
torch the ranks are forked before the preload (CUDA must not be initialised in a parent that forks) and
import the stack themselves, as separate processes would.

Written here because neither torchrun nor accelerate preloads (both exec a fresh interpreter per rank) and
``multiprocessing``'s forkserver serves Python callables, not ``python -m`` programs with their own exit
codes and signal handling.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys


def main(report_fd: int, spec: dict) -> None:
    report = os.fdopen(report_fd, "w", buffering=1)
    import torch  # lazy: the zygote's whole point is this import (and the preload's)

    if torch.version.cuda is None and torch.version.hip is None:
        for name in spec["preload"]:
            importlib.import_module(name)
    gc.freeze()  # what the imports made: the ranks' collector leaves it (and its copy-on-write pages) alone
    zygote = os.getpid()
    for env in spec["ranks"]:
        pid = os.fork()
        if pid == 0:
            report.close()
            _rank(zygote, spec["module"], spec["argv"], env)  # never returns
        report.write(f"start {pid}\n")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher signals each rank itself
    for _ in spec["ranks"]:
        pid, status = os.wait()
        report.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")


def _rank(zygote: int, module: str, argv: list[str], env: dict[str, str]) -> None:
    """In a forked child: become the rank ``python -m module *argv`` would be, with ``env`` added."""
    die_with_parent()  # the zygote's death (hence the launcher's) ends this rank
    if os.getppid() != zygote:  # the zygote died before the line above
        os._exit(1)
    os.environ.update(env)
    sys.argv = [module, *argv]
    # SystemExit, from main or here, ends this process as the interpreter's own exit does: atexit handlers, flushed
    # streams (never back into the zygote's loop: nothing on the way up catches it)
    raise SystemExit(importlib.import_module(module).main(argv))


def die_with_parent() -> None:
    """SIGTERM when the parent dies (Linux; elsewhere nothing). Called by a rank (before its exec, or after the
    zygote forked it) and by the zygote, so a killed launcher takes its ranks with it."""
    try:
        import ctypes  # lazy: only a launched child on Linux needs it

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
