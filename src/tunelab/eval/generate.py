"""Batched generation for evaluation: left padding, KV cache, greedy or sampled, stop strings, seeded.

transformers' ``generate`` does the decoding (with its KV cache); this module adds what an
evaluation needs around it: prompts sorted by length so a batch carries little padding (the
replies come back in the caller's order), stop strings (transformers' ``stop_strings``
criterion ends a row as soon as one is produced; the reply is then cut before it), a seed per
batch so a sampled evaluation is reproducible, and chat or raw-text prompts.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.eval.settings import GenerationSettings

__all__ = ["GenerationSettings", "generate", "encode_prompt", "loglik_continuations", "n_scored_rows"]


def encode_prompt(tokenizer: Any, prompt: str | list[dict], *, chat: bool = True) -> list[int]:
    """Token ids of a prompt: a list of chat messages through the chat template (with the
    generation prompt), or a raw string as it is."""
    if isinstance(prompt, str) and not chat:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str | list[dict]],
             settings: GenerationSettings = GenerationSettings(), *, chat: bool = True,
             progress: Any = None) -> list[str]:
    """One reply per prompt, in the order given.

    ``prompts`` are chat message lists (or strings, sent as one user message when ``chat``,
    else used as raw text). ``progress`` is an optional callable ``advance(n)``.
    """
    encoded = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    sample = settings.temperature > 0
    replies: list[str] = [""] * len(prompts)
    for b, start in enumerate(range(0, len(order), settings.batch_size)):
        idx = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        torch.manual_seed(settings.seed + b)
        kwargs: dict[str, Any] = {}
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=settings.max_new_tokens,
            do_sample=sample, temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None, top_k=settings.top_k if sample else None,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True, **kwargs,
        )
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            replies[i] = _cut_at_stop(text, settings.stop).strip()
        if progress is not None:
            progress(len(idx))
    return replies


@torch.no_grad()
def loglik_continuations(model: torch.nn.Module, tokenizer: Any, contexts: list[list[int]],
                         continuations: list[list[list[int]]], *, batch_size: int = 8,
                         progress: Any = None) -> list[list[float]]:
    """Sum of log-probabilities of each continuation given its context.

    ``contexts[i]`` are token ids; ``continuations[i]`` the token ids of each candidate for
    that context. When every candidate of a context is a single token (multiple-choice
    letters), one forward pass of the context scores them all; otherwise each
    (context + candidate) sequence is scored, ``batch_size`` sequences per forward pass,
    left-padded, longest first. ``progress(n)`` is told of every sequence scored: one per single-token
    context, one per candidate otherwise (see :func:`n_scored_rows`).
    """
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    scores: list[list[float]] = [[0.0] * len(c) for c in continuations]
    # longest first, so each batch holds sequences of similar length (little padding)
    by_length = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    single = [i for i in by_length if all(len(x) == 1 for x in continuations[i])]
    multi = [i for i in by_length if not all(len(x) == 1 for x in continuations[i])]

    # one row per context: read the candidates' log-probs off the last position
    for start in range(0, len(single), batch_size):
        idx = single[start : start + batch_size]
        logits = _forward(model, [contexts[i] for i in idx], pad, device, keep=1)
        for row, i in enumerate(idx):
            logp = torch.log_softmax(logits[row, -1].float(), dim=-1)
            scores[i] = [float(logp[c[0]]) for c in continuations[i]]
        if progress is not None:
            progress(len(idx))

    # one row per (context, candidate); left padding puts every candidate at the end of its row
    pairs = [(i, j) for i in multi for j in range(len(continuations[i]))]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        keep = max(len(continuations[i][j]) for i, j in chunk) + 1
        logits = _forward(model, [contexts[i] + continuations[i][j] for i, j in chunk], pad, device, keep=keep)
        for row, (i, j) in enumerate(chunk):
            cont = continuations[i][j]
            logp = torch.log_softmax(logits[row, keep - 1 - len(cont) : keep - 1].float(), dim=-1)
            scores[i][j] = float(logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum())
        if progress is not None:
            progress(len(chunk))
    return scores


def _forward(model: torch.nn.Module, seqs: list[list[int]], pad: int, device, *, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions of left-padded ``seqs`` (the LM head runs on those only).

    Position ids count real tokens only, so a padded row scores exactly like the unpadded sequence.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=False, logits_to_keep=keep)
    return out.logits


def n_scored_rows(continuations: list[list[list[int]]]) -> int:
    """How many sequences :func:`loglik_continuations` runs through the model (for progress bars)."""
    return sum(1 if all(len(x) == 1 for x in c) else len(c) for c in continuations)
