"""``train.processes: N``: ``tunelab train`` starts N data-parallel processes on this machine.

Each process is what ``python -m tunelab.cli train ...`` would be (on Linux it is forked from one
process that imported the model stack once: :mod:`tunelab.train.zygote`), with the environment
torchrun and ``accelerate launch`` give their workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); the loop's ``Accelerator`` reads it and
runs DDP over gloo on CPU or NCCL on GPUs. Nothing else changes: the optimiser step covers
``batch_size x grad_accum x N`` rows, and 1 process equals N processes (tested).

Why on CPU: the ~40,000 small ATen calls of a training step (casts, norms, RoPE) do not get
faster with a second intra-op thread, while a second process runs its own; on the 2-core
development machine two 1-thread processes train the standard LoRA workload faster than one
2-thread process (see ``docs/benchmarks.md``), for twice the model memory.

Why our own and not ``accelerate launch``: the config alone says how many processes; a user
error stays one line (the launcher would add its own traceback); and when one process fails
the others are stopped at once instead of waiting at the next collective for the 30-minute
gloo timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from tunelab.errors import UserError
from tunelab.train import zygote
from tunelab.train.zygote import die_with_parent

#: Set in the processes this launcher starts (their user errors are printed by process 0 only).
LAUNCHED_ENV = "TUNELAB_PROCESS"


def launched() -> bool:
    """Whether this process is one of several started by a launcher (ours, torchrun, accelerate, MPI)."""
    return any(k in os.environ for k in ("LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")) or \
        int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's number on its machine (the first on each machine prints the run's user errors)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_devices(processes: int) -> None:
    """N ranks need N GPUs when there is a GPU (one rank per device); any N works on CPU. Called by
    the ranks (the launcher itself stays light: it never imports torch)."""
    import torch

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise UserError(f"train.processes: {processes}, but this machine has {torch.cuda.device_count()} GPU(s). "
                        f"Set train.processes to at most {torch.cuda.device_count()}")


@dataclass(frozen=True)
class Nodes:
    """Several machines (``tunelab train CONFIG --nnodes N --node-rank R --master-addr HOST --master-port P``):
    each runs ``tunelab train`` with the same config and flags but its own ``--node-rank``; node R's processes
    are the global ranks R x processes .. R x processes + processes - 1, and all of them meet at
    HOST:P, which node 0 listens on (torchrun's static rendezvous, by the same environment variables)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    def check(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} with --nnodes {self.nnodes}: the node ranks are 0 to "
                            f"{self.nnodes - 1}. Give each machine its own --node-rank")
        if self.nnodes > 1 and self.master_port is None:
            raise UserError(f"--nnodes {self.nnodes} needs --master-port (and --master-addr, node 0's address): "
                            "every node must name the same one, e.g. --master-addr node0 --master-port 29500")


#: What a forked rank finds imported (``tunelab train``'s rank imports these first thing).
PRELOAD = ("tunelab.cli", "tunelab.train.recipe")


