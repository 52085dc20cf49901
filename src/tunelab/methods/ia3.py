"""IA3 (Liu et al. 2022, "(IA)^3"): learned per-feature scaling vectors.

Keys and values of attention are rescaled per output feature, and the input of the
feed-forward down projection per input feature: ``kv_dim + kv_dim + intermediate`` numbers per
layer on Llama-style models, fewer than LoRA at r=1. PEFT's ``IA3Config`` does the work; its
default targets for the model type apply unless ``target_modules`` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError

MERGEABLE = True  # PEFT merge_and_unload() multiplies the vectors into the weights


class Config(BaseModel):
    """IA3 (PEFT): learned rescaling of attention keys/values and feed-forward activations."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        None, description="Modules to rescale (default for Llama-style models: [k_proj, v_proj, down_proj])."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which targets are feed-forward (scaled on their input; default: [down_proj])."
    )


def apply(model, cfg: Config):
    from peft import IA3Config, get_peft_model

    from tunelab.models.classifier import peft_task_type

    if (cfg.target_modules is None) != (cfg.feedforward_modules is None):

        raise UserError("method.target_modules and method.feedforward_modules: set both or neither")
    try:
        return get_peft_model(model, IA3Config(task_type=peft_task_type(model), target_modules=cfg.target_modules,
                                               feedforward_modules=cfg.feedforward_modules))
    except ValueError as err:

        raise UserError(f"method (ia3): {err.args[0].splitlines()[0]}. Set method.target_modules and "
                        "method.feedforward_modules to module names of this model") from None


def save(model, folder: Path) -> None:
    """A PEFT adapter folder: ``PeftModel.from_pretrained(base, folder)`` reloads it."""
    model.save_pretrained(folder, safe_serialization=True)
