"""The ``eval:`` config section: what to evaluate when training ends (strict, like every section).

Evaluation runs after training when ``eval.data`` or ``eval.benchmarks`` is set; ``eval.report``
and ``eval.mlflow`` work with or without them. ``tunelab eval`` takes the same options as flags.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BenchmarkSpec(_Strict):
    """One multiple-choice benchmark (MMLU / CMMLU / C-Eval layout)."""

    path: str = Field(..., description="A zip or folder of <split>/<subject>.csv files, e.g. ../shared/data/benchmarks/mmlu/mmlu.zip.")
    k_shot: int = Field(0, ge=0, le=10, description="Solved examples from the subject's dev split put before each question.")
    limit: int | None = Field(None, ge=1, description="Score at most this many questions (round-robin over the subjects).")
    split: str = Field("auto", description="Split to score: auto (test when it has answers, else val), test, val or dev.")
    subjects: list[str] | None = Field(None, description="Only these subjects (file-name stems, e.g. abstract_algebra).")


class ForgettingSection(_Strict):
    """Base vs tuned on general benchmarks and held-out general data, next to the task metric (eval/forgetting.py)."""

    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=list, description="General multiple-choice benchmarks (MMLU / CMMLU subsets via limit).")
    general: list[str] = Field(
        default_factory=list, description="Held-out general instruction files: mean assistant-token loss of base and tuned.")
    general_limit: int | None = Field(200, ge=1, description="Score at most this many rows of each general file (first rows).")
    task_limit: int | None = Field(None, ge=1, description="Score the task metric on at most this many validation rows.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the intervals (Wilson, bootstrap, paired bootstrap).")
    batch_size: int = Field(16, ge=1, description="Prompts per scoring batch.")
    max_length: int = Field(1024, ge=8, description="Token limit of the general-loss evaluation.")


class EvalSection(_Strict):
    """Evaluation at the end of training, reports and MLflow logging."""

    data: list[str] = Field(default_factory=list, description="Files to score the tuned model on after training (any data format).")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "classification", "preference"] = Field(
        "auto", description="Row format of eval.data files.")
    task: Literal["auto", "lm", "generation", "classification", "preference"] = Field(
        "auto", description="auto: preference for chosen / rejected pairs (pair accuracy), classification for "
        "labelled rows, lm for plain text, else generation.")
    metrics: list[str] | None = Field(None, description="Generation metrics to compute (default all): exact_match, f1, bleu, rouge1, rouge2, rougeL, chrf.")
    labels: list[str] | None = Field(None, description="Classification label set (default: the labels found in the data).")
    limit: int | None = Field(None, ge=1, description="Score at most this many rows of each eval.data file (first rows).")
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list, description="Multiple-choice benchmarks to score.")
    baselines: bool = Field(False, description="Also score the base model zero-shot and few-shot (eval.few_shot training "
                            "examples in the prompt) and, on classification data, TF-IDF + logistic regression trained "
                            "on the run's training split, with the paired test of the tuned model against it.")
    few_shot: int = Field(3, ge=1, le=32, description="Training examples in the prompt of the few-shot baseline.")
    checkpoint: Literal["final", "best"] = Field("final", description="Which weights of the run to score.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length limit.")
    temperature: float = Field(0.0, ge=0, description="0: greedy; > 0: sampling (seeded by eval.seed).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    stop: list[str] = Field(default_factory=list, description="Stop strings: generation ends at the first one (cut from the reply).")
    seed: int = Field(0, description="Seed for sampled generation.")
    batch_size: int = Field(8, ge=1, description="Prompts per generation / scoring batch.")
    max_length: int = Field(1024, ge=8, description="Token limit of the language-modelling evaluation (as data.max_length).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the scored models are loaded in.")
    report: bool = Field(False, description="Write <run>/report.html and report.md after training (and evaluation).")
    mlflow: bool = Field(False, description="Log params, per-step metrics, evaluations and artifacts to MLflow after training.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///<output_dir>/mlflow.db, artifacts beside it).")
    mlflow_experiment: str = Field("tunelab", description="MLflow experiment name.")
    forgetting: ForgettingSection | None = Field(
        None, description="After training, score the base and the tuned model on general benchmarks and held-out "
        "general data next to the task metric; <run>/forgetting.json and the report's trade-off table.")
