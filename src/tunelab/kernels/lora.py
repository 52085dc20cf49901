"""A fused forward/backward for PEFT's LoRA linear layers while training.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling``. Under bf16
autocast with fp32 adapters that costs, per adapted layer and token: a copy of ``x`` to fp32
(and autocast's copy back to bf16), the scaling multiply over the full ``out`` width, a separate
add of the two results, and in the backward the same again (an fp32 copy of ``x`` is also what
the autograd graph keeps). :class:`LoRALinearFn` does the same maths with

* the adapter weights cast once to the compute dtype (they are ``r x in`` and ``out x r``),
* the scaling applied to the rank-``r`` intermediate instead of the ``out``-wide result,
* the adapter product added into the base product in place (``addmm_``), forward and backward,
* only ``x`` (compute dtype) and the ``r``-wide ``x A^T`` kept for the backward.

It is our own code because PEFT has no fused path for CPU training; measured on
SmolLM2-135M-Instruct (LoRA r=16 on every linear layer, one packed 512-token row, bf16, one
thread): see docs/benchmarks.md. The layers keep their PEFT parameters, so checkpoints and the
saved adapter are unchanged; :func:`restore` puts PEFT's own forward back.

A layer takes the fused path only when it is vanilla LoRA with one active adapter, no dropout
in training, a frozen ``nn.Linear`` base; anything else (DoRA, dropout, merged weights, several
adapters, ``adapter_names``) runs PEFT's forward unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.kernels import install_forward, remove_forward


class LoRALinearFn(torch.autograd.Function):
    """``y = x W^T + b + s * (x A^T) B^T`` with ``W``, ``b`` frozen and ``A``, ``B`` trained."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        xa = x2 @ a.t()  # (tokens, r)
        y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, w, a, b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        g = dy2 @ b  # (tokens, r): gradient reaching x A^T, before scaling
        d_b = (dy2.t() @ xa).mul_(s) if ctx.needs_input_grad[4] else None
        d_a = (g.t() @ x2).mul_(s) if ctx.needs_input_grad[3] else None
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = dy2 @ w
            d_x.addmm_(g, a, alpha=s)
            d_x = d_x.view(ctx.x_shape).to(ctx.x_dtype)
        pa, pb = ctx.param_dtypes
        return (d_x, None, None, d_a.to(pa) if d_a is not None else None,
                d_b.to(pb) if d_b is not None else None, None)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance ``forward`` of a PEFT ``lora.Linear``: the fused path when it applies, else PEFT's."""
    adapters = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] not in self.lora_A or adapters[0] in self.lora_variant
            or (self.training and not isinstance(self.lora_dropout[adapters[0]], nn.Identity))):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base = self.base_layer
    return LoRALinearFn.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                              float(self.scaling[name]))


def _eligible(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = getattr(module, "base_layer", None)
    return (type(module) is LoraLinear and type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad) and not getattr(module, "fan_in_fan_out", False))


def use_fused_lora(model: nn.Module) -> int:
    """Give every eligible LoRA linear layer the fused forward; returns how many got it."""
    return install_forward(model, _eligible, _fused_forward)


def restore(model: nn.Module) -> bool:
    """PEFT's own forward everywhere again; returns whether any layer had the fused one."""
    return remove_forward(model, _fused_forward)
