"""``task: multitask``: per-task data, the shared model with its heads, the loss, the plan.

Each task's files are read and prepared with the data workbench on their own
(:func:`tunelab.data.workbench.prepare_records` with only that task's ``data.train`` /
``data.eval`` entries: cleaning, ``eval_ratio``, mixing, weights work per task), then turned into
rows by the task's type (:mod:`tunelab.data.tasks` for classification and generative
classification, the SFT tokeniser for sft). Every row carries its task index as ``groups``,
which :class:`~tunelab.objectives.multitask.MultiTaskLoss` reads and the loop logs per task.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from tunelab import methods
from tunelab.data.batching import Plan, rows_unpacked
from tunelab.data.cache import encode_records_cached
from tunelab.data.formats import summarize_rejects, write_rejects
from tunelab.data.task_mix import TaskPlan
from tunelab.data.tasks import class_weights, classification_task_rows, generative_task_rows
from tunelab.data.workbench import prepare_records
from tunelab.errors import UserError
from tunelab.models.classifier import ClassifierSpec
from tunelab.models.load import load_model
from tunelab.models.multitask import MultiTaskModel, save_heads
from tunelab.objectives.classification import GenerativeEval
from tunelab.objectives.multitask import MultiTaskLoss
from tunelab.tasks.protocol import PreparedData

ROWS = {"classification": classification_task_rows, "generative_classification": generative_task_rows}


@dataclass
class MultiTaskRows:
    """What :func:`prepare` hands to the model/loss builder (``PreparedData.task``)."""

    tasks: list[str]
    kinds: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    eval_prompts: dict[str, list] = field(default_factory=dict)
    train_of: list[tuple[int, ...]] = field(default_factory=list)  # row indices of each task
    eval_counts: list[float] = field(default_factory=list)  # eval targets of each task (the eval-loss divisor)
    eval_rows: int = 0


def _classification_section(cfg, spec):
    return cfg.classification.model_copy(update={
        "labels": spec.labels, "pooling": spec.pooling, "class_weights": spec.class_weights,
        "prompt": spec.prompt or cfg.classification.prompt})


def prepare(cfg, tokenizer, run, console: Console, is_main: bool):
    """Rows of every task (see the module docstring) -> ``PreparedData``."""
    d = cfg.data
    names = list(cfg.tasks)
    info = MultiTaskRows(names, [cfg.tasks[t].type for t in names])
    train, evals, rejects, per_task, files, eval_files = [], [], [], {}, [], []
    for k, name in enumerate(names):
        spec = cfg.tasks[name]
        sub = cfg.model_copy(update={"data": d.model_copy(update={
            "train": [s for s in d.train if s.task == name], "eval": [s for s in d.eval if s.task == name]})})
        prep = prepare_records(sub, None, console, is_main)
        files += [{**f, "task": name} for f in prep.files]
        eval_files += [{**f, "task": name} for f in prep.eval_files]
        if spec.type == "sft":
            enc = dict(train_on=d.train_on, max_length=d.max_length, truncation=d.truncation, use_cache=d.cache)
            tr, rej, _ = encode_records_cached(prep.train, tokenizer, **enc)
            ev, ev_rej, _ = encode_records_cached(prep.eval, tokenizer, **enc)
            t_rows, e_rows, t_rej = rows_unpacked(tr), rows_unpacked(ev), prep.rejects + rej + ev_rej
            summary = {"type": "sft", "train_samples": len(tr), "eval_samples": len(ev)}
        else:
            rows = ROWS[spec.type](d, _classification_section(cfg, spec), tokenizer, prep.train, prep.eval,
                                   seed_rejects=prep.rejects)
            t_rows, e_rows, t_rej = rows.train, rows.eval, rows.rejects
            info.labels[name], info.label_counts[name] = rows.labels, rows.label_counts
            if spec.type == "generative_classification":
                info.eval_prompts[name] = rows.eval_prompts
            summary = {"type": spec.type, "train_samples": len(rows.train), "eval_samples": len(rows.eval),
                       "labels": rows.label_counts}
        if not t_rows:
            if run is not None and is_main:  # the error points at this file: write every reject so far first
                write_rejects(rejects + t_rej, run.rejects_file, replace=True)
            raise UserError(f"tasks.{name}: no usable training row ({len(t_rej)} rejected: {summarize_rejects(t_rej)}). "
                            f"See the reasons in {run.rejects_file if run else 'the rejects file'}")
        info.train_of.append(tuple(range(len(train), len(train) + len(t_rows))))
        train += [dataclasses.replace(r, groups=(k,)) for r in t_rows]
        evals += [dataclasses.replace(r, groups=(k,)) for r in e_rows]
        info.eval_counts.append(float(len(e_rows)) if spec.type == "classification"
                                else float(sum(r.target_weight for r in e_rows)))
        rejects += t_rej
        per_task[name] = {**summary, "train_rows": len(t_rows), "eval_rows": len(e_rows), "rejected": len(t_rej)}
    info.eval_rows = len(evals)
    summary = {"task": "multitask", "files": files, "eval_files": eval_files, "tasks": per_task,
               "train_rows": len(train), "eval_rows": len(evals), "train_samples": len(train),
               "eval_samples": len(evals), "train_tokens": sum(len(r) for r in train),
               "train_target_tokens": sum(r.n_targets for r in train),
               "rejected": len(rejects), "rejected_by_reason": summarize_rejects(rejects)}
    if run is not None and is_main:
        if rejects or run.rejects_file.exists():  # anew: a resumed run makes the same ones again
            write_rejects(rejects, run.rejects_file, replace=True)
        run.write_json("data.json", summary)
    if is_main:
        shown = ", ".join(f"{t} ({v['type']}): {v['train_rows']} train / {v['eval_rows']} eval" for t, v in per_task.items())
        console.print(f"data (multitask): {shown}" + (f"; [yellow]{len(rejects)} rejected[/]" if rejects else ""))
    return PreparedData(train, evals, summary, tuple(names), None, task=info)


def _apply_head_method(lm, cfg):
    """``method: head`` on a multi-task model: the LM frozen, its top ``unfreeze_top`` blocks (+ final norm) trained."""
    for p in lm.parameters():
        p.requires_grad_(False)
    if cfg.unfreeze_top:
        decoder = lm.get_decoder()
        blocks = decoder.layers
        if cfg.unfreeze_top > len(blocks):
            raise UserError(f"method.unfreeze_top: the backbone has {len(blocks)} blocks (got {cfg.unfreeze_top}). "
                            f"Use at most {len(blocks)}")
        for block in list(blocks)[-cfg.unfreeze_top:]:
            block.requires_grad_(True)
        if getattr(decoder, "norm", None) is not None:
            decoder.norm.requires_grad_(True)
    return lm


def model_and_loss(cfg, data, dtype: torch.dtype, tokenizer):
    """(MultiTaskModel, MultiTaskLoss, eval-metrics callable) with the method applied to the shared LM."""
    info: MultiTaskRows = data.task
    method = methods.get(cfg.method.name)
    lm = load_model(cfg.model.path, dtype=dtype, **methods.load_options(cfg.method, dtype))
    head_cfg = cfg.method if methods.fact(cfg.method.name, "CLASS_HEAD") else None
    lm = _apply_head_method(lm, cfg.method) if head_cfg is not None else method.apply(lm, cfg.method)
    specs = {}
    for name in info.tasks:
        t = cfg.tasks[name]
        if t.type != "classification":
            continue
        layers, width, act, drop = t.head_layers, t.head_width, t.head_activation, t.head_dropout
        if head_cfg is not None and not t.head_layers:  # the head method's shape unless the task sets its own
            layers, width, act, drop = head_cfg.layers, head_cfg.width, head_cfg.activation, head_cfg.dropout
        specs[name] = ClassifierSpec(labels=info.labels[name], pooling="last" if t.pooling == "auto" else t.pooling,
                                     layers=layers, width=width, activation=act, dropout=drop,
                                     base_model=cfg.model.path)
    generative = {n: cfg.tasks[n].type for n in info.tasks if cfg.tasks[n].type != "classification"}
    model = MultiTaskModel(lm, specs, generative)
    model.heads.requires_grad_(True)
    weights = {n: class_weights(cfg.tasks[n].class_weights, info.labels[n], info.label_counts[n]) for n in specs}
    loss = MultiTaskLoss(model, info.tasks, info.kinds, [cfg.tasks[n].weight for n in info.tasks],
                         {n: info.labels[n] for n in specs}, weights, info.eval_counts, info.eval_rows)
    gens = {n: GenerativeEval(lm, tokenizer, info.eval_prompts[n], info.labels[n],
                              max_new_tokens=cfg.classification.max_new_tokens, batch_size=cfg.train.batch_size * 4)
            for n in info.eval_prompts if info.eval_prompts[n]}

    def eval_metrics(accelerator) -> dict[str, Any]:
        out = loss.take_metrics(accelerator)
        for n, gen in gens.items():
            out["tasks"].setdefault(n, {}).update(gen.run(accelerator)[0])
        return flatten_task_metrics(out["tasks"])

    return model, loss, eval_metrics


def flatten_task_metrics(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"tasks": {...}, "<task>/<metric>": v, ...}`` plus ``accuracy`` / ``macro_f1`` averaged over the
    classification tasks (the headline the loop prints and summary.json keeps)."""
    out: dict[str, Any] = {"tasks": per_task}
    for task, m in per_task.items():
        for key in ("eval_loss", "accuracy", "macro_f1"):
            if key in m:
                out[f"{task}/{key}"] = m[key]
    scored = [m for m in per_task.values() if "accuracy" in m]
    if scored:
        out["accuracy"] = sum(m["accuracy"] for m in scored) / len(scored)
        out["macro_f1"] = sum(m["macro_f1"] for m in scored) / len(scored)
    return out


