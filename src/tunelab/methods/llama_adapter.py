"""LLaMA-Adapter (Zhang et al. 2023): adaption prompts with zero-initialised gating.

The top ``layers`` attention layers each get ``prompt_length`` learned prompt vectors; each
layer attends to them separately from the sequence and adds the result scaled by a learned
gate that starts at 0, so training starts from the base model exactly. PEFT's adaption prompt
does the work (it wraps the attention modules of the model types it knows: Llama, Mistral,
Gemma, Qwen2 and others listed in ``peft.tuners.adaption_prompt.config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
from tunelab.train.schedule import num_layers

FUSED_KERNELS = False  # the kernels assume no adaption prompts in the attention
CLASSIFICATION = False  # a class head's backbone would not see them
MERGEABLE = False
NOT_MERGEABLE = (
    "the adaption prompts are attended to through a separate gated attention, which no weight matrix can absorb: "
    "serve the run with its adapter loaded onto the base (tunelab serve RUN, tunelab chat RUN)"
)


class Config(BaseModel):
    """LLaMA-Adapter (PEFT adaption prompt): gated learned prompts in the top layers' attention."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["llama_adapter"] = "llama_adapter"
    prompt_length: int = Field(10, ge=1, le=1024, description="Adaption prompt vectors per adapted layer.")
    layers: int = Field(8, ge=1, description="Adapt the top this many decoder layers (capped at the model's depth).")


def apply(model, cfg: Config):
    from peft import AdaptionPromptConfig, get_peft_model
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG


    model_type = getattr(model.config, "model_type", None)
    if model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise UserError(f"method llama_adapter: PEFT's adaption prompt does not support model type {model_type!r} "
                        f"(supported: {', '.join(sorted(TRANSFORMERS_MODEL_CONFIG))}). Use lora or adapter")
    layers = min(cfg.layers, num_layers(model))
    return get_peft_model(model, AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=cfg.prompt_length,
                                                      adapter_layers=layers))


def memory_linear_from(cfg: Config) -> int:
    """Adaption prompts in the top ``layers`` only: nothing below them needs gradients."""
    return cfg.layers


def save(model, folder: Path) -> None:
    """A PEFT adapter folder: ``PeftModel.from_pretrained(base, folder)`` reloads it."""
    model.save_pretrained(folder, safe_serialization=True)
