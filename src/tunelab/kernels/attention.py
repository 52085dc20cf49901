"""Segment-wise causal attention for training rows on CPU: GEMMs per packed sample, no ``L x L`` mask.

Why our own: with packed rows transformers turns restarting position ids into a block-diagonal
``L x L`` mask, and PyTorch's CPU attention kernels are slow in the backward pass on it
(docs/benchmarks.md). Here every packed sample attends over its own span only, so the work is
``sum(n_i^2)`` rather than ``L^2``, and both passes are a few large batched matrix products
(bf16 on AMX/AVX512-BF16) around an fp32 softmax:

* grouped-query attention without copies: the ``G`` query heads of a key/value head are laid
  out as ``G * n`` rows of one matrix product with that head's keys;
* long samples are cut into blocks of :data:`BLOCK` queries that only read the keys up to their
  own end (causal), which bounds the temporary score matrix and skips the masked half;
* memory like flash attention: the forward keeps only q, k and v; the backward recomputes the
  probabilities block by block (``softmax`` rather than ``exp(s - lse)``, which hits a slow
  denormal path on CPU for very negative scores) and gets the score gradient from PyTorch's
  fused softmax backward.

Right-padded (unpacked) rows need no mask either: under causal attention a real token never
sees the padding after it, and padding carries no label; the padding tail of a packed row is a
segment of its own. The function is registered with transformers' ``AttentionInterface`` as
``tunelab_packed``; that name has no mask function, so transformers builds no mask at all.
Anything else (a KV cache, a query shorter than the keys, a mask given explicitly, CUDA where
flash-attention's varlen kernels do this job) goes to the stock SDPA function, and models are
switched back to ``sdpa`` before they are saved or used for generation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "tunelab_packed"
BLOCK = 256  # queries per block: the fp32 score matrix is at most (G * BLOCK) x n per key/value head
# Query blocks and key spans are computed padded to a multiple of this: every new matmul shape
# costs oneDNN a cached primitive and the heap a new block size, and packed rows bring a new
# segment length with nearly every sample, so unpadded shapes kept growing the process over the
# whole epoch. Padded query rows are zeros whose results are dropped;
# padded keys are masked for every real query; neither changes a real token's result or gradient.
SHAPE_MULTIPLE = 32


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """``[(start, end), ...]`` per row: a new segment wherever the position id restarts at 0."""
    length = position_ids.shape[-1]
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            starts = [0] + starts
        out.append(list(zip(starts, starts[1:] + [length], strict=True)))
    return out


def _blocks(spans: list[tuple[int, int]]):
    """(segment start, block start, block end) for every query block of every segment."""
    for s, e in spans:
        for qs in range(s, e, BLOCK):
            yield s, qs, min(qs + BLOCK, e)


def _round(n: int) -> int:
    return -(-n // SHAPE_MULTIPLE) * SHAPE_MULTIPLE


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The softmax / accumulation dtype: fp32 for bf16 and fp16 inputs, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


# (G, m, kn, dtype, device) -> causal bias, shared by all layers; least recently used first. Packed
# rows give many block shapes (one per segment length), so the cache is bounded in bytes: unbounded,
# it grew with every optimiser step, and a row only needs the few shapes of its own segments
# across its layers.
_BIASES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_BIAS_BYTES = 32 * 2**20
_BIAS_LOCK = threading.Lock()  # the training loop may run two micro-batches at once (train.micro_batch_threads)


def _causal_bias(g: int, m: int, kn: int, off: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(G * m, kn)``: 0 where query row ``i`` (the ``off + i``-th position of its segment) may see key
    ``j``, ``-inf`` where ``j`` is in its future. Built once per block shape and reused by every layer."""
    key = (g, m, kn, off, dtype, device)
    with _BIAS_LOCK:
        bias = _BIASES.get(key)
        if bias is not None:
            _BIASES.move_to_end(key)
            return bias
        future = torch.arange(kn, device=device).view(1, kn) > torch.arange(off, off + m, device=device).view(m, 1)
        bias = torch.zeros(m, kn, dtype=dtype, device=device).masked_fill_(future, float("-inf")).repeat(g, 1)
        _BIASES[key] = bias
        total = sum(b.numel() * b.element_size() for b in _BIASES.values())
        while total > _BIAS_BYTES and len(_BIASES) > 1:
            _, old = _BIASES.popitem(last=False)
            total -= old.numel() * old.element_size()
        return bias


