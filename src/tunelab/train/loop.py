"""The training loop: one readable function on top of accelerate.

Invariants it keeps (each has a test):

* the loss of an optimiser step is the mean over the *labelled tokens of the whole step*
  (all micro-batches of all processes), so batch 8 = batch 2 x accumulation 4 = 2 processes
  x batch 4, and packed = unpacked;
* the data order is a pure function of (seed, step) (:class:`~tunelab.data.batching.Plan`), and
  checkpoints hold every other piece of state, so a run killed at any point and resumed ends
  with the same weights as one that never stopped (CPU, fp32);
* a step whose loss or gradient is not finite is skipped and counted; too many in a row stop
  the run with a usable checkpoint;
* micro-batches run in worker threads (``train.micro_batch_threads``, CPU) give the same step as
  one at a time: each computes its own gradients, added to ``.grad`` in micro-batch order.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunelab import metrics_log
from tunelab.config import TrainSection
from tunelab.data.batching import PAD_MULTIPLE, Plan, Row, collate
from tunelab.errors import UserError
from tunelab.objectives.output import uncounted
from tunelab.progress import progress_bar
from tunelab.train import checkpoint as ckpt
from tunelab.train import cpu_tuning as cpu_tuning_mod
from tunelab.train import step as step_fn
from tunelab.train.run import RunDir


class _StopRequest:
    """Ctrl-C takes effect at a step boundary only, in one process and in several.

    A ``KeyboardInterrupt`` raised wherever the signal lands could stop the run after
    ``optimizer.step()`` but before the step counter moves, and the checkpoint saved then would
    hold weights one update ahead of its step (resume would apply that update twice). With
    several processes it would also land on each rank at a different point, and the ranks would
    wait for each other forever. So the first SIGINT only marks the request; the step finishes
    (its evaluation and checkpoint too), one checkpoint is saved and the run stops. The ranks
    agree on the request through the step's loss all-reduce. A second SIGINT aborts at once,
    without saving: the last complete checkpoint stays the one to resume from.
    """

    def __init__(self, console: Console, announce: bool):
        # a run started with SIGINT ignored (`cmd &` in a script) keeps it ignored, as any program does
        self.active = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
        self.console, self.announce = console, announce
        self.asked = False
        self._old = None

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.announce:
            self.console.print("[yellow]Ctrl-C: stopping after this step with a checkpoint "
                               "(Ctrl-C again to stop now, without saving)[/]")

    def __enter__(self):
        if self.active:
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self._old)


@dataclass
class LoopSetup:
    """Everything the loop needs, built by :func:`tunelab.train.recipe.fine_tune`."""

    accelerator: Any
    loss_model: torch.nn.Module  # CausalLMLoss, prepared by accelerate (DDP-wrapped with >1 process)
    model: torch.nn.Module  # the tuned model itself (unwrapped), for checkpoints
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: list[Row]
    eval_rows: list[Row]
    plan: Plan
    total_steps: int
    pad_id: int
    packed: bool
    pad_to: int | None  # fixed row width (static shapes for torch.compile), or None
    cfg: TrainSection
    run: RunDir
    save_weights: Callable[[Path], None]  # writes the tuned model/adapter + tokenizer to a folder (called by every process)
    resume_from: Path | None = None
    console: Console = field(default_factory=Console)
    tensorboard: Any = None
    datasets: tuple[str, ...] = ()  # names of mixed training datasets: per-dataset losses in the metrics
    # task metrics at each evaluation (classification: accuracy, macro-F1), or None
    eval_extra: Callable[[], dict[str, Any]] | None = None
    before_update: Callable[[int], None] | None = None  # called with the step after backward (gradual unfreezing)
    # a regulariser added once per optimiser step (L2-SP, EWC): returns a scalar tensor with a graph to the
    # trained weights; its gradient adds to the step's gradient as is (it is not divided by the token count)
    penalty: Callable[[], torch.Tensor] | None = None
    # called after every evaluation with the step and the metrics (eval_loss, accuracy...): sweeps report
    # intermediate values there and may raise to prune the run
    on_eval: Callable[[int, dict[str, Any]], None] | None = None
    # extra values for each train record (objectives: per-term penalties, the distillation KL; a loss's own, such
    # as the preference pair metrics); called on every process at each train record, so it may all-reduce
    step_metrics: Callable[[], dict[str, float]] | None = None
    # micro-batches run at once in worker threads (one CPU process; tunelab.train.build.micro_batch_threads)
    micro_batch_threads: int = 1
    # called with this process's micro-batches of a step before their forwards (KTO's KL estimate over the step)
    before_step: Callable[[list[dict[str, torch.Tensor]]], None] | None = None
    # train.distributed's engine (train/engines.py): gradient sync, backward, update, sharded checkpoints
    engine: Any = None


def _micro_batch(s: LoopSetup, step: int, micro: int) -> dict[str, torch.Tensor]:
    idx = s.plan.micro_rows(step, micro, s.accelerator.process_index)
    batch = collate([s.rows[i] for i in idx], pad_id=s.pad_id, packed=s.packed, pad_to=s.pad_to,
                    multiple_of=PAD_MULTIPLE)
    return {k: v.to(s.accelerator.device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(s: LoopSetup) -> float | None:
    """Mean loss per labelled token over the validation rows (all processes)."""
    if not s.eval_rows:
        return None
    acc = s.accelerator
    s.loss_model.eval()
    mine = s.eval_rows[acc.process_index :: acc.num_processes]
    # every rank runs as many forwards as the rank with the most rows (the first): a sharded model's forward
    # is collective (FSDP gathers each layer), so a rank that stopped early would leave the others waiting
    batches = max(1, -(-len(s.eval_rows[:: acc.num_processes]) // s.cfg.batch_size))
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    with progress_bar("eval", len(mine), s.console, enabled=acc.is_main_process) as advance:
        for b in range(batches):
            rows = mine[b * s.cfg.batch_size : (b + 1) * s.cfg.batch_size]
            batch = collate(rows or s.eval_rows[:1], pad_id=s.pad_id, packed=s.packed, pad_to=s.pad_to,
                            multiple_of=PAD_MULTIPLE)
            with uncounted(s.loss_model) if not rows else nullcontext():  # a borrowed row counts on its own rank
                out = s.loss_model(**{k: v.to(acc.device) for k, v in batch.items()})
            if rows:
                total += torch.stack([out.total.double(), torch.as_tensor(out.count, device=acc.device).double()])
                advance(len(rows))
    total = acc.reduce(total, "sum")
    s.loss_model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def _save_checkpoint(s: LoopSetup, step: int, state: dict) -> None:
    acc = s.accelerator
    sharded = s.engine.sharded
    ckpt.save_checkpoint(
        s.run.checkpoints, step, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
        state={**state, "processes": acc.num_processes, "distributed": s.engine.name}, rank=acc.process_index,
        is_main=acc.is_main_process, barrier=acc.wait_for_everyone, limit=s.cfg.save_total_limit,
        shards=(lambda folder: s.engine.save_shards(folder, s.loss_model, s.optimizer)) if sharded else None,
    )


def _forward_backward(s: LoopSetup, step: int, scale: float, by_dataset: torch.Tensor | None,
                      pool: _Workers | None) -> tuple[torch.Tensor, float | None]:
    """Forward and backward of every micro-batch of optimiser step ``step``, the gradients summed into
    ``.grad``; returns the step's summed loss and the penalty's value (or None).

    ``scale`` turns a micro-batch's loss sum into its share of the step's objective. With ``pool``
    (worker threads), the micro-batches run at once, each computing its own gradients with
    ``torch.autograd.grad``, and they are added to ``.grad`` in micro-batch order: the order one
    process would have added them in, whichever thread finishes first.
    """
    acc, cfg = s.accelerator, s.cfg
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    penalty_value = None
    if s.before_step is not None:
        s.before_step([_micro_batch(s, step, micro) for micro in range(cfg.grad_accum)])

    def add_groups(groups: dict | None) -> None:
        for g, (g_sum, g_n) in (groups.items() if groups and by_dataset is not None else ()):
            by_dataset[g, 0] += g_sum
            by_dataset[g, 1] += g_n

    if pool is None:
        # DDP averages gradients over processes: `scale` holds the factor `world`, and the penalty is the
        # same on every process, so DDP's mean keeps it
        # (FSDP and ZeRO average too); the engine syncs the gradients after the last micro-batch (DDP: no_sync
        # for the others), or after each one (FSDP: no rank ever holds the whole gradient)
        return step_fn.accumulate(
            s.loss_model, lambda micro: _micro_batch(s, step, micro), cfg.grad_accum, scale=scale,
            backward=s.engine.backward, context=lambda last: s.engine.context(s.loss_model, last),
            penalty=s.penalty, on_groups=add_groups)

    params = [p for p in s.model.parameters() if p.requires_grad]

    def one(micro: int):
        out = s.loss_model(**_micro_batch(s, step, micro))
        return out.total.detach(), out.groups, torch.autograd.grad(out.total * scale, params, allow_unused=True)

    futures = [pool.submit(one, micro) for micro in range(cfg.grad_accum)]
    for future in futures:
        part, groups, grads = future.result()
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        add_groups(groups)
        loss_sum += part.double()
    if s.penalty is not None:
        penalty = s.penalty()
        penalty.backward()
        penalty_value = penalty.detach().item()
    return loss_sum, penalty_value


class _Workers:
    """Worker threads for :func:`_forward_backward`, each with its share of the intra-op threads.

    With ``train.cpu_tuning`` the GIL switch interval is shortened while they run
    (:func:`tunelab.train.cpu_tuning.shorten_switch_interval`).
    """

    def __init__(self, n: int, cpu_tuning: bool = True):
        self.threads = torch.get_num_threads()
        self.restore_switch_interval = cpu_tuning_mod.shorten_switch_interval(cpu_tuning)
        self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            n, thread_name_prefix="tunelab-micro", initializer=torch.set_num_threads,
            initargs=(max(1, self.threads // n),))

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        """Drop the queued micro-batches and wait for the running ones (before a checkpoint is written)."""
        if self.pool is None:
            return
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None
        torch.set_num_threads(self.threads)  # new threads start from the last value set anywhere in the process
        self.restore_switch_interval()


def _stop_workers(pool: _Workers | None) -> None:
    if pool is not None:
        pool.close()


def _start_state(s: LoopSetup) -> dict[str, Any]:
    """The loop's state: fresh, or restored from the checkpoint (with the metrics log cut back to it)."""
    acc = s.accelerator
    state = {"step": 0, "best_eval_loss": None, "evals_without_improvement": 0, "skipped_steps": 0,
             "nonfinite_in_a_row": 0, "tokens_seen": 0}
    if s.resume_from is not None:
        sharded = s.engine.sharded
        state.update(ckpt.load_checkpoint(
            s.resume_from, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler, rank=acc.process_index,
            shards=(lambda folder: s.engine.load_shards(folder, s.loss_model, s.optimizer)) if sharded else None,
            layout={"processes": acc.num_processes, "distributed": s.engine.name} if sharded else None))
        state.pop("processes", None)
        state.pop("distributed", None)
    if acc.is_main_process:  # the steps after the checkpoint are run again: their old records go
        metrics_log.truncate_after(s.run.metrics_file, state["step"])
        if s.resume_from is not None:
            s.run.log_metrics({"kind": "resume", "step": state["step"], "from": s.resume_from.name})
            s.console.print(f"resumed from [bold]{s.resume_from}[/] at step {state['step']}")
    return state


