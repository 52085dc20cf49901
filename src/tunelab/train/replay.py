"""Experience replay wired into a run: the replay files' rows and the plan that mixes them into every step.

The counts and the order are :class:`tunelab.data.replay.ReplayPlan`'s; the rows come from
:func:`tunelab.tasks.build_rows`, so replay files are read and tokenised exactly as the training data
(template, ``train_on``, lengths, packing; text files cut into ``max_length`` rows for a pre-training
task), carry the ``weight`` of their ``DatasetSpec``, and their rejects go to
``<run>/reference/replay/rejects.jsonl``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from tunelab import tasks
from tunelab.data.batching import Plan
from tunelab.data.replay import REPLAY, ReplayPlan
from tunelab.errors import UserError
from tunelab.train.keep import sub_run


def with_replay(cfg, tokenizer, data, plan: Plan, run, console: Console, is_main: bool = True, *, task_facts):
    """(data, plan) with the replay rows appended to ``data.train`` and a :class:`ReplayPlan`.

    Task rows without a dataset index get index 0 so that every micro-batch reports per-dataset
    losses; the names become ``(*datasets or (task,), "replay")``.
    """
    if task_facts.unused_parameters:
        raise UserError("objectives.replay: task multitask samples one task per step; add the replay data as one "
                        "more sft task in `tasks` (its task_sampling share plays the replay ratio)")
    if not task_facts.causal_lm_rows:
        raise UserError(f"objectives.replay: task {cfg.task} trains a class head; replayed text has no class. "
                        "Use task: generative_classification or sft to replay data")
    settings = cfg.objectives.replay
    if not settings.data:
        raise UserError("objectives.replay.data: empty. Give the replay files (general instruction data, earlier "
                        "tasks); the buffer of earlier stages exists only in `tunelab continual`")
    names = tuple(data.datasets) or (cfg.data.train[0].name or Path(cfg.data.train[0].path).stem,)
    group = len(names)
    if is_main:
        console.print("replay data:")
    replay = tasks.build_rows(cfg, settings.data, tokenizer, sub_run(run, REPLAY), console, is_main,
                              field="objectives.replay.data", task="pretrain" if task_facts.always_packed else "sft")
    rows = [dataclasses.replace(r, groups=(group,) * len(r.segments)) for r in replay.train]
    task = [r if r.groups is not None else dataclasses.replace(r, groups=(0,) * len(r.segments)) for r in data.train]
    rplan = ReplayPlan(plan, len(rows), settings.ratio, tuple((int(s), float(r)) for s, r in settings.schedule))
    rplan.check()
    k = rplan.replay_rows_at(0)
    s = replay.summary
    summary = {"files": s["files"], "samples": s["train_samples"], "rows": len(rows),
               "target_tokens": sum(r.n_targets for r in rows), "rejected": s["rejected"],
               "ratio": settings.ratio, "schedule": [list(p) for p in settings.schedule],
               "rows_per_step": plan.rows_per_step, "replay_rows_per_step": k,
               "task_rows_per_step": plan.rows_per_step - k}
    if run is not None and is_main:
        run.write_json("replay.json", summary)
    if is_main:
        console.print(f"replay: {summary['samples']} samples in {summary['rows']} rows; {k} of {plan.rows_per_step} "
                      f"rows of every step (ratio {settings.ratio})")
    data = dataclasses.replace(data, train=task + rows, datasets=(*names, REPLAY),
                               summary={**data.summary, "replay": summary})
    return data, rplan