def _scores(q_blk, k_seg, g: int, m: int, off: int, scale: float, dtype: torch.dtype | None) -> torch.Tensor:
    """Softmax probabilities of one query block, ``(KV, G * m, kn)``, causal; scaled scores and the mask
    come out of one ``baddbmm``, and the softmax accumulates in fp32 whatever ``dtype`` it returns
    (``None``: the input's)."""
    bias = _causal_bias(g, m, k_seg.shape[-2], off, q_blk.dtype, q_blk.device)
    scores = torch.baddbmm(bias, q_blk, k_seg.transpose(-1, -2), alpha=scale)
    return torch.softmax(scores, dim=-1, dtype=dtype)


def _padded_queries(x, qs: int, qe: int, kv: int, g: int, d: int) -> tuple[torch.Tensor, int]:
    """Rows ``qs:qe`` of ``x`` (``(KV, G, L, D)``) as one ``(KV, G * mp, D)`` matrix, ``mp`` = the block
    length rounded up, the padded rows zero."""
    m = qe - qs
    mp = _round(m)
    if mp == m:
        return x[:, :, qs:qe].reshape(kv, g * m, d), m
    out = x.new_zeros(kv, g, mp, d)
    out[:, :, :m] = x[:, :, qs:qe]
    return out.view(kv, g * mp, d), mp


def _key_span(x, s: int, qe: int) -> torch.Tensor:
    """Keys (or values) ``s:qe`` of ``x`` (``(KV, L, D)``), extended to a rounded-up length: a view
    over the following positions when the row has them (masked for every real query), else zeros."""
    kn = qe - s
    kp = _round(kn)
    if s + kp <= x.shape[-2]:
        return x[:, s : s + kp]
    out = x.new_zeros(x.shape[0], kp, x.shape[-1])
    out[:, :kn] = x[:, s:qe]
    return out


