"""Causal-LM loss computed only where there are labels, without materialising all logits.

``CausalLMLoss`` wraps a (possibly PEFT-wrapped) causal LM. Its forward runs the decoder,
keeps the hidden states of positions whose *next* token is labelled, and computes the
summed cross-entropy over the vocabulary in chunks with :class:`ChunkedLinearCE`. It returns
the *sum* of token losses and the number of target tokens: the training loop divides by the
number of target tokens of the whole optimiser step (all micro-batches, all processes).

Why our own: HF models compute ``batch x length x vocab`` logits (49k vocab x 1k tokens =
200 MB per row in fp32) even when most tokens are prompt. Liger's fused linear
cross-entropy does this on CUDA only (Triton); this one is plain torch and runs anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.data.batching import IGNORE
from tunelab.objectives.output import LossSum

# The fp32 logits of one chunk (evaluation's; training's bf16 ones are half of it) stay below this
# size. Larger blocks are memory-mapped afresh by malloc at every call (glibc serves allocations
# above its mmap threshold, at most 32 MiB, with new pages), and the page faults cost more than the
# arithmetic. Below it, taller chunks run the two vocabulary GEMMs faster, so a chunk is as tall as
# this size allows (the measurements are in docs/benchmarks.md).
CHUNK_BYTES = 32 * 2**20 - 2**20
# Chunks are whole multiples of this many rows, the last one padded with zero rows: the number of
# labelled tokens differs in every batch, and each new chunk height is a new matmul shape for
# oneDNN (a cached primitive, a new heap block size). See tunelab.data.batching.PAD_MULTIPLE.
ROW_MULTIPLE = 16


def chunk_rows(chunk: int, vocab: int) -> int:
    """The rows per chunk: at most ``chunk``, and few enough to keep the fp32 logits under CHUNK_BYTES."""
    rows = min(chunk, max(ROW_MULTIPLE, CHUNK_BYTES // (4 * vocab)))
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


def _softmax_and_loss(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
    """The gradient of ``sum CE(logits[rows], targets)`` for the logits (``softmax - onehot``, in
    the logits' dtype) and that sum (fp32).

    One softmax pass in the logits' dtype, where an fp32 log-softmax, a clamp, an ``exp`` and a cast
    would take four passes over an fp32 block (docs/benchmarks.md has the timings). What a bf16
    softmax would lose is taken back where it matters:

    * a target above one half: its entry is minus the mass on the other words (summed with fp32
      accumulation, rounded once) and its loss ``-log1p(-that mass)``: exact where ``p_t`` is near
      1 and bf16 is coarsest;
    * a target below one half: ``p_t - 1`` and ``-log p_t`` from ``p_t`` as the softmax gives it
      (8 bits: at most 0.002 on that token's loss, unbiased);
    * a target below 1e-30, which bf16 may flush to zero: its row's exact fp32 log-softmax.

    Against fp64 on that row: loss error 0.21 (0.22 with the fp32 log-softmax), gradient 1.45%
    (1.45%), both the bf16 logits' own. Evaluation keeps the exact fp32 log-softmax.
    """
    # fp16 would flush probabilities below 6e-8 and keep few bits below 6e-5: its softmax runs in fp32
    p = torch.softmax(logits, dim=-1, dtype=torch.float32 if logits.dtype == torch.float16 else None)
    p_t = p[rows, targets].float()
    confident = p_t > 0.5
    p[rows, targets] = 0.0  # summed without the target: one rounding of the small mass, in the sum's own pass
    other = p[: rows.shape[0]].sum(-1).float()
    log_p = torch.where(confident, torch.log1p(-other), p_t.log())
    lost = (p_t < 1e-30).nonzero().squeeze(1)
    if lost.numel():  # rare: a target 69 nats below the top word
        log_p[lost] = torch.log_softmax(logits[lost].float(), dim=-1)[torch.arange(lost.numel()), targets[lost]]
    p[rows, targets] = torch.where(confident, other.neg_(), p_t - 1.0).to(p.dtype)
    return p.to(logits.dtype), -log_p.sum()


def add_head_grad(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """A chunk's gradient for the output head (``vocab x hidden``, the GEMM's output in the hidden states'
    dtype, fp32 accumulation inside it) added to the chunks' so far. The only chunk's (most micro-batches)
    is kept as it is: half the memory of fp32, and no zeroed accumulator to fault in; several are summed in
    fp32. Either way each chunk's is rounded once, as an fp32 accumulator of rounded chunks would be."""
    return part if total is None else total.float().add_(part)  # .float(): a copy at the second chunk only


def scaled_head_grad(total: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The backward's ``total x grad_out`` in fp32, rounded once to the weight's ``dtype``. When ``total`` is
    already in it (a bf16 weight under FSDP / ZeRO and one chunk), one multiply: torch multiplies reduced
    floats in fp32 and rounds once, the same bits (tested) in a fifth of the time of the fp32 round trip
    (SmolLM2-360M's head: 41 vs 199 ms)."""
    if total.dtype == dtype:
        return total * grad_out
    if total.dtype == torch.float32:
        return (total * grad_out).to(dtype)
    return total.float().mul_(grad_out).to(dtype)


class ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i), with gradients computed chunk by chunk in the forward.

    Only one ``chunk x vocab`` block of logits exists at a time; the backward just scales the
    stored gradients. Gradients for ``W`` are computed only when it requires grad (:func:`add_head_grad`).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = h.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # vocab x hidden: the only chunk's, or fp32 over several
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(h.dtype)  # once, not per chunk (a copy when an fp32 head meets bf16 hidden states)
        if not need_w:  # a trained head adds a vocab x hidden gradient per chunk: fewer, larger chunks
            chunk = chunk_rows(chunk, weight.shape[0])
        chunk = max(ROW_MULTIPLE, chunk // ROW_MULTIPLE * ROW_MULTIPLE)
        n = h.shape[0]
        padded = -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
        hp = h if padded == n else torch.cat([h, h.new_zeros(padded - n, h.shape[1])])
        for start in range(0, padded, chunk):
            hc = hp[start : start + chunk]
            real = min(hc.shape[0], n - start)  # the rows after it are padding (last chunk only)
            tc = targets[start : start + real]
            rows = torch.arange(real, device=h.device)
            logits = hc @ w.T
            if need_h or need_w:
                p, loss = _softmax_and_loss(logits, rows, tc)
                total += loss
                p[real:] = 0.0
                if need_h:
                    grad_h[start : start + real] = (p @ w)[:real]
                if need_w:
                    grad_w = add_head_grad(grad_w, p.T @ hc)
            else:  # evaluation: one exact fp32 log-softmax
                total -= torch.log_softmax(logits, dim=-1, dtype=torch.float32)[rows, tc].sum()
        if need_w and grad_w is None:  # no row at all
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(
            grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0)
        )
        ctx.need = (need_h, need_w, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w, w_dtype = ctx.need
        gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
        gw = scaled_head_grad(grad_w, grad_out, w_dtype) if need_w else None
        return gh, gw, None, None


def chunked_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    if h.shape[0] == 0:
        return (h.sum() * 0.0).float() + (weight.sum() * 0.0).float()  # keeps the graph for DDP
    return ChunkedLinearCE.apply(h, weight, targets, chunk)


def plain_cross_entropy_sum(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, softcap: float | None,
                            chunk: int = 1024) -> torch.Tensor:
    """The same sum for heads :class:`ChunkedLinearCE` does not cover (a bias, logit soft-capping).

    Plain autograd: the logits of labelled positions are kept for the backward (still never
    the whole ``batch x length x vocab``).
    """
    total = (h.sum() * 0.0).float()  # keeps the graph when there is no labelled token (DDP)
    for start in range(0, h.shape[0], chunk):
        logits = head(h[start : start + chunk]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + torch.nn.functional.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, output head) of a causal LM, looking through a PEFT wrapper."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder(), lm.get_output_embeddings()


def _virtual_tokens_forward(model: nn.Module):
    """:func:`tunelab.methods.virtual.hidden_states` for prompt-learning PEFT models, else None."""
    from tunelab.methods import virtual

    return virtual.hidden_states if virtual.is_virtual(model) else None


class CausalLMLoss(nn.Module):
    """Wraps a causal LM; ``forward(batch) -> (loss_sum, n_targets)``.

    Wrapping (instead of calling parts of the model from the loop) keeps the whole forward
    inside one module, so DistributedDataParallel sees it and syncs gradients.
    """

    def __init__(self, model: nn.Module, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        # the fused path covers a bias-free linear head without soft-capping (Llama, Qwen, Mistral, ...)
        self.fused = getattr(causal_lm_parts(model)[1], "bias", None) is None and not self.softcap
        # prefix / prompt / P-tuning feed virtual tokens first (tunelab.methods.virtual); None for the rest
        self.virtual = _virtual_tokens_forward(model)

    # distillation from the base model (tunelab.objectives.distill.Distiller), set by the recipe; a plain
    # attribute (not a submodule): a frozen teacher copy must stay out of DDP and the checkpoints
    distill = None

    def target_hidden(self, input_ids, labels, attention_mask=None, position_ids=None):
        """``(h, targets, keep, head)``: hidden states of the positions whose next token is labelled."""
        decoder, head = causal_lm_parts(self.model)
        if self.virtual is None:
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        else:  # hidden states of the real tokens only: labels line up, virtual tokens get no loss
            hidden = self.virtual(self.model, decoder, input_ids, attention_mask, position_ids)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        return hidden[:, :-1][keep], targets[keep], keep, head

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, weights=None,
                groups=None) -> LossSum:
        """The CE summed over the labelled tokens and their count; with ``weights`` (per token)
        ``sum(w*ce)`` and ``sum(w)``; with ``groups`` (dataset per token) ``{group: (ce_sum, tokens)}``,
        unweighted, in ``LossSum.groups``.

        With :attr:`distill` set, training adds the gradient of ``distill.weight * T^2 * KL`` per
        labelled token (weighted like the CE) while the returned value stays the CE (the loop logs
        it as ``loss``; the KL is logged apart as ``distill_kl``).
        """
        h, targets, keep, head = self.target_hidden(input_ids, labels, attention_mask, position_ids)
        if weights is not None or groups is not None:
            total, count, per_group = self._weighted(h, head, targets, weights, groups, keep)
        elif self.fused:
            total, count, per_group = chunked_cross_entropy_sum(h, head.weight, targets, self.chunk), keep.sum(), None
        else:
            total, count = plain_cross_entropy_sum(h, head, targets, self.softcap, self.chunk), keep.sum()
            per_group = None
        if self.distill is not None and self.training:
            token_w = weights[:, 1:][keep] if weights is not None else None
            kl = self.distill.kl_sum(self.model, h, head, keep, token_w, input_ids=input_ids,
                                     attention_mask=attention_mask, position_ids=position_ids)
            total = total + (kl - kl.detach())
        return LossSum(total, count, per_group)

    def _weighted(self, h, head, targets, weights, groups, keep):
        """The loss per (group, weight) class of tokens: one chunked CE call per distinct pair.

        sum(w * ce) = sum over distinct w of w * (CE sum of the tokens with weight w), so the
        fused kernel is used unchanged; a batch has few distinct weights.
        """
        w = weights[:, 1:][keep] if weights is not None else torch.ones_like(targets, dtype=torch.float32)
        g = groups[:, 1:][keep] if groups is not None else torch.zeros_like(targets)
        total = (h.sum() * 0.0).float()
        per_group: dict[int, tuple[torch.Tensor, int]] = {}
        pairs = torch.unique(torch.stack([g.double(), w.double()], dim=1), dim=0) if len(targets) else []
        for gv, wv in pairs.tolist() if len(targets) else []:
            sel = (g == int(gv)) & (w.double() == wv)
            if self.fused:
                part = chunked_cross_entropy_sum(h[sel], head.weight, targets[sel], self.chunk)
            else:
                part = plain_cross_entropy_sum(h[sel], head, targets[sel], self.softcap, self.chunk)
            total = total + part * wv
            s, n = per_group.get(int(gv), (0.0, 0))
            per_group[int(gv)] = (s + part.detach().double(), n + int(sel.sum()))
        return total, w.sum(), (per_group if groups is not None else None)