def _step_divisor(step_rows: list[Row]) -> float:
    """What the step's summed loss is divided by: its labelled tokens (the same on every process), the
    sum of their weights with sample weights (sum(w*ce)/sum(w)), or its units (preference pairs)."""
    if any(r.units is not None for r in step_rows):
        return max(1, sum(r.units or 0 for r in step_rows))
    if any(r.weights is not None for r in step_rows):
        return max(1e-12, sum(r.target_weight for r in step_rows))
    return max(1, sum(r.n_targets for r in step_rows))


def _log_train(s: LoopSetup, record: dict[str, Any]) -> None:
    s.run.log_metrics(record)
    if s.tensorboard is not None:
        s.tensorboard.add_scalar("train/loss", record["loss"], record["step"])
        s.tensorboard.add_scalar("train/lr", record["lr"], record["step"])


def _step_extras(s: LoopSetup, by_dataset: torch.Tensor | None, penalty_value: float | None,
                 finite: bool) -> dict[str, Any]:
    """The optional parts of a train record: per-dataset losses, the penalty, objective terms, a skip."""
    out: dict[str, Any] = {}
    for g, name in enumerate(s.datasets) if by_dataset is not None else ():
        if by_dataset[g, 1] > 0:
            out[f"loss/{name}"] = (by_dataset[g, 0] / by_dataset[g, 1]).item()
    if penalty_value is not None:
        out["penalty"] = penalty_value
    if s.step_metrics is not None:
        out.update(s.step_metrics())
    if not finite:
        out["skipped"] = "non-finite loss or gradient"
    return out