def attention_forward(q, k, v, bounds, scale, keep_probs: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``q (B, H, L, D)``, ``k, v (B, KV, L, D)``, one dtype -> ``(B, L, H, D)``, causal within each
    segment of ``bounds`` (:func:`segment_bounds`), and the probabilities of every query block when
    ``keep_probs`` (for :func:`attention_backward`, which then need not recompute them; else ``[]``)."""
    b_, h, length, d = q.shape
    kv = k.shape[1]
    g = h // kv
    out = q.new_empty(b_, length, h, d)
    probs = []
    for b, spans in enumerate(bounds):
        qb = q[b].view(kv, g, length, d)
        ob = out[b].permute(1, 0, 2).view(kv, g, length, d)
        for s, qs, qe in _blocks(spans):
            q_blk, mp = _padded_queries(qb, qs, qe, kv, g, d)
            p = _scores(q_blk, _key_span(k[b], s, qe), g, mp, qs - s, scale, None)
            o = torch.matmul(p, _key_span(v[b], s, qe)).view(kv, g, mp, d)
            ob[:, :, qs:qe] = o[:, :, : qe - qs]
            if keep_probs:
                probs.append(p)
    return out, probs


def attention_backward(q, k, v, d_out, bounds, scale, probs=None):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward` for ``d_out`` (``(B, L, H, D)``): ``dq``
    in ``q``'s dtype and layout, ``dk`` and ``dv`` accumulated in fp32 (or the inputs' wider dtype).

    Per query block: the probabilities are the forward's (``probs``) or recomputed (in the inputs'
    dtype, the softmax accumulating in fp32, as in the forward), and the score gradient ``p * (dp - rowsum(dp * p))``
    is one fused ``_softmax_backward_data`` pass instead of five elementwise ones over fp32
    copies; the error against an fp64 reference stays that of bf16 (both in docs/benchmarks.md).
    """
    b_, h, length, d = q.shape
    kv = k.shape[1]
    g = h // kv
    dq = torch.empty_like(q)
    acc = _acc(q.dtype)
    dk = torch.zeros_like(k, dtype=acc)
    dv = torch.zeros_like(v, dtype=acc)
    kept = iter(probs) if probs is not None else None
    for b, spans in enumerate(bounds):
        qb, dqb = q[b].view(kv, g, length, d), dq[b].view(kv, g, length, d)
        dob = d_out[b].permute(1, 0, 2).view(kv, g, length, d)
        for s, qs, qe in _blocks(spans):
            m, kn = qe - qs, qe - s
            q_blk, mp = _padded_queries(qb, qs, qe, kv, g, d)
            do_blk = _padded_queries(dob, qs, qe, kv, g, d)[0].to(q.dtype)  # padded rows: zero gradient
            k_seg, v_seg = _key_span(k[b], s, qe), _key_span(v[b], s, qe)
            p = next(kept) if kept is not None else _scores(q_blk, k_seg, g, mp, qs - s, scale, None)
            dv[b, :, s:qe].add_(torch.matmul(p.transpose(-1, -2), do_blk)[:, :kn])
            dp = torch.matmul(do_blk, v_seg.transpose(-1, -2))
            # the scale goes on the (smaller) products with k and q
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dqb[:, :, qs:qe] = torch.matmul(ds, k_seg).mul_(scale).view(kv, g, mp, d)[:, :, :m]
            dk[b, :, s:qe].add_(torch.matmul(ds.transpose(-1, -2), q_blk)[:, :kn], alpha=scale)
    return dq, dk, dv


class SegmentCausalAttention(torch.autograd.Function):
    """``q (B, H, L, D)``, ``k, v (B, KV, L, D)`` -> ``(B, L, H, D)``, causal within each segment."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, scale):
        # one compute dtype for all three: autocast's (e.g. bf16 q/v but fp32 k after RoPE on fp32
        # cos/sin, as in full fine-tuning with fp32 weights), else the promoted input dtype
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        dev = q.device.type
        cdt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
               else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        out, _ = attention_forward(q, k, v, bounds, scale)
        ctx.save_for_backward(q, k, v)
        ctx.bounds, ctx.scale = bounds, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, d_out, ctx.bounds, ctx.scale)
        qd, kd, vd = ctx.in_dtypes
        return dq.to(qd), dk.to(kd), dv.to(vd), None, None


@torch.compiler.disable  # Python over segments: torch.compile compiles around it
def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, position_ids=None, **kwargs):
    """transformers attention-function signature; returns ``((batch, seq, heads, dim), None)``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if (attention_mask is not None or query.device.type != "cpu" or q_len != kv_len or q_len == 1
            or (dropout and module.training)):
        if attention_mask is None and q_len == kv_len:
            is_causal = True  # no mask was built for this attention name: causal is the one we need
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if position_ids is None:
        bounds = [[(0, q_len)]] * query.shape[0]
    else:
        if position_ids.shape[0] != query.shape[0]:
            position_ids = position_ids.expand(query.shape[0], -1)
        bounds = segment_bounds(position_ids)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return SegmentCausalAttention.apply(query, key, value, bounds, scale), None


AttentionInterface.register(NAME, packed_attention_forward)


def _lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a causal LM (or a PEFT model around one) to segment-wise attention for training."""
    lm = _lm(model)
    config = getattr(lm, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME) or not hasattr(lm, "set_attn_implementation"):
        return False  # eager / flash-attention / other models keep their own path
    if next(lm.parameters()).device.type != "cpu":
        return False  # CUDA: SDPA / flash-attention varlen do this job
    lm.set_attn_implementation(NAME)
    return True


def restore_sdpa(model: torch.nn.Module) -> bool:
    """Back to the stock attention (before saving, generating, or handing the model to a user);
    returns whether ours was on."""
    lm = _lm(model)
    if getattr(getattr(lm, "config", None), "_attn_implementation", None) != NAME:
        return False
    lm.set_attn_implementation("sdpa")
    return True
