"""The bottleneck adapter module and its hooks (used by :mod:`tunelab.methods.adapter`).

Kept apart so that reading configs (``tunelab.methods``) does not import torch.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import UserError

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))``; computed in the adapter's dtype, returned in ``h``'s."""

    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        return h + delta.to(h.dtype)


def output_hook(adapter: Bottleneck):
    def hook(module, args, output):
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def sublayers(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    attn = next((getattr(layer, n) for n in ("self_attn", "attn", "attention", "self_attention") if hasattr(layer, n)), None)
    ffn = next((getattr(layer, n) for n in ("mlp", "feed_forward", "ffn") if hasattr(layer, n)), None)
    if attn is None or ffn is None:

        raise UserError(f"method adapter: cannot find the attention / feed-forward modules of {type(layer).__name__}. "
                        "Use lora for this architecture")
    return attn, ffn
