"""Keep what the model knew: L2-SP, EWC and distillation wired into a run.

The maths (targets, anchors, penalties, the Fisher, the KL) lives in :mod:`tunelab.objectives.keep`
and :mod:`tunelab.objectives.distill`; this module builds them for a run from its config and
data: reference rows through the task's own data pipeline, the Fisher estimated (or read back on
resume), the teacher for distillation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab import tasks
from tunelab.data.formats import read_records
from tunelab.errors import UserError
from tunelab.objectives import distill as dist
from tunelab.objectives.keep import (
    FISHER_FILE,
    Anchor,
    KeepPenalty,
    Plain,
    base_shape,
    check_fisher,
    collect_targets,
    combine_fisher,
    estimate_fisher,
    load_fisher,
    save_fisher,
)
from tunelab.train.run import RunDir


@dataclass
class KeepSetup:
    """What :func:`build` hands the loop: the per-step penalty and the per-term metrics."""

    penalty: KeepPenalty | None
    distiller: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = dict(self.penalty.last) if self.penalty is not None else {}
        if self.distiller is not None:
            out.update(self.distiller.take_metrics())
        return out


def _labelled(specs, name: str) -> bool:
    """Whether reference files are classification rows (True) or instruction/chat rows (False)."""
    kinds = {s.path: read_records(s.path, format=s.format, columns=s.columns or None, limit=8).format == "classification"
             for s in specs}
    if len(set(kinds.values())) > 1:
        raise UserError(f"objectives.{name}.data: mixes classification files "
                        f"{[p for p, k in kinds.items() if k]} with instruction files "
                        f"{[p for p, k in kinds.items() if not k]}. Give one kind")
    return all(kinds.values())


def reference_rows(cfg, specs, tokenizer, run, console, is_main: bool, name: str, data) -> list:
    """Rows of reference files, read and tokenised like the training data (rejects in ``<run>/reference/<name>/``)."""
    task, as_task, update = tasks.get(cfg.task), None, {}
    if task.labelled and task.causal_lm_rows and not _labelled(specs, name):
        # General instruction data (alpaca, chat) keeps the model's general ability: it is a
        # reference for an answer-as-text task as it is, scored on its replies like SFT.
        as_task = "sft"
    elif task.labelled and isinstance(getattr(data.task, "labels", None), list):  # one label set (not multitask)
        update["classification"] = cfg.classification.model_copy(update={"labels": list(data.task.labels)})
    if is_main:
        console.print(f"reference data for objectives.{name}:")
    return tasks.build_rows(cfg, specs, tokenizer, sub_run(run, name), console, is_main,
                            field=f"objectives.{name}.data", task=as_task, update=update).train


def sub_run(run: RunDir | None, name: str) -> RunDir | None:
    """``<run>/reference/<name>/``: the rejects and ``data.json`` of further data files (reference, replay)."""
    if run is None:
        return None
    sub = RunDir(run.path / "reference" / name)
    sub.path.mkdir(parents=True, exist_ok=True)
    return sub


def build(cfg, *, model, loss_module, data, tokenizer, run, accelerator, console, scheduler, resumed: bool,
          precision: str) -> KeepSetup | None:
    """L2-SP, EWC and distillation as configured, for :func:`tunelab.train.recipe.fine_tune`.

    Runs after the method is applied and before ``accelerator.prepare`` and the training kernels (the
    Fisher's base-layer hooks need PEFT's own forward), i.e. on the weights the run
    starts from -- also in a resumed session, whose checkpoint the loop loads later -- so ``theta0``
    is the start of the run. The Fisher (and the distillation top-k cache) are written to the run
    and read back when resuming.
    """
    o = cfg.objectives
    if o.l2sp is None and o.ewc is None and o.distill is None:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = cfg.data.packing or tasks.get(cfg.task).always_packed
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if not getattr(model, "is_loaded_in_4bit", False):
        loss_module.to(accelerator.device)  # estimate on the training device (prepare would move it anyway)
    setup = KeepSetup(None)
    if o.l2sp is not None or o.ewc is not None:
        targets = collect_targets(model, skip=("score.",) if tasks.get(cfg.task).class_head else ())
        anchor, fisher = Anchor.capture(targets), None
        if o.ewc is not None:
            fisher, anchor = _run_fisher(cfg, targets, anchor, model=model, loss_module=loss_module, data=data,
                                         tokenizer=tokenizer, run=run, accelerator=accelerator, console=console,
                                         resumed=resumed, pad_id=pad_id, packed=packed)
        setup.penalty = KeepPenalty(targets, anchor, l2sp=o.l2sp.weight if o.l2sp else None,
                                    ewc=o.ewc.weight if o.ewc else None, fisher=fisher)
        setup.info["targets"] = len(targets)
        setup.info["anchored_values"] = sum(
            t.param.numel() if isinstance(t, Plain) else base_shape(t).numel() for t in targets)
    if o.distill is not None:
        d = o.distill
        head = loss_module.model.get_output_embeddings() if hasattr(loss_module.model, "get_output_embeddings") else None
        if head is not None and (getattr(head, "bias", None) is not None or loss_module.softcap):
            raise UserError("objectives.distill: this model's LM head has a bias or logit soft-capping, which the "
                            "chunked KL does not cover. Remove objectives.distill")
        adapters = dist.has_adapters(model)
        kind = d.teacher if d.teacher != "auto" else ("adapters_off" if adapters else "copy")
        if kind == "adapters_off" and not adapters:
            raise UserError(f"objectives.distill.teacher adapters_off: method {cfg.method.name} has no adapters to "
                            "switch off. Use teacher: copy (a frozen copy in memory) or cached (top-k on disk)")
        ref_rows = reference_rows(cfg, d.data, tokenizer, run, console, is_main, "distill", data) if d.data else None
        teacher, cache = None, None
        if kind == "copy":
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
            if precision == "bf16":
                teacher.to(torch.bfloat16)
            teacher.to(accelerator.device)
        elif kind == "cached":
            path = run.path / dist.CACHE_FILE
            build_cache = lambda write: dist.build_topk_cache(  # noqa: E731
                loss_module, ref_rows if ref_rows is not None else data.train, path=path, top_k=d.top_k,
                temperature=d.temperature, pad_id=pad_id, packed=packed, batch_size=cfg.train.batch_size,
                adapters_off=adapters, autocast=accelerator.autocast, console=console if is_main else None, write=write)
            cache = build_cache(True) if is_main else None
            accelerator.wait_for_everyone()
            if cache is None:
                cache = build_cache(False)
        distiller = dist.Distiller(d.weight, d.temperature, kind, teacher=teacher, cache=cache,
                                   chunk=getattr(loss_module, "chunk", 1024))
        setup.distiller = distiller
        setup.info["distill"] = {"teacher": kind, "on": "reference data" if ref_rows is not None else "training batches"}
        if ref_rows is not None:
            ref = dist.ReferenceKL(distiller, loss_module, ref_rows, batch_size=cfg.train.batch_size,
                                   seed=cfg.train.seed, pad_id=pad_id, packed=packed, scheduler=scheduler,
                                   rank=rank, world=world, autocast=accelerator.autocast, device=accelerator.device)
            if setup.penalty is None:
                setup.penalty = KeepPenalty([], Anchor({}))
            setup.penalty.extra["distill"] = ref
        else:
            loss_module.distill = distiller
    if is_main:
        parts = []
        if o.l2sp is not None:
            parts.append(f"l2sp (lambda {o.l2sp.weight:g})")
        if o.ewc is not None:
            parts.append(f"ewc (lambda {o.ewc.weight:g})")
        if o.distill is not None:
            info = setup.info["distill"]
            parts.append(f"distill (weight {o.distill.weight:g}, T {o.distill.temperature:g}, teacher {info['teacher']}, "
                         f"on {info['on']})")
        console.print("objectives: " + ", ".join(parts))
    return setup


def _run_fisher(cfg, targets, anchor: Anchor, *, model, loss_module, data, tokenizer, run, accelerator, console,
                resumed: bool, pad_id: int, packed: bool) -> tuple[dict[str, torch.Tensor], Anchor]:
    """The run's Fisher and anchor: read back on resume, reused from ``ewc.fisher``, or estimated
    (and combined online with ``ewc.fisher``); written to ``<run>/fisher.safetensors``."""
    e = cfg.objectives.ewc
    own = run.path / FISHER_FILE
    if resumed and own.is_file():
        fisher, saved, _ = load_fisher(own)
        check_fisher(fisher, targets, str(own))
        saved.check(targets, str(own))
        if accelerator.is_main_process:
            console.print(f"ewc: Fisher and anchor read back from {own}")
        return fisher, saved
    old = None
    if e.fisher:
        old, _, _ = load_fisher(Path(e.fisher))
        check_fisher(old, targets, f"objectives.ewc.fisher {e.fisher}")
    meta: dict[str, Any] = {"estimator": "sampled-label diagonal Fisher, per labelled token", "model": cfg.model.path,
                            "method": cfg.method.name, "task": cfg.task}
    if old is not None and not e.online:
        fisher = old
        meta.update(source=str(e.fisher), reused=True)
    else:
        rows = (reference_rows(cfg, e.data, tokenizer, run, console, accelerator.is_main_process, "ewc", data)
                if e.data else data.train)
        fisher = estimate_fisher(loss_module, rows, targets, samples=e.samples, pad_id=pad_id, packed=packed,
                                 seed=cfg.train.seed, autocast=accelerator.autocast, rank=accelerator.process_index,
                                 world=accelerator.num_processes,
                                 reduce=(lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None,
                                 console=console, device=accelerator.device)
        meta.update(samples=min(e.samples, len(rows)), data=[s.path for s in e.data] or "training data")
        if old is not None:
            fisher = combine_fisher(old, fisher, e.gamma)
            meta.update(online=True, gamma=e.gamma, previous=str(e.fisher))
    if accelerator.is_main_process:
        save_fisher(own, fisher, anchor, meta)
        console.print(f"ewc: Fisher of {len(fisher)} targets -> {own}")
    accelerator.wait_for_everyone()
    return fisher, anchor
