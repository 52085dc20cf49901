"""``tunelab`` commands for the tests, forked from a warm process instead of started as new interpreters.

``python -m tunelab.cli ...`` spends about 8 of its CPU-seconds importing torch, transformers and peft
before it does anything, and a ``train.processes: 2`` run pays that once more in its zygote. On the
2-core CI machine the suite is CPU-bound and starts such commands more than a hundred times, so each
pytest worker keeps one *warm server*: a process that imported ``tunelab.cli`` and
``tunelab.train.recipe`` once and ran nothing else. :func:`run` (like ``subprocess.run``) and
:func:`start` (like ``subprocess.Popen``) ask it for a command; it forks a child that becomes that
command: its arguments, environment, working directory, standard streams, ``SIGINT`` disposition, file
size limit and the test fault (:mod:`faults`) it would have had, then ``tunelab.cli.main(argv)``. The
child's multi-process launcher forks its zygote from itself (``launch.FORK_ZYGOTE_HERE``), so a 2-process
run imports nothing either.

What this leaves out of the tests: the interpreter start-up itself (``sys.path``, ``python -m``). The tests
that are about that (the launcher's imports, the missing extras, the CLI's error lines from a real
interpreter, ``accelerate launch`` and ``torchrun``) keep starting real interpreters.

Protocol: the client writes one JSON line per command on the server's request pipe. The server forks a
*waiter* per command, which forks the command and reports ``pid N`` and then ``exit CODE`` (as
``Popen.returncode``) in a status file the client polls. Each level dies with its parent
(``PR_SET_PDEATHSIG``), so a killed pytest worker takes its server and every command with it.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunelab.train.cpu_tuning import with_scalable_malloc
from tunelab.train.zygote import die_with_parent

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


class Command:
    """A command the warm server runs: the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, args: list[str], folder: Path):
        self.args, self.folder, self.returncode, self._pid = args, folder, None, None

    @property
    def pid(self) -> int:
        while self._pid is None:
            self._status()
            if self._pid is None:
                time.sleep(0.02)
        return self._pid

    def _status(self) -> None:
        lines = (self.folder / "status").read_text().split("\n") if (self.folder / "status").exists() else []
        for line in lines:
            kind, _, value = line.partition(" ")
            if kind == "pid":
                self._pid = int(value)
            elif kind == "exit":
                self.returncode = int(value)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        return tuple((self.folder / name).read_text(errors="replace") for name in ("stdout", "stderr"))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out = self.output()
        shutil.rmtree(self.folder, ignore_errors=True)
        return out


def start(args: list[str], *, env: dict | None = None, cwd: str | Path | None = None, input: str | None = None,
          sigint: str = "default", file_size_limit: int | None = None, tbb: bool = False) -> Command:
    """``tunelab ARGS`` (as ``python -m tunelab.cli ARGS``) in a fork of the warm server. ``env``: the whole
    environment (default: this process's). ``sigint``: ``default`` (Ctrl-C raises KeyboardInterrupt, as in a
    new interpreter) or ``ignore``. ``file_size_limit``: ``RLIMIT_FSIZE`` in bytes, with SIGXFSZ ignored (a write
    past it fails with EFBIG). ``tbb``: a run whose launcher gives its ranks TBB's allocator (a sharded engine's,
    ``cpu_tuning.rank_environment``): it runs in a second server started with that ``LD_PRELOAD``, so that its
    launcher can still fork their zygote from itself (an exec-time variable the launcher would change makes it
    start a new interpreter instead)."""
    env = dict(os.environ if env is None else env)
    if tbb:
        env["LD_PRELOAD"] = _tbb_preload(env.get("LD_PRELOAD", ""))
    folder = Path(tempfile.mkdtemp(prefix="tunelab-warm-"))
    if input is not None:
        (folder / "stdin").write_text(input)
    request = {"argv": [str(a) for a in args], "env": env, "cwd": str(cwd or os.getcwd()), "folder": str(folder),
               "stdin": input is not None, "sigint": sigint, "file_size_limit": file_size_limit}
    _server(tbb).write((json.dumps(request) + "\n").encode())
    return Command(["tunelab", *map(str, args)], folder)


