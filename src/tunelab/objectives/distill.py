"""Distillation from the base model: ``T^2 * KL(p_teacher^T || p_student^T)`` per labelled token.

The teacher is the model the run started from:

* ``adapters_off`` (adapter methods): the same model with its adapters disabled -- PEFT's
  ``disable_adapter()`` (LoRA, QLoRA, IA3, LLaMA-Adapter; prompt-learning methods simply run the
  decoder without their virtual tokens), our bottleneck adapters switched to identity. No
  second copy in memory. Our fused LoRA kernel sees PEFT's ``disable_adapters`` flag and runs
  the base layer alone;
* ``copy`` (full / freeze): a frozen copy of the starting model (one more model in memory; in
  bf16 when training runs in bf16);
* ``cached``: the teacher's top-``k`` log-probabilities at temperature ``T`` of every labelled
  position, computed once before training (with the starting model itself, adapters disabled)
  and kept in ``<run>/distill_topk.safetensors``; a resumed run reuses the file. The student
  is compared on ``k + 1`` buckets (the ``k`` tokens and "the rest"), a lower bound of the full
  KL that is exactly zero before any update. Its gradient on the logits is ``T (q - t)`` with
  ``t`` the teacher's probabilities on the ``k`` tokens and the student's own shape, scaled to
  the teacher's remaining mass, elsewhere.

:class:`ChunkedLinearKL` keeps the labels-only, chunked design of
:class:`~tunelab.objectives.causal_lm.ChunkedLinearCE`: student and teacher logits exist for
one chunk of labelled positions at a time, gradients are computed in the forward. The teacher
forward runs under ``no_grad``.

Where the KL is taken: on the training batches themselves (``distill.data`` empty; added to
:class:`~tunelab.objectives.causal_lm.CausalLMLoss`, divided by the step's labelled tokens like
the CE), or on reference data (``distill.data``): every optimiser step takes one reference
micro-batch of ``train.batch_size`` rows per process (a seeded order, a pure function of the
step, so resume is exact) and adds ``weight * mean KL over its labelled tokens`` through the
loop's per-step penalty.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_bytes
from tunelab.objectives.causal_lm import add_head_grad, scaled_head_grad

CACHE_FILE = "distill_topk.safetensors"


class _FullTeacher:
    """Teacher hidden states of the labelled positions and its head: full softmax targets."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float):
        self.hidden, self.weight, self.t = hidden, weight, temperature

    def kl_and_target(self, start: int, end: int, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hc = self.hidden[start:end]
        logp = torch.log_softmax((hc @ self.weight.to(hc.dtype).T).float() / self.t, dim=-1)
        p = logp.exp()
        return (p * (logp - logq)).sum(-1), p


class _TopKTeacher:
    """Cached top-k teacher log-probabilities (at T) per labelled position: ``k + 1`` buckets."""

    def __init__(self, indices: torch.Tensor, logp: torch.Tensor):
        self.indices, self.logp = indices.long(), logp.float()

    def kl_and_target(self, start: int, end: int, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, logp_k = self.indices[start:end], self.logp[start:end]
        p_k = logp_k.exp()
        p_rest = (1.0 - p_k.sum(-1)).clamp(min=0.0)
        q = logq.exp()
        lq_k = logq.gather(1, idx)
        q_rest = (1.0 - lq_k.exp().sum(-1)).clamp(min=1e-30)
        kl = (p_k * (logp_k - lq_k)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()
        target = q * (p_rest / q_rest).unsqueeze(1)
        target.scatter_(1, idx, p_k)
        return kl, target


class ChunkedLinearKL(torch.autograd.Function):
    """``T^2 * sum_i w_i KL(p_i || softmax(h_i W^T / T))``, chunk by chunk, gradients in the forward."""

    @staticmethod
    def forward(ctx, h, weight, teacher, temperature: float, token_w, chunk: int):
        need_h, need_w = h.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # the output head's: add_head_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        t = temperature
        for start in range(0, h.shape[0], chunk):
            hc = h[start:start + chunk]
            logq = torch.log_softmax((hc @ weight.to(hc.dtype).T).float() / t, dim=-1)
            kl, target = teacher.kl_and_target(start, start + hc.shape[0], logq)
            w = token_w[start:start + chunk].float() if token_w is not None else None
            total += (kl * w).sum() if w is not None else kl.sum()
            if need_h or need_w:
                d = logq.clamp_min_(-80.0).exp_().sub_(target).mul_(t)  # d(T^2 KL)/d(raw logits)
                if w is not None:
                    d.mul_(w.unsqueeze(1))
                d = d.to(hc.dtype)
                if need_h:
                    grad_h[start:start + chunk] = d @ weight.to(hc.dtype)
                if need_w:
                    grad_w = add_head_grad(grad_w, d.T @ hc)
        if need_w and grad_w is None:  # no row at all
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.need = (need_h, need_w, weight.dtype)
        return total * (t * t)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w, w_dtype = ctx.need
        gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
        gw = scaled_head_grad(grad_w, grad_out, w_dtype) if need_w else None
        return gh, gw, None, None, None, None


# --------------------------------------------------------------------------- teachers


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") or hasattr(model, "bottleneck_adapter_config")


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside ``model``: PEFT's ``disable_adapter()``, or our bottleneck adapters as identity."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    if hasattr(model, "bottleneck_adapter_config"):
        from tunelab.methods.bottleneck import Bottleneck

        adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
        for m in adapters:
            m.forward = _identity
        try:
            yield
        finally:
            for m in adapters:
                del m.forward
        return
    raise UserError("objectives.distill.teacher adapters_off: this method has no adapters to switch off. "
                    "Use teacher: copy or cached")


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


def teacher_hidden(model: nn.Module, input_ids, attention_mask, position_ids, adapters_off: bool) -> torch.Tensor:
    """Last hidden states of the teacher (the decoder without virtual tokens), under ``no_grad``."""
    from tunelab.objectives.causal_lm import causal_lm_parts

    decoder = causal_lm_parts(model)[0]
    with torch.no_grad(), (adapters_disabled(model) if adapters_off else nullcontext()):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state


def row_keys(input_ids: torch.Tensor, keep: torch.Tensor, position_ids: torch.Tensor | None) -> list[bytes | None]:
    """A digest per batch row of what the teacher's logits at its labelled positions depend on: the
    tokens (and position ids) up to the last labelled position. Rows without labels: None."""
    out: list[bytes | None] = []
    ids = input_ids.cpu().numpy().astype(np.int64)
    pos = position_ids.cpu().numpy().astype(np.int64) if position_ids is not None else None
    kept = keep.cpu().numpy()
    for b in range(ids.shape[0]):
        where = np.flatnonzero(kept[b])
        if where.size == 0:
            out.append(None)
            continue
        end = int(where[-1]) + 1
        digest = hashlib.blake2b(ids[b, :end].tobytes(), digest_size=16)
        if pos is not None:
            digest.update(pos[b, :end].tobytes())
        out.append(digest.digest())
    return out


class TopKCache:
    """Top-k teacher log-probabilities per row, looked up by :func:`row_keys`."""

    def __init__(self, keys: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor, logp: torch.Tensor,
                 meta: dict[str, Any]):
        self.index = {bytes(k.tolist()): (int(offsets[i]), int(offsets[i + 1]))
                      for i, k in enumerate(keys.to(torch.uint8))}
        self.indices, self.logp, self.meta = indices, logp, meta

    def lookup(self, input_ids, keep, position_ids) -> _TopKTeacher:
        parts_i, parts_l = [], []
        for b, key in enumerate(row_keys(input_ids, keep, position_ids)):
            if key is None:
                continue
            span = self.index.get(key)
            n = int(keep[b].sum())
            if span is None or span[1] - span[0] != n:
                raise UserError("objectives.distill teacher cached: a training row is not in "
                                f"{self.meta.get('file', CACHE_FILE)} (the data changed since it was written). "
                                "Delete that file to compute it again")
            parts_i.append(self.indices[span[0]:span[1]])
            parts_l.append(self.logp[span[0]:span[1]])
        device = input_ids.device
        k = self.indices.shape[1]
        idx = torch.cat(parts_i) if parts_i else torch.zeros((0, k), dtype=torch.int32)
        lp = torch.cat(parts_l) if parts_l else torch.zeros((0, k))
        return _TopKTeacher(idx.to(device), lp.to(device))


def build_topk_cache(loss_module, rows: list, *, path: Path, top_k: int, temperature: float, pad_id: int,
                     packed: bool, batch_size: int, adapters_off: bool, autocast: Callable[[], Any] | None = None,
                     console=None, write: bool = True) -> TopKCache:
    """The teacher's top-k log-probabilities (at T) over every labelled position of ``rows``, written to
    ``path`` (safetensors, atomically) or read back from it when it matches these rows and settings."""
    from safetensors.torch import load_file, save

    from tunelab.data.batching import collate
    from tunelab.objectives.causal_lm import causal_lm_parts

    model = loss_module.model
    device = next(model.parameters()).device
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    all_keys: list[bytes] = []
    for part in batches:
        b = collate(part, pad_id=pad_id, packed=packed)
        all_keys += [k for k in row_keys(b["input_ids"], b["labels"][:, 1:] != -100, b.get("position_ids")) if k]
    fingerprint = hashlib.blake2b(b"".join(sorted(set(all_keys))), digest_size=16).hexdigest()
    meta = {"top_k": top_k, "temperature": temperature, "rows": fingerprint, "file": str(path)}
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                old = json.loads((fh.metadata() or {}).get("tunelab", "{}"))
            if {k: old.get(k) for k in ("top_k", "temperature", "rows")} == {k: meta[k] for k in ("top_k", "temperature", "rows")}:
                t = load_file(str(path))
                return TopKCache(t["keys"], t["offsets"], t["indices"], t["logp"], meta)
        except (OSError, ValueError, json.JSONDecodeError):
            pass  # unreadable or stale: compute again
    if not write:
        raise UserError(f"objectives.distill: {path} was not written by the main process. Check the run folder")
    head = causal_lm_parts(model)[1]
    seen: dict[bytes, tuple[int, int]] = {}
    keys, offsets, idx_parts, lp_parts = [], [0], [], []
    progress = Progress(TextColumn("[bold]teacher top-k[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                        TimeRemainingColumn(), console=console, disable=console is None, transient=True)
    was_training = loss_module.training
    loss_module.eval()
    try:
        with progress, torch.no_grad():
            task = progress.add_task("topk", total=len(batches))
            for part in batches:
                b = {k: v.to(device) for k, v in collate(part, pad_id=pad_id, packed=packed).items()}
                keep = b["labels"][:, 1:] != -100
                with autocast() if autocast else nullcontext():
                    hidden = teacher_hidden(model, b["input_ids"], b.get("attention_mask"), b.get("position_ids"),
                                            adapters_off)
                h = hidden[:, :-1][keep]
                lp_all = []
                for start in range(0, h.shape[0], 1024):
                    hc = h[start:start + 1024]
                    logp = torch.log_softmax((hc @ head.weight.to(hc.dtype).T).float() / temperature, dim=-1)
                    v, i = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                    lp_all.append((i.int().cpu(), v.cpu()))
                i_cat = torch.cat([x[0] for x in lp_all]) if lp_all else torch.zeros((0, top_k), dtype=torch.int32)
                v_cat = torch.cat([x[1] for x in lp_all]) if lp_all else torch.zeros((0, top_k))
                at = 0
                for r, key in enumerate(row_keys(b["input_ids"], keep, b.get("position_ids"))):
                    n = int(keep[r].sum())
                    if key is not None and key not in seen:
                        seen[key] = (offsets[-1], offsets[-1] + n)
                        keys.append(list(key))
                        idx_parts.append(i_cat[at:at + n])
                        lp_parts.append(v_cat[at:at + n])
                        offsets.append(offsets[-1] + n)
                    at += n
                progress.advance(task)
    finally:
        loss_module.train(was_training)
    k = min(top_k, head.weight.shape[0])
    tensors = {"keys": torch.tensor(keys, dtype=torch.uint8).reshape(-1, 16),
               "offsets": torch.tensor(offsets, dtype=torch.int64),
               "indices": torch.cat(idx_parts) if idx_parts else torch.zeros((0, k), dtype=torch.int32),
               "logp": torch.cat(lp_parts) if lp_parts else torch.zeros((0, k))}
    atomic_write_bytes(path, save(tensors, metadata={"tunelab": json.dumps(meta)}))
    return TopKCache(tensors["keys"], tensors["offsets"], tensors["indices"], tensors["logp"], meta)


# --------------------------------------------------------------------------- the distiller


class Distiller:
    """``weight * T^2 * KL`` summed over labelled tokens, against one of the teachers above.

    ``kind``: ``adapters_off`` (``model`` with adapters disabled), ``copy`` (``teacher``: a frozen
    model) or ``cached`` (``cache``: a :class:`TopKCache`). Accumulates the unscaled KL per token
    for the metrics (:meth:`take_metrics`).
    """

    def __init__(self, weight: float, temperature: float, kind: str, teacher: nn.Module | None = None,
                 cache: TopKCache | None = None, chunk: int = 1024):
        self.weight, self.temperature, self.kind = weight, temperature, kind
        self.teacher, self.cache, self.chunk = teacher, cache, chunk
        self._kl, self._n = 0.0, 0.0

    def kl_sum(self, model: nn.Module, h: torch.Tensor, head: nn.Module, keep: torch.Tensor,
               token_w: torch.Tensor | None, *, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """``weight * T^2 * sum_i w_i KL_i`` over the labelled positions ``keep`` (``h``: student hidden)."""
        from tunelab.objectives.causal_lm import causal_lm_parts

        if h.shape[0] == 0:
            return (h.sum() * 0.0).float()
        if self.kind == "cached":
            teacher = self.cache.lookup(input_ids, keep, position_ids)
        else:
            source = self.teacher if self.kind == "copy" else model
            hidden = teacher_hidden(source, input_ids, attention_mask, position_ids, adapters_off=self.kind == "adapters_off")
            teacher = _FullTeacher(hidden[:, :-1][keep], causal_lm_parts(source)[1].weight, self.temperature)
        total = ChunkedLinearKL.apply(h, head.weight, teacher, self.temperature, token_w, self.chunk)
        self._kl += float(total.detach()) / self.temperature ** 2
        self._n += float(token_w.sum()) if token_w is not None else h.shape[0]
        return self.weight * total

    def take_metrics(self) -> dict[str, float]:
        """Mean KL per labelled token (at T, without the T^2 and the weight) since the last call."""
        if not self._n:
            return {}
        out = {"distill_kl": self._kl / self._n}
        self._kl, self._n = 0.0, 0.0
        return out


class ReferenceKL:
    """The reference-data term of the per-step penalty: ``weight * mean KL`` over one reference
    micro-batch, chosen by the optimiser step (``scheduler.last_epoch``) in a seeded order."""

    def __init__(self, distiller: Distiller, loss_module, rows: list, *, batch_size: int, seed: int, pad_id: int,
                 packed: bool, scheduler, rank: int = 0, world: int = 1, autocast: Callable[[], Any] | None = None,
                 device: torch.device | None = None):
        self.distiller, self.loss_module, self.rows = distiller, loss_module, rows
        self.order = list(range(len(rows)))
        random.Random(seed).shuffle(self.order)
        self.batch_size, self.pad_id, self.packed = batch_size, pad_id, packed
        self.scheduler, self.rank, self.world = scheduler, rank, world
        self.autocast, self.device = autocast, device

    def rows_at(self, step: int) -> list:
        n, first = len(self.order), (step * self.world + self.rank) * self.batch_size
        return [self.rows[self.order[(first + j) % n]] for j in range(self.batch_size)]

    def __call__(self) -> torch.Tensor:
        from tunelab.data.batching import collate

        step = int(self.scheduler.last_epoch)
        batch = collate(self.rows_at(step), pad_id=self.pad_id, packed=self.packed)
        device = self.device or next(self.loss_module.parameters()).device
        b = {k: v.to(device) for k, v in batch.items() if k not in ("weights", "groups")}
        with self.autocast() if self.autocast else nullcontext():
            h, _, keep, head = self.loss_module.target_hidden(**b)
            kl = self.distiller.kl_sum(self.loss_module.model, h, head, keep, None, input_ids=b["input_ids"],
                                       attention_mask=b.get("attention_mask"), position_ids=b.get("position_ids"))
        return kl / max(1, int(keep.sum()))
