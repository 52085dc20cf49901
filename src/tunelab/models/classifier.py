"""Sequence classifiers: any Hugging Face backbone (decoder or encoder) + pooling + a task head.

``SequenceClassifier`` holds

* ``backbone``: the base model without its LM head (``LlamaModel``, ``BertModel``, ...), loaded
  by transformers (``AutoModel``; a ``.gguf`` goes through :func:`tunelab.models.load.load_model`);
* pooling of the last hidden states over the non-pad tokens: ``last`` (the last non-pad token,
  found from the attention mask, so left and right padding give the same result), ``mean``
  (sentence encoders such as all-MiniLM-L6-v2) or ``cls`` (the first token);
* ``score``: :class:`ClassificationHead`, a linear layer, or a small MLP (``layers`` hidden
  layers of ``width`` units with an activation and dropout; the ``head`` method sets it).

The head is named ``score`` on purpose: PEFT's sequence-classification task type
(:func:`peft_task_type` returns it for these models) adds ``score`` to ``modules_to_save``, so
LoRA/QLoRA/IA3 train the head fully and save it in the adapter file. Decoders get position ids
from the attention mask, so a left-padded row gives the same logits as a right-padded one.

A saved folder is the backbone's ``save_pretrained`` (its ``config.json`` carries ``id2label`` /
``label2id``), ``head.safetensors`` and ``classifier.json`` (labels, pooling, head shape, base
model); a PEFT method saves the adapter (with ``score``) instead of the backbone weights.
:func:`tunelab.methods.reload.load_classifier` reads either back (it needs the method registry, a
layer above this module).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import UserError, first_line
from tunelab.models.load import load_model, offline_mode_from_env, resolve_source

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class ClassifierSpec:
    """Everything needed to rebuild a classifier around its backbone (saved as ``classifier.json``)."""

    labels: list[str]
    pooling: str = "last"  # last | mean | cls
    layers: int = 0  # hidden layers of the head (0: one linear layer)
    width: int | None = None  # hidden units per head layer (default: the backbone's hidden size)
    activation: str = "gelu"
    dropout: float = 0.0
    base_model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


class ClassificationHead(nn.Module):
    """``[dropout -> linear -> activation] x layers -> dropout -> linear(n_labels)`` on pooled features."""

    def __init__(self, hidden: int, n_labels: int, *, layers: int = 0, width: int | None = None,
                 activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        width = width or hidden
        blocks: list[nn.Module] = []
        size = hidden
        for _ in range(layers):
            blocks += [nn.Dropout(dropout), nn.Linear(size, width), ACTIVATIONS[activation]()]
            size = width
        self.hidden = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(size, n_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.hidden(pooled)))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """``(batch, length, d)`` hidden states -> ``(batch, d)`` over the tokens where the mask is 1.

    ``last`` takes the last position whose mask is 1 (works for left and right padding),
    ``mean`` averages the masked positions, ``cls`` takes the first non-pad position.
    """
    mask = attention_mask.to(torch.long)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if how == "last":
        return hidden[rows, (positions * mask).argmax(dim=1)]
    if how == "cls":
        return hidden[rows, (positions + (1 - mask) * mask.shape[1]).argmin(dim=1)]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    raise ValueError(f"unknown pooling {how!r}")


def is_decoder(config) -> bool:
    """Whether a backbone config is a causal LM (architectures ``*ForCausalLM`` or ``*LMHeadModel``)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if archs:
        return False
    return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", "") in {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2"}


