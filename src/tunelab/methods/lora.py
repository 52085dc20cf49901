"""LoRA and its variants (DoRA, rsLoRA, LoRA+), through PEFT.

The base weights are frozen; each targeted linear layer ``W`` gets ``W + s * B A`` with ``A``
(r x in) and ``B`` (out x r), ``B`` zero-initialised so training starts from the base model
exactly, and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023, which
keeps the update's scale stable as the rank grows). DoRA (Liu et al. 2024) also learns a
magnitude vector per output feature of each target. LoRA+ (Hayou et al. 2024) trains ``B`` at
``loraplus_lr_ratio`` times the LR of ``A``. PEFT does the work; this module maps our config
onto ``LoraConfig`` and resolves ``layers`` to explicit module names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunelab.errors import UserError
from tunelab.train.schedule import num_layers

SHARDS = True  # FSDP / ZeRO tested (tests/test_scale.py); DoRA not under ZeRO-3
MERGEABLE = True  # PEFT merge_and_unload() folds B·A (and DoRA's magnitudes) into the base weights


class Config(BaseModel):
    """Low-rank adapters (PEFT LoRA; DoRA, rsLoRA, LoRA+ as options). Trains well under 1% of the weights."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=4096, description="Rank of the update B·A.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Layers to adapt: 'all-linear' (every linear layer but the output head), "
        "a list of module-name suffixes such as [q_proj, v_proj], or a regex matched on full names.",
    )
    layers: list[int] | None = Field(
        None,
        description="Adapt only these decoder layers (0-based; negative counts from the top, -1 is the last). "
        "Default: every layer.",
    )
    dora: bool = Field(False, description="DoRA: also learn a magnitude per output feature (weight-decomposed LoRA).")
    rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: train B (and DoRA magnitudes) at this many times train.lr, e.g. 16."
    )

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _linear_names(model) -> list[str]:
    """Full names of the linear layers PEFT can adapt, output head excluded."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return [n for n, m in model.named_modules() if isinstance(m, linear_types) and m is not head]


def resolve_targets(model, target_modules: str | list[str], layers: list[int] | None) -> str | list[str]:
    """What PEFT's ``target_modules`` gets: the config's value, or with ``layers`` the explicit
    full names of the matching linear layers of those layers."""
    if layers is None:
        return target_modules

    n = num_layers(model)
    wanted = set()
    for i in layers:
        if not -n <= i < n:
            raise UserError(f"method.layers: layer {i} does not exist (this model has {n} layers: 0..{n - 1}, or -{n}..-1)")
        wanted.add(i % n)
    names = []
    for name in _linear_names(model):
        match = _LAYER.search(name)
        if not match or int(match.group(1)) not in wanted:
            continue
        if target_modules == "all-linear":
            ok = True
        elif isinstance(target_modules, list):
            ok = any(name == t or name.endswith("." + t) for t in target_modules)
        else:
            ok = re.fullmatch(target_modules, name) is not None
        if ok:
            names.append(name)
    if not names:
        raise UserError(f"method.target_modules: nothing matches {target_modules!r} in layers {layers}. "
                        "Use 'all-linear' or module names such as q_proj, v_proj")
    return names


def peft_config(model, cfg: Config):
    from peft import LoraConfig

    from tunelab.models.classifier import peft_task_type  # lazy: torch; the config imports this module

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, cfg.target_modules, cfg.layers),
        use_dora=cfg.dora,
        use_rslora=cfg.rslora,
        bias="none",
        task_type=peft_task_type(model),  # SEQ_CLS for classifiers: the `score` head is trained and saved
    )


def apply(model, cfg: Config):
    from peft import get_peft_model

    config = peft_config(model, cfg)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"

        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise UserError(
            f"method.target_modules: {err.args[0].splitlines()[0]} (got {cfg.target_modules!r}). "
            f"Use 'all-linear' or names from this model, e.g. {', '.join(names[:12])}"
        ) from None


def lr_multiplier(cfg: Config):
    """LoRA+: ``B`` matrices and DoRA magnitudes at ``loraplus_lr_ratio`` x the LR (as PEFT's
    ``create_loraplus_optimizer`` groups them)."""
    if cfg.loraplus_lr_ratio is None:
        return None
    ratio = cfg.loraplus_lr_ratio

    def multiplier(name: str) -> float:
        return ratio if ("lora_B" in name or "lora_embedding_B" in name or "lora_magnitude_vector" in name) else 1.0

    return multiplier


def memory_linear_from(cfg: Config) -> int:
    """LoRA on the top ``-i`` layers (negative ``layers``) needs no gradients below them; on explicit
    positive ``layers``, memory grows linearly from above the highest one."""
    idx = cfg.layers
    if not idx:
        return 1
    return max(-i for i in idx) if all(i < 0 for i in idx) else max(i for i in idx if i >= 0) + 1


def save(model, folder: Path) -> None:
    """A PEFT adapter folder: ``PeftModel.from_pretrained(base, folder)`` reloads it."""
    model.save_pretrained(folder, safe_serialization=True)
