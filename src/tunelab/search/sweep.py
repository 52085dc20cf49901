"""``tunelab sweep CONFIG``: hyperparameter search over the training config.

Optuna does the search: samplers (``TPESampler``, ``RandomSampler``, ``GridSampler``), pruners
(``MedianPruner``, ``SuccessiveHalvingPruner``), the study storage (``RDBStorage``: a SQLite
file by default, or any database URL, so workers on several machines share one study), trial
heartbeats with ``RetryFailedTrialCallback`` (a killed worker's trial is marked failed and re-run
with its parameters) and parameter importances (``optuna.importance``). Our code maps sampled
values onto config paths, trains each trial with :func:`tunelab.train.recipe.fine_tune`
(reporting every evaluation to the pruner through its ``on_eval`` hook) and writes the outputs.

The sweep folder ``<run.output_dir>/<run.name>-sweep/`` holds ``sweep.yaml`` (the resolved
config the workers run), ``study.db`` (default storage), ``trials/trial-NNNN/`` (one run
directory per trial), ``trials.csv``, ``best.yaml`` (the best trial's config, ready for
``tunelab train``), ``history.png`` and ``importance.png``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from tunelab.config import TuneConfig, dump_config, load_config, set_path
from tunelab.errors import UserError, require
from tunelab.fsutil import atomic_write_bytes, atomic_write_text
from tunelab.methods import METHODS
from tunelab.report import plots
from tunelab.search.config import CategoricalParam, FloatParam, IntParam, SweepSection
from tunelab.train.run import make_folder

FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class SweepOutcome:
    """What :func:`sweep` returns (also written to the sweep folder)."""

    folder: Path
    storage: str
    study: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)


def sweep_folder(cfg: TuneConfig) -> Path:
    return Path(cfg.run.output_dir) / f"{cfg.run.name}-sweep"


def storage_url(cfg: TuneConfig) -> str:
    s = _section(cfg)
    return s.storage or f"sqlite:///{(sweep_folder(cfg) / 'study.db').resolve()}"


def _section(cfg: TuneConfig) -> SweepSection:
    if cfg.sweep is None:
        raise UserError("sweep: the config has no sweep: section. Add one with at least sweep.params (see docs/search.md)")
    return cfg.sweep


def direction(s: SweepSection) -> str:
    if s.objective.direction:
        return s.objective.direction
    metric = s.objective.metric.lower()
    return "minimize" if any(w in metric for w in ("loss", "perplexity", "ppl")) else "maximize"


# --------------------------------------------------------------------------- Optuna objects


def open_storage(url: str, s: SweepSection):
    """``RDBStorage`` with heartbeats: a trial whose worker died is failed, then retried with its params."""

    require("optuna", extra="sweep")  # every way into a study comes here first
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=s.heartbeat,
                                  grace_period=4 * s.heartbeat,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=s.max_retries))
        except (ImportError, ModuleNotFoundError) as err:
            raise UserError(f"sweep.storage {url.split('://')[0]}://...: the database driver is missing ({err}). "
                            "Install it, e.g. pip install psycopg2-binary for PostgreSQL") from None
        except Exception as err:  # sqlalchemy errors: unreachable server, bad credentials, a creation race
            if isinstance(err, optuna.exceptions.OptunaError):
                raise
            if "IntegrityError" in type(err).__name__ and attempt < 5:
                time.sleep(0.5 + random.random())  # another worker is creating the tables right now
                continue
            raise UserError(f"sweep.storage: cannot open {_redact(url)} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}). Check the URL and that the server is up") from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    head, sep, tail = url.partition("://")
    if "@" in tail:
        tail = "***@" + tail.split("@", 1)[1]
    return head + sep + tail


def make_sampler(s: SweepSection):
    import optuna

    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(s), seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials)


def grid_space(s: SweepSection) -> dict[str, list]:
    space: dict[str, list] = {}
    for path, d in s.params.items():
        if isinstance(d, CategoricalParam):
            space[path] = list(d.choices)
        elif isinstance(d, IntParam):
            space[path] = list(range(d.low, d.high + 1, d.step))
        else:
            space[path] = list(d.grid or [])
    return space


def make_pruner(s: SweepSection, eval_every: int):
    """Pruning starts after ``warmup_evals`` evaluations of a trial (reports are made at optimiser steps)."""
    import optuna

    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials,
                                           n_warmup_steps=s.warmup_evals * max(eval_every, 1))
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(reduction_factor=s.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig):
    import optuna

    s = _section(cfg)
    make_folder(sweep_folder(cfg), "run.output_dir")  # the default storage's file and the trials live here
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=s.study or cfg.run.name, storage=open_storage(storage_url(cfg), s),
                               sampler=make_sampler(s), pruner=make_pruner(s, cfg.train.eval_every), direction=direction(s), load_if_exists=True)


# --------------------------------------------------------------------------- one trial


def suggest(trial, s: SweepSection, base_method: str) -> dict[str, Any]:
    """Draw every parameter (``method.name`` first; method fields only where the chosen method has them)."""

    order = sorted(s.params, key=lambda p: p != "method.name")
    values: dict[str, Any] = {}
    method = base_method
    for path in order:
        d = s.params[path]
        if path.startswith("method.") and path != "method.name" and path[7:] not in METHODS[method].Config.model_fields:
            continue  # conditional: this method has no such option
        if isinstance(d, CategoricalParam):
            values[path] = trial.suggest_categorical(path, d.choices)
        elif isinstance(d, IntParam):
            values[path] = trial.suggest_int(path, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, FloatParam) and s.sampler == "grid":
            values[path] = trial.suggest_categorical(path, d.grid)
        else:
            values[path] = trial.suggest_float(path, d.low, d.high, log=d.type == "log_float", step=d.step)
        if path == "method.name":
            method = values[path]
    return values


def apply_params(cfg: TuneConfig, params: dict[str, Any], *, name: str | None = None,
                 output_dir: str | None = None) -> TuneConfig:
    """A copy of ``cfg`` with ``params`` set at their dotted paths, validated; no ``sweep:`` section."""

    raw = cfg.model_dump(mode="json", exclude={"sweep"})
    new_method = params.get("method.name")
    if new_method and new_method != raw["method"]["name"]:  # keep the options the new method also has
        fields = METHODS[new_method].Config.model_fields
        raw["method"] = {k: v for k, v in raw["method"].items() if k in fields} | {"name": new_method}
    raw = copy.deepcopy(raw)
    for path, value in params.items():
        set_path(raw, path, value)
    if name is not None:
        raw["run"]["name"] = name
    if output_dir is not None:
        raw["run"]["output_dir"] = output_dir
    return load_config(None, base=raw)[0]


def _metric_value(metric: str, history: list[dict], run_dir: Path, reduce: str, minimize: bool) -> float | None:
    if "." in metric:  # <source>.<metric> from the eval: section's results
        source, key = metric.split(".", 1)
        path = run_dir / "eval" / f"{source}.json"
        if not path.is_file():
            raise UserError(f"sweep.objective.metric {metric}: {path} was not written. Add data named {source!r} "
                            "to the eval: section, or use a loop metric such as eval_loss")
        systems = json.loads(path.read_text())["systems"]
        metrics = (systems.get("tuned") or next(iter(systems.values())))["metrics"]
        if key not in metrics:
            raise UserError(f"sweep.objective.metric {metric}: {path} has no {key!r}. It has: {', '.join(metrics)}")
        return float(metrics[key])
    values = [h[metric] for h in history if h.get(metric) is not None]
    if not values:
        return None
    if reduce == "last":
        return float(values[-1])
    return float(min(values) if minimize else max(values))


class _Objective:
    """Optuna's objective: sample, train one trial run, report evaluations, return the metric."""

    def __init__(self, cfg: TuneConfig, console: Console):
        self.cfg, self.s, self.console = cfg, _section(cfg), console
        self.trials_dir = sweep_folder(cfg) / "trials"

    def __call__(self, trial) -> float:
        import optuna

        from tunelab.train.recipe import fine_tune

        t0 = time.perf_counter()
        params = suggest(trial, self.s, self.cfg.method.name)
        name = f"trial-{trial.number:04d}"
        trial_cfg = apply_params(self.cfg, params, name=name, output_dir=str(self.trials_dir))
        trial.set_user_attr("run_dir", str(trial_cfg.run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        metric, minimize = self.s.objective.metric, direction(self.s) == "minimize"
        history: list[dict] = []

        def on_eval(step: int, metrics: dict) -> None:
            history.append({"step": step, **metrics})
            value = metrics.get(metric)
            if value is None or "." in metric:
                return
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {step}: {metric} {value:.4f}")

        quiet = Console(file=io.StringIO(), width=120)
        try:
            fine_tune(trial_cfg, {}, console=quiet, on_eval=on_eval)
        except optuna.TrialPruned:
            self._line(trial.number, params, history[-1].get(metric) if history else None, "pruned", t0)
            raise
        value = _metric_value(metric, history, trial_cfg.run_dir, self.s.objective.reduce, minimize)
        if value is None:
            raise UserError(f"sweep.objective.metric {metric}: trial {trial.number} reported no such metric "
                            f"(it reported: {', '.join(history[-1]) if history else 'no evaluation'}). "
                            "Use eval_loss, or accuracy / macro_f1 for classification tasks")
        self._line(trial.number, params, value, "complete", t0)
        return value

    def _line(self, number: int, params: dict, value, state: str, t0: float) -> None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        val = f"{value:.4f}" if isinstance(value, int | float) else "-"
        self.console.print(f"trial {number}: {state}, {self.s.objective.metric} {val} ({shown}) "
                           f"in {time.perf_counter() - t0:.1f} s")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- workers


def _counts(study) -> tuple[int, int]:
    """(finished trials, running trials) in the storage."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return len(trials) - running, running


def _fail_stale(study) -> None:

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_worker(cfg: TuneConfig, console: Console) -> int:
    """Train trials until the study has ``sweep.trials`` finished (or running) trials or the time is up.

    Trials are claimed from the shared storage one at a time (``study.optimize(n_trials=1)``), so
    any number of these loops, on any machines, share one study.
    """
    s = _section(cfg)
    study = open_study(cfg)
    objective = _Objective(cfg, console)
    deadline = time.monotonic() + s.timeout if s.timeout else None
    done = 0
    while True:
        _fail_stale(study)  # a dead worker's trial: failed, and re-queued with its parameters
        finished, running = _counts(study)
        if finished + running >= s.trials or (deadline is not None and time.monotonic() >= deadline):
            break
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True)
        done += 1
    return done


def sweep(cfg: TuneConfig, console: Console | None = None, *, workers: int | None = None) -> SweepOutcome:
    """Run the sweep (``workers`` processes, default ``sweep.workers``) and write its outputs."""
    console = console or Console()
    require("optuna", extra="sweep")  # both before the first trial, not after the last
    require("matplotlib", extra="sweep", verb="tunelab sweep")
    s = _section(cfg)
    make_folder(sweep_folder(cfg), "run.output_dir")  # a file in the way: a one-line error
    workers = workers or s.workers
    url = storage_url(cfg)
    console.print(f"sweep {s.study or cfg.run.name}: {len(s.params)} parameters, sampler {s.sampler}, pruner "
                  f"{s.pruner}, {direction(s)} {s.objective.metric}, {s.trials} trials, {workers} worker(s); "
                  f"storage {_redact(url)}")
    open_study(cfg)  # creates the study (and the tables) once, before workers race to
    if workers == 1:
        run_worker(cfg, console)
    else:
        _run_processes(cfg, workers, console)
    return write_outputs(cfg, console)


def _run_processes(cfg: TuneConfig, workers: int, console: Console) -> None:
    """``workers`` child processes, each ``tunelab sweep sweep.yaml --worker``, torch threads shared."""
    folder = sweep_folder(cfg)
    spec = folder / "sweep.yaml"
    atomic_write_text(spec, dump_config(cfg))
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "tunelab.cli", "sweep", str(spec), "--worker", "--set", f"train.threads={threads}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parents[2]),
                                                                    os.environ.get("PYTHONPATH", "")] if p)}
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise UserError(f"sweep: {sum(1 for c in codes if c)} of {workers} workers failed (exit codes {codes}); "
                        f"the study in {_redact(storage_url(cfg))} keeps every finished trial: run the sweep again to resume")


# --------------------------------------------------------------------------- outputs


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial; ``retry_of``: the trial a heartbeat-stale retry re-runs (Optuna's system attribute)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
                     "duration_s": round(duration, 2) if duration is not None else None,
                     "last_step": t.last_step, "run_dir": t.user_attrs.get("run_dir"),
                     "worker": t.user_attrs.get("worker"),
                     "retry_of": t.system_attrs.get("failed_trial")})
    return rows


def write_outputs(cfg: TuneConfig, console: Console) -> SweepOutcome:
    """``trials.csv``, the trial table, ``best.yaml`` and the plots, from the study in the storage."""
    from optuna.trial import TrialState

    s = _section(cfg)
    folder = sweep_folder(cfg)
    study = open_study(cfg)
    rows = trial_rows(study)
    names = list(s.params)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", s.objective.metric, "duration_s", *names, "run_dir", "worker"])
    for r in rows:
        w.writerow([r["number"], r["state"], r["value"], r["duration_s"], *[r["params"].get(n) for n in names],
                    r["run_dir"], r["worker"]])
    files = {"trials": str(folder / "trials.csv")}
    atomic_write_text(folder / "trials.csv", buf.getvalue())

    table = Table(title=f"sweep {study.study_name}: {direction(s)} {s.objective.metric}")
    for col in ("trial", "state", s.objective.metric, "seconds", *names):
        table.add_column(col)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best_number = study.best_trial.number if complete else None
    for r in rows:
        mark = " *" if r["number"] == best_number else ""
        table.add_row(f"{r['number']}{mark}", r["state"].lower(), f"{r['value']:.4f}" if r["value"] is not None else "-",
                      f"{r['duration_s']:.1f}" if r["duration_s"] is not None else "-",
                      *[_fmt(r["params"].get(n, "")) for n in names])
    console.print(table)

    best = None
    if complete:
        bt = study.best_trial
        best_cfg = apply_params(cfg, bt.params, name=f"{cfg.run.name}-best")
        header = (f"# best trial {bt.number} of sweep {study.study_name}: {s.objective.metric} = {bt.value:.6g}\n"
                  f"# params: {json.dumps(bt.params)}\n# run it: tunelab train {folder / 'best.yaml'}\n")
        atomic_write_text(folder / "best.yaml", header + yaml.safe_dump(best_cfg.model_dump(mode="json", exclude={"sweep"}),
                                                                       sort_keys=False, allow_unicode=True))
        files["best"] = str(folder / "best.yaml")
        best = {"number": bt.number, "value": bt.value, "params": bt.params}
        console.print(f"best: trial {bt.number}, {s.objective.metric} {bt.value:.4f} -> {folder / 'best.yaml'}")
    files.update(_plots(study, s, folder))
    atomic_write_text(folder / "sweep.json", json.dumps({"study": study.study_name, "storage": _redact(storage_url(cfg)),
                                                         "best": best, "trials": rows, "files": files},
                                                        indent=2, default=str) + "\n")
    return SweepOutcome(folder, storage_url(cfg), study.study_name, rows, best, files)


def _plots(study, s: SweepSection, folder: Path) -> dict[str, str]:
    """Optimisation history (each trial and the best so far) and parameter importances (fANOVA)."""
    import optuna
    from optuna.trial import TrialState

    plt = plots.pyplot(verb="tunelab sweep", extra="sweep")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return {}
    out: dict[str, str] = {}
    xs = [t.number for t in complete]
    ys = [t.value for t in complete]
    best, running = [], None
    for y in ys:
        running = y if running is None else (min(running, y) if direction(s) == "minimize" else max(running, y))
        best.append(running)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(xs, ys, "o", label="trial")
    ax.plot(xs, best, "-", label="best so far")
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if pruned:
        ax.plot([t.number for t in pruned], [t.last_step and t.intermediate_values[t.last_step] for t in pruned],
                "x", color="grey", label="pruned (last report)")
    ax.set_xlabel("trial")
    ax.set_ylabel(s.objective.metric)
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write_bytes(folder / "history.png", plots.to_png(fig))
    out["history"] = str(folder / "history.png")
    varied = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
    if len(complete) >= 2 and varied:
        try:
            importances = optuna.importance.get_param_importances(study, params=sorted(varied))
        except (RuntimeError, ValueError):  # e.g. a dynamic search space with too few common trials
            importances = {}
        if importances:
            atomic_write_bytes(folder / "importance.png", plots.bars({"importance": dict(importances)},
                                                                       title="parameter importances (fANOVA)",
                                                                       ylabel="share of variance"))
            atomic_write_text(folder / "importance.json", json.dumps(importances, indent=2) + "\n")
            out["importance"] = str(folder / "importance.png")
    return out
