"""The task registry: ``task:`` in the config names one of these.

Each task is one module implementing :class:`tunelab.tasks.protocol.Task`; see that module for
what a task decides and how to add one.
"""

from __future__ import annotations

from tunelab.tasks.classification import Classification
from tunelab.tasks.generative_classification import GenerativeClassification
from tunelab.tasks.multitask import MultiTask
from tunelab.tasks.preference import Preference, Reward
from tunelab.tasks.pretrain import Pretrain
from tunelab.tasks.protocol import PreparedData, Task
from tunelab.tasks.sft import SFT

TASKS: dict[str, Task] = {t.name: t for t in (SFT(), Pretrain(), Classification(), GenerativeClassification(),
                                              MultiTask(), Preference(), Reward())}

__all__ = ["TASKS", "PreparedData", "Task", "get", "prepare_data", "problems"]


def get(name: str) -> Task:
    """The task ``name`` (a validated config always names a registered one)."""
    return TASKS[name]


def problems(cfg) -> list[str]:
    """The config rules of ``cfg.task``: its combinations with the method, the data and the objectives."""
    return get(cfg.task).rules(cfg)


def prepare_data(cfg, tokenizer, run, console, is_main: bool = True) -> PreparedData:
    """The rows of ``cfg.task`` from ``cfg.data``, its rejects and ``data.json`` written into ``run``."""
    return get(cfg.task).rows(cfg, tokenizer, run, console, is_main)
