"""Prompt tuning (Lester et al. 2021): learned input embeddings prepended to every sample.

``virtual_tokens`` embeddings, initialised from the embeddings of ``init_text`` (repeated or
cut to length; the paper's best initialisation) or randomly. PEFT's ``PromptTuningConfig``
does the work; the text initialisation is done here with the run's own tokenizer (so the saved
adapter does not depend on a tokenizer path: its config records a random init, its weights
the trained values).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
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
    """Prompt tuning (PEFT): learned virtual token embeddings, initialised from a text."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prompt"] = "prompt"
    virtual_tokens: int = Field(16, ge=1, le=1024, description="Number of virtual tokens prepended to every sample.")
    init_text: str | None = Field(
        "Answer the request accurately and concisely.",
        description="Initialise the virtual tokens from this text's token embeddings (repeated or cut to length); "
        "null: random init.",
    )


def text_init_ids(tokenizer, text: str, n: int) -> list[int]:
    """Token ids of ``text`` repeated or cut to exactly ``n`` (as PEFT's TEXT init does)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:

        raise UserError(f"method.init_text: {text!r} has no tokens. Use a non-empty text or null")
    return (ids * math.ceil(n / len(ids)))[:n]


def apply(model, cfg: Config):
    import torch
    from peft import PromptTuningConfig

    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(model.name_or_path) if cfg.init_text else None
    peft_model = wrap(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens))
    if tokenizer is not None:
        ids = torch.tensor(text_init_ids(tokenizer, cfg.init_text, cfg.virtual_tokens))
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        with torch.no_grad():
            init = peft_model.word_embeddings(ids.to(peft_model.word_embeddings.weight.device))
            encoder.embedding.weight.copy_(init.to(encoder.embedding.weight.dtype))
    return peft_model