def train_loop(s: LoopSetup) -> dict[str, Any]:
    acc, cfg, plan = s.accelerator, s.cfg, s.plan
    world = acc.num_processes
    trainable = [p for p in s.model.parameters() if p.requires_grad]

    state = _start_state(s)
    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=s.console, disable=not acc.is_main_process, transient=False)
    task = progress.add_task("train", total=s.total_steps, completed=state["step"], loss="-", lr="-", tps="-")
    stop_reason = "completed"
    s.loss_model.train()
    t_start, tokens_window, t_window = time.perf_counter(), 0, time.perf_counter()
    start_step, tokens_at_start = state["step"], state["tokens_seen"]

    pool = _Workers(s.micro_batch_threads, s.cfg.cpu_tuning) if s.micro_batch_threads > 1 else None
    saved_at = None  # the step of the checkpoint written last in this session
    with progress, _StopRequest(s.console, acc.is_main_process) as stop:
        try:
            while state["step"] < s.total_steps:
                step = state["step"]
                # --- one optimiser step: the loss is a mean over the step's labelled tokens
                step_rows = [s.rows[i] for i in plan.step_rows(step)]
                n_targets = _step_divisor(step_rows)
                by_dataset = torch.zeros((len(s.datasets), 2), dtype=torch.float64, device=acc.device) if s.datasets else None
                step_tokens = sum(len(r) for r in step_rows)
                loss_sum, penalty_value = _forward_backward(s, step, world / n_targets, by_dataset, pool)
                # one all-reduce carries the step's loss and whether any rank was asked to stop
                totals = acc.reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(stop.asked))]), "sum")
                step_loss, stop_after_step = (totals[0] / n_targets).item(), totals[1].item() > 0
                if by_dataset is not None:
                    by_dataset = acc.reduce(by_dataset, "sum")

                # --- clip, check, update ------------------------------------------------
                if s.before_update is not None:
                    s.before_update(step)
                grad_norm, finite = s.engine.update(s.optimizer, trainable, loss=step_loss,
                                                    max_grad_norm=cfg.max_grad_norm)
                state["nonfinite_in_a_row"] = 0 if finite else state["nonfinite_in_a_row"] + 1
                state["skipped_steps"] += 0 if finite else 1
                lr = s.scheduler.get_last_lr()[0]
                s.scheduler.step()
                state["step"] = step = step + 1
                state["tokens_seen"] += step_tokens
                tokens_window += step_tokens

                # --- log --------------------------------------------------------------------
                now = time.perf_counter()
                tps = tokens_window / max(now - t_window, 1e-9)
                if step % cfg.log_every == 0 or step == s.total_steps or not finite:  # the same on every process
                    extras = _step_extras(s, by_dataset, penalty_value, finite)  # everywhere: it may all-reduce
                    if acc.is_main_process:
                        record = {"kind": "train", "step": step, "epoch": round(step / plan.steps_per_epoch, 4),
                                  "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                                  "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t_start, 2), **extras}
                        _log_train(s, record)
                        tokens_window, t_window = 0, now
                progress.update(task, completed=step, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                if state["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                    stop_reason = "diverged"
                    break

                # --- evaluate; early stopping; keep the best ---------------------------------
                if cfg.eval_every and step % cfg.eval_every == 0 and step < s.total_steps:
                    if _eval_and_track(s, state, step) == "early_stop":
                        stop_reason = "early_stopping"
                        break

                # --- checkpoint ---------------------------------------------------------------
                if cfg.save_every and step % cfg.save_every == 0 and step < s.total_steps:
                    _save_checkpoint(s, step, state)
                    saved_at = step
                # Ctrl-C: one process sees its own flag at once (it may have come during this step's
                # evaluation or checkpoint); several agree through the step's all-reduce above.
                if (stop_after_step or (world == 1 and stop.asked)) and step < s.total_steps:
                    _stop_workers(pool)
                    if saved_at != step:
                        _save_checkpoint(s, step, state)
                    raise UserError(
                        f"interrupted at step {step}: checkpoint saved in {s.run.checkpoints}. "
                        f"Continue with: tunelab train CONFIG --resume"
                    )
        except KeyboardInterrupt:  # a second Ctrl-C: mid-step, so nothing consistent to save
            _stop_workers(pool)
            raise UserError(f"interrupted twice at step {state['step']}: stopped without saving. Continue "
                            f"from the last checkpoint in {s.run.checkpoints} with: tunelab train CONFIG "
                            f"--resume") from None
        finally:
            _stop_workers(pool)

        _finish(s, state, stop_reason)  # inside the Ctrl-C guard: a Ctrl-C now lets it finish
    seconds = time.perf_counter() - t_start
    return {**state, "stop_reason": stop_reason, "train_seconds": round(seconds, 2),
            "steps_this_session": state["step"] - start_step,
            "tokens_per_s": round((state["tokens_seen"] - tokens_at_start) / max(seconds, 1e-9), 1)}


def _finish(s: LoopSetup, state: dict[str, Any], stop_reason: str) -> None:
    """The end of the run: a last evaluation and a last checkpoint; a diverged run says so."""
    if stop_reason == "completed" and s.eval_rows:
        _eval_and_track(s, state, state["step"])
    _save_checkpoint(s, state["step"], state)
    if stop_reason == "diverged":
        raise UserError(
            f"training diverged: {state['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
            f"(step {state['step']}); the last checkpoint is in {s.run.checkpoints}. Lower train.lr, set "
            f"train.max_grad_norm, or use train.precision=fp32")


def _eval_and_track(s: LoopSetup, state: dict, step: int) -> str | None:
    eval_loss = evaluate(s)
    if eval_loss is None:
        return None
    best = state["best_eval_loss"]
    improved = best is None or eval_loss < best
    if improved:
        state["best_eval_loss"], state["evals_without_improvement"] = eval_loss, 0
        s.save_weights(s.run.best)  # on every process: a sharded model is gathered first (rank 0 writes)
        if s.accelerator.is_main_process:
            s.run.write_json("best.json", {"step": step, "eval_loss": eval_loss})
    else:
        state["evals_without_improvement"] += 1
    extra = s.eval_extra() if s.eval_extra is not None else {}
    if extra:
        state["eval_metrics"] = {"step": step, **extra}
    if s.accelerator.is_main_process:
        s.run.log_metrics({"kind": "eval", "step": step, "eval_loss": eval_loss, "best": improved, **extra})
        if s.tensorboard is not None:
            s.tensorboard.add_scalar("eval/loss", eval_loss, step)
            for key in ("accuracy", "macro_f1", "pair_accuracy", "margin"):
                if key in extra:
                    s.tensorboard.add_scalar(f"eval/{key}", extra[key], step)
        shown = "".join(f", {k} {extra[k]:.4f}" for k in ("accuracy", "macro_f1", "pair_accuracy", "margin")
                        if k in extra)
        s.console.print(f"step {step}: eval loss {eval_loss:.4f}{shown}" + (" (best)" if improved else ""))
    s.accelerator.wait_for_everyone()
    if s.on_eval is not None:
        s.on_eval(step, {"eval_loss": eval_loss, **extra})
    patience = s.cfg.early_stopping_patience
    if patience is not None and state["evals_without_improvement"] >= patience:
        return "early_stop"
    return None
