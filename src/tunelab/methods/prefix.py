"""Prefix tuning (Li & Liang 2021): learned keys and values prepended in every attention layer.

``virtual_tokens`` positions of past keys/values per layer, produced during training by a
reparameterisation MLP (embedding -> Linear -> tanh -> Linear to ``2 x layers x kv_dim``), which
the paper found essential for stable training. PEFT's ``PrefixTuningConfig`` does the work; at
save time PEFT stores the MLP's *output* (the keys and values), so inference needs no MLP.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.methods.virtual import (  # noqa: F401
    CLASSIFICATION,
    FUSED_KERNELS,
    MERGEABLE,
    NOT_MERGEABLE,
    VIRTUAL_TOKENS,
    save,
    wrap,
)

# The prefix is a key/value cache; a checkpointed layer's recomputation appends it a second time.
GRADIENT_CHECKPOINTING = False


class Config(BaseModel):
    """Prefix tuning (PEFT): learned past keys/values in every layer, via a reparameterisation MLP."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prefix"] = "prefix"
    virtual_tokens: int = Field(16, ge=1, le=1024, description="Prefix length (virtual key/value positions per layer).")
    projection: bool = Field(True, description="Train through the reparameterisation MLP (recommended by the paper).")
    projection_hidden: int = Field(512, ge=1, description="Hidden width of the reparameterisation MLP.")


def apply(model, cfg: Config):
    from peft import PrefixTuningConfig

    return wrap(model, PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens, prefix_projection=cfg.projection,
        encoder_hidden_size=cfg.projection_hidden,
    ))
