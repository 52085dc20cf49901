"""P-tuning (Liu et al. 2021): virtual token embeddings produced by a small prompt encoder.

``virtual_tokens`` input embeddings, each the output of an MLP (or LSTM + MLP) over a learned
embedding, prepended to every sample. PEFT's ``PromptEncoderConfig`` does the work.
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


class Config(BaseModel):
    """P-tuning (PEFT prompt encoder): virtual token embeddings computed by an MLP or LSTM encoder."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["ptuning"] = "ptuning"
    virtual_tokens: int = Field(16, ge=1, le=1024, description="Number of virtual tokens prepended to every sample.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder: mlp (3 linear layers) or lstm (bi-LSTM + MLP).")
    encoder_hidden: int = Field(128, ge=1, description="Hidden width of the prompt encoder.")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in the prompt encoder (LSTM only in PEFT).")


def apply(model, cfg: Config):
    from peft import PromptEncoderConfig

    return wrap(model, PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens,
        encoder_reparameterization_type=cfg.encoder.upper(), encoder_hidden_size=cfg.encoder_hidden,
        encoder_dropout=cfg.encoder_dropout,
    ))
