"""Multi-task models: one shared causal LM, a classification head per classification task.

``MultiTaskModel`` holds

* ``lm``: the causal LM as loaded and wrapped by the method (LoRA/QLoRA/IA3 through PEFT,
  bottleneck adapters, full, freeze): SFT and generative-classification tasks train its LM head
  through :class:`~tunelab.objectives.causal_lm.CausalLMLoss`, exactly as single-task SFT;
* ``heads``: an ``nn.ModuleDict`` of :class:`~tunelab.models.classifier.ClassificationHead`, one
  per classification task, each on the pooled last hidden states of the shared decoder (pooling
  ``last`` from the attention mask, or ``mean``/``cls``; positions count real tokens only, so
  left and right padding give the same logits, as in :class:`~tunelab.models.classifier.SequenceClassifier`).

Heads are trained in full and in fp32 whatever the method does to the backbone. Saved as the
method's own folder for ``lm`` (a PEFT adapter, a full model, bottleneck adapter files...) plus
``heads.safetensors`` (``<task>.<param>`` tensors) and ``multitask.json`` (each classification
task's :class:`~tunelab.models.classifier.ClassifierSpec` and each generative task's type);
:func:`attach_heads` rebuilds the model around a reloaded LM.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import UserError
from tunelab.models.classifier import ClassificationHead, ClassifierSpec, pool

MULTITASK_FILE = "multitask.json"
HEADS_FILE = "heads.safetensors"


class MultiTaskModel(nn.Module):
    """A shared causal LM + one ``score`` head per classification task."""

    def __init__(self, lm: nn.Module, specs: dict[str, ClassifierSpec], generative: dict[str, str] | None = None):
        super().__init__()
        self.lm = lm
        self.specs = dict(specs)
        self.generative = dict(generative or {})  # task -> "sft" | "generative_classification"
        self.config = lm.config
        hidden = lm.config.get_text_config().hidden_size
        device = next(lm.parameters()).device
        self.heads = nn.ModuleDict({
            name: ClassificationHead(hidden, len(s.labels), layers=s.layers, width=s.width, activation=s.activation,
                                     dropout=s.dropout).to(device=device, dtype=torch.float32)
            for name, s in self.specs.items()})

    @property
    def decoder(self) -> nn.Module:
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return lm.get_decoder()

    def classify(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``task``'s head for a batch (``(batch, labels)``)."""
        if task not in self.heads:
            raise UserError(f"task {task!r} has no classification head (heads: {', '.join(self.heads) or 'none'}). "
                            "Pick one of them")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
        head = self.heads[task]
        return head(pool(hidden, attention_mask, self.specs[task].pooling).to(head.out.weight.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, task: str,
                **_: Any) -> torch.Tensor:
        return self.classify(task, input_ids, attention_mask)

    # the Hugging Face-like surface the recipe uses
    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        lm.gradient_checkpointing_enable(**kwargs)

    @property
    def tasks(self) -> list[str]:
        return list(self.specs) + list(self.generative)


def save_heads(model: MultiTaskModel, folder: Path) -> None:
    """``heads.safetensors`` + ``multitask.json`` into a weights folder (the LM is saved by its method)."""
    from safetensors.torch import save_file

    tensors = {f"{task}.{k}": v.detach().contiguous().cpu() for task, head in model.heads.items()
               for k, v in head.state_dict().items()}
    if tensors:
        save_file(tensors, str(Path(folder) / HEADS_FILE))
    spec = {"classification": {t: asdict(s) for t, s in model.specs.items()}, "generative": model.generative}
    (Path(folder) / MULTITASK_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False))


def read_spec(folder: Path) -> tuple[dict[str, ClassifierSpec], dict[str, str]]:
    raw = json.loads((Path(folder) / MULTITASK_FILE).read_text())
    return {t: ClassifierSpec(**s) for t, s in raw["classification"].items()}, dict(raw.get("generative", {}))


def attach_heads(lm: nn.Module, folder: Path) -> MultiTaskModel:
    """The multi-task model of a saved folder around its reloaded LM (heads loaded, strict)."""
    from safetensors.torch import load_file

    specs, generative = read_spec(folder)
    model = MultiTaskModel(lm, specs, generative)
    if specs:
        tensors = load_file(str(Path(folder) / HEADS_FILE))
        for task, head in model.heads.items():
            head.load_state_dict({k.removeprefix(task + "."): v for k, v in tensors.items() if k.startswith(task + ".")})
    return model.eval()


def is_multitask_folder(folder: Path) -> bool:
    return (Path(folder) / MULTITASK_FILE).is_file()
