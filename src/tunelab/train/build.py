"""Build: a config becomes the components a run needs (model, loss, optimiser, scheduler, plan, penalties).

:func:`build` is what :func:`tunelab.train.recipe.fine_tune` runs before the loop; the smaller
builders are shared with the advisor (``search/advise.py``), which builds the same model, loss and
optimiser to measure them. Task-specific decisions come from the task registry
(:mod:`tunelab.tasks`), method-specific ones from the method registry (:mod:`tunelab.methods`).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list
from rich.console import Console

from tunelab import methods, tasks
from tunelab.config import TuneConfig, dump_config
from tunelab.data.batching import Plan
from tunelab.data.tasks import class_weights, row_class
from tunelab.data.templates import set_chat_template
from tunelab.errors import UserError
from tunelab.fsutil import atomic_folder, atomic_write_text
from tunelab.models import features as model_features
from tunelab.models.load import describe_model, load_tokenizer, portable_name
from tunelab.objectives.causal_lm import causal_lm_parts
from tunelab.tasks import PreparedData
from tunelab.train import checkpoint as ckpt
from tunelab.train import engines, launch
from tunelab.train import keep as keep_objectives
from tunelab.train.cpu_tuning import apply_cpu_tuning, default_threads, set_threads  # noqa: F401 (re-exported)
from tunelab.train.precision import accelerate_mixed_precision, resolve_precision, slow_bf16_warning
from tunelab.train.replay import with_replay
from tunelab.train.run import RunDir, environment
from tunelab.train.schedule import GradualUnfreezing, lr_factor, num_layers, param_groups, warmup_steps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, precision: str, method: str) -> str:
    """``model.dtype: auto``: frozen base weights in bf16 under bf16 autocast, else fp32 masters (a method that
    trains the base weights, ``TRAINS_BASE``)."""
    if requested != "auto":
        return requested
    return "bfloat16" if precision == "bf16" and not methods.fact(method, "TRAINS_BASE") else "float32"


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
                                    kernels=bool(kernels),
                                    adapters_off=getattr(getattr(loss_module, "reference", None), "kind", "") == "adapters_off")


def concurrent_micro_batches(t, *, threads: int, device: str, processes: int, trained: float, dropout: bool,
                             distill: bool, kernels: bool, adapters_off: bool = False) -> int:
    """The rule behind ``train.micro_batch_threads`` (also used by the advisor's memory estimate).

    Threads help on CPU, where one process's Python work and small operators leave cores idle
    (see docs/benchmarks.md). Each in-flight micro-batch holds its own activations and gradients,
    so the default is on for adapter runs only (``trained``: the share of parameters trained).
    """
    blockers = [why for why, on in (
        ("a GPU", device != "cpu"),
        ("several processes", processes > 1),
        ("gradient checkpointing", t.gradient_checkpointing),
        ("train.compile", t.compile),
        ("distillation", distill),
        # switching PEFT's adapters off and on (a preference reference) changes the model for every thread
        ("a reference model that is the same model with its adapters switched off", adapters_off),
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


def kernels_apply(cfg: TuneConfig) -> bool:
    """Our training kernels (``train.fused_kernels``) assume causal-LM rows (right-padded or packed) and a
    method without virtual tokens or adaption prompts: facts of the task and of the method."""
    # a sharded engine gathers a module's parameters in that module's own forward hooks, which a fused layer
    # (reading its projections' weights directly) would bypass under ZeRO-3
    return (cfg.train.fused_kernels and tasks.get(cfg.task).causal_lm_rows
            and methods.fact(cfg.method.name, "FUSED_KERNELS") and not cfg.train.sharded)


def build_model(cfg: TuneConfig, data: PreparedData, dtype: str, tokenizer):
    """(model, loss module, task metrics or None): the task's model with the method applied, trained tensors
    in fp32 masters, gradient checkpointing switched on if configured."""
    model, loss_module, eval_extra = tasks.get(cfg.task).model_and_loss(cfg, data, DTYPES[dtype], tokenizer)
    for p in model.parameters():  # trained tensors keep fp32 masters whatever dtype the frozen base has
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    if cfg.train.gradient_checkpointing:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, loss_module, eval_extra


def cached_features(cfg: TuneConfig, model: torch.nn.Module, data: PreparedData, pad_id: int, accelerator,
                    console: Console, is_main: bool) -> dict[str, Any] | None:
    """A frozen backbone's pooled features of every training and validation row, computed once (or read from
    the cache) and attached to the classifier (:mod:`tunelab.models.features`), when the method asks for them
    (``caches_features``) and nothing below the head trains; what happened (for ``env.json``), else None."""
    if not methods.caches_features(cfg.method) or cfg.train.unfreeze is not None or not model_features.applies(model):
        return None
    model.to(accelerator.device)
    info = model_features.attach(
        model, data.train + data.eval, pad_id=pad_id, batch_size=max(32, cfg.train.batch_size),
        settings={"pooling": model.spec.pooling, "max_length": cfg.data.max_length,
                  "precision": str(accelerator.mixed_precision)},
        autocast=accelerator.autocast, main_first=accelerator.main_process_first, console=console, is_main=is_main)
    if is_main:
        how = "read from the cache" if info["from_cache"] else f"computed in {info['seconds']:.1f} s"
        console.print(f"features: the frozen backbone's pooled features of {info['rows']:,} rows {how} "
                      f"({info['folder']}); the head trains on them")
    return info


def fit_without_loop(cfg: TuneConfig, model: torch.nn.Module, data: PreparedData) -> str | None:
    """The method's ``fit`` hook on the training rows' cached features (``head``'s ``fit: sklearn``), or None."""
    table = getattr(model, "features", None)
    if table is None:
        return methods.fit(cfg.method, model, None, [], n_classes=0)
    labels = data.task.labels
    index = [table.index[r.input_ids] for r in data.train]
    weights = [r.weights[0] if r.weights else 1.0 for r in data.train]
    return methods.fit(cfg.method, model, table.values[torch.tensor(index, device=table.values.device)],
                       [row_class(r) for r in data.train], n_classes=len(labels),
                       class_weight=class_weights(cfg.classification.class_weights, labels, data.task.label_counts),
                       sample_weight=weights if any(r.weights for r in data.train) else None)


def build_optimizer(model: torch.nn.Module, cfg, lr_multiplier=None, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and norm weights (1-D tensors).

    Parameter groups per layer when ``cfg.layer_lr_decay`` is set (discriminative LRs), and per
    LR factor of the method (``lr_multiplier(name)``: LoRA+); see ``schedule.param_groups``.

    ``fused``: torch's fused AdamW kernel (one pass over each parameter's weight, gradient and two
    moments) instead of the per-tensor loop torch uses on CPU by default: 2-4x faster steps
    (docs/benchmarks.md, "AdamW step"). The engine says whether it may (``fused_optimizer``: all of them
    now: DDP, FSDP2, DeepSpeed).
    """
    n_layers = num_layers(model) if cfg.layer_lr_decay is not None else 0
    groups = param_groups(model.named_parameters(), n_layers=n_layers, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          layer_decay=cfg.layer_lr_decay, multiplier=lr_multiplier)
    if not groups:
        raise UserError("method: no trainable parameter left after applying the method. Check method.* settings")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                          for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def build_schedule(cfg: TuneConfig, optimizer, plan) -> tuple[torch.optim.lr_scheduler.LRScheduler, int]:
    """The LR schedule over the run's optimiser steps, and their number."""
    t = cfg.train
    total_steps = t.max_steps or max(1, math.ceil((t.epochs or 1.0) * plan.steps_per_epoch))
    warm = warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup=warm, kind=t.schedule,
                                          stlr_cut_frac=t.stlr_cut_frac, stlr_ratio=t.stlr_ratio)
    )
    return scheduler, total_steps