def _tbb_preload(user: str) -> str:
    """``LD_PRELOAD`` as the launcher sets it for a sharded engine's ranks (``cpu_tuning.rank_environment``)."""
    preload = with_scalable_malloc(user)
    assert preload is not None, "tbb= needs PyPI's tbb (make setup installs it)"
    return preload


def run(args: list[str], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True)``, warm."""
    command = start(args, **kwargs)
    try:
        stdout, stderr = command.communicate(timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.wait()
        shutil.rmtree(command.folder, ignore_errors=True)
        raise
    return subprocess.CompletedProcess(command.args, command.returncode, stdout, stderr)


_SERVER: dict[tuple[int, bool], tuple[subprocess.Popen, object]] = {}  # (pid, tbb): a server, its request pipe


def _server(tbb: bool):
    """This process's request pipe to its warm server (the one with TBB's allocator preloaded for ``tbb``),
    started on first use."""
    key = (os.getpid(), tbb)
    if key not in _SERVER:
        read, write = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}
        if tbb:
            env["LD_PRELOAD"] = _tbb_preload(env.get("LD_PRELOAD", ""))
        server = subprocess.Popen([sys.executable, str(Path(__file__)), str(read)], env=env, pass_fds=(read,),
                                  stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        os.close(read)
        pipe = os.fdopen(write, "wb", buffering=0)
        atexit.register(pipe.close)  # the server ends at end of file
        _SERVER[key] = (server, pipe)
    return _SERVER[key][1]


# --- the server --------------------------------------------------------------------------------------------

def serve(request_fd: int) -> None:
    import torch  # noqa: F401 - the imports this process exists to hold

    import faults
    import tunelab.cli
    from tunelab.train import launch

    for name in launch.PRELOAD:
        __import__(name)
    launch.FORK_ZYGOTE_HERE = True
    gc.freeze()  # the imports' objects: a fork's collector leaves them (and their copy-on-write pages) alone
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped as they end
    requests = os.fdopen(request_fd, "rb", buffering=0)
    for line in requests:
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            request = json.loads(line)
            requests.close()
            die_with_parent()
            _wait_for(_command(request, tunelab.cli, faults), Path(request["folder"]))


def _command(request: dict, cli, faults) -> int:
    """In the waiter: fork the command; in the command, become it (never returns there)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid:
        return pid
    die_with_parent()
    folder = Path(request["folder"])
    streams = [os.open(folder / "stdin" if request["stdin"] else os.devnull, os.O_RDONLY),
               *(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for name in ("stdout", "stderr"))]
    for fd, opened in enumerate(streams):
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [cli.__file__, *request["argv"]]
    signal.signal(signal.SIGINT, signal.default_int_handler if request["sigint"] == "default" else signal.SIG_IGN)
    if request["file_size_limit"] is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["file_size_limit"],) * 2)
    if os.environ.get("OMP_NUM_THREADS"):  # a new interpreter's torch would size its pool from it
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if os.environ.get(faults.ENV):  # what tests/fault_site/sitecustomize.py does at a new interpreter's start
        faults.install(faults.Fault.parse(os.environ[faults.ENV]))
    # SystemExit, from main or here, ends this process as the interpreter's own exit does (atexit handlers,
    # flushed streams); nothing on the way up to the top of the server's stack catches it
    raise SystemExit(cli.main(request["argv"]))


def _wait_for(pid: int, folder: Path) -> None:
    """In the waiter: report the command's pid, then its exit code, in ``folder/status``; then end."""
    _write(folder / "status", f"pid {pid}\n")
    _, status = os.waitpid(pid, 0)
    _write(folder / "status", f"pid {pid}\nexit {os.waitstatus_to_exitcode(status)}\n")
    os._exit(0)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