class SequenceClassifier(nn.Module):
    """A backbone, a pooling rule and the ``score`` head; ``forward(input_ids, attention_mask) -> logits``."""

    def __init__(self, backbone: nn.Module, spec: ClassifierSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.decoder = is_decoder(backbone.config)
        self.config = backbone.config  # PEFT reads model.config; labels live there too
        self.config.id2label = dict(enumerate(spec.labels))
        self.config.label2id = spec.label2id
        self.score = self._new_head()
        # pooled features of known rows (tunelab.models.features.FeatureTable), set when the backbone is frozen
        self.features = None

    def _new_head(self) -> ClassificationHead:
        s = self.spec
        return ClassificationHead(self.config.hidden_size, len(s.labels), layers=s.layers, width=s.width,
                                  activation=s.activation, dropout=s.dropout)

    def set_head(self, *, layers: int, width: int | None, activation: str, dropout: float) -> None:
        """Replace the head by a fresh one of this shape (the ``head`` method's MLP)."""
        self.spec.layers, self.spec.width, self.spec.activation, self.spec.dropout = layers, width, activation, dropout
        device = next(self.backbone.parameters()).device
        self.score = self._new_head().to(device)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled output ``(batch, hidden)``: what the head reads."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.decoder:
            # positions count real tokens only: left padding then gives the same logits as right padding
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        hidden = self.backbone(**kwargs).last_hidden_state
        return pool(hidden, attention_mask, self.spec.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = self.features.lookup(input_ids, attention_mask) if self.features is not None else None
        if pooled is None:  # no table, or a row it does not hold
            pooled = self.pooled(input_ids, attention_mask)
        return self.score(pooled.to(self.score.out.weight.dtype))

    def train(self, mode: bool = True) -> SequenceClassifier:
        """A frozen backbone (nothing in it trains) stays in inference mode: it is a feature extractor, so its
        dropout is off, and its features are the same in every epoch (what makes the feature cache exact)."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    # Hugging Face-like surface used by PEFT, the recipe and the checkpoint code
    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def layers(self) -> nn.ModuleList | None:
        """The backbone's stack of transformer blocks (the longest ``ModuleList``), for partial unfreezing."""
        lists = [m for m in self.backbone.modules() if isinstance(m, nn.ModuleList)]
        return max(lists, key=len) if lists else None

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True, *, with_backbone: bool = True,
                        **_: Any) -> None:
        """Backbone (``save_pretrained``, with id2label/label2id) + ``head.safetensors`` + ``classifier.json``.

        ``with_backbone=False`` (a frozen backbone) writes only the config: the weights are the base model's.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        if with_backbone:
            self.backbone.save_pretrained(folder, safe_serialization=True)
        else:
            self.config.save_pretrained(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.score.state_dict().items()}, str(folder / HEAD_FILE))
        write_spec(self, folder)


def write_spec(model: nn.Module, folder: Path) -> None:
    """``classifier.json`` and the backbone config (with the label maps) for any method's weights folder."""
    clf = unwrap(model)
    (Path(folder) / CLASSIFIER_FILE).write_text(json.dumps(asdict(clf.spec), indent=2, ensure_ascii=False))
    if not (Path(folder) / "config.json").is_file():
        clf.config.save_pretrained(folder)


def unwrap(model: nn.Module) -> SequenceClassifier:
    """The :class:`SequenceClassifier` inside a (possibly PEFT-wrapped) model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, SequenceClassifier):
        raise TypeError(f"expected a SequenceClassifier, got {type(inner).__name__}")
    return inner


def is_classifier(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(inner, SequenceClassifier)


def peft_task_type(model: nn.Module) -> str:
    """The PEFT ``task_type`` for a model: ``SEQ_CLS`` for classifiers (the ``score`` head then goes
    to ``modules_to_save``: trained in full and saved with the adapter), else ``CAUSAL_LM``."""
    return "SEQ_CLS" if isinstance(model, SequenceClassifier) else "CAUSAL_LM"


def load_backbone(name_or_path: str, *, dtype: torch.dtype = torch.float32, **load_options: Any) -> nn.Module:
    """The base model without its LM head, from an alias, a folder, a ``.gguf`` file or a cached hub id.

    transformers' ``AutoModel`` loads a causal-LM folder as its bare decoder (the ``model.`` prefix
    of the checkpoint is stripped) and an encoder folder as the encoder. ``load_options`` are the
    method's extra ``from_pretrained`` arguments (QLoRA: a bitsandbytes 4-bit ``quantization_config``).
    """
    from transformers import AutoModel

    with offline_mode_from_env():
        source = resolve_source(name_or_path)
        if source.kind == "gguf":
            return load_model(name_or_path, dtype=dtype, **load_options).get_decoder()
        try:
            return AutoModel.from_pretrained(source.location, dtype=dtype, local_files_only=source.kind != "hub",
                                             **load_options)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(
                f"model '{name_or_path}': transformers cannot load this folder as a backbone (got: {first_line(err)}). "
                "Check that it is a complete model folder (config.json plus *.safetensors)."
            ) from err


def default_pooling(name_or_path: str) -> str:
    """``last`` for causal LMs, ``mean`` for encoders (what sentence-transformers models are trained with)."""
    from transformers import AutoConfig

    with offline_mode_from_env():
        source = resolve_source(name_or_path)
        if source.kind == "gguf":
            return "last"
        config = AutoConfig.from_pretrained(source.location, local_files_only=source.kind != "hub")
    return "last" if is_decoder(config) else "mean"


def build_classifier(name_or_path: str, labels: list[str], *, pooling: str = "auto",
                     dtype: torch.dtype = torch.float32, **load_options: Any) -> SequenceClassifier:
    """A classifier with a fresh linear head over ``labels`` on the named backbone (loaded with the
    method's ``load_options``, e.g. QLoRA's 4-bit quantisation)."""
    if pooling == "auto":
        pooling = default_pooling(name_or_path)
    backbone = load_backbone(name_or_path, dtype=dtype, **load_options)
    spec = ClassifierSpec(labels=list(labels), pooling=pooling, base_model=str(name_or_path))
    model = SequenceClassifier(backbone, spec)
    model.score.to(torch.float32)  # the head trains in fp32 whatever the backbone's dtype
    return model


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, texts: list[str], *, batch_size: int = 32,
            max_length: int = 512) -> list[dict[str, Any]]:
    """``[{"label", "score", "probs": {label: p}}]`` for each text, labels mapped back through the saved label set."""
    clf = unwrap(model)
    labels = clf.spec.labels
    device = next(clf.parameters()).device
    out: list[dict[str, Any]] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        probs = clf(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).softmax(-1)
        for row in probs.tolist():
            best = max(range(len(labels)), key=row.__getitem__)
            out.append({"label": labels[best], "score": row[best], "probs": dict(zip(labels, row, strict=True))})
    return out
