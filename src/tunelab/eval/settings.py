"""Decoding settings, and the options of the ``eval``, ``compare``, ``cv`` and ``runs`` verbs.

Kept free of torch so that building the command line stays fast; :mod:`tunelab.eval.generate`
re-exports :class:`GenerationSettings`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass

from tunelab.cli_args import POSITIONAL, field_of
from tunelab.eval.config import BenchmarkSpec, EvalSection

__all__ = ["GenerationSettings", "EvalOptions", "CompareOptions", "CvOptions", "RunsOptions", "RunsShowOptions",
           "RunsMlflowOptions", "CHECKPOINT_HELP"]

CHECKPOINT_HELP = "Which weights of a run: final or best."


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class GenerationSettings:
    """How to decode. ``temperature == 0`` is greedy; otherwise sampling with ``top_p`` / ``top_k``."""

    max_new_tokens: int = Field(64, ge=1, description="Maximum tokens to generate per reply.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; > 0 samples (seeded).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    top_k: int | None = Field(None, ge=1, description="Sample from the k likeliest tokens only (with temperature > 0).")
    stop: tuple[str, ...] = Field((), description="Stop strings: a reply ends at the first one (cut from it).")
    seed: int = Field(0, description="Seed for sampling.")
    batch_size: int = Field(8, ge=1, description="Prompts per batch.")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _list(what: str) -> dict:
    return {"cli": {"repeat": True, "metavar": what}}


class _EvalCommon(_Options):
    """The flags ``eval`` and ``compare`` share: what to score, and how to decode."""

    data: list[str] = field_of(EvalSection, "data", description="A data file to score (any format tunelab reads).",
                               json_schema_extra=_list("FILE"))
    format: str = Field("auto", description="Row format of --data files (default: detected).")
    task: Literal["auto", "lm", "generation", "classification", "preference"] = field_of(EvalSection, "task")
    metrics: list[str] | None = field_of(EvalSection, "metrics")
    labels: list[str] | None = field_of(EvalSection, "labels")
    mode: Literal["both", "constrained", "generated"] = Field(
        "both", description="Generative classification: score the labels by log-likelihood (constrained), parse free "
        "generations (generated), or both side by side (generated is the primary figure).")
    prompt: str | None = Field(
        None, description="Classification on a model that is not a run: ask each row with this template ({labels}: "
        "the data's labels, comma-separated; {text}: the row's text). A run asks with the prompt it trained with.")
    limit: int | None = Field(None, ge=1, description="Score at most N rows / benchmark questions.")
    train: str | None = Field(
        None, description="Classification: the training file of the TF-IDF + logistic-regression baseline (default: "
        "the run's own training split). Lets a model that is not a run be compared with the baseline.",
        json_schema_extra={"cli": {"metavar": "FILE"}})
    benchmark: list[str] = Field(
        default_factory=list, description="A multiple-choice benchmark in the MMLU/CMMLU/C-Eval CSV layout.",
        json_schema_extra=_list("ZIP_OR_FOLDER"))
    k_shot: int = field_of(BenchmarkSpec, "k_shot")
    split: str = field_of(BenchmarkSpec, "split")
    subjects: list[str] | None = field_of(BenchmarkSpec, "subjects")
    checkpoint: str = Field("final", description=CHECKPOINT_HELP)
    max_new_tokens: int = field_of(EvalSection, "max_new_tokens")
    temperature: float = field_of(EvalSection, "temperature", description="0 = greedy; > 0 samples (seeded).")
    top_p: float = field_of(EvalSection, "top_p")
    stop: list[str] = field_of(EvalSection, "stop", json_schema_extra=_list("TEXT"))
    seed: int = field_of(EvalSection, "seed")
    batch_size: int = field_of(EvalSection, "batch_size")
    max_length: int = field_of(EvalSection, "max_length")
    dtype: Literal["float32", "bfloat16", "float16"] = field_of(
        EvalSection, "dtype", description="dtype to load the models in (bfloat16 is faster on CPUs with AVX512-BF16).")

class EvalOptions(_EvalCommon):
    """``tunelab eval``."""

    target: str = Field(description="A run directory, a weights folder, an alias, a HF folder or a .gguf file.",
                        json_schema_extra=POSITIONAL)
    baselines: bool = Field(False, description="Also score the base model zero-shot and few-shot (a run directory "
                            "only) and, on classification data, TF-IDF + logistic regression trained on the run's "
                            "training split (or --train FILE).")
    few_shot: int = field_of(EvalSection, "few_shot")
    out: str | None = Field(None, description="Folder for the results (default <run>/eval or eval_results/<name>).")


class CompareOptions(_EvalCommon):
    """``tunelab compare``."""

    run_a: str = Field(description="Run (or model) A.", json_schema_extra=POSITIONAL)
    run_b: str = Field(description="Run (or model) B.", json_schema_extra=POSITIONAL)
    out: str | None = Field(None, description="Folder for the results (default <run A>/eval).")


class CvOptions(_Options):
    """``tunelab cv``."""

    config: str = Field(description="The YAML config file.", json_schema_extra=POSITIONAL)
    set: list[str] = Field(default_factory=list, description="Override a config value.",
                           json_schema_extra=_list("KEY=VALUE"))
    folds: int = Field(5, ge=2, description="Number of folds K.")
    group: Literal["near", "exact", "none"] = Field(
        "near", description="Keep near / exact duplicate rows in one fold, or none.")


class RunsOptions(_Options):
    """``tunelab runs``."""

    dir: str = Field("runs", description="The runs folder (run.output_dir).")
    filter: list[str] = Field(default_factory=list, description="Keep runs whose KEY contains VALUE, or KEY<N / "
                              "KEY>N, e.g. method=lora.", json_schema_extra=_list("KEY=VALUE"))
    sort: str = Field("date", description="Column or metric to sort by; -KEY for descending.")
    json_out: bool = Field(False, description="Print JSON instead of a table.", json_schema_extra={"cli": {"flag": "--json"}})


class RunsShowOptions(_Options):
    """``tunelab runs show``."""

    name: str = Field(description="Run name (or a run directory).", json_schema_extra=POSITIONAL)
    dir: str = Field("runs", description="The runs folder.")


class RunsMlflowOptions(_Options):
    """``tunelab runs mlflow``."""

    names: list[str] = Field(description="Run names (or run directories).",
                             json_schema_extra={"cli": {"positional": True, "nargs": "+"}})
    dir: str = Field("runs", description="The runs folder.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///<runs folder>/mlflow.db).")
    experiment: str = Field("tunelab", description="MLflow experiment name.")
