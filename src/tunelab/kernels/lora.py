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
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from tunelab.kernels.patching import install_forward, remove_forward


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


def fused_adapter(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, scaling)`` of the one active adapter of PEFT LoRA layer ``m`` when the fused maths
    computes it exactly, else None (merged weights, several adapters, a variant such as DoRA,
    dropout while training). Whether the adapters are switched off is the caller's question."""
    adapters = m.active_adapters
    if (m.merged or len(adapters) != 1 or adapters[0] not in m.lora_A or adapters[0] in m.lora_variant
            or (m.training and not isinstance(m.lora_dropout[adapters[0]], nn.Identity))):
        return None
    name = adapters[0]
    return m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance ``forward`` of a PEFT ``lora.Linear``: the fused path when it applies, else PEFT's."""
    adapter = None if (args or kwargs or self.disable_adapters) else fused_adapter(self)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return LoRALinearFn.apply(x, base.weight, base.bias, *adapter)


def fusable(module: nn.Module) -> bool:
    """A PEFT ``lora.Linear`` over a frozen ``nn.Linear`` (the layers the fused kernels can take)."""
    base = getattr(module, "base_layer", None)
    return (type(module) is LoraLinear and type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad) and not getattr(module, "fan_in_fan_out", False))


def use_fused_lora(model: nn.Module) -> int:
    """Give every eligible LoRA linear layer the fused forward; returns how many got it."""
    return install_forward(model, fusable, fused_forward)


def restore(model: nn.Module) -> bool:
    """PEFT's own forward everywhere again; returns whether any layer had the fused one."""
    return remove_forward(model, fused_forward)
