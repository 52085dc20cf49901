"""The ``sweep:`` config section (strict, like every section): what ``tunelab sweep`` searches.

It lives in the training YAML, so one file runs both ``tunelab train`` (which ignores it) and
``tunelab sweep``. ``params`` maps dotted config paths (``train.lr``, ``method.r``) to
distributions; :func:`sweep_problems` checks every path against the resolved config.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FloatParam(_Strict):
    """A float drawn uniformly from [low, high] (``log: true`` or ``type: log_float``: log-uniformly)."""

    type: Literal["float", "log_float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0, description="Quantisation step (not with a log scale).")
    grid: list[float] | None = Field(None, min_length=1, description="sampler grid: the values to try.")


class IntParam(_Strict):
    """An integer in [low, high] (inclusive), every ``step``; ``log: true`` samples log-uniformly."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False


class CategoricalParam(_Strict):
    """One of ``choices`` (numbers, strings, booleans or null)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(..., min_length=1)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class ObjectiveSettings(_Strict):
    """The value a trial is scored by."""

    metric: str = Field(
        "eval_loss",
        description="A metric the training loop evaluates (eval_loss; accuracy, macro_f1 for classification tasks), "
        "or <source>.<metric> from the eval: section's results (<run>/eval/<source>.json, e.g. val.f1).",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize for losses and perplexities, maximize for everything else."
    )
    reduce: Literal["best", "last"] = Field(
        "best", description="Loop metrics: the best value over the trial's evaluations, or the last one."
    )


class SweepSection(_Strict):
    """Hyperparameter search (``tunelab sweep``): distributions, sampler, pruner, objective, budget, storage."""

    params: dict[str, Param] = Field(
        ..., min_length=1, description="Config path -> distribution, e.g. {train.lr: {type: log_float, low: 1e-5, "
        "high: 1e-3}, method.r: {type: categorical, choices: [4, 8, 16]}}.",
    )
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe: Optuna's Bayesian TPE; random; grid: every combination (categorical / int / grid values).")
    pruner: Literal["none", "median", "successive_halving"] = Field(
        "median", description="Stop unpromising trials at an intermediate evaluation (needs train.eval_every > 0).")
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    trials: int = Field(20, ge=1, description="Finished trials (complete or pruned) the study stops at, across all workers.")
    timeout: float | None = Field(None, gt=0, description="Seconds after which a worker starts no new trial.")
    workers: int = Field(1, ge=1, description="Worker processes started by this command (each trains one trial at a time).")
    storage: str | None = Field(
        None, description="An Optuna database URL shared by workers (postgresql://..., mysql://..., sqlite:///...). "
        "Default: sqlite file study.db in the sweep folder, so an interrupted sweep resumes.")
    study: str | None = Field(None, description="Study name in the storage (default: run.name).")
    seed: int = Field(0, description="Sampler seed.")
    startup_trials: int = Field(5, ge=0, description="TPE random trials before modelling; median pruner: trials before pruning.")
    warmup_evals: int = Field(1, ge=0, description="median pruner: evaluations of a trial before it can be pruned.")
    reduction_factor: int = Field(3, ge=2, description="successive_halving: keep 1/reduction_factor of trials per rung.")
    heartbeat: int = Field(
        30, ge=1, description="Seconds between a running trial's heartbeats; a trial silent for 4 heartbeats "
        "(a killed worker) is marked failed and re-run once.")
    max_retries: int = Field(1, ge=0, description="Re-runs of a failed trial (its parameters are kept).")


def sweep_problems(section: SweepSection, resolved: dict[str, Any], method_fields: dict[str, set[str]]) -> list[str]:
    """Problems of the ``sweep:`` section against the resolved config (flattened ``path -> value``).

    A path must name a leaf of the resolved config, or a field of a method that a ``method.name``
    choice selects (``method_fields``: method -> its fields).
    """
    problems: list[str] = []
    names = {str(c) for c in getattr(section.params.get("method.name"), "choices", [])} | {
        str(resolved.get("method.name"))}
    allowed_method = {f"method.{f}" for n in names for f in method_fields.get(n, set())}
    for path, dist in section.params.items():
        if path.startswith("sweep."):
            problems.append(f"sweep.params.{path}: a sweep cannot search its own settings. Remove it")
            continue
        if path not in resolved and path not in allowed_method:
            known = list(resolved) + sorted(allowed_method)
            parent = path.rpartition(".")[0]
            siblings = [k for k in known if k.rpartition(".")[0] == parent]
            guess = difflib.get_close_matches(path, siblings, n=1) or difflib.get_close_matches(path, known, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else "use a dotted path of the config such as train.lr"
            problems.append(f"sweep.params.{path}: no such config path. {hint}")
            continue
        if isinstance(dist, FloatParam | IntParam) and dist.low > dist.high:
            problems.append(f"sweep.params.{path}: low {dist.low} > high {dist.high}. Swap them")
        if isinstance(dist, FloatParam) and dist.type == "log_float" and dist.low <= 0:
            problems.append(f"sweep.params.{path}: log_float needs low > 0 (got {dist.low})")
        if isinstance(dist, FloatParam) and dist.type == "log_float" and dist.step is not None:
            problems.append(f"sweep.params.{path}: step is not supported with log_float. Remove one")
        if section.sampler == "grid" and isinstance(dist, FloatParam) and not dist.grid:
            problems.append(f"sweep.params.{path}: sampler grid needs the values of a float to try: add grid: [...]")
    has_eval = bool(resolved.get("data.eval_ratio")) or any(k.startswith("data.eval.") for k in resolved)
    if "." not in section.objective.metric and not has_eval:
        problems.append(f"sweep.objective.metric {section.objective.metric} is measured on validation data: set "
                        "data.eval or data.eval_ratio")
    return problems