def weights_saver(model, tokenizer, cfg: TuneConfig,
                  stock: Callable[[], AbstractContextManager] = nullcontext) -> Callable[[Path], None]:
    """A function writing the tuned weights + tokenizer + tunelab.json to a folder, atomically.

    ``stock``: inside the training loop, ``TrainingKernels.stock`` (what is saved must load and run with
    plain transformers / PEFT, so it is written with the stock code)."""
    method, task = methods.get(cfg.method.name), tasks.get(cfg.task)

    def save(folder: Path) -> None:
        def fill(tmp: Path) -> None:
            with stock():
                task.save(model, method, tmp)
            tokenizer.save_pretrained(tmp)
            base, base_path = portable_name(cfg.model.path)
            _portable_adapter_config(tmp, base)
            info = {"base_model": base, "base_model_path": base_path, "method": cfg.method.name,
                    "run": cfg.run.name, "task": cfg.task, "method_config": cfg.method.model_dump(mode="json"),
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
            (tmp / "tunelab.json").write_text(json.dumps(info, indent=2))

        atomic_folder(folder, fill)

    return save


def _portable_adapter_config(folder: Path, base: str) -> None:
    """PEFT writes the base's local folder (a cache path of this machine) into ``adapter_config.json``;
    vLLM, TGI and ``AutoPeftModel`` read it, so it names the base as another machine finds it (alias or
    hub id; ``tunelab.json`` keeps the local path as ``base_model_path``)."""
    config = folder / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = base
        config.write_text(json.dumps(data, indent=2, sort_keys=True))


def make_accelerator(cfg: TuneConfig, precision: str, device: torch.device) -> Accelerator:
    """accelerate's Accelerator for this run (DDP told about unused parameters where the task has them)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps process-global state; a second fine_tune in the same Python process
        # (the Python API, sweeps, tests) may use another precision. Single-process only.
        AcceleratorState._reset_state()
    ddp = ([DistributedDataParallelKwargs(find_unused_parameters=True)]
           if tasks.get(cfg.task).unused_parameters else [])
    return Accelerator(mixed_precision=accelerate_mixed_precision(precision), cpu=device.type == "cpu",
                       kwargs_handlers=ddp)


@dataclass
class Components:
    """Everything :func:`build` makes for a run; the loop gets the parts it needs as values."""

    accelerator: Any
    run: RunDir
    tokenizer: Any
    data: PreparedData
    model: torch.nn.Module
    loss_module: torch.nn.Module
    optimizer: Any
    scheduler: Any
    plan: Plan
    total_steps: int
    precision: str
    threads: int
    kernels: bool  # whether the training kernels apply; the loop switches them on (``kernels.training_kernels``)
    env: dict[str, Any]  # for env.json, written once the kernels' state is known
    resume_from: Path | None
    engine: Any = None  # train.distributed's engine (train/engines.py)
    eval_extra: Callable | None = None
    unfreezing: GradualUnfreezing | None = None
    keep: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def open_run(cfg: TuneConfig, sources, resume: bool, accelerator, console: Console) -> tuple[RunDir, Path | None]:
    """The run folder (new, or the one to resume) and the checkpoint to resume from."""
    is_main = accelerator.is_main_process
    run, refusal = RunDir(cfg.run_dir), [None]
    if is_main:
        try:
            run = RunDir.create(cfg.run_dir, resume=resume)
        except UserError as err:
            refusal = [str(err)]
        else:
            if not resume:
                atomic_write_text(run.path / "config.yaml", dump_config(cfg, sources))
                run.write_json("config.sources.json", sources or {})
    if accelerator.num_processes > 1:  # every rank stops on the main one's refusal (not at a broken barrier)
        broadcast_object_list(refusal)
    if refusal[0]:
        raise UserError(refusal[0])
    resume_from = None
    if resume:
        resume_from = ckpt.newest_valid(run.checkpoints,
                                        lambda msg: console.print(f"[yellow]{msg}[/]") if is_main else None)
        if resume_from is None and is_main:
            console.print("[yellow]no checkpoint yet: starting from step 0[/]")
    return run, resume_from


def build(cfg: TuneConfig, sources: dict[str, str] | None, *, resume: bool, console: Console) -> Components:
    """Config -> components: run folder, data, model with its method, optimiser, schedule, plan, penalties."""
    t, task = cfg.train, tasks.get(cfg.task)
    if t.processes > 1 and not launch.launched():
        raise UserError(f"train.processes: {t.processes} processes are started by `tunelab train CONFIG`; this entry "
                        "point (the Python API, sweep, cv, continual) trains in one process. Run `tunelab train`, "
                        "or set train.processes: 1")
    if os.environ.get(launch.LAUNCHED_ENV):
        launch.check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(t.precision, device)
    accelerator = make_accelerator(cfg, precision, device)
    engine = engines.make_engine(cfg, accelerator, precision)
    # threads, malloc (train.cpu_tuning; a sharded engine's malloc saves memory); recorded in env.json
    tuning = apply_cpu_tuning(t, device.type, sharded=engine.sharded)
    threads = tuning["threads"]
    is_main = accelerator.is_main_process
    if is_main and (slow := slow_bf16_warning(precision, device)):
        console.print(f"[yellow]{slow}[/]")
    run, resume_from = open_run(cfg, sources, resume, accelerator, console)

    seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    template = set_chat_template(tokenizer, cfg.data.template)
    data = tasks.prepare_data(cfg, tokenizer, run, console, is_main)

    seed_everything(t.seed)  # the same initial adapter whatever the data did to the RNG
    dtype = resolve_dtype(cfg.model.dtype, precision, cfg.method.name)
    model, loss_module, eval_extra = build_model(cfg, data, dtype, tokenizer)
    info = describe_model(model)
    if is_main:
        console.print(
            f"model: {cfg.model.path}, method {cfg.method.name}: {info['trainable_parameters']:,} of "
            f"{info['parameters']:,} parameters trained ({info['trainable_percent']:.2f}%); precision {precision}, "
            f"{accelerator.num_processes} process(es) on {device.type}, {threads} threads")
    env = {**environment(device.type, precision, accelerator.num_processes),
           "template": template, "dtype": dtype, "cpu_tuning": tuning, "model": info}

    lengths = tuple(len(r) for r in data.train) if cfg.data.group_by_length else None
    plan = task.plan(cfg, data, accelerator.num_processes,
                     Plan(len(data.train), t.batch_size, t.grad_accum, accelerator.num_processes, t.seed, lengths,
                          cfg.data.sampler, data.strata))
    if cfg.objectives.replay is not None:  # experience replay: exact replay rows in every step (data/replay.py)
        data, plan = with_replay(cfg, tokenizer, data, plan, run if is_main else None, console, is_main,
                                 task_facts=task)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cached = cached_features(cfg, model, data, pad_id, accelerator, console, is_main)
    if cached is not None:
        env["features"] = cached
    engine.shard(loss_module)  # FSDP2 replaces the parameters: the optimiser is built on the sharded ones
    env["distributed"] = engine.describe()  # after shard: it says what sharding chose (FSDP's reduce-scatter)
    optimizer = build_optimizer(model, t, methods.lr_multiplier(cfg.method), fused=engine.fused_optimizer)
    env["optimizer"] = {"name": t.optimizer, "fused": bool(optimizer.defaults.get("fused"))}
    scheduler, total_steps = build_schedule(cfg, optimizer, plan)
    fitted = fit_without_loop(cfg, model, data)
    if fitted is not None:  # the method fitted the trained weights itself: the loop runs no step
        env["fit"] = fitted
        total_steps = 0
        if is_main:
            console.print(f"method.fit: {fitted}; the training loop runs no step")
    unfreezing = None
    if t.unfreeze is not None:
        u = t.unfreeze
        unfreezing = GradualUnfreezing(model.named_parameters(), n_layers=num_layers(model), every=u.every,
                                       unit=u.unit, group_size=u.group_size, start_groups=u.start_groups,
                                       steps_per_epoch=plan.steps_per_epoch)
    if t.compile:
        causal_lm_parts(model)[0].compile(dynamic=False)
    # keep what the model knew: L2-SP, EWC, distillation (objectives/keep.py, objectives/distill.py)
    keep = keep_objectives.build(cfg, model=model, loss_module=loss_module, data=data, tokenizer=tokenizer, run=run,
                                 accelerator=accelerator, console=console, scheduler=scheduler,
                                 resumed=resume_from is not None, precision=precision)
    return Components(accelerator, run, tokenizer, data, model, loss_module, optimizer, scheduler, plan, total_steps,
                      precision, threads, kernels_apply(cfg), env, resume_from, engine, eval_extra, unfreezing, keep)
