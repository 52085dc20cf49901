"""Options of the verbs that read a training config: ``train``, ``config show`` and ``continual``.

``ConfigOptions`` (the config file and its ``--set`` overrides) is the base of every such verb's
options, here and in :mod:`tunelab.search.settings` and :mod:`tunelab.eval.settings`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.cli_args import POSITIONAL

__all__ = ["ConfigOptions", "ConfigShowOptions", "ContinualOptions", "TrainOptions"]


class ConfigOptions(BaseModel):
    """A YAML training config and ``--set KEY=VALUE`` overrides of its values."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(description="The YAML config file.", json_schema_extra=POSITIONAL)
    set: list[str] = Field(default_factory=list, description="Override a config value, e.g. --set train.lr=1e-4.",
                           json_schema_extra={"cli": {"repeat": True, "metavar": "KEY=VALUE"}})


class TrainOptions(ConfigOptions):
    """``tunelab train``."""

    resume: bool = Field(False, description="Continue the run from its latest checkpoint (same config required).")
    dry_run: bool = Field(False, description="Print the memory / time estimate and recommendation (tunelab advise) "
                          "and exit.")


class ConfigShowOptions(ConfigOptions):
    """``tunelab config show``."""

    yaml: bool = Field(False, description="Print YAML instead of a table.")


class ContinualOptions(ConfigOptions):
    """``tunelab continual``."""

    config: str = Field(description="A YAML config with a stages: list.", json_schema_extra=POSITIONAL)
    set: list[str] = Field(default_factory=list, description="Override a value in every stage, e.g. --set "
                           "train.lr=1e-4.", json_schema_extra={"cli": {"repeat": True, "metavar": "KEY=VALUE"}})
    compare: str | None = Field(
        None, description="Run variants side by side, e.g. naive,ewc:5000,replay:0.3,distill,l2sp:0.01 (the number "
        "is the weight, or replay's ratio); each in <run>/compare/<variant>/, table in <run>/compare.md.",
        json_schema_extra={"cli": {"metavar": "VARIANTS"}})
