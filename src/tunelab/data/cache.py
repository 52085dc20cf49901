"""Tokenised data cached on disk, keyed by a fingerprint of everything that shapes it.

Rendering chat templates (several prefix renders per conversation) is the slow part of data
preparation; a second run with the same records, tokenizer, template and settings loads the
token ids from ``<cache>/tokenized/<fingerprint>/`` instead. The fingerprint hashes the
records' content (not file names or dates), the tokenizer's vocabulary and special tokens,
the chat template text and the encode settings, so any change that could change a token
gives a new entry. Entries are written atomically; a corrupt or partial entry is ignored.

Storage: flat ``int32`` arrays (``input_ids``, ``labels``) with row offsets in one ``.npz``,
plus a JSON file with sample ids, weights, flags and the tokenize-stage rejects. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tunelab import __version__
from tunelab.data.records import Record, Reject
from tunelab.data.tokenize import Encoded, encode_records
from tunelab.fsutil import atomic_folder

FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary, merges/normaliser (the tokenizer JSON) and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is what we can see
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def fingerprint(records: list[Record], tokenizer, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(f"tunelab {__version__} cache v{FORMAT_VERSION}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    from tunelab.models.registry import cache_root

    return cache_root() / "tokenized"


def load(key: str):
    """(encoded, rejects) from the cache, or None when absent or unreadable."""

    folder = cache_dir() / key
    try:
        arrays = np.load(folder / "tokens.npz")
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        ids, labels, offsets = arrays["input_ids"], arrays["labels"], arrays["offsets"]
        encoded = [
            Encoded(ids[a:b].tolist(), labels[a:b].tolist(), sid, weight, truncated)
            for (a, b), sid, weight, truncated in zip(
                zip(offsets[:-1], offsets[1:], strict=True), meta["ids"], meta["weights"], meta["truncated"],
                strict=True,
            )
        ]
        rejects = [Reject(**r) for r in meta["rejects"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return encoded, rejects


def store(key: str, encoded, rejects: list[Reject]) -> None:
    lengths = [len(e.input_ids) for e in encoded]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    flat_ids = np.fromiter((t for e in encoded for t in e.input_ids), dtype=np.int32, count=int(offsets[-1]))
    flat_labels = np.fromiter((t for e in encoded for t in e.labels), dtype=np.int32, count=int(offsets[-1]))
    meta = {
        "ids": [e.id for e in encoded], "weights": [e.weight for e in encoded],
        "truncated": [e.truncated for e in encoded], "rejects": [r.to_dict() for r in rejects],
    }

    def fill(tmp: Path) -> None:
        np.savez(tmp / "tokens.npz", input_ids=flat_ids, labels=flat_labels, offsets=offsets)
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    dest = cache_dir() / key
    if dest.exists():
        return
    try:
        atomic_folder(dest, fill)
    except OSError:  # a read-only or full cache must never stop training
        pass


def encode_records_cached(records: list[Record], tokenizer, *, use_cache: bool = True, **settings):
    """:func:`tunelab.data.tokenize.encode_records` through the on-disk cache.

    Returns ``(encoded, rejects, hit)``.
    """

    if not use_cache or os.environ.get("TUNELAB_NO_DATA_CACHE"):
        return (*encode_records(records, tokenizer, **settings), False)
    key = fingerprint(records, tokenizer, settings)
    cached = load(key)
    if cached is not None:
        return (*cached, True)
    encoded, rejects = encode_records(records, tokenizer, **settings)
    store(key, encoded, rejects)
    return encoded, rejects, False
