"""Full fine-tuning: every parameter of the base model is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

MERGEABLE = True  # already a plain model
TRAINS_BASE = True
SHARDS = True  # FSDP / ZeRO tested (tests/test_scale.py)


class Config(BaseModel):
    """Train all weights. Needs the most memory (weights + gradients + two AdamW states)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["full"] = "full"


def apply(model, cfg: Config):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model, folder: Path) -> None:
    """A plain ``save_pretrained`` folder (safetensors), loadable with ``AutoModelForCausalLM``."""
    model.save_pretrained(folder, safe_serialization=True)
