"""The task registry: ``task:`` in the config names one of these.

Each task is one module implementing :class:`tunelab.tasks.protocol.Task`; see that module for
what a task decides and how to add one.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.coverage import coverage_warning, unknown_tokens
from tunelab.errors import UserError, first_line
from tunelab.tasks.classification import Classification
from tunelab.tasks.generative_classification import GenerativeClassification
from tunelab.tasks.multitask import MultiTask
from tunelab.tasks.preference import Preference, Reward
from tunelab.tasks.pretrain import Pretrain
from tunelab.tasks.protocol import PreparedData, Task
from tunelab.tasks.sft import SFT

TASKS: dict[str, Task] = {t.name: t for t in (SFT(), Pretrain(), Classification(), GenerativeClassification(),
                                              MultiTask(), Preference(), Reward())}

__all__ = ["TASKS", "PreparedData", "Task", "build_rows", "get", "prepare_data", "problems"]


def get(name: str) -> Task:
    """The task ``name`` (a validated config always names a registered one)."""
    return TASKS[name]


def problems(cfg) -> list[str]:
    """The config rules of ``cfg.task``: its combinations with the method, the data and the objectives."""
    return get(cfg.task).rules(cfg)


def prepare_data(cfg, tokenizer, run, console, is_main: bool = True) -> PreparedData:
    """The rows of ``cfg.task`` from ``cfg.data``, its rejects and ``data.json`` written into ``run``."""
    data = get(cfg.task).rows(cfg, tokenizer, run, console, is_main)
    # how much of the data the tokenizer reads: a vocabulary that maps it to [UNK] makes training noise
    stats = unknown_tokens(tokenizer, (r.input_ids for r in data.train))
    if stats is not None:
        data.summary["unknown_tokens"] = stats
        if run is not None and is_main:
            run.write_json("data.json", data.summary)
        warning = coverage_warning(stats, cfg.model.path)
        if warning is not None and is_main:
            console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    return data



def build_rows(cfg, specs, tokenizer, run, console, is_main: bool, *, field: str, task: str | None = None,
               update: dict[str, Any] | None = None) -> PreparedData:
    """Rows of further data files (``specs``: the reference data of EWC and distillation, replay data), read
    and tokenised exactly as the training data is, by the rows of ``task`` (``cfg.task`` by default): the one
    path from files to rows besides :func:`prepare_data` itself, which it calls.

    ``run``: where their rejects and ``data.json`` go (a folder of their own inside the run), or None.
    ``field``: the config field that names the files, for errors. ``update``: further config fields (e.g.
    the label set).
    """
    data = cfg.data.model_copy(update={"train": list(specs), "eval": [], "eval_ratio": 0.0, "prepare": None,
                                       "mix": type(cfg.data.mix)(), "sampler": "random"})
    sub = cfg.model_copy(update={"data": data, "task": task or cfg.task, **(update or {})})
    try:
        return prepare_data(sub, tokenizer, run, console, is_main)
    except UserError as err:  # the data.train rules, said of the field that named these files
        raise UserError(f"{field}: {first_line(err).removeprefix('data.train: ')}") from None