def plan(cfg, data, world_size: int):
    t, s = cfg.train, cfg.task_sampling
    return TaskPlan(tuple(data.task.train_of), t.batch_size, t.grad_accum, world_size, t.seed, s.strategy, s.temperature)


def save(model, method, folder) -> None:
    """The shared LM as its method saves it (nothing for a frozen LM under ``method: head``) + the heads."""
    if getattr(method, "CLASS_HEAD", False):
        if any(p.requires_grad for p in model.lm.parameters()):
            model.lm.save_pretrained(folder, safe_serialization=True)
    else:
        method.save(model.lm, folder)
    save_heads(model, folder)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def config_problems(cfg) -> list[str]:
    """Cross-field rules of ``task: multitask`` (its task module's rules), worded with field paths."""
    p: list[str] = []
    d, tasks = cfg.data, cfg.tasks
    if not tasks:
        return ["task: multitask needs a `tasks` mapping (name -> {type: classification|sft|generative_classification})."]
    for name in tasks:
        if not _NAME.fullmatch(name):
            p.append(f"tasks.{name}: task names are letters, digits, '_', '.', '-'. Rename it.")
    for section, specs in (("data.train", d.train), ("data.eval", d.eval)):
        for i, spec in enumerate(specs):
            if spec.task is None:
                p.append(f"{section}.{i}.task: missing. Name the task of {spec.path} (one of: {', '.join(tasks)}).")
            elif spec.task not in tasks:
                p.append(f"{section}.{i}.task: unknown task {spec.task!r}. Choose one of: {', '.join(tasks)}.")
    used = {s.task for s in d.train}
    for name in tasks:
        if name not in used:
            p.append(f"tasks.{name}: no data.train entry has task: {name}. Add its training file or remove the task.")
    if d.packing:
        p.append("data.packing with task: multitask: classification rows are one example each. Set data.packing: false.")
    if d.sampler != "random":
        p.append("data.sampler with task: multitask: task_sampling chooses the rows of each step. Remove data.sampler.")
    if d.group_by_length:
        p.append("data.group_by_length with task: multitask is not supported. Remove it.")
    if not methods.fact(cfg.method.name, "CLASSIFICATION"):
        p.append(f"method {cfg.method.name} with task: multitask: virtual tokens are not fed to the task heads. "
                 "Use lora, qlora, dora, ia3, adapter, full, freeze or head.")
    generative = [n for n, t in tasks.items() if t.type != "classification"]
    if methods.fact(cfg.method.name, "CLASS_HEAD") and not cfg.method.unfreeze_top and generative:
        p.append(f"method head freezes the whole LM, so tasks {generative} would train nothing. Set "
                 "method.unfreeze_top >= 1, or use lora / full for runs with sft or generative tasks.")
    return p


class MultiTask:
    name = "multitask"
    causal_lm_rows = False  # classification rows among them: no fused kernels, no replay
    always_packed = False
    class_head = True
    labelled = True
    continual = False
    pair_metric = False
    shards = False  # several heads, steps training one of them: not tested under FSDP / ZeRO
    zero3 = False
    unused_parameters = True  # a step trains one task's head: the others get no gradient
    builds_without_data = False  # its heads come from the tasks' label sets

    def rules(self, cfg) -> list[str]:
        return config_problems(cfg)

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        return prepare(cfg, tokenizer, run, console, is_main)

    def model_and_loss(self, cfg, data, dtype: torch.dtype, tokenizer):
        return model_and_loss(cfg, data, dtype, tokenizer)

    def plan(self, cfg, data, processes: int, plan_: Plan) -> Plan:
        return plan(cfg, data, processes)

    def save(self, model, method, folder) -> None:
        save(model, method, folder)
