"""Fault injection for the reliability tests, from outside the production code.

A :class:`Fault` names a point inside a training step, which occurrence of it, and what happens
there: ``sigint`` (a real Ctrl-C to this process), ``sigkill`` (the process dies at once) or, in
the test process itself, ``kill`` (a :class:`SimulatedKill` that unwinds the run the way a death
would leave its files: nothing after the point is written, no handler saves anything).

:func:`install` wraps the functions the loop calls at each point. Subprocesses get the same
faults through ``fault_site/sitecustomize.py``: put that folder on ``PYTHONPATH`` and the fault in
``TUNELAB_TEST_FAULT`` (``point:nth:action[:rank]``), and every ``tunelab`` process, the ranks a
launcher starts included, installs it at start-up; a command forked from the warm server
(:mod:`warm`) installs it as it starts too.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FAULT_SITE = Path(__file__).parent / "fault_site"
ENV = "TUNELAB_TEST_FAULT"

# where in a step: the first micro-batch's forward, a later one's, right after optimizer.step(),
# inside an evaluation, inside a checkpoint write (after the RNG files, before the weights)
POINTS = ("before_forward", "between_micro_batches", "after_update", "during_eval", "during_checkpoint")


class SimulatedKill(BaseException):  # noqa: N818 - it stands for a signal, not an error
    """The in-process stand-in for SIGKILL; a BaseException, so no ``except Exception`` catches it."""


@dataclass(frozen=True)
class Fault:
    point: str
    nth: int  # 1-based occurrence of the point in this process
    action: str  # sigint | sigkill | kill
    rank: int | None = None  # only on this rank (None: every process)

    def __str__(self) -> str:
        return ":".join(str(x) for x in (self.point, self.nth, self.action, *([self.rank] if self.rank is not None
                                                                              else [])))

    @classmethod
    def parse(cls, text: str) -> Fault:
        point, nth, action, *rank = text.split(":")
        assert point in POINTS and action in ("sigint", "sigkill", "kill"), text
        return cls(point, int(nth), action, int(rank[0]) if rank else None)


def _fire(action: str) -> None:
    if action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise SimulatedKill


@dataclass
class Armed:
    """An installed fault: ``fired`` once its occurrence came; ``uninstall()`` disarms it."""

    uninstall: Callable[[], None]
    fired: bool = False


def install(fault: Fault) -> Armed:
    """Arm ``fault`` in this process."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from tunelab.train import checkpoint, loop

    seen = {"n": 0}

    def hit(point: str) -> None:
        # the rank is read when the point comes: a launcher's ranks are forked from one process that installed
        # the fault before any of them had a rank (tunelab.train.zygote)
        if point == fault.point and (fault.rank is None or int(os.environ.get("RANK", "0")) == fault.rank):
            seen["n"] += 1
            if seen["n"] == fault.nth:
                armed.fired = True
                _fire(fault.action)

    micro_batch, evaluate, save_file = loop._micro_batch, loop.evaluate, checkpoint.save_file

    def micro_batch_hook(s, step, micro):
        hit("before_forward" if micro == 0 else "between_micro_batches")
        return micro_batch(s, step, micro)

    def evaluate_hook(s):
        hit("during_eval")
        return evaluate(s)

    def save_file_hook(*args, **kwargs):
        hit("during_checkpoint")
        return save_file(*args, **kwargs)

    handle = register_optimizer_step_post_hook(lambda *_: hit("after_update"))
    loop._micro_batch, loop.evaluate, checkpoint.save_file = micro_batch_hook, evaluate_hook, save_file_hook

    def uninstall() -> None:
        handle.remove()
        loop._micro_batch, loop.evaluate, checkpoint.save_file = micro_batch, evaluate, save_file

    armed = Armed(uninstall)
    return armed


def subprocess_env(fault: Fault | None) -> dict[str, str]:
    """The environment for a ``tunelab`` subprocess that arms ``fault`` (None: none)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULT_SITE), src, os.environ.get("PYTHONPATH", "")])}
    env.pop(ENV, None)
    if fault is not None:
        env[ENV] = str(fault)
    return env
