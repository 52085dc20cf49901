"""Training-time kernels of our own, switched on for the duration of training only.

* :mod:`~tunelab.kernels.attention`: segment-wise causal attention for packed rows on CPU;
* :mod:`~tunelab.kernels.decoder`: a whole Llama-style decoder layer (frozen base weights, LoRA or
  none) as one function with a hand-written backward, on CPU with packed rows;
* :mod:`~tunelab.kernels.lora`: a fused forward/backward for PEFT's LoRA linear layers (those
  outside fused decoder layers).

Both leave the parameters and the saved formats alone: :func:`restore_stock` puts the stock
transformers / PEFT code back before a model is saved, used for generation or handed to a user,
and :func:`use_training_kernels` switches them on again.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn


def install_forward(model: nn.Module, eligible: Callable[[nn.Module], object], forward: Callable) -> int:
    """Give every module of ``model`` for which ``eligible`` is truthy ``forward`` as its instance
    ``forward`` (the class's stays underneath); returns how many got it."""
    n = 0
    for module in model.modules():
        if eligible(module):
            module.forward = types.MethodType(forward, module)
            n += 1
    return n


def remove_forward(model: nn.Module, forward: Callable) -> bool:
    """Take the instance ``forward`` installed by :func:`install_forward` off every module again;
    returns whether any had it."""
    found = False
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is forward:
            del module.forward
            found = True
    return found


def use_training_kernels(model: nn.Module) -> list[str]:
    """Switch ``model`` to our training kernels where they apply; returns what was switched on."""
    from tunelab.kernels import attention as att
    from tunelab.kernels import decoder
    from tunelab.kernels import lora as fused_lora

    used = []
    if att.use_packed_attention(model):
        used.append("segment-wise causal attention")
        n = decoder.use_fused_layers(model)
        if n:
            used.append(f"fused decoder layer ({n} layers)")
    n = fused_lora.use_fused_lora(model)
    if n:
        used.append(f"fused LoRA linear ({n} layers)")
    return used


def restore_stock(model: nn.Module) -> bool:
    """The stock transformers attention and PEFT forward again; returns whether any of ours was on."""
    from tunelab.kernels import attention as att
    from tunelab.kernels import decoder
    from tunelab.kernels import lora as fused_lora

    attention_was_on = att.restore_sdpa(model)
    layers_were_on = decoder.restore(model)
    lora_was_on = fused_lora.restore(model)
    return attention_was_on or layers_were_on or lora_was_on
