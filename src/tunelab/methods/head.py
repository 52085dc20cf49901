"""Task heads on a frozen (or partly frozen) backbone: feature extraction and added dense layers.

Needs ``task: classification`` (the model is a :class:`~tunelab.models.classifier.SequenceClassifier`).
``apply`` replaces the classifier's head by a fresh one of the configured shape (a linear
layer, or ``layers`` hidden layers of ``width`` units with an activation and dropout), freezes
the backbone, and unfreezes its top ``unfreeze_top`` transformer blocks (plus the final norm of
a decoder, which sits after them). ``unfreeze_top: 0`` is feature extraction: only the head
learns, so the backbone's features are used as they are. Plain torch; nothing to wrap.

Feature extraction done once: with ``unfreeze_top: 0`` and ``cache_features`` (the default) the
backbone's pooled features of every training and validation row are computed once and cached on
disk (:mod:`tunelab.models.features`, hook :func:`caches_features`); the loop then trains the
head on them, an epoch costing no backbone pass. ``fit: sklearn`` fits scikit-learn's
``LogisticRegression`` on those features instead of running the loop (hook :func:`fit`) and
writes it into the linear head, so the run saves, evaluates, predicts and serves like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    cache_features: bool = Field(
        True, description="With unfreeze_top: 0: compute the backbone's pooled features of every training and "
        "validation row once, cache them on disk (keyed by the backbone's weights, pooling, max_length and the "
        "rows' tokens) and train the head on them: an epoch then costs no backbone pass; same results.")
    fit: Literal["loop", "sklearn"] = Field(
        "loop", description="loop: the training loop trains the head (train.lr, train.epochs, ...). sklearn: "
        "scikit-learn's LogisticRegression on the cached features (needs layers: 0 and unfreeze_top: 0), written "
        "into the linear head; the loop runs no step, the run is saved and evaluated as usual.")
    sklearn_c: float = Field(1.0, gt=0, description="fit: sklearn: LogisticRegression's C (inverse L2 strength).")
    sklearn_max_iter: int = Field(1000, ge=1, description="fit: sklearn: LogisticRegression's max_iter (lbfgs).")

    @model_validator(mode="after")
    def _sklearn_needs_a_linear_head_on_a_frozen_backbone(self):
        if self.fit == "sklearn" and (self.layers or self.unfreeze_top):
            raise ValueError(f"method.fit=sklearn fits a logistic regression, a linear head on frozen features "
                             f"(got layers={self.layers}, unfreeze_top={self.unfreeze_top}). Set layers: 0 and "
                             "unfreeze_top: 0, or fit: loop")
        return self


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


def caches_features(cfg: Config) -> bool:
    """Whether the backbone's features are computed once (:mod:`tunelab.models.features`): a frozen backbone."""
    return cfg.unfreeze_top == 0 and (cfg.cache_features or cfg.fit == "sklearn")


def fit(model, cfg: Config, features, labels: list[int], *, n_classes: int,
        class_weight: list[float] | None = None, sample_weight: list[float] | None = None) -> str | None:
    """``fit: sklearn``: scikit-learn's multinomial ``LogisticRegression`` on the training rows' pooled features
    (``features``: float32 ``[rows, hidden]``), copied into the linear head so that its softmax is the
    regression's probabilities; None with ``fit: loop`` (the loop trains the head).

    Two classes: sklearn's one score ``w.x + b`` becomes logits ``-(w.x + b)/2`` and ``+(w.x + b)/2`` (the same
    softmax). A class absent from the training rows gets a bias of -1e4: never predicted.
    """
    if cfg.fit != "sklearn":
        return None
    if features is None:
        raise UserError("method.fit=sklearn: needs task: classification (one class head) and the backbone's cached "
                        "features; train.unfreeze keeps them from being cached. Remove train.unfreeze, or use fit: loop")
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    x = features.detach().cpu().numpy().astype(np.float64)
    y = np.asarray(labels)
    present = sorted(set(labels))
    if len(present) < 2:
        raise UserError(f"method.fit=sklearn: the training rows have {len(present)} class(es); logistic regression "
                        "needs at least 2. Check data.train, or use fit: loop")
    weights = {c: class_weight[c] for c in present} if class_weight is not None else None
    lr = LogisticRegression(C=cfg.sklearn_c, max_iter=cfg.sklearn_max_iter, class_weight=weights)
    lr.fit(x, y, sample_weight=None if sample_weight is None else np.asarray(sample_weight))
    coef, bias = lr.coef_, lr.intercept_
    if len(present) == 2:
        coef, bias = np.vstack([-coef[0] / 2, coef[0] / 2]), np.asarray([-bias[0] / 2, bias[0] / 2])
    weight = np.zeros((n_classes, x.shape[1]))
    full_bias = np.full(n_classes, -1e4)
    for j, c in enumerate(lr.classes_):
        weight[int(c)], full_bias[int(c)] = coef[j], bias[j]
    out = model.score.out
    with torch.no_grad():
        out.weight.copy_(torch.as_tensor(weight, dtype=out.weight.dtype))
        out.bias.copy_(torch.as_tensor(full_bias, dtype=out.bias.dtype))
    return (f"logistic regression (scikit-learn, C={cfg.sklearn_c}) on the features of {len(y):,} training rows, "
            f"{lr.n_iter_.max()} lbfgs iterations")
