"""The method registry: one module per fine-tuning method, registered by name.

A method module defines

* ``Config``: a pydantic model with ``name: Literal["<method>"]`` and the method's own
  options (validated strictly, documented field by field: the docs become ``--help``);
* ``apply(model, cfg: Config) -> model``: wraps or freezes the loaded base model for tuning
  and returns the model to train (its ``requires_grad`` flags say what is trained);
* ``save(model, folder)``: writes the tuned weights in the standard Hugging Face layout
  (a PEFT adapter folder or a full ``save_pretrained`` folder);
* ``MERGEABLE``: whether ``tunelab export --merge`` can fold the tuning into the base weights.

Adding a method is a checklist: write the module, add it to ``_MODULES`` below, add a row to
``docs/methods.md`` and a case to ``tests/test_methods.py``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

_MODULES = ("full", "lora", "head")


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
