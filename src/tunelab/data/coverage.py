"""How much of the data a tokenizer can read: the share of its tokens that are the unknown token.

A WordPiece or SentencePiece vocabulary built for one script maps text in another (Chinese on
an English encoder) to ``[UNK]``: the model then sees the same token for most words and its
results are noise. Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen) have no unknown
token, so their rate is 0. ``data inspect --model``, ``train`` (``data.json``) and ``advise``
report the rate; above :data:`UNKNOWN_WARN` they warn in one line and name a model that covers
the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["COVERING_MODEL", "UNKNOWN_WARN", "coverage_warning", "unknown_tokens", "unknown_tokens_of_texts"]

UNKNOWN_WARN = 0.05  # above this share of unknown tokens the data is not read by the model
COVERING_MODEL = "smollm2-135m-instruct"  # a bundled alias with a byte-level vocabulary: it reads any text


def unknown_tokens(tokenizer: Any, id_lists: Iterable[Sequence[int]]) -> dict[str, Any] | None:
    """``{"unknown", "tokens", "rate"}`` over token id lists (special tokens other than the unknown one not
    counted); None when the tokenizer has no unknown token (it reads every text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    specials = set(getattr(tokenizer, "all_special_ids", None) or []) - {unk}
    unknown = tokens = 0
    for ids in id_lists:
        for i in ids:
            if i == unk:
                unknown += 1
                tokens += 1
            elif i not in specials:
                tokens += 1
    return {"unknown": unknown, "tokens": tokens, "rate": round(unknown / tokens, 4) if tokens else 0.0}


def unknown_tokens_of_texts(tokenizer: Any, texts: Sequence[str], batch: int = 1024) -> dict[str, Any] | None:
    """:func:`unknown_tokens` of texts, tokenised without special tokens."""
    if getattr(tokenizer, "unk_token_id", None) is None:
        return None
    ids: list[Sequence[int]] = []
    for start in range(0, len(texts), batch):
        ids += tokenizer(list(texts[start:start + batch]), add_special_tokens=False)["input_ids"]
    return unknown_tokens(tokenizer, ids)


def coverage_warning(stats: dict[str, Any] | None, model: str) -> str | None:
    """The one-line warning when the unknown-token rate is above :data:`UNKNOWN_WARN`, else None."""
    if not stats or stats["rate"] <= UNKNOWN_WARN:
        return None
    return (f"{model}: {stats['rate']:.1%} of the data's tokens are unknown to its tokenizer "
            f"({stats['unknown']:,} of {stats['tokens']:,}): the model's vocabulary does not cover this text, so "
            f"its results would be noise. Use a model whose tokenizer reads it, e.g. {COVERING_MODEL} "
            "(byte-level, no unknown tokens)")
