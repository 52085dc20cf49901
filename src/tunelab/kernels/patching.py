"""Instance ``forward``s over a class's own: how the kernels are switched on and off per module.

The lowest layer of :mod:`tunelab.kernels`: it imports nothing of the package, so the kernel
modules (:mod:`~tunelab.kernels.lora`, :mod:`~tunelab.kernels.decoder`) and the package itself
can all import it.
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
