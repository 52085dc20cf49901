"""LoRA: low-rank adapters on the chosen linear layers, through PEFT.

The base weights are frozen; each targeted linear layer ``W`` gets ``W + (alpha / r) * B A``
with ``A`` (r x in) and ``B`` (out x r), ``B`` zero-initialised so training starts from the
base model exactly. PEFT does the work; this module only maps our config onto ``LoraConfig``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MERGEABLE = True


class Config(BaseModel):
    """Low-rank adapters (PEFT LoRA). Trains well under 1% of the weights of a small LLM."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=4096, description="Rank of the update B·A.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Layers to adapt: 'all-linear' (every linear layer but the output head), "
        "a list of module-name suffixes such as [q_proj, v_proj], or a regex matched on full names.",
    )

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


def apply(model, cfg: Config):
    from peft import LoraConfig, get_peft_model

    from tunelab.models.classifier import peft_task_type

    peft_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type=peft_task_type(model),  # SEQ_CLS for classifiers: the `score` head is trained and saved
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
        from tunelab.errors import UserError

        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise UserError(
            f"method.target_modules: {err.args[0].splitlines()[0]} (got {cfg.target_modules!r}). "
            f"Use 'all-linear' or names from this model, e.g. {', '.join(names[:12])}"
        ) from None


def save(model, folder: Path) -> None:
    """A PEFT adapter folder: ``PeftModel.from_pretrained(base, folder)`` reloads it."""
    model.save_pretrained(folder, safe_serialization=True)
