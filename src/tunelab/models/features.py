"""Pooled features of a frozen backbone: computed once, cached on disk, looked up by the classifier.

With the ``head`` method and ``unfreeze_top: 0`` nothing below the head trains, so the pooled
backbone output of a row is the same in every epoch. :func:`attach` computes it once for every
distinct training and validation row and hands the classifier a :class:`FeatureTable`;
:meth:`~tunelab.models.classifier.SequenceClassifier.forward` then looks a batch's rows up
instead of running the backbone (a row it does not know, e.g. new text at prediction time, still
goes through the backbone). An epoch then costs the head's forward and backward only.

Same results as the backbone in the loop: a frozen backbone runs in inference mode either way
(:meth:`~tunelab.models.classifier.SequenceClassifier.train`: no dropout in it), the features
are computed under the run's autocast, in training's own padded batches (``collate``), and
stored in float32, the dtype the head reads them in.

The cache: ``<cache>/features/<key>/`` (``features.npy``, float32 ``[rows, hidden]``, in the
order of the distinct rows, and ``meta.json``), written atomically
(:func:`tunelab.fsutil.atomic_folder`); the key hashes the backbone's weights and buffers (their
bytes, so a changed model is a new entry whatever its name), the pooling, ``max_length``, the
autocast precision, the torch and transformers versions and every row's token ids (so changed
data, tokenizer or truncation is a new entry too). A corrupt or partial entry is ignored and
computed again; a read-only or full cache never stops training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.data.batching import PAD_MULTIPLE, Row, collate
from tunelab.fsutil import atomic_folder
from tunelab.models.classifier import SequenceClassifier
from tunelab.models.registry import cache_root
from tunelab.progress import progress_bar

__all__ = ["FeatureTable", "applies", "attach", "cache_dir", "compute", "feature_key", "model_digest"]

FORMAT_VERSION = 1


class FeatureTable:
    """Pooled features by row: ``lookup(input_ids, attention_mask)`` gives a batch's features, or None when
    a row is not in the table (the caller then runs the backbone). ``hits`` / ``misses`` count batches."""

    def __init__(self, rows: list[tuple[int, ...]], values: torch.Tensor):
        self.index = {ids: i for i, ids in enumerate(rows)}
        self.values = values
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        found = [self.index.get(tuple(t for t, m in zip(r, mr, strict=True) if m)) for r, mr in zip(ids, mask, strict=True)]
        if any(i is None for i in found):
            self.misses += 1
            return None
        self.hits += 1
        return self.values[torch.tensor(found, device=self.values.device)]


def applies(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a classifier whose backbone is entirely frozen (nothing below the head trains)."""
    return isinstance(model, SequenceClassifier) and not any(p.requires_grad for p in model.backbone.parameters())


def model_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        data = t.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            h.update(data.view(torch.uint8).numpy())  # the bytes, through the buffer protocol (no copy)
    return h.hexdigest()


def feature_key(digest: str, settings: dict[str, Any], rows: list[tuple[int, ...]]) -> str:
    import transformers

    h = hashlib.sha256(f"tunelab features v{FORMAT_VERSION} torch {torch.__version__} transformers "
                       f"{transformers.__version__}".encode())
    h.update(digest.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ids in rows:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"\xff" * 8)
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    return cache_root() / "features"


def _load(key: str, n: int) -> np.ndarray | None:
    folder = cache_dir() / key
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        values = np.load(folder / "features.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None
    if values.dtype != np.float32 or values.ndim != 2 or values.shape[0] != n or meta.get("rows") != n:
        return None
    return values


def _store(key: str, values: np.ndarray, meta: dict[str, Any]) -> bool:
    dest = cache_dir() / key

    def fill(tmp: Path) -> None:
        np.save(tmp / "features.npy", values, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    try:
        atomic_folder(dest, fill)
    except OSError:  # a read-only or full cache must never stop training
        return False
    return True


@torch.no_grad()
def compute(model: SequenceClassifier, rows: list[tuple[int, ...]], *, pad_id: int, batch_size: int = 32,
            autocast: Callable[[], AbstractContextManager] = nullcontext, console=None,
            enabled: bool = True) -> torch.Tensor:
    """The pooled backbone output of every row, float32 ``[rows, hidden]``, in inference mode; rows are
    batched by length (less padding) and padded as training pads them."""
    device = next(model.backbone.parameters()).device
    out = torch.empty((len(rows), model.config.hidden_size), dtype=torch.float32, device=device)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    was_training = model.backbone.training
    model.backbone.eval()
    try:
        with progress_bar("features", len(rows), console, enabled=enabled) as advance:
            for start in range(0, len(order), batch_size):
                part = order[start : start + batch_size]
                batch = collate([Row(rows[i], (-100,) * len(rows[i]), (len(rows[i]),)) for i in part], pad_id=pad_id,
                                packed=False, multiple_of=PAD_MULTIPLE)
                with autocast():
                    pooled = model.pooled(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                out[torch.tensor(part, device=device)] = pooled.float()
                advance(len(part))
    finally:
        model.backbone.train(was_training)
    return out


def attach(model: SequenceClassifier, rows: list[Row], *, settings: dict[str, Any], pad_id: int,
           batch_size: int = 32, autocast: Callable[[], AbstractContextManager] = nullcontext,
           main_first: Callable[[], AbstractContextManager] = nullcontext, console=None,
           is_main: bool = True) -> dict[str, Any]:
    """Compute (or read from the cache) the features of ``rows`` and attach them to ``model`` (``model.features``).

    ``settings``: what else shapes the features besides the weights and the tokens (pooling, max_length,
    precision). ``main_first``: with several processes the main one computes and stores first, the others
    then read its entry. Returns what happened, for ``env.json``.
    """
    t0 = time.perf_counter()
    distinct = list(dict.fromkeys(r.input_ids for r in rows))
    key = feature_key(model_digest(model.backbone), settings, distinct)
    device = next(model.backbone.parameters()).device
    with main_first():
        values = _load(key, len(distinct))
        hit = values is not None
        if values is None:
            tensor = compute(model, distinct, pad_id=pad_id, batch_size=batch_size, autocast=autocast,
                             console=console, enabled=is_main)
            stored = _store(key, tensor.cpu().numpy(), {"rows": len(distinct), "hidden": tensor.shape[1],
                                                        "base_model": model.spec.base_model, **settings})
        else:
            tensor = torch.from_numpy(values).to(device)
            stored = True
    model.features = FeatureTable(distinct, tensor)
    return {"key": key, "rows": len(distinct), "from_cache": hit, "stored": stored,
            "seconds": round(time.perf_counter() - t0, 2), "folder": str(cache_dir() / key)}
