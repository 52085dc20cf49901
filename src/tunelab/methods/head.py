"""Task heads on a frozen (or partly frozen) backbone: feature extraction and added dense layers.

Needs ``task: classification`` (the model is a :class:`~tunelab.models.classifier.SequenceClassifier`).
``apply`` replaces the classifier's head by a fresh one of the configured shape (a linear
layer, or ``layers`` hidden layers of ``width`` units with an activation and dropout), freezes
the backbone, and unfreezes its top ``unfreeze_top`` transformer blocks (plus the final norm of
a decoder, which sits after them). ``unfreeze_top: 0`` is feature extraction: only the head
learns, so the backbone's features are used as they are. Plain torch; nothing to wrap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError

CLASS_HEAD = True  # trains a class head only: needs a task with one
MERGEABLE = True  # the saved folder is already a complete model (backbone + head)


class Config(BaseModel):
    """A new classification head (linear or MLP) on a frozen backbone, optionally with its top blocks unfrozen."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["head"] = "head"
    layers: int = Field(0, ge=0, le=8, description="Hidden layers of the head (0: one linear layer on the pooled features).")
    width: int | None = Field(None, ge=1, description="Units per hidden layer (default: the backbone's hidden size).")
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("gelu", description="Activation after each hidden layer.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before each layer of the head.")
    unfreeze_top: int = Field(0, ge=0, description="Also train the top N transformer blocks of the backbone (0: frozen backbone).")


def apply(model, cfg: Config):
    from tunelab.models.classifier import SequenceClassifier

    if not isinstance(model, SequenceClassifier):
        raise UserError("method.name=head: the model has no classification head. Set task: classification")
    model.set_head(layers=cfg.layers, width=cfg.width, activation=cfg.activation, dropout=cfg.dropout)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if cfg.unfreeze_top:
        blocks = model.layers()
        if blocks is None or cfg.unfreeze_top > len(blocks):
            have = 0 if blocks is None else len(blocks)
            raise UserError(f"method.unfreeze_top: the backbone has {have} blocks (got {cfg.unfreeze_top}). Use at most {have}")
        for block in list(blocks)[-cfg.unfreeze_top:]:
            block.requires_grad_(True)
        final_norm = getattr(model.backbone, "norm", None)  # decoders normalise after the last block
        if final_norm is not None:
            final_norm.requires_grad_(True)
    model.score.requires_grad_(True)
    return model


def save(model, folder: Path) -> None:
    """``head.safetensors`` + ``classifier.json`` (+ the backbone when part of it was trained).

    A frozen backbone is not copied: :func:`~tunelab.methods.reload.load_classifier` loads it
    from the base model named in ``classifier.json`` (a head on all-MiniLM-L6-v2 is 1.5 KB, not 90 MB).
    """
    model.save_pretrained(folder, safe_serialization=True,
                          with_backbone=any(p.requires_grad for p in model.backbone.parameters()))
