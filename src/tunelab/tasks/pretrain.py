"""``task: pretrain``: continued pre-training on plain text; every token a target, rows packed."""

from __future__ import annotations

from tunelab.data.tasks import pretrain_task_rows
from tunelab.data.workbench import prepare_records
from tunelab.tasks.common import refuse_empty, reject_counts, report
from tunelab.tasks.lm import CausalLMTask
from tunelab.tasks.protocol import PreparedData


class Pretrain(CausalLMTask):
    name = "pretrain"
    always_packed = True

    def rules(self, cfg) -> list[str]:
        p = super().rules(cfg)
        if cfg.data.group_by_length:
            p.append("data.group_by_length with task: pretrain: rows are all max_length long. Remove it.")
        return p

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        prep = prepare_records(cfg, run, console, is_main)
        rows = pretrain_task_rows(cfg.data, tokenizer, prep.train, prep.eval, seed_rejects=prep.rejects)
        return task_data(cfg, rows, prep, run, console, is_main)


def task_data(cfg, rows, prep, run, console, is_main: bool) -> PreparedData:
    """``PreparedData`` from the ``TaskRows`` of pretrain and the two classification tasks."""
    refuse_empty(rows.train, rows.rejects, run, is_main, f"row for task {cfg.task}")
    summary = {"task": cfg.task, "files": prep.files, "eval_files": prep.eval_files, **rows.summary,
               "train_rows": len(rows.train), "eval_rows": len(rows.eval),
               "train_target_tokens": sum(r.n_targets for r in rows.train), **reject_counts(rows.rejects)}
    headline = (f"data ({cfg.task}): {summary['train_samples']} train / {summary['eval_samples']} eval samples, "
                f"{summary['train_tokens']:,} train tokens in {summary['train_rows']} rows")
    if rows.labels:
        headline += f"; {len(rows.labels)} labels"
    report(summary, rows.rejects, run, console, is_main, headline)
    return PreparedData(rows.train, rows.eval, summary, task=rows)
