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
    nnodes: int = Field(1, ge=1, description="Machines in the run; start `tunelab train` on each with the same config "
                        "and flags but its own --node-rank (docs/scaling.md). Each runs train.processes ranks.")
    node_rank: int = Field(0, ge=0, description="This machine's number, 0 to nnodes - 1 (node 0 hosts the rendezvous).")
    master_addr: str = Field("127.0.0.1", description="Node 0's address, the same on every node.")
    master_port: int | None = Field(None, ge=1, le=65535, description="A free TCP port on node 0, the same on every "
                                    "node (required with --nnodes > 1).")


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
