"""A whole Llama-style decoder layer as one autograd function, for training with frozen base weights.

Stock transformers + PEFT run a decoder layer as ~100 small autograd operations, most of them
elementwise (RMSNorm in fp32 and back, RoPE through ``rotate_half`` and ``cat``, the LoRA
branch, casts), and autograd keeps the inputs of each: about 70 KB of activations per token and
layer for SmolLM2-135M with LoRA under bf16 autocast. :class:`DecoderLayerFn` computes the same
layer with a hand-written backward:

* every projection is one GEMM on the frozen weight plus, for LoRA, the rank-``r`` product added
  in place (the ``A`` matrices of q/k/v and of gate/up are stacked, so each group's ``x A^T``,
  input gradient and ``A`` gradient is one GEMM);
* RMSNorm keeps only its fp32 ``1/rms`` per token and is recomputed in the backward; RoPE
  writes the rotated q and k straight into the layout the attention reads;
* attention is :mod:`tunelab.kernels.attention` (segment-wise, for packed rows);
* the backward keeps 10 tensors per token (the layer input, q, k, v, the attention output, the
  mid-layer residual, the gate and up projections, ``silu(gate)``, the rank-``r`` LoRA
  intermediates): ~15 KB per token and layer in bf16, plus the attention probabilities of each
  packed sample (bf16, ``heads x n^2`` for a sample of ``n`` tokens; not with gradient
  checkpointing, which recomputes them). Keeping the probabilities instead of recomputing them in
  the backward trades memory for speed (docs/benchmarks.md); keeping ``silu(gate)`` saves one of
  the two SiLU passes the backward would make.

It is our own code because neither transformers nor PEFT has a fused CPU training path (Liger's
fused kernels are Triton, CUDA only). The parameters, the module tree and the saved formats are
untouched; a layer that does not fit (trained base or norm weights, LoRA dropout or variants,
a KV cache, an attention mask, a non-SiLU MLP, CUDA) runs its stock forward.
Equivalence with the stock layer, values and gradients: ``tests/test_decoder_kernel.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

import tunelab.kernels.attention as att
import tunelab.kernels.lora as fused_lora
from tunelab.kernels.patching import install_forward, remove_forward

LAYER_TYPES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_CHILDREN = {  # the exact module tree the fused layer computes; anything added (an adapter) or wrapped is not it
    "layer": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
    "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mlp": {"gate_proj", "up_proj", "down_proj", "act_fn"},
}


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has hooks or a replaced ``forward`` (other than our fused LoRA one, the same
    maths) that the fused layer would skip."""
    forward = vars(module).get("forward")
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or (forward is not None and getattr(forward, "__func__", None) is not fused_lora.fused_forward))


@dataclass
class _Proj:
    """One projection of a layer: the frozen base ``nn.Linear`` and, for LoRA, the adapter module."""

    base: nn.Linear
    lora: nn.Module | None  # the PEFT lora.Linear wrapping ``base``, or None for a plain frozen Linear

    def adapter(self) -> tuple[nn.Parameter, nn.Parameter, float] | None:
        """``(A, B, scaling)`` of the active adapter, or None when the LoRA branch is off."""
        m = self.lora
        return None if m is None or m.disable_adapters else fused_lora.fused_adapter(m)

    def computable(self) -> bool:
        """Whether the fused maths computes this projection as it is now."""
        m = self.lora
        return m is None or m.disable_adapters or fused_lora.fused_adapter(m) is not None


def _proj(module: nn.Module) -> _Proj | None:
    """A frozen plain ``nn.Linear`` or a PEFT LoRA layer over one, as a :class:`_Proj`; else None."""
    if type(module) is nn.Linear:
        ok = not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)
        return _Proj(module, None) if ok else None
    return _Proj(module.base_layer, module) if fused_lora.fusable(module) else None


