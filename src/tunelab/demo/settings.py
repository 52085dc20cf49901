"""Options of ``tunelab demo``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DemoOptions(BaseModel):
    """``tunelab demo``: where the demo's data and runs go."""

    model_config = ConfigDict(extra="forbid")

    workdir: str = Field("demo_run", description="Folder for the demo's data and runs.")
    fresh: bool = Field(False, description="Start a new run even if one exists.")
