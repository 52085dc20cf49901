"""Partial fine-tuning: train a chosen part of the base model, freeze the rest.

Three selectors, combined as a union (LLaMA-Factory's ``freeze`` stage offers the first two):

* ``layers``: the top N decoder layers (negative: the bottom N), optionally only their
  ``layer_modules`` (e.g. ``[mlp]`` or ``[self_attn]``);
* ``patterns``: regular expressions searched in full parameter names (``lm_head``,
  ``layers\\.1[0-9]\\.mlp``, ...);
* ``bitfit``: every bias and every normalisation weight (BitFit, Ben Zaken et al. 2022; on
  bias-free models such as Llama this is the norms' scales).

Nothing is wrapped: the result is the base model with ``requires_grad`` flags, saved as a plain
transformers model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.errors import UserError
from tunelab.train.schedule import num_layers

MERGEABLE = True  # already a plain model
TRAINS_BASE = True
SHARDS = True  # FSDP / ZeRO tested (tests/test_scale.py)


class Config(BaseModel):
    """Train only some weights: the top N layers, name patterns, or norms and biases (BitFit)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["freeze"] = "freeze"
    layers: int | None = Field(
        None,
        description="Train the top N decoder layers (negative: the bottom N). Default 2 when no other selector is set.",
    )
    layer_modules: list[str] | None = Field(
        None, description="Within those layers, only parameters under these submodules, e.g. [mlp] or [self_attn]."
    )
    patterns: list[str] = Field(
        default_factory=list, description="Also train parameters whose full name matches one of these regexes (re.search)."
    )
    bitfit: bool = Field(False, description="Also train every bias and normalisation weight (BitFit).")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({err})") from None
        return v

    @model_validator(mode="after")
    def _default_selector(self) -> Config:
        if self.layers is None and not self.patterns and not self.bitfit:
            self.layers = 2
        if self.layers == 0:
            raise ValueError("layers: 0 trains nothing. Use N > 0 (top N layers) or N < 0 (bottom N)")
        return self


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.*)$")


def _is_bitfit(model, name: str) -> bool:
    """A bias, or a weight of a normalisation module (LayerNorm, RMSNorm, ...)."""
    if name.endswith(".bias"):
        return True
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf == "weight" and "norm" in type(module).__name__.lower()


def selected(model, cfg: Config) -> set[str]:
    """Names of the parameters ``cfg`` trains (tied parameters appear under their first name)."""

    n = num_layers(model)
    if cfg.layers is not None and abs(cfg.layers) > n:

        raise UserError(f"method.layers: {cfg.layers} but this model has {n} layers. Use a value in 1..{n} or -{n}..-1")
    chosen_layers = set(range(n - cfg.layers, n) if (cfg.layers or 0) > 0 else range(-(cfg.layers or 0)))
    patterns = [re.compile(p) for p in cfg.patterns]
    out = set()
    for name, _ in model.named_parameters():
        match = _LAYER.search(name)
        if match and int(match.group(1)) in chosen_layers and (
            not cfg.layer_modules or any(match.group(2).startswith(m + ".") for m in cfg.layer_modules)
        ):
            out.add(name)
        elif any(p.search(name) for p in patterns) or (cfg.bitfit and _is_bitfit(model, name)):
            out.add(name)
    return out


def apply(model, cfg: Config):
    chosen = selected(model, cfg)
    if not chosen:

        raise UserError(f"method (freeze): nothing matches layers={cfg.layers}, layer_modules={cfg.layer_modules}, "
                        f"patterns={cfg.patterns}, bitfit={cfg.bitfit}. Check the module names with `tunelab config show`")
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return model


def memory_linear_from(cfg: Config) -> int:
    """With ``layers: N`` the probes start at N layers (see ``methods.memory_linear_from``)."""
    if cfg.patterns or cfg.bitfit:
        return 1
    n = cfg.layers if cfg.layers is not None else 2
    return n if n > 0 else 1


def save(model, folder: Path) -> None:
    """A plain ``save_pretrained`` folder (safetensors), loadable with ``AutoModelForCausalLM``."""
    model.save_pretrained(folder, safe_serialization=True)
