"""``fine_tune(config)``: build -> loop -> save, the one entry function behind ``tunelab train``.

:func:`tunelab.train.build.build` turns the config into components; the loop
(:func:`tunelab.train.loop.train_loop`) gets them as values; the final weights, ``summary.json``
and the evaluations the config asks for close the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from rich.console import Console
from rich.table import Table

from tunelab import tasks
from tunelab.config import TuneConfig
from tunelab.errors import UserError
from tunelab.eval.after import after_training
from tunelab.kernels import TrainingKernels, training_kernels
from tunelab.train.build import Components, build, build_model, micro_batch_threads, weights_saver
from tunelab.train.build import build_optimizer as build_optimizer  # noqa: PLC0414 - the public API's name
from tunelab.train.loop import LoopSetup, train_loop
from tunelab.train.run import RunDir, peak_memory_mib


@dataclass
class TrainOutcome:
    """What :func:`fine_tune` returns: the summary written to ``summary.json`` and the model."""

    summary: dict[str, Any]
    model: torch.nn.Module
    tokenizer: Any
    run_dir: Path


def fine_tune(cfg: TuneConfig, sources: dict[str, str] | None = None, *, resume: bool = False,
              console: Console | None = None, on_eval=None) -> TrainOutcome:
    """Train as configured; the summary is also written to ``<run>/summary.json``.

    ``on_eval(step, metrics)`` is called after every evaluation (sweeps report and prune there).
    """
    console = console or Console()
    c = build(cfg, sources, resume=resume, console=console)
    is_main = c.accelerator.is_main_process
    # Our kernels run inside the loop only; the final save, evaluation and the returned model run the stock code.
    with training_kernels(c.model, c.kernels, notify=console.print if is_main else None) as kernels:
        setup = loop_setup(cfg, c, console, on_eval, kernels)
        if is_main:  # after the engine's prepare: what it chose there too (ZeRO-3's master weights)
            c.run.write_json("env.json", {**c.env, "distributed": c.engine.describe(), "kernels": kernels.active})
        result = train_loop(setup)
    result.update(peak_memory(c.accelerator))
    summary = dict(result)
    model = save_weights(cfg, c, setup.loss_model)(c.run.final)  # every process: a sharded model is gathered
    if is_main:
        summary = {**result, "run_dir": str(c.run.path), "total_steps": c.total_steps, "precision": c.precision,
                   "processes": c.accelerator.num_processes, "micro_batch_threads": setup.micro_batch_threads,
                   "data": c.data.summary}
        c.run.write_json("summary.json", summary)
        if setup.tensorboard is not None:
            setup.tensorboard.close()
        _print_summary(console, summary, c.run)
        after_training(cfg.eval, c.run.path, console)
    c.accelerator.wait_for_everyone()
    return TrainOutcome(summary, model, c.tokenizer, c.run.path)


def save_weights(cfg: TuneConfig, c: Components, loss_model, stock=None) -> Callable[[Path], torch.nn.Module]:
    """A function every process calls to write the tuned weights to a folder (rank 0 writes): the model as it is,
    or, under a sharded engine, its whole state gathered into an unsharded copy of the model (built once, on rank
    0), so ``final/`` and ``best/`` are the ordinary HF / PEFT layout. It returns the model written."""
    copy: list[torch.nn.Module] = []

    def save(folder: Path) -> torch.nn.Module:
        state = c.engine.full_state_dict(loss_model, c.model)  # collective under FSDP / ZeRO-3, else None
        model = c.model
        if c.accelerator.is_main_process:
            if state is not None:
                if not copy:
                    copy.append(build_model(cfg, c.data, c.env["dtype"], c.tokenizer)[0])
                copy[0].load_state_dict(state)
                model = copy[0]
            weights_saver(model, c.tokenizer, cfg, **({"stock": stock} if stock else {}))(folder)
        c.accelerator.wait_for_everyone()
        return model

    return save


def loop_setup(cfg: TuneConfig, c: Components, console: Console, on_eval, kernels: TrainingKernels) -> LoopSetup:
    """The loop's inputs, as values: the prepared model and optimiser, rows, plan, callbacks. ``kernels``: what
    :func:`tunelab.kernels.training_kernels` switched on; saving and generation inside the loop use its stock code."""
    t, tokenizer = cfg.train, c.tokenizer
    workers = micro_batch_threads(t, threads=c.threads, device=c.accelerator.device,
                                  processes=c.accelerator.num_processes, model=c.model, loss_module=c.loss_module,
                                  kernels=bool(kernels))
    if c.accelerator.is_main_process and workers > 1:
        console.print(f"{workers} micro-batches at a time, {max(1, c.threads // workers)} thread(s) each "
                      f"(train.micro_batch_threads)")
    loss_model, optimizer = c.engine.prepare(c.loss_module, c.optimizer)
    tensorboard = None
    if t.tensorboard and c.accelerator.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard: the tensorboard package is not installed. pip install tensorboard") from None
        tensorboard = SummaryWriter(str(c.run.path / "tensorboard"))
    eval_extra = c.eval_extra

    def eval_stock():  # e.g. generation at an evaluation: the training precision, the stock attention / PEFT code
        with c.accelerator.autocast(), kernels.stock(), c.engine.generation(loss_model):
            return eval_extra(c.accelerator)

    return LoopSetup(
        before_step=_step_statistics(c), step_metrics=_step_metrics(c),
        accelerator=c.accelerator, micro_batch_threads=workers, loss_model=loss_model, model=c.model,
        optimizer=optimizer, scheduler=c.scheduler, rows=c.data.train, eval_rows=c.data.eval, plan=c.plan,
        total_steps=c.total_steps,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        packed=cfg.data.packing or tasks.get(cfg.task).always_packed,
        pad_to=cfg.data.max_length if (t.compile and cfg.data.packing) else None, cfg=t, run=c.run,
        save_weights=save_weights(cfg, c, loss_model, kernels.stock), resume_from=c.resume_from, console=console,
        engine=c.engine,
        tensorboard=tensorboard, datasets=c.data.datasets,
        eval_extra=eval_stock if eval_extra else None,
        before_update=c.unfreezing.drop_frozen_grads if c.unfreezing else None, on_eval=on_eval,
        penalty=c.keep.penalty if c.keep else None,
    )


def _step_statistics(c: Components):
    """A loss that needs statistics of the whole step before its forwards (KTO's KL estimate over all
    micro-batches and processes): computed, summed over processes and handed back to it."""
    loss = c.loss_module
    if not getattr(loss, "needs_step_statistics", False):
        return None

    def before_step(batches):
        with c.accelerator.autocast():
            local = loss.step_statistics(batches).to(c.accelerator.device)
        loss.use_step_statistics(c.accelerator.reduce(local, "sum").cpu())

    return before_step


def _step_metrics(c: Components):
    """Each train record's extra values: the objectives' terms and the loss's own (preference rewards, summed
    over the processes: the loop calls this on every process)."""
    loss_metrics = getattr(c.loss_module, "take_train_metrics", None)
    parts = [f for f in (c.keep.metrics if c.keep else None,
                         (lambda: loss_metrics(c.accelerator)) if loss_metrics else None) if f]
    if not parts:
        return None
    return lambda: {k: v for f in parts for k, v in f().items()}


def peak_memory(accelerator) -> dict[str, list[float]]:
    """Peak memory of every process, training included, saving not."""
    peaks = [peak_memory_mib()]
    if accelerator.num_processes > 1:
        peaks = gather_object(peaks)
    out = {"peak_rss_mib": [p["rss"] for p in peaks]}
    if "gpu" in peaks[0]:
        out["peak_gpu_mib"] = [p["gpu"] for p in peaks]
    return out


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
