"""``fine_tune(config)``: data -> model -> method -> loop -> run directory.

The one entry function behind ``tunelab train``. Each phase calls one module; nothing here
knows how a method, a data format or the loop works inside.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tunelab import methods
from tunelab.config import TuneConfig, dump_config
from tunelab.data.batching import Plan, Row, rows_packed, rows_unpacked
from tunelab.errors import UserError
from tunelab.fsutil import atomic_folder, atomic_write_text
from tunelab.train import checkpoint as ckpt
from tunelab.train import launch
from tunelab.train.cpu_tuning import apply_cpu_tuning, default_threads, set_threads  # noqa: F401 (re-exported)
from tunelab.train.loop import LoopSetup, train_loop
from tunelab.train.precision import accelerate_mixed_precision, resolve_precision
from tunelab.train.run import RunDir, environment, peak_memory_mib
from tunelab.train.schedule import lr_factor, warmup_steps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, precision: str, method: str) -> str:
    """``model.dtype: auto``: frozen base weights in bf16 under bf16 autocast, else fp32 masters."""
    if requested != "auto":
        return requested
    return "bfloat16" if precision == "bf16" and method not in ("full", "freeze") else "float32"


@dataclass
class TrainOutcome:
    """What :func:`fine_tune` returns: the summary written to ``summary.json`` and the model."""

    summary: dict[str, Any]
    model: torch.nn.Module
    tokenizer: Any
    run_dir: Path


@dataclass
class PreparedData:
    train: list[Row]
    eval: list[Row]
    summary: dict[str, Any]
    datasets: tuple[str, ...] = ()  # names of mixed datasets (per-dataset losses)
    strata: tuple[int, ...] | None = None  # class per row for data.sampler
    task: Any = None  # tunelab.data.tasks.TaskRows for the tasks other than sft (labels, eval prompts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batch_threads(t, *, threads: int, device: torch.device, processes: int, model: torch.nn.Module,
                        loss_module: torch.nn.Module, kernels: list[str]) -> int:
    """How many micro-batches run at once (``train.micro_batch_threads``; :func:`tunelab.train.loop.train_loop`)
    for this model: :func:`concurrent_micro_batches` with the facts read from it."""
    params = list(model.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad) / max(1, sum(p.numel() for p in params))
    return concurrent_micro_batches(t, threads=threads, device=device.type, processes=processes, trained=trained,
                                    dropout=_has_dropout(model), distill=getattr(loss_module, "distill", None) is not None,
                                    kernels=bool(kernels))


def concurrent_micro_batches(t, *, threads: int, device: str, processes: int, trained: float, dropout: bool,
                             distill: bool, kernels: bool) -> int:
    """The rule behind ``train.micro_batch_threads`` (also used by the advisor's memory estimate).

    Threads help on CPU, where one process's Python work and small operators leave cores idle
    (2 one-thread workers against one 2-thread one, SmolLM2 LoRA benchmark: 667 -> 727 tokens/s,
    measured; more with the GIL switch interval of :class:`tunelab.train.loop._Workers`). Each
    in-flight micro-batch holds its own activations and gradients, so the default is on for
    adapter runs only (``trained``: the share of parameters trained).
    """
    blockers = [why for why, on in (
        ("a GPU", device != "cpu"),
        ("several processes", processes > 1),
        ("gradient checkpointing", t.gradient_checkpointing),
        ("train.compile", t.compile),
        ("distillation", distill),
        ("dropout (the threads would draw the masks in a varying order)", dropout),
    ) if on]
    if t.micro_batch_threads is not None:
        if t.micro_batch_threads > 1 and blockers:
            raise UserError(f"train.micro_batch_threads: {t.micro_batch_threads} runs micro-batches in threads of one "
                            f"CPU process, which does not apply with {blockers[0]}. Set train.micro_batch_threads: 1 "
                            f"or leave it out")
        return t.micro_batch_threads
    return 2 if not blockers and threads >= 2 and t.grad_accum >= 2 and kernels and trained <= 0.05 else 1


def _has_dropout(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
            or bool(getattr(config, "attention_dropout", 0.0)))


def prepare_data(cfg: TuneConfig, tokenizer, run: RunDir | None, console: Console, is_main: bool = True) -> PreparedData:
    """Read, split, tokenise and row the data; write rejects; summarise what happened."""
    from tunelab.data.cache import encode_records_cached
    from tunelab.data.formats import summarize_rejects, write_rejects
    from tunelab.data.workbench import prepare_records

    d = cfg.data
    if cfg.task == "multitask":  # per-task data, rows tagged with their task (train/multitask.py)
        from tunelab.train import multitask

        return multitask.prepare(cfg, tokenizer, run, console, is_main)
    prep = prepare_records(cfg, run, console, is_main)  # read + data.prepare steps (clean, split, mix, weights)
    train_records, eval_records, rejects = prep.train, prep.eval, prep.rejects
    files, eval_files = prep.files, prep.eval_files

    if cfg.task != "sft":  # pretrain, classification, generative classification: tunelab.data.tasks
        return _prepare_task_data(cfg, tokenizer, train_records, eval_records, rejects, files, eval_files, run,
                                  console, is_main)
    encode = dict(train_on=d.train_on, max_length=d.max_length, truncation=d.truncation, use_cache=d.cache)
    train_enc, tok_rejects, hit = encode_records_cached(train_records, tokenizer, **encode)
    eval_enc, eval_tok_rejects, _ = encode_records_cached(eval_records, tokenizer, **encode)
    rejects += tok_rejects + eval_tok_rejects
    if not train_enc:
        reasons = summarize_rejects(rejects)
        if run is not None and is_main and rejects:  # the error points at this file: write it first
            write_rejects(rejects, run.rejects_file)
        raise UserError(
            f"data.train: no usable training sample ({len(rejects)} rejected: {reasons}). "
            f"See the reasons in {run.rejects_file if run else 'the rejects file'}"
        )
    groups = prep.groups(train_enc)
    if d.packing:
        train_rows, eval_rows = rows_packed(train_enc, d.max_length, groups), rows_packed(eval_enc, d.max_length)
    else:
        train_rows, eval_rows = rows_unpacked(train_enc, groups), rows_unpacked(eval_enc)

    summary = {
        "files": files, "eval_files": eval_files,
        "train_samples": len(train_enc), "eval_samples": len(eval_enc),
        "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "train_tokens": sum(len(e.input_ids) for e in train_enc),
        "train_target_tokens": sum(r.n_targets for r in train_rows),
        "truncated": sum(1 for e in train_enc + eval_enc if e.truncated),
        "tokenized_from_cache": hit,
        "rejected": len(rejects), "rejected_by_reason": summarize_rejects(rejects),
        **({"prepare": prep.report} if prep.report else {}),
    }
    if run is not None and is_main:
        if rejects:
            write_rejects(rejects, run.rejects_file)
        run.write_json("data.json", summary)
    if is_main:
        msg = (f"data: {summary['train_samples']} train / {summary['eval_samples']} eval samples, "
               f"{summary['train_tokens']:,} train tokens in {summary['train_rows']} rows"
               + (" (tokenised data from the cache)" if hit else ""))
        if rejects:
            msg += f"; [yellow]{len(rejects)} rejected[/] {summary['rejected_by_reason']}"
            if run is not None:
                msg += f" -> {run.rejects_file}"
        console.print(msg)
    strata = prep.strata(train_enc) if d.sampler != "random" else None
    return PreparedData(train_rows, eval_rows, summary, prep.datasets, strata)


def _prepare_task_data(cfg: TuneConfig, tokenizer, train_records, eval_records, rejects, files, eval_files,
                       run: RunDir | None, console: Console, is_main: bool) -> PreparedData:
    """The rows of ``task: pretrain | classification | generative_classification`` (see data/tasks.py)."""
    from tunelab.data.formats import summarize_rejects, write_rejects
    from tunelab.data.tasks import task_rows

    rows = task_rows(cfg.task, cfg.data, cfg.classification, tokenizer, train_records, eval_records,
                     seed_rejects=rejects)
    if not rows.train:
        if run is not None and is_main and rows.rejects:  # the error points at this file: write it first
            write_rejects(rows.rejects, run.rejects_file)
        raise UserError(
            f"data.train: no usable training row for task {cfg.task} ({len(rows.rejects)} rejected: "
            f"{summarize_rejects(rows.rejects)}). See the reasons in {run.rejects_file if run else 'the rejects file'}"
        )
    summary = {"task": cfg.task, "files": files, "eval_files": eval_files, **rows.summary,
               "train_rows": len(rows.train), "eval_rows": len(rows.eval),
               "train_target_tokens": sum(r.n_targets for r in rows.train),
               "rejected": len(rows.rejects), "rejected_by_reason": summarize_rejects(rows.rejects)}
    if run is not None and is_main:
        if rows.rejects:
            write_rejects(rows.rejects, run.rejects_file)
        run.write_json("data.json", summary)
    if is_main:
        msg = (f"data ({cfg.task}): {summary['train_samples']} train / {summary['eval_samples']} eval samples, "
               f"{summary['train_tokens']:,} train tokens in {summary['train_rows']} rows")
        if rows.labels:
            msg += f"; {len(rows.labels)} labels"
        if rows.rejects:
            msg += f"; [yellow]{len(rows.rejects)} rejected[/] {summary['rejected_by_reason']}"
            if run is not None:
                msg += f" -> {run.rejects_file}"
        console.print(msg)
    return PreparedData(rows.train, rows.eval, summary, task=rows)


def _task_model_and_loss(cfg: TuneConfig, data: PreparedData, dtype: str, tokenizer):
    """(model, loss module, eval-metrics callable or None) for the task; the method is applied here."""
    from tunelab.objectives.causal_lm import CausalLMLoss

    method = methods.get(cfg.method.name)
    if cfg.task == "multitask":  # a shared LM + a head per classification task (train/multitask.py)
        from tunelab.train import multitask

        return multitask.model_and_loss(cfg, data, DTYPES[dtype], tokenizer)
    if cfg.task == "classification":
        from tunelab.data.tasks import class_weights
        from tunelab.models.classifier import build_classifier, unwrap
        from tunelab.objectives.classification import ClassificationLoss

        labels = data.task.labels
        if cfg.method.name == "head" and cfg.method.unfreeze_top and cfg.model.dtype == "auto":
            dtype = "float32"  # unfrozen blocks train in fp32 master weights
        model = build_classifier(cfg.model.path, labels, pooling=cfg.classification.pooling, dtype=DTYPES[dtype],
                                 **methods.load_options(cfg.method, DTYPES[dtype]))  # QLoRA: a 4-bit backbone
        model = method.apply(model, cfg.method)
        if not hasattr(model, "peft_config"):  # PEFT trains it via modules_to_save; other methods may freeze it
            unwrap(model).score.requires_grad_(True)  # the new head always trains
        weights = class_weights(cfg.classification.class_weights, labels, data.task.label_counts)
        loss = ClassificationLoss(model, labels, weights)
        return model, loss, lambda acc: loss.take_metrics(acc)
    from tunelab.models.load import load_model

    model = method.apply(load_model(cfg.model.path, dtype=DTYPES[dtype], **methods.load_options(cfg.method, DTYPES[dtype])),
                         cfg.method)
    if cfg.task == "generative_classification":
        from tunelab.objectives.classification import GenerativeEval

        gen = GenerativeEval(model, tokenizer, data.task.eval_prompts, data.task.labels,
                             max_new_tokens=cfg.classification.max_new_tokens, batch_size=cfg.train.batch_size * 4)
        return model, CausalLMLoss(model), lambda acc: gen.run(acc)[0]
    return model, CausalLMLoss(model), None


def kernels_apply(cfg: TuneConfig) -> bool:
    """Our training kernels (``train.fused_kernels``) assume right-padded or packed causal-LM rows and no
    virtual tokens (prefix / prompt / P-tuning / LLaMA-Adapter bring their own keys or masks)."""
    virtual = cfg.method.name in ("prefix", "prompt", "ptuning", "llama_adapter")
    return cfg.train.fused_kernels and cfg.task not in ("classification", "multitask") and not virtual


def _with_stock_code(model, kernels: list[str], fn, accelerator):
    """Run ``fn(accelerator)`` (e.g. generation at an evaluation) under the training precision, with the
    stock attention / PEFT code, then switch back."""
    from tunelab.kernels import restore_stock, use_training_kernels

    with accelerator.autocast():  # the training precision: bf16 frozen weights meet fp32 trained ones
        if not kernels:
            return fn(accelerator)
        restore_stock(model)
        try:
            return fn(accelerator)
        finally:
            use_training_kernels(model)


def build_optimizer(model: torch.nn.Module, cfg, lr_multiplier=None) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and norm weights (1-D tensors).

    Parameter groups per layer when ``cfg.layer_lr_decay`` is set (discriminative LRs), and per
    LR factor of the method (``lr_multiplier(name)``: LoRA+); see ``schedule.param_groups``.
    """
    from tunelab.train.schedule import num_layers, param_groups

    n_layers = num_layers(model) if cfg.layer_lr_decay is not None else 0
    groups = param_groups(model.named_parameters(), n_layers=n_layers, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          layer_decay=cfg.layer_lr_decay, multiplier=lr_multiplier)
    if not groups:
        raise UserError("method: no trainable parameter left after applying the method. Check method.* settings")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def weights_saver(model, tokenizer, cfg: TuneConfig):
    """A function writing the tuned weights + tokenizer + tunelab.json to a folder, atomically."""
    method = methods.get(cfg.method.name)

    def save(folder: Path) -> None:
        def fill(tmp: Path) -> None:
            from tunelab.kernels import restore_stock, use_training_kernels

            was_on = restore_stock(model)  # what we save must load and run with plain transformers / PEFT
            try:
                if cfg.task == "multitask":  # the shared LM by its method + heads.safetensors, multitask.json
                    from tunelab.train import multitask

                    multitask.save(model, method, tmp)
                else:
                    method.save(model, tmp)
            finally:
                if was_on:
                    use_training_kernels(model)
            tokenizer.save_pretrained(tmp)
            info = {"base_model": cfg.model.path, "method": cfg.method.name,
                    "run": cfg.run.name, "task": cfg.task, "method_config": cfg.method.model_dump(mode="json"),
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
            if cfg.task == "classification":  # labels, pooling and head shape for load_classifier
                from tunelab.models.classifier import write_spec

                write_spec(model, tmp)
            (tmp / "tunelab.json").write_text(json.dumps(info, indent=2))

        atomic_folder(folder, fill)

    return save


def fine_tune(cfg: TuneConfig, sources: dict[str, str] | None = None, *, resume: bool = False,
              console: Console | None = None, on_eval=None) -> TrainOutcome:
    """Train as configured; the summary is also written to ``<run>/summary.json``.

    ``on_eval(step, metrics)`` is called after every evaluation (sweeps report and prune there).
    """
    from accelerate import Accelerator

    from tunelab.data.templates import set_chat_template
    from tunelab.kernels import restore_stock, use_training_kernels
    from tunelab.models.load import describe_model, load_tokenizer

    console = console or Console()
    t = cfg.train
    if t.processes > 1 and not launch.launched():
        raise UserError(f"train.processes: {t.processes} processes are started by `tunelab train CONFIG`; this entry "
                        "point (the Python API, sweep, cv, continual) trains in one process. Run `tunelab train`, "
                        "or set train.processes: 1")
    if os.environ.get(launch.LAUNCHED_ENV):
        launch.check_devices(int(os.environ["WORLD_SIZE"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tuning = apply_cpu_tuning(t, device.type)  # threads, malloc (train.cpu_tuning); recorded in env.json
    threads = tuning["threads"]
    precision = resolve_precision(t.precision, device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps process-global state; a second fine_tune in the same Python process
        # (the Python API, sweeps, tests) may use another precision. Single-process only.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    from accelerate.utils import DistributedDataParallelKwargs

    # multitask: a step uses one task's head only, so DDP must accept parameters without a gradient
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.task == "multitask" else []
    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(precision), cpu=device.type == "cpu",
                              kwargs_handlers=ddp)
    is_main = accelerator.is_main_process

    # --- run directory ------------------------------------------------------------------
    run = RunDir(cfg.run_dir)
    if is_main:
        run = RunDir.create(cfg.run_dir, resume=resume)
        if not resume:
            atomic_write_text(run.path / "config.yaml", dump_config(cfg, sources))
            run.write_json("config.sources.json", sources or {})
    accelerator.wait_for_everyone()
    resume_from = None
    if resume:
        resume_from = ckpt.newest_valid(run.checkpoints,
                                        lambda msg: console.print(f"[yellow]{msg}[/]") if is_main else None)
        if resume_from is None and is_main:
            console.print("[yellow]no checkpoint yet: starting from step 0[/]")

    # --- data ---------------------------------------------------------------------------
    seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    template = set_chat_template(tokenizer, cfg.data.template)
    data = prepare_data(cfg, tokenizer, run, console, is_main)

    # --- model and method -----------------------------------------------------------------
    seed_everything(t.seed)  # the same initial adapter whatever the data did to the RNG
    dtype = resolve_dtype(cfg.model.dtype, precision, cfg.method.name)
    model, loss_module, eval_extra = _task_model_and_loss(cfg, data, dtype, tokenizer)
    for p in model.parameters():  # trained tensors keep fp32 masters whatever dtype the frozen base has
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    kernels = use_training_kernels(model, notify=console.print if is_main else None) if kernels_apply(cfg) else []
    if t.gradient_checkpointing:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info = describe_model(model)
    if is_main:
        console.print(
            f"model: {cfg.model.path}, method {cfg.method.name}: {info['trainable_parameters']:,} of "
            f"{info['parameters']:,} parameters trained ({info['trainable_percent']:.2f}%); precision {precision}, {accelerator.num_processes} "
            f"process(es) on {device.type}, {threads} threads"
        )
        run.write_json("env.json", {**environment(device.type, precision, accelerator.num_processes),
                                    "template": template, "dtype": dtype, "kernels": kernels, "cpu_tuning": tuning,
                                    "model": info})

    # --- optimiser, schedule, plan ----------------------------------------------------------
    lengths = tuple(len(r) for r in data.train) if cfg.data.group_by_length else None
    plan = Plan(len(data.train), t.batch_size, t.grad_accum, accelerator.num_processes, t.seed, lengths,
                cfg.data.sampler, data.strata)
    if cfg.task == "multitask":  # every optimiser step trains one task, sampled by task_sampling
        from tunelab.train import multitask

        plan = multitask.plan(cfg, data, accelerator.num_processes)
    if cfg.objectives.replay is not None:  # experience replay: exact replay rows in every step (data/replay.py)
        from tunelab.data.replay import with_replay

        data, plan = with_replay(cfg, tokenizer, data, plan, run if is_main else None, console, is_main)
    total_steps = t.max_steps or max(1, math.ceil((t.epochs or 1.0) * plan.steps_per_epoch))
    warm = warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio)
    optimizer = build_optimizer(model, t, methods.lr_multiplier(cfg.method))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup=warm, kind=t.schedule,
                                          stlr_cut_frac=t.stlr_cut_frac, stlr_ratio=t.stlr_ratio)
    )
    unfreezing = None
    if t.unfreeze is not None:
        from tunelab.train.schedule import GradualUnfreezing, num_layers

        u = t.unfreeze
        unfreezing = GradualUnfreezing(model.named_parameters(), n_layers=num_layers(model), every=u.every,
                                       unit=u.unit, group_size=u.group_size, start_groups=u.start_groups,
                                       steps_per_epoch=plan.steps_per_epoch)
    if t.compile:
        from tunelab.objectives.causal_lm import causal_lm_parts

        causal_lm_parts(model)[0].compile(dynamic=False)
    # --- keep what the model knew: L2-SP, EWC, distillation (objectives/keep.py, objectives/distill.py) ----
    from tunelab.objectives import keep as keep_objectives

    keep = keep_objectives.build(cfg, model=model, loss_module=loss_module, data=data, tokenizer=tokenizer, run=run,
                                 accelerator=accelerator, console=console, scheduler=scheduler,
                                 resumed=resume_from is not None, kernels=kernels, precision=precision)
    loss_model, optimizer = accelerator.prepare(loss_module, optimizer)

    tensorboard = None
    if t.tensorboard and is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard: the tensorboard package is not installed. pip install tensorboard") from None
        tensorboard = SummaryWriter(str(run.path / "tensorboard"))

    workers = micro_batch_threads(t, threads=threads, device=device, processes=accelerator.num_processes,
                                  model=model, loss_module=loss_module, kernels=kernels)
    if is_main and workers > 1:
        console.print(f"{workers} micro-batches at a time, {max(1, threads // workers)} thread(s) each "
                      f"(train.micro_batch_threads)")
    setup = LoopSetup(
        accelerator=accelerator, micro_batch_threads=workers, loss_model=loss_model, model=model, optimizer=optimizer, scheduler=scheduler,
        rows=data.train, eval_rows=data.eval, plan=plan, total_steps=total_steps,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        packed=cfg.data.packing or cfg.task == "pretrain", pad_to=cfg.data.max_length if (t.compile and cfg.data.packing) else None, cfg=t, run=run, save_weights=weights_saver(model, tokenizer, cfg),
        resume_from=resume_from, console=console, tensorboard=tensorboard, datasets=data.datasets,
        eval_extra=(lambda: _with_stock_code(model, kernels, eval_extra, accelerator)) if eval_extra is not None else None,
        before_update=unfreezing.drop_frozen_grads if unfreezing else None, on_eval=on_eval,
        penalty=keep.penalty if keep else None, step_metrics=keep.metrics if keep else None,
    )
    result = train_loop(setup)
    peaks = [peak_memory_mib()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        peaks = gather_object(peaks)
    result["peak_rss_mib"] = [p["rss"] for p in peaks]  # per process, training included, saving not
    if "gpu" in peaks[0]:
        result["peak_gpu_mib"] = [p["gpu"] for p in peaks]

    # --- final weights and summary ---------------------------------------------------------
    if is_main:
        setup.save_weights(run.final)
        summary = {**result, "run_dir": str(run.path), "total_steps": total_steps, "precision": precision,
                   "processes": accelerator.num_processes, "micro_batch_threads": workers, "data": data.summary}
        run.write_json("summary.json", summary)
        if tensorboard is not None:
            tensorboard.close()
        _print_summary(console, summary, run)
        from tunelab.eval.evaluate import after_training

        after_training(cfg.eval, run.path, console)
    else:
        summary = {**result}
    accelerator.wait_for_everyone()
    restore_stock(model)  # the returned model runs the stock code (generation, saving, a user's own use)
    return TrainOutcome(summary, model, tokenizer, run.path)


def _print_summary(console: Console, summary: dict[str, Any], run: RunDir) -> None:
    table = Table(title=f"run {run.path}", show_header=False)
    table.add_row("stopped", summary["stop_reason"])
    table.add_row("steps", f"{summary['step']} / {summary['total_steps']}")
    table.add_row("train time", f"{summary['train_seconds']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s)")
    if summary.get("best_eval_loss") is not None:
        table.add_row("best eval loss", f"{summary['best_eval_loss']:.4f}")
    if summary.get("eval_metrics", {}).get("accuracy") is not None:
        m = summary["eval_metrics"]
        table.add_row("eval accuracy / macro-F1", f"{m['accuracy']:.4f} / {m['macro_f1']:.4f} (step {m['step']})")
    for task, m in summary.get("eval_metrics", {}).get("tasks", {}).items():  # task: multitask
        table.add_row(f"task {task}", ", ".join(f"{k} {m[k]:.4f}" for k in ("eval_loss", "accuracy", "macro_f1") if k in m))
    if summary.get("skipped_steps"):
        table.add_row("skipped steps (non-finite)", str(summary["skipped_steps"]))
    for key, what in (("peak_rss_mib", "peak RSS"), ("peak_gpu_mib", "peak GPU memory")):
        if summary.get(key):
            per = summary[key]
            table.add_row(what, f"{sum(per):,.0f} MiB" + (f" ({' + '.join(f'{x:,.0f}' for x in per)} per process)"
                                                          if len(per) > 1 else ""))
    table.add_row("weights", str(run.final))
    console.print(table)
