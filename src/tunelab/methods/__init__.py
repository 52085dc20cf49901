"""The method registry: one module per fine-tuning method, registered by name.

A method module defines

* ``Config``: a pydantic model with ``name: Literal["<method>"]`` and the method's own
  options (validated strictly, documented field by field: the docs become ``--help``);
* ``apply(model, cfg: Config) -> model``: wraps or freezes the loaded base model for tuning
  and returns the model to train (its ``requires_grad`` flags say what is trained);
* ``save(model, folder)``: writes the tuned weights in the standard Hugging Face layout
  (a PEFT adapter folder or a full ``save_pretrained`` folder);
* ``MERGEABLE``: whether ``tunelab export --merge`` can fold the tuning into the base weights
  (PEFT ``merge_and_unload()`` for LoRA, DoRA, IA3; full and freeze are plain models already);
  when False, ``NOT_MERGEABLE``: one line saying why not and how such a run is served instead.

Optional hooks (absent means "nothing special"):

* ``load_options(cfg, dtype) -> dict``: extra keyword arguments for
  :func:`tunelab.models.load.load_model` (QLoRA: a bitsandbytes 4-bit ``quantization_config``);
* ``lr_multiplier(cfg) -> (name -> float)``: a per-parameter LR factor (LoRA+: ``B`` matrices);
* ``VIRTUAL_TOKENS = True``: the method feeds virtual tokens / past key values (prefix, prompt,
  P-tuning); :class:`~tunelab.objectives.causal_lm.CausalLMLoss` then runs
  :func:`tunelab.methods.virtual.hidden_states` instead of the bare decoder;
* facts, read through :func:`fact` (defaults in brackets): ``VIRTUAL_TOKENS`` [False];
  ``FUSED_KERNELS`` [True]: tunelab's training kernels may run the decoder (they assume plain
  causal-LM inputs with no virtual tokens or adaption prompts); ``CLASSIFICATION`` [True]: the
  method works under a class head (the backbone sees only the real tokens); ``CLASS_HEAD``
  [False]: the method trains a class head only (``head``), so it needs a task with one;
  ``TRAINS_BASE`` [False]: the method trains the base weights themselves (``full``, ``freeze``), so
  they are fp32 masters, the saved folder is a plain model, and there is no adapter to switch off;
  ``SHARDS`` [False]: the method trains under ``train.distributed: fsdp`` / ``deepspeed`` (tested there);
* ``memory_linear_from(cfg) -> int``: the smallest decoder depth from which the method's training
  memory grows linearly with depth (1 by default; more when only the top layers train, so nothing
  below them holds gradients or saved activations); the advisor's memory probes start there;
* ``caches_features(cfg) -> bool``: the method leaves the classifier's backbone frozen and wants its
  pooled features computed once (:mod:`tunelab.models.features`; ``head`` with ``unfreeze_top: 0``);
* ``fit(model, cfg, features, labels, n_classes=, class_weight=, sample_weight=) -> str | None``: fits the
  trained parameters on those features without the training loop (``head``'s ``fit: sklearn``);
  returns what it did, or None when the loop is to train as usual;
* ``load(folder, info, dtype) -> model``: rebuilds the tuned model from ``save``'s folder when a
  plain PEFT or transformers load cannot (own modules, a quantised base);
  :func:`tunelab.ship.inference.load_for_inference` calls it.

Adding a method is a checklist: write the module, add it to ``_MODULES`` below, add a row to
``docs/methods.md`` and a case to ``tests/test_methods.py``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

_MODULES = ("full", "lora", "qlora", "freeze", "head", "prefix", "prompt", "ptuning", "ia3", "adapter", "llama_adapter")


def _load() -> dict[str, ModuleType]:
    registry: dict[str, ModuleType] = {}
    for name in _MODULES:
        module = importlib.import_module(f"tunelab.methods.{name}")
        registry[name] = module
    return registry


METHODS: dict[str, ModuleType] = _load()

# A discriminated union over every registered method's Config, keyed by ``name``.
MethodConfig = Annotated[
    Union[tuple(m.Config for m in METHODS.values())],  # noqa: UP007 - built dynamically
    Field(discriminator="name"),
]


def get(name: str) -> ModuleType:
    """The module of method ``name`` (validated configs always name a registered one)."""
    return METHODS[name]


def load_options(cfg, dtype) -> dict:
    """Extra ``load_model`` keyword arguments the method needs (empty for most)."""
    hook = getattr(get(cfg.name), "load_options", None)
    return hook(cfg, dtype) if hook else {}


def lr_multiplier(cfg):
    """The method's per-parameter LR factor function, or None."""
    hook = getattr(get(cfg.name), "lr_multiplier", None)
    return hook(cfg) if hook else None


def caches_features(cfg) -> bool:
    """Whether the method wants the frozen backbone's features computed once (``caches_features`` hook)."""
    hook = getattr(get(cfg.name), "caches_features", None)
    return bool(hook(cfg)) if hook else False


def fit(cfg, model, features, labels: list[int], **kwargs) -> str | None:
    """The method's ``fit`` hook on the cached features (see the module docstring), or None: the loop trains."""
    hook = getattr(get(cfg.name), "fit", None)
    return hook(model, cfg, features, labels, **kwargs) if hook else None


FACTS = {"VIRTUAL_TOKENS": False, "FUSED_KERNELS": True, "CLASSIFICATION": True, "CLASS_HEAD": False,
         "TRAINS_BASE": False, "SHARDS": False}


def fact(name: str, key: str) -> bool:
    """A fact method ``name`` declares (see the module docstring), or its default."""
    return bool(getattr(get(name), key, FACTS[key]))


def memory_linear_from(cfg, layers: int) -> int:
    """The method's ``memory_linear_from`` hook (see the module docstring), within ``1..layers``."""
    hook = getattr(get(cfg.name), "memory_linear_from", None)
    return max(1, min(hook(cfg) if hook else 1, layers))