#: Fork the zygote from the launcher itself instead of starting ``python -m tunelab.train.zygote``: only for a
#: launcher process that has imported ``PRELOAD`` and runs no other thread, where it saves the zygote's imports
#: (about 9 CPU-seconds). The test suite's warm server (``tests/warm.py``) sets it; a user's process, which may
#: hold threads, CUDA or open state a rank must not inherit, never does. A rank's exit then unwinds through the
#: launcher's frames up to that process's top, as ``os.fork`` children do.
FORK_ZYGOTE_HERE = False
#: Variables that take effect only when a process starts (the TBB allocator a sharded engine's ranks get is an
#: LD_PRELOAD): a zygote whose environment changes one is always a new process.
EXEC_TIME = ("LD_PRELOAD", "LD_LIBRARY_PATH", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX")


def run_processes(argv: list[str], processes: int, *, grace_s: float = 60.0, nodes: Nodes | None = None,
                  env: dict[str, str] | None = None, module: str = "tunelab.cli", preload: tuple[str, ...] = PRELOAD,
                  fork: bool | None = None) -> int:
    """Run ``python -m <module> <argv>`` as ``processes`` ranks (forked ranks exit with ``<module>.main(argv)``,
    which is what that runs); the exit code is the first failing rank's (else 0).

    A rank that fails stops the others. The ranks run in their own session, so Ctrl-C (or a
    SIGINT sent to this process) reaches them once, through this launcher: they agree on a step,
    save one checkpoint and stop; they are killed after ``grace_s`` if they have not. A second
    Ctrl-C makes them abort. On Linux a rank also dies with its launcher (``PR_SET_PDEATHSIG``), so
    a killed launcher leaves no rank waiting at a collective. ``env``: variables added to the ranks'
    environment (the allocator: :func:`tunelab.train.cpu_tuning.rank_environment`).

    ``fork`` (default: on Linux): the ranks are forked from one process that imported ``preload``
    first (:mod:`tunelab.train.zygote`), instead of each starting an interpreter and importing it again.
    """
    nodes = nodes or Nodes()
    nodes.check()
    port = nodes.master_port or free_port()
    first, world = nodes.node_rank * processes, nodes.nnodes * processes
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    base.update(env or {})
    ranks = [{"RANK": str(first + r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
              "LOCAL_WORLD_SIZE": str(processes), "GROUP_RANK": str(nodes.node_rank),
              "NODE_RANK": str(nodes.node_rank), "MASTER_ADDR": nodes.master_addr, "MASTER_PORT": str(port),
              LAUNCHED_ENV: "1"} for r in range(processes)]
    try:
        if sys.platform.startswith("linux") if fork is None else fork:
            procs = _Zygote(module, argv, preload, ranks, base).start()
        else:
            procs = [subprocess.Popen([sys.executable, "-m", module, *argv], env={**base, **rank_env},
                                      start_new_session=True, preexec_fn=die_with_parent) for rank_env in ranks]
    except KeyboardInterrupt:  # during the zygote's imports: it (and any rank it forked) is gone
        return 130
    try:
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                # give rank 0 a moment to fail on its own (it prints the error line), then stop the rest
                _wait(procs[:1], 2.0)
                codes = [p.poll() for p in procs]
                r, code = next((r, c) for r, c in enumerate(codes) if c not in (None, 0))
                _stop(procs)
                if first + r != 0:  # rank 0 printed its own one-line error
                    where = f" on host {socket.gethostname()} (node {nodes.node_rank})" if nodes.nnodes > 1 else ""
                    print(f"error: process {first + r} of {world}{where} stopped with exit code {code}; its messages "
                          "are above", file=sys.stderr)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _send(procs, signal.SIGINT)
        try:
            _wait(procs, grace_s)
        except KeyboardInterrupt:
            _send(procs, signal.SIGINT)  # the second Ctrl-C: abort
        _stop(procs)
        return 130


class _Zygote:
    """The process the ranks are forked from (:mod:`tunelab.train.zygote`), and what it reports of them."""

    def __init__(self, module: str, argv: list[str], preload: tuple[str, ...], ranks: list[dict], env: dict):
        read, write = os.pipe()
        spec = {"module": module, "argv": argv, "preload": list(preload), "ranks": ranks}
        if FORK_ZYGOTE_HERE and threading.active_count() == 1 and all(m in sys.modules for m in preload) and \
                all(env.get(k) == os.environ.get(k) for k in EXEC_TIME):
            self.popen = _fork_zygote(spec, env, read, write)
        else:
            self.popen = subprocess.Popen([sys.executable, "-m", "tunelab.train.zygote", str(write), json.dumps(spec)],
                                          env=env, pass_fds=(write,), start_new_session=True,
                                          preexec_fn=die_with_parent)
        os.close(write)
        os.set_blocking(read, False)
        self.read_fd, self.pending, self.ranks = read, b"", []
        self.wanted = len(ranks)

    def start(self) -> list[_Forked]:
        """Wait until the zygote has forked every rank (or has died: the ranks it did not fork fail with its code)."""
        try:
            while len(self.ranks) < self.wanted and self.popen.poll() is None:
                time.sleep(0.05)
                self.read()
        except KeyboardInterrupt:
            self.popen.kill()  # its ranks die with it (PR_SET_PDEATHSIG)
            self.popen.wait()
            raise
        self.read()
        missing = [_Forked(None, self) for _ in range(self.wanted - len(self.ranks))]
        for rank in missing:
            rank.returncode = self.popen.returncode or 1
        return [*self.ranks, *missing]

    def read(self) -> None:
        """Take in the zygote's reports: ``start PID`` and ``exit PID CODE`` lines (the pipe is closed at its end)."""
        while self.read_fd is not None:
            try:
                chunk = os.read(self.read_fd, 4096)
            except BlockingIOError:
                break
            if not chunk:  # the zygote has exited: it reported everything it will
                os.close(self.read_fd)
                self.read_fd = None
                break
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            kind, pid, *code = line.decode().split()
            if kind == "start":
                self.ranks.append(_Forked(int(pid), self))
            else:
                next(r for r in self.ranks if r.pid == int(pid)).returncode = int(code[0])
        if self.popen.poll() is not None and not self.pending:  # a dead zygote's unreported ranks died with it
            for rank in self.ranks:
                if rank.returncode is None:
                    rank.returncode = self.popen.returncode or -signal.SIGTERM


def _fork_zygote(spec: dict, env: dict, read: int, write: int) -> _Child:
    """The zygote as a fork of this process (``FORK_ZYGOTE_HERE``), set up as the exec'd one would be."""
    pid = os.fork()
    if pid:
        return _Child(pid)
    zygote_pid = os.getpid()
    try:
        os.close(read)
        os.setsid()
        die_with_parent()
        os.environ.clear()
        os.environ.update(env)
        zygote.main(write, spec)
    except BaseException:
        if os.getpid() != zygote_pid:
            raise  # a rank ending (zygote._rank): up to the top of the stack, as in the exec'd zygote
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # the zygote, once its ranks have ended: never back into the launcher's code


class _Child:
    """A process this one forked, with the part of ``subprocess.Popen``'s interface :class:`_Zygote` uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


class _Forked:
    """A forked rank, with the part of ``subprocess.Popen``'s interface the launcher uses."""

    def __init__(self, pid: int | None, zygote: _Zygote):
        self.pid, self.zygote, self.returncode = pid, zygote, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.read()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended after the poll
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


def _send(procs, sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


def _wait(procs, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    _wait(procs, 10.0)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
