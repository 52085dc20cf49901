"""The task protocol: what a task (``task:`` in the config) tells the rest of tunelab.

A task decides what a training row is, which model and loss train on it, what is measured at an
evaluation, how the trained weights are saved, and which config combinations it refuses. Its facts
are attributes, read where a decision depends on the task, so that no code outside ``tasks/``
compares task names. Add a task: one module implementing :class:`Task`, one line in
``tasks/__init__.py``'s registry, and its name in ``config.TuneConfig.task``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console

from tunelab.data.batching import Plan, Row


@dataclass
class PreparedData:
    """A task's rows and what happened while making them (``data.json``)."""

    train: list[Row]
    eval: list[Row]
    summary: dict[str, Any]
    datasets: tuple[str, ...] = ()  # names of mixed datasets (per-dataset losses)
    strata: tuple[int, ...] | None = None  # class per row for data.sampler
    task: Any = None  # the task's own facts about its rows (labels, eval prompts, per-task indices)


EvalMetrics = Callable[[Any], dict[str, Any]]  # (accelerator) -> task metrics at an evaluation


class Task(Protocol):
    name: str
    causal_lm_rows: bool  # rows are causal-LM rows: our fused kernels, replay and LM reference data apply
    always_packed: bool  # rows are packed whatever data.packing says (continued pre-training)
    class_head: bool  # trains a new classification head (the `head` method applies; no distillation)
    labelled: bool  # rows carry a label from a label set read from the data
    continual: bool  # can be a stage of a continual run and has a task metric for forgetting
    pair_metric: bool  # its rows are preference pairs: forgetting's task metric is held-out pair accuracy
    unused_parameters: bool  # a step may leave parameters without a gradient (DDP must be told)
    shards: bool  # trains under train.distributed: fsdp / deepspeed (one model, one loss: no second view)
    zero3: bool  # also under DeepSpeed ZeRO-3, which gathers a weight only inside its own module's forward and
    #              backward hooks: a loss whose backward reads the output head's weight directly cannot
    builds_without_data: bool  # its model needs nothing from the rows but a label set (the advisor's probes)

    def rules(self, cfg) -> list[str]:
        """Config problems this task has with the rest of the config (field paths and fixes)."""

    def rows(self, cfg, tokenizer, run, console: Console, is_main: bool) -> PreparedData:
        """Read, prepare and tokenise the data into rows; write the rejects and ``data.json``."""

    def model_and_loss(self, cfg, data: PreparedData, dtype: torch.dtype,
                       tokenizer) -> tuple[torch.nn.Module, torch.nn.Module, EvalMetrics | None]:
        """The model with the method applied, the loss module the loop calls, and the task metrics."""

    def plan(self, cfg, data: PreparedData, processes: int, plan: Plan) -> Plan:
        """The data order; most tasks keep the default ``plan``."""

    def save(self, model: torch.nn.Module, method, folder: Path) -> None:
        """Write the trained weights (the method's format) and what reloading needs into ``folder``."""
