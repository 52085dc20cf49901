"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), our own small module.

Each adapter is ``h + up(act(down(h)))`` with ``down: hidden -> size`` and ``up: size ->
hidden``, ``up`` zero-initialised so training starts from the base model exactly. It is applied
to the output of a sublayer, before the residual addition:

* ``houlsby``: after the attention block and after the feed-forward block of every layer;
* ``pfeiffer``: after the feed-forward block only (half the parameters, about the same quality
  in Pfeiffer et al.'s study).

Why our own: PEFT has no bottleneck adapter and the maintained ``adapters`` library (AdapterHub)
is not installed here. The adapters are registered as submodules of each decoder layer
(``model.layers.3.adapter_ffn.down.weight``), so the base weights keep their names, and are
hooked in with forward hooks on the attention and feed-forward modules (works with gradient
checkpointing, DDP and torch.compile). Saved as ``bottleneck_adapter.safetensors`` (adapter
tensors only) + ``bottleneck_adapter.json`` (the config); :func:`load` rebuilds base + adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError

MERGEABLE = False
NOT_MERGEABLE = (
    "a bottleneck adapter has a non-linearity between its two projections, so it cannot be folded into the base "
    "weights: serve the run with its adapter loaded onto the base (tunelab serve RUN, tunelab chat RUN)"
)
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
CONFIG_FILE = "bottleneck_adapter.json"


class Config(BaseModel):
    """Bottleneck adapters after attention and/or FFN (Houlsby, Pfeiffer placements); own module."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="houlsby: after attention and after the FFN; pfeiffer: after the FFN only."
    )
    size: int = Field(64, ge=1, description="Bottleneck width (the adapter's hidden size).")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Non-linearity in the bottleneck.")
    layers: list[int] | None = Field(
        None, description="Only these decoder layers (0-based; negative counts from the top). Default: all."
    )


def apply(model, cfg: Config):
    from tunelab.methods.bottleneck import Bottleneck, output_hook, sublayers
    from tunelab.models.classifier import is_classifier  # lazy: torch; the config imports this module

    decoder = model.backbone if is_classifier(model) else model.get_decoder()  # task: classification: the backbone
    layers = decoder.layers
    n = len(layers)
    chosen = range(n) if cfg.layers is None else cfg.layers
    bad = [i for i in chosen if not -n <= i < n]
    if bad:
        raise UserError(f"method.layers: {bad} out of range (this model has {n} layers). Use 0..{n - 1} or -{n}..-1")
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = model.config.get_text_config().hidden_size
    for i in sorted({i % n for i in chosen}):
        layer = layers[i]
        attn, ffn = sublayers(layer)
        targets = [("adapter_ffn", ffn)] + ([("adapter_attn", attn)] if cfg.placement == "houlsby" else [])
        for attr, sub in targets:
            adapter = Bottleneck(hidden, cfg.size, cfg.activation).to(next(layer.parameters()).device)
            layer.add_module(attr, adapter)
            sub.register_forward_hook(output_hook(adapter))
    model.bottleneck_adapter_config = cfg
    return model


def adapter_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if ".adapter_ffn." in n or ".adapter_attn." in n}


def save(model, folder: Path) -> None:
    """The adapter tensors + config; a classifier also writes its trained head (``head.safetensors``)."""
    from safetensors.torch import save_file

    from tunelab.models.classifier import (  # lazy: torch; the config imports this module
        HEAD_FILE,
        is_classifier,
    )

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model.bottleneck_adapter_config.model_dump(), indent=2))
    if is_classifier(model):
        save_file({k: v.detach().contiguous().cpu() for k, v in model.score.state_dict().items()},
                  str(folder / HEAD_FILE))


def load_into(model, folder: Path):
    """Hook the adapters saved in ``folder`` into ``model`` (a base LM or a classifier) and load their weights."""
    from safetensors.torch import load_file


    cfg = Config.model_validate(json.loads((folder / CONFIG_FILE).read_text()))
    model = apply(model, cfg)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    expected = set(adapter_state(model))
    if set(tensors) != expected:
        raise UserError(f"{folder / WEIGHTS_FILE}: adapter tensors do not match its config "
                        f"({len(expected ^ set(tensors))} differ). The folder is damaged; re-export the run")
    model.load_state_dict(tensors, strict=False)
    return model


def load(folder: Path, info: dict, dtype):
    """The base model with the saved adapters hooked in."""
    from tunelab.models.load import load_model  # lazy: torch; the config imports this module

    return load_into(load_model(info["base_model"], dtype=dtype), folder)
