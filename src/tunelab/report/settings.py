"""Options of ``tunelab report``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReportOptions(BaseModel):
    """``tunelab report``: the runs, and where the HTML goes."""

    model_config = ConfigDict(extra="forbid")

    runs: list[str] = Field(description="Run directories.", json_schema_extra={"cli": {"positional": True, "nargs": "+"}})
    out: str | None = Field(None, description="The HTML file (default <first run>/report.html; .md beside it).")
