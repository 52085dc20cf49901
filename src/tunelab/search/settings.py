"""Options of ``sweep``, ``advise`` and ``select`` (:class:`SelectRequest` is ``select_model``'s input)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.train.settings import ConfigOptions

__all__ = ["AdviseOptions", "SelectRequest", "SweepOptions"]


class SweepOptions(ConfigOptions):
    """``tunelab sweep``."""

    config: str = Field(description="A training YAML with a sweep: section.", json_schema_extra={"cli": "positional"})
    workers: int | None = Field(None, ge=1, description="Worker processes (default sweep.workers).")
    worker: bool = Field(False, description="Run trials only (join the study from this machine; no table at the end).")
    report: bool = Field(False, description="Only write the table, best.yaml and plots of the study.")


class AdviseOptions(ConfigOptions):
    """``tunelab advise``."""

    probe_steps: int = Field(2, ge=0, description="Timed training steps of the real model (0: skip).")
    methods: list[str] | None = Field(None, description="Methods to estimate (default: every applicable one).",
                                      json_schema_extra={"cli": {"nargs": "*"}})


class SelectRequest(BaseModel):
    """``tunelab select``: which candidate base models to rank, on which data, and how."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[str] = Field(description="Aliases, HF folders or .gguf files.",
                                  json_schema_extra={"cli": {"nargs": "+"}})
    data: str = Field(description="Validation file (any training data format).")
    shots: int = Field(3, ge=0, description="Examples put before each prompt for few-shot.")
    limit: int = Field(64, ge=1, description="Validation rows scored.")
    max_length: int = Field(512, ge=8, description="Tokens per sample (memory and throughput).")
    batch_size: int = Field(4, ge=1, description="Micro-batch for memory and throughput.")
    method: str = Field("lora", description="Method whose training throughput is measured.")
    out: str | None = Field(None, description="Write the ranking as JSON here.")
    max_new_tokens: int = Field(48, ge=1, description="Generation tasks: tokens generated per reply.")
    memory_methods: tuple[str, ...] = Field(("full", "lora", "qlora"), description="Methods whose peak memory "
                                            "is estimated.")
