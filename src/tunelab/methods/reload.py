"""Reloading a classifier saved by tunelab, with whatever method trained it.

Above both :mod:`tunelab.models.classifier` (the model) and the method modules (how each saved
its weights): a full folder, a PEFT adapter with its ``score`` head (QLoRA: on the base
re-quantised as in training), or bottleneck adapters with ``head.safetensors``. Not a method
itself (it is not in the registry); importing it imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab import methods
from tunelab.errors import UserError
from tunelab.methods import adapter as bottleneck
from tunelab.methods.qlora import same_kernel_in_eval
from tunelab.models.classifier import (
    CLASSIFIER_FILE,
    HEAD_FILE,
    ClassifierSpec,
    SequenceClassifier,
    load_backbone,
)

__all__ = ["load_classifier", "method_load_options"]


def method_load_options(folder: Path, dtype: torch.dtype) -> tuple[dict[str, Any], torch.dtype]:
    """The trained method's load options (QLoRA's quantisation) and dtype, from ``tunelab.json``."""
    info_file = folder / "tunelab.json"
    if not info_file.is_file():
        return {}, dtype
    info = json.loads(info_file.read_text())
    module = methods.METHODS.get(info.get("method", ""))
    if module is None or not hasattr(module, "load_options"):
        return {}, dtype
    trained = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(info.get("dtype"), dtype)
    return methods.load_options(module.Config.model_validate(info["method_config"]), trained), trained


def load_classifier(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Reload a classifier saved by tunelab: a full folder, a PEFT adapter with its ``score`` head (QLoRA:
    on the base re-quantised as in training), or bottleneck adapters with ``head.safetensors``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_file = folder / CLASSIFIER_FILE
    if not spec_file.is_file():
        raise UserError(f"{folder}: no {CLASSIFIER_FILE}, so this is not a tunelab classifier. Point at a run's final/ or best/")
    spec = ClassifierSpec(**json.loads(spec_file.read_text()))
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        options, trained = method_load_options(folder, dtype)
        base = SequenceClassifier(load_backbone(spec.base_model, dtype=trained if options else dtype, **options), spec)
        if options:  # a quantised backbone: the float weights as prepare_model_for_kbit_training left them
            from peft import prepare_model_for_kbit_training

            base = same_kernel_in_eval(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False))
        base.score.to(torch.float32)
        return PeftModel.from_pretrained(base, folder).eval()
    if (folder / bottleneck.CONFIG_FILE).is_file():  # bottleneck adapters hooked into the base backbone
        model = SequenceClassifier(load_backbone(spec.base_model, dtype=dtype), spec)
        model.score.to(torch.float32)
        bottleneck.load_into(model, folder)
        model.score.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model.eval()
    has_backbone = any(p.name != HEAD_FILE for p in folder.glob("*.safetensors"))
    source = str(folder) if has_backbone else spec.base_model  # a frozen backbone is the base model's
    model = SequenceClassifier(load_backbone(source, dtype=dtype), spec)
    model.score.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return model.eval()