@dataclass
class _Layer:
    """What the fused function needs of one decoder layer (module references, read at every call)."""

    qkv: tuple[_Proj, _Proj, _Proj]
    o: _Proj
    gate_up: tuple[_Proj, _Proj]
    down: _Proj
    norm_in: nn.Module
    norm_post: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scale: float

    def projections(self) -> tuple[_Proj, ...]:
        return (*self.qkv, self.o, *self.gate_up, self.down)


def describe(layer: nn.Module) -> _Layer | None:
    """The fused view of ``layer``, or None when the layer does not fit the fused path."""
    if type(layer).__name__ not in LAYER_TYPES or {n for n, _ in layer.named_children()} != _CHILDREN["layer"]:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
    if ({n for n, _ in attn.named_children()} != _CHILDREN["self_attn"]
            or {n for n, _ in mlp.named_children()} != _CHILDREN["mlp"]
            or layer._forward_hooks or layer._forward_pre_hooks
            or any(_hooked(m) for m in (attn, mlp, n_in, n_post, *attn.children(), *mlp.children()))):
        return None  # e.g. bottleneck adapters (forward hooks), LLaMA-Adapter (a wrapped attention)
    config = getattr(attn, "config", None)
    if (config is None or getattr(config, "hidden_act", None) != "silu" or getattr(attn, "sliding_window", None)
            or getattr(config, "attention_dropout", 0.0)):
        return None
    for norm in (n_in, n_post):
        if (not hasattr(norm, "variance_epsilon") or norm.weight.requires_grad
                or not type(norm).__name__.endswith(("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"))):
            return None
    projs = [_proj(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projs += [_proj(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projs):
        return None
    head_dim = attn.head_dim
    return _Layer(qkv=tuple(projs[:3]), o=projs[3], gate_up=tuple(projs[4:6]), down=projs[6], norm_in=n_in,
                  norm_post=n_post, heads=projs[0].base.out_features // head_dim,
                  kv_heads=projs[1].base.out_features // head_dim, head_dim=head_dim, scale=attn.scaling)


# =========================================================================== pieces
# Plain functions on 2-D ``(tokens, features)`` tensors; the autograd function strings them together.


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype):
    """transformers' Llama RMSNorm (fp32 statistics, ``weight * normalised.to(input dtype)``), in
    ``dtype``; also returns the fp32 ``1/rms`` per token for the backward."""
    xf = x.float()  # x itself when it is fp32: only out-of-place ops on it
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return torch.mul(xf, rstd).to(x.dtype).mul_(weight.to(x.dtype)).to(dtype), rstd


def _rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`_rms_norm` for its input, in fp32."""
    n = torch.mul(x.float(), rstd)
    dn = torch.mul(dy.float(), weight.float())
    return dn.sub_(n.mul_((dn * n).mean(-1, keepdim=True))).mul_(rstd)


def _stack_a(projs, dtype) -> tuple[torch.Tensor | None, list]:
    """The LoRA ``A`` matrices of ``projs`` stacked ``(sum r, in)`` in ``dtype``, and per projection
    ``(row slice, B in dtype, scaling)`` or None (no adapter)."""
    mats, info, row = [], [], 0
    for p in projs:
        ad = p.adapter()
        if ad is None:
            info.append(None)
            continue
        a, b, s = ad
        mats.append(a)
        info.append((slice(row, row + a.shape[0]), b.to(dtype), s))
        row += a.shape[0]
    if not mats:
        return None, info
    return (torch.cat(mats).to(dtype) if len(mats) > 1 else mats[0].to(dtype)), info


def _group_forward(x: torch.Tensor, projs, dtype):
    """``[x W_i^T + b_i + s_i (x A_i^T) B_i^T]`` for projections sharing the input ``x``; returns the
    outputs, the stacked ``x A^T`` (or None) and the stacking info."""
    a, info = _stack_a(projs, dtype)
    xa = x @ a.t() if a is not None else None
    outs = []
    for p, inf in zip(projs, info, strict=True):
        w = p.base.weight.to(dtype)
        y = x @ w.t() if p.base.bias is None else torch.addmm(p.base.bias.to(dtype), x, w.t())
        if inf is not None:
            rows, b, s = inf
            y.addmm_(xa[:, rows], b.t(), alpha=s)
        outs.append(y)
    return outs, xa, a, info


def _group_backward(dys, x, xa, a, info, projs, need_dx: bool):
    """Input gradient (sum over the group, or None) and ``[(dA, dB) or None]`` per projection."""
    dtype = x.dtype
    dx = None
    if need_dx:
        for p, dy in zip(projs, dys, strict=True):
            w = p.base.weight.to(dtype)
            dx = dy @ w if dx is None else dx.addmm_(dy, w)
    grads = [None] * len(projs)
    if a is None:
        return dx, grads
    # g_i = s_i * dy_i B_i, stacked: the gradient reaching x A^T
    g = torch.empty(x.shape[0], a.shape[0], dtype=dtype, device=x.device)
    for dy, inf in zip(dys, info, strict=True):
        if inf is not None:
            rows, b, s = inf
            g[:, rows] = (dy @ b).mul_(s)
    if need_dx:
        dx.addmm_(g, a)
    d_a = g.t() @ x  # (sum r, in)
    for i, (dy, inf) in enumerate(zip(dys, info, strict=True)):
        if inf is not None:
            rows, _, s = inf
            grads[i] = (d_a[rows], (dy.t() @ xa[:, rows]).mul_(s))
    return dx, grads


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, heads * D)`` -> rotated ``(B, heads, L, D)``, contiguous, for the attention kernel.

    ``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` ``(B, L, D)`` whose halves repeat (as
    transformers builds them)."""
    b_, length, _ = x.shape
    d = cos.shape[-1]
    half = d // 2
    xt = x.view(b_, length, heads, d).transpose(1, 2)
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    out = torch.empty(b_, heads, length, d, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    x1, x2 = xt[..., :half], xt[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)
    return out


def _rope_backward(d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of :func:`_rope` for ``d`` ``(B, heads, L, D)``: ``(B * L, heads * D)`` in ``dtype``."""
    b_, heads, length, dd = d.shape
    half = dd // 2
    d = d.to(dtype)
    c, s = cos[:, None, :, :half].to(dtype), sin[:, None, :, :half].to(dtype)
    out = torch.empty(b_, length, heads, dd, dtype=dtype, device=d.device)
    ot = out.transpose(1, 2)
    d1, d2 = d[..., :half], d[..., half:]
    torch.mul(d1, c, out=ot[..., :half]).addcmul_(d2, s)
    torch.mul(d2, c, out=ot[..., half:]).addcmul_(d1, s, value=-1)
    return out.view(b_ * length, heads * dd)


# =========================================================================== the layer


class DecoderLayerFn(torch.autograd.Function):
    """One decoder layer: ``x (B, L, H)`` -> ``(B, L, H)``; trained tensors are the LoRA matrices."""

    @staticmethod
    def forward(ctx, x, cos, sin, spec: _Layer, bounds, dtype, keep_probs: bool, *lora_params):
        b_, length, hidden = x.shape
        x2 = x.reshape(b_ * length, hidden)
        cos, sin = cos.to(dtype), sin.to(dtype)
        # attention block
        h1, r1 = _rms_norm(x2, spec.norm_in.weight, spec.norm_in.variance_epsilon, dtype)
        (q, k, v), xa_qkv, a_qkv, i_qkv = _group_forward(h1, spec.qkv, dtype)
        q = _rope(q.view(b_, length, -1), cos, sin, spec.heads)
        k = _rope(k.view(b_, length, -1), cos, sin, spec.kv_heads)
        v = v.view(b_, length, spec.kv_heads, spec.head_dim).transpose(1, 2).contiguous()
        keep_probs = keep_probs and any(ctx.needs_input_grad)
        attn, probs = att.attention_forward(q, k, v, bounds, spec.scale, keep_probs)  # (B, L, heads, D)
        attn2 = attn.view(b_ * length, -1)
        (o,), xa_o, a_o, i_o = _group_forward(attn2, (spec.o,), dtype)
        x_mid = x2 + o.to(x2.dtype)
        # MLP block
        h2, r2 = _rms_norm(x_mid, spec.norm_post.weight, spec.norm_post.variance_epsilon, dtype)
        (gt, up), xa_gu, a_gu, i_gu = _group_forward(h2, spec.gate_up, dtype)
        silu_g = torch.nn.functional.silu(gt)
        act = silu_g * up
        (dn,), xa_d, a_d, i_d = _group_forward(act, (spec.down,), dtype)
        del act
        out = torch.add(x_mid.view(b_, length, hidden), dn.to(x_mid.dtype).view(b_, length, hidden))

        if any(ctx.needs_input_grad):  # not under no_grad (evaluation)
            ctx.save_for_backward(x, r1, q, k, v, attn, x_mid, r2, gt, silu_g, up, cos, sin,
                                  *(t for t in (xa_qkv, xa_o, xa_gu, xa_d) if t is not None), *probs)
            ctx.has_xa = tuple(t is not None for t in (xa_qkv, xa_o, xa_gu, xa_d))
            ctx.stacks = ((a_qkv, i_qkv), (a_o, i_o), (a_gu, i_gu), (a_d, i_d))
            ctx.spec, ctx.bounds, ctx.dtype, ctx.shape = spec, bounds, dtype, x.shape
            ctx.param_dtypes = [p.dtype for p in lora_params]
        return out

    @staticmethod
    def backward(ctx, d_out):
        spec, dtype = ctx.spec, ctx.dtype
        b_, length, hidden = ctx.shape
        saved = list(ctx.saved_tensors)
        x, r1, q, k, v, attn, x_mid, r2, gt, silu_g, up, cos, sin = saved[:13]
        x2 = x.reshape(b_ * length, hidden)
        rest = iter(saved[13:])
        xa_qkv, xa_o, xa_gu, xa_d = (next(rest) if has else None for has in ctx.has_xa)
        probs = list(rest) or None  # the attention probabilities, when the forward kept them
        (a_qkv, i_qkv), (a_o, i_o), (a_gu, i_gu), (a_d, i_d) = ctx.stacks
        res_dtype = x2.dtype
        d_res = d_out.reshape(b_ * length, hidden)  # gradient of the residual stream

        # MLP block: out = x_mid + down(silu(gate) * up)
        dy = d_res.to(dtype)
        d_act, g_d = _group_backward([dy], silu_g * up, xa_d, a_d, i_d, (spec.down,), True)
        # silu'(g) in one kernel (fp32 inside, the result in the compute dtype), as autograd does it
        d_up = silu_g.mul(d_act)
        d_gate = torch.ops.aten.silu_backward(d_act.mul_(up), gt)
        del d_act
        h2, _ = _rms_norm(x_mid, spec.norm_post.weight, spec.norm_post.variance_epsilon, dtype)
        d_h2, g_gu = _group_backward([d_gate, d_up], h2, xa_gu, a_gu, i_gu, spec.gate_up, True)
        del h2, d_gate, d_up
        d_mid = _rms_norm_backward(d_h2, x_mid, r2, spec.norm_post.weight).add_(d_res.float())
        del d_h2

        # attention block: x_mid = x + o_proj(attention(rope(q), rope(k), v))
        dy = d_mid.to(dtype)
        d_attn, g_o = _group_backward([dy], attn.view(b_ * length, -1), xa_o, a_o, i_o, (spec.o,), True)
        dq, dk, dv = att.attention_backward(q, k, v, d_attn.view(b_, length, spec.heads, spec.head_dim),
                                            ctx.bounds, spec.scale, probs)
        del probs
        del d_attn
        dq = _rope_backward(dq, cos, sin, dtype)
        dk = _rope_backward(dk, cos, sin, dtype)
        dv = dv.transpose(1, 2).to(dtype).reshape(b_ * length, -1)
        h1, _ = _rms_norm(x2, spec.norm_in.weight, spec.norm_in.variance_epsilon, dtype)
        need_dx = ctx.needs_input_grad[0]
        d_h1, g_qkv = _group_backward([dq, dk, dv], h1, xa_qkv, a_qkv, i_qkv, spec.qkv, need_dx)
        d_x = None
        if need_dx:
            d_x = _rms_norm_backward(d_h1, x2, r1, spec.norm_in.weight).add_(d_mid)
            d_x = d_x.to(res_dtype).view(b_, length, hidden)

        # LoRA gradients, in the order of the lora_params inputs (A, B per adapted projection)
        grads = []
        for g in (*g_qkv, *g_o, *g_gu, *g_d):
            if g is not None:
                grads += [g[0], g[1]]
        out = [gr.to(dt) if need else None
               for gr, dt, need in zip(grads, ctx.param_dtypes, ctx.needs_input_grad[7:], strict=True)]
        return (d_x, None, None, None, None, None, None, *out)


def _lora_params(spec: _Layer) -> list[nn.Parameter]:
    out = []
    for p in spec.projections():
        ad = p.adapter()
        if ad is not None:
            out += [ad[0], ad[1]]
    return out


# =========================================================================== switching it on and off

# the last position ids seen and their segment bounds: one forward = every layer, one tensor. Per thread:
# the training loop may run two micro-batches at once (train.micro_batch_threads)
_BOUNDS = threading.local()


def _bounds(position_ids: torch.Tensor | None, batch: int, length: int) -> list:
    """Segment bounds of ``position_ids``, computed once per forward: the layers of one forward get
    the same tensor, so the last one is kept (compared by value: a freed tensor's address is reused)."""
    if position_ids is None:
        return [[(0, length)]] * batch
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    last = getattr(_BOUNDS, "ids", None)
    if last is None or last.shape != position_ids.shape or not torch.equal(last, position_ids):
        _BOUNDS.ids, _BOUNDS.bounds = position_ids.clone(), att.segment_bounds(position_ids)
    return _BOUNDS.bounds


# train.compile compiles around the fused layer, as around the packed attention: traced, the layer's Python over
# segment bounds made Dynamo guard on them and recompile for every new packing layout (measured on the tiny model:
# steps 2 and 3 took 4.3 and 1.9 s against 0.15 s eager; disabled, 0.11-0.12 s after a 12 s first step)
@torch.compiler.disable
def fused_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                   use_cache=False, position_embeddings=None, **kwargs):
    """Instance ``forward`` of a decoder layer: the fused function when the call fits, else the stock one."""
    spec = describe(self)
    dev = hidden_states.device.type
    if (spec is None or attention_mask is not None or past_key_values is not None or use_cache
            or position_embeddings is None or dev != "cpu" or hidden_states.shape[1] < 2
            or self.self_attn.config._attn_implementation != att.NAME
            or not all(p.computable() for p in spec.projections())):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden_states.dtype
    cos, sin = position_embeddings
    bounds = _bounds(position_ids, hidden_states.shape[0], hidden_states.shape[1])
    params = _lora_params(spec)

    # transformers checkpoints the class's forward, which this instance forward replaces: do it here
    checkpointed = getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()

    def run(h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev, enabled=False):  # checkpointing recomputes the probabilities with the layer
            return DecoderLayerFn.apply(h, cos, sin, spec, bounds, dtype, not checkpointed, *params)

    return self._gradient_checkpointing_func(run, hidden_states) if checkpointed else run(hidden_states)


def use_fused_layers(model: nn.Module) -> int:
    """Give every decoder layer that fits the fused forward; returns how many got it."""
    return install_forward(model, lambda m: describe(m) is not None, fused_forward)


def restore(model: nn.Module) -> bool:
    """The stock forward on every decoder layer again; returns whether any had the fused one."""
    return remove_forward(model, fused_forward)
