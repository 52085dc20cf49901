"""Preference losses (DPO, IPO, hinge, conservative DPO, ORPO, SimPO, KTO, + an SFT term) and the
Bradley-Terry loss of a reward model; the reference model; the pair metrics.

Rows come from :mod:`tunelab.data.preference`: one row per pair (chosen and rejected packed, one
forward for both) or per KTO sample (the sample and its mismatched sample). ``tags`` in the batch
say which segment a token belongs to. For each sequence, its log-probability is the sum over its
labelled (reply) tokens of ``log p(token)``; those are computed on the labelled positions only, a
chunk of rows of the vocabulary at a time (:class:`ChunkedTokenLogp`: never ``batch x length x
vocab``, logits recomputed in the backward).

Normalisation: every loss here is a sum over *pairs* (KTO: samples), and the module returns that
sum with the count of pairs; the loop divides a step's sum by the step's pairs (``Row.units``), so
batch 8 = batch 2 x accumulation 4 = 2 processes x batch 4. Inside a pair: DPO, hinge and KTO use
summed log-ratios (per sequence); IPO, SimPO and ORPO use length-normalised ones (mean per reply
token), as TRL does; the SFT term (``sft_weight``) and ORPO's NLL are the chosen reply's mean NLL per
token, per pair. KTO's KL estimate ``z`` is the mean log-ratio of the step's mismatched samples
(all micro-batches and processes, computed before the step's forwards by :meth:`step_statistics`),
clamped at 0 and not differentiated.

The reference (``Reference``): ``adapters_off`` (the same model with its adapters disabled, no
copy), ``copy`` (a frozen copy), or ``cached`` (each sequence's reference log-probability computed
once before training, kept under the data cache folder in a file named by a digest of the rows, the
starting weights and the settings; found again by a digest of the sequence's tokens and labels).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.batching import collate
from tunelab.data.preference import CHOSEN, DESIRABLE, MISMATCHED, REJECTED, TAGS, UNDESIRABLE
from tunelab.fsutil import atomic_write_bytes
from tunelab.models.classifier import unwrap
from tunelab.objectives.causal_lm import CausalLMLoss, causal_lm_parts, chunk_rows
from tunelab.objectives.distill import adapters_disabled, has_adapters
from tunelab.objectives.output import LossSum, Tally

PAIR_LOSSES = ("dpo", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
CACHE_VERSION = 1


class ChunkedTokenLogp(torch.autograd.Function):
    """``log softmax(h_i W^T)[t_i]`` for each labelled position ``i``, a chunk of rows at a time.

    The forward keeps no logits (exact fp32 log-softmax per chunk); the backward recomputes each
    chunk's logits and applies the per-token upstream gradient ``g_i``: ``d/dlogits = g_i (onehot - p)``.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        w = weight.to(h.dtype)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            logits = (h[start : start + chunk] @ w.T).float()
            t = targets[start : start + chunk].unsqueeze(1)
            out[start : start + chunk] = torch.log_softmax(logits, dim=-1).gather(1, t).squeeze(1)
        ctx.save_for_backward(h, weight, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, h.shape[0], ctx.chunk):
            hc = h[start : start + ctx.chunk]
            gc = g[start : start + ctx.chunk].float().unsqueeze(1)
            d = torch.softmax((hc @ w.T).float(), dim=-1).mul_(-gc)
            d.scatter_add_(1, targets[start : start + ctx.chunk].unsqueeze(1), gc)
            d = d.to(h.dtype)
            if need_h:
                gh[start : start + ctx.chunk] = d @ w
            if need_w:
                gw += (d.T @ hc).float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None


def token_logps(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int = 1024,
                softcap: float | None = None) -> torch.Tensor:
    """Log-probability of each target under ``head`` (fp32): the chunked function for a bias-free
    linear head, plain autograd on chunks of labelled rows for a head with a bias or soft-capping."""
    if h.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=h.device)
    if getattr(head, "bias", None) is None and not softcap:
        return ChunkedTokenLogp.apply(h, head.weight, targets, chunk_rows(chunk, head.weight.shape[0]))
    parts = []
    for start in range(0, h.shape[0], chunk):
        logits = head(h[start : start + chunk]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        parts.append(torch.log_softmax(logits, dim=-1).gather(1, targets[start : start + chunk].unsqueeze(1)).squeeze(1))
    return torch.cat(parts)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _positions(keep: torch.Tensor, tags: torch.Tensor):
    """Per labelled position: its sequence id ``row * TAGS + tag`` (row-major, so each sequence's
    positions are consecutive)."""
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    return rows * TAGS + tags[:, 1:][keep]


def sequence_keys(input_ids: torch.Tensor, labels: torch.Tensor, tags: torch.Tensor, seq_ids: list[int]) -> list[bytes]:
    """A digest of each sequence's tokens and labels (what its reference log-probability depends on)."""
    ids, lab, tg = (x.cpu().numpy().astype(np.int64) for x in (input_ids, labels, tags))
    out = []
    for s in seq_ids:
        b, t = divmod(s, TAGS)
        m = tg[b] == t
        digest = hashlib.blake2b(ids[b][m].tobytes(), digest_size=16)
        digest.update(lab[b][m].tobytes())
        out.append(digest.digest())
    return out


class Reference:
    """The reference log-probability of each sequence of a batch (see the module doc)."""

    def __init__(self, kind: str, model: nn.Module | None = None, table: dict[bytes, float] | None = None,
                 info: dict[str, Any] | None = None):
        self.kind, self.model, self.table = kind, model, table
        self.info = info or {"kind": kind}
        self.forwards = 0  # reference forwards run (the cached kind runs none during training)

    def sequence_logps(self, policy: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor,
                       seq_ids: torch.Tensor, inverse: torch.Tensor, chunk: int) -> torch.Tensor:
        if self.kind == "cached":
            keys = sequence_keys(batch["input_ids"], batch["labels"], batch["tags"], seq_ids.tolist())
            missing = [k for k in keys if k not in self.table]
            if missing:
                raise RuntimeError(f"{len(missing)} sequence(s) of this batch have no cached reference log-probability")
            return torch.tensor([self.table[k] for k in keys], dtype=torch.float32, device=keep.device)
        self.forwards += 1
        source = self.model if self.kind == "copy" else policy
        decoder, head = causal_lm_parts(source)
        softcap = getattr(getattr(source, "config", None), "final_logit_softcapping", None)
        off = adapters_disabled(source) if self.kind == "adapters_off" else nullcontext()
        with torch.no_grad(), off:
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
            tok = token_logps(hidden[:, :-1][keep], head, batch["labels"][:, 1:][keep], chunk, softcap)
        return torch.zeros(len(seq_ids), dtype=torch.float32, device=tok.device).index_add_(0, inverse, tok)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, values): the starting weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_reference(model: nn.Module, rows: list, *, pad_id: int, batch_size: int, folder: Path,
                     settings: dict[str, Any]) -> Reference:
    """The ``cached`` reference: read the file for these rows, weights and settings, or compute it with
    ``model`` as it is now (adapters disabled) and write it atomically."""
    from safetensors.torch import load, save

    row_digest = hashlib.blake2b(digest_size=16)
    for r in rows:
        row_digest.update(np.asarray(r.input_ids + r.labels + r.segments + (r.tags or ()), dtype=np.int64).tobytes())
    key = hashlib.blake2b(json.dumps({"v": CACHE_VERSION, "rows": row_digest.hexdigest(), "model": model_fingerprint(model),
                                     "settings": settings}, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = folder / f"{key}.safetensors"
    info = {"kind": "cached", "key": key, "file": str(path), "sequences": 0, "from_cache": False}
    if path.is_file():
        try:
            t = load(path.read_bytes())
            table = {bytes(k.tolist()): float(v) for k, v in zip(t["keys"], t["logps"].tolist(), strict=True)}
            return Reference("cached", table=table, info={**info, "sequences": len(table), "from_cache": True})
        except Exception:  # a torn or foreign file: computed again and replaced
            pass
    ref = Reference("adapters_off" if has_adapters(model) else "copy", model=model)
    table: dict[bytes, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id=pad_id, packed=True)
            keep = batch["labels"][:, 1:] != -100
            seq = _positions(keep, batch["tags"])
            seq_ids, inverse = torch.unique_consecutive(seq, return_inverse=True)
            device = next(model.parameters()).device
            b = {k: v.to(device) for k, v in batch.items()}
            logps = ref.sequence_logps(model, b, keep.to(device), seq_ids, inverse.to(device), 1024)
            table.update(zip(sequence_keys(batch["input_ids"], batch["labels"], batch["tags"], seq_ids.tolist()),
                             logps.tolist(), strict=True))
    finally:
        model.train(was_training)
    keys = torch.tensor([list(k) for k in table], dtype=torch.uint8).reshape(-1, 16)
    try:
        atomic_write_bytes(path, save({"keys": keys, "logps": torch.tensor(list(table.values()), dtype=torch.float64)}))
    except OSError:  # a read-only or full cache must not stop training: this run keeps the table in memory
        pass
    return Reference("cached", table=table, info={**info, "sequences": len(table), "computed": len(table)})


class PreferenceLoss(CausalLMLoss, Tally):
    """``forward(batch) -> LossSum(sum of per-pair losses, pairs)``; see the module doc for each loss."""

    def __init__(self, model: nn.Module, loss: str = "dpo", *, beta: float = 0.1, label_smoothing: float = 0.0,
                 gamma: float = 0.5, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 sft_weight: float = 0.0, reference: Reference | None = None, chunk: int = 1024):
        super().__init__(model, chunk)
        self.loss, self.beta, self.label_smoothing, self.gamma = loss, beta, label_smoothing, gamma
        self.desirable_weight, self.undesirable_weight, self.sft_weight = desirable_weight, undesirable_weight, sft_weight
        self.reference = reference  # a plain attribute: a frozen copy stays out of DDP and the checkpoints
        self.step_kl: float | None = None  # KTO: the step's KL estimate, set by use_step_statistics
        self._stats = {True: {}, False: {}}  # metrics summed since the last take, per mode (training or not)

    def sequences(self, input_ids, labels, attention_mask, position_ids, tags, grad: bool = True):
        """(per-sequence log-probs, reference log-probs or None, tag, length) of a batch's sequences."""
        if tags is None:  # the placeholder row of an empty slice (collate): no sequence
            tags = torch.full_like(input_ids, -1)
        h, targets, keep, head = self.target_hidden(input_ids, labels, attention_mask, position_ids)
        seq = _positions(keep, tags)
        seq_ids, inverse, counts = torch.unique_consecutive(seq, return_inverse=True, return_counts=True)
        seq_tag = seq_ids % TAGS
        mismatched = (seq_tag == MISMATCHED)[inverse]  # KTO's KL samples: no gradient
        tok = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        live = (~mismatched).nonzero().squeeze(1)
        if grad:
            tok = tok.index_put((live,), token_logps(h[live], head, targets[live], self.chunk, self.softcap))
        dead = mismatched.nonzero().squeeze(1) if grad else torch.arange(h.shape[0], device=h.device)
        if dead.numel():
            with torch.no_grad():
                values = token_logps(h[dead].detach(), head, targets[dead], self.chunk, self.softcap)
            tok = tok.index_put((dead,), values)  # outside no_grad: tok keeps the graph of the live positions
        logp = torch.zeros(len(seq_ids), dtype=torch.float32, device=h.device).index_add(0, inverse, tok)
        ref = None
        if self.loss not in REFERENCE_FREE:
            batch = {"input_ids": input_ids, "labels": labels, "tags": tags, "attention_mask": attention_mask,
                     "position_ids": position_ids}
            ref = self.reference.sequence_logps(self.model, batch, keep, seq_ids, inverse, self.chunk)
        if h.shape[0] == 0:  # an empty slice on some process: keep the graph for DDP
            logp = logp + (h.sum() * 0.0).float()
        return logp, ref, seq_tag, counts.to(torch.float32), h

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, tags=None, weights=None,
                groups=None, statistics: bool = False) -> LossSum | torch.Tensor:
        if statistics:  # KTO's KL pass (step_statistics), run as a forward of this module: see there
            logp, ref, tag, _, _ = self.sequences(input_ids, labels, attention_mask, position_ids, tags, grad=False)
            m = tag == MISMATCHED
            return torch.stack([(logp - ref)[m].double().sum().cpu(), m.sum().double().cpu()])
        logp, ref, tag, length, h = self.sequences(input_ids, labels, attention_mask, position_ids, tags)
        if self.loss == "kto":
            total, count = self._kto(logp, ref, tag)
        else:
            total, count = self._pairs(logp, ref, tag, length)
        return LossSum(total + (h.sum() * 0.0).float(), count)

    # --------------------------------------------------------------------------- the losses

    def _pairs(self, logp, ref, tag, length):
        c, r = tag == CHOSEN, tag == REJECTED
        lp_c, lp_r, n_c, n_r = logp[c], logp[r], length[c], length[r]
        beta, eps = self.beta, self.label_smoothing
        if self.loss in REFERENCE_FREE:
            avg_c, avg_r = lp_c / n_c, lp_r / n_r
            rew_c, rew_r = beta * avg_c.detach(), beta * avg_r.detach()
            if self.loss == "orpo":
                log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
                per = -avg_c - beta * F.logsigmoid(log_odds)
            else:  # simpo
                z = beta * (avg_c - avg_r) - self.gamma
                per = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        else:
            ratio_c, ratio_r = lp_c - ref[c], lp_r - ref[r]
            rew_c, rew_r = beta * ratio_c.detach(), beta * ratio_r.detach()
            if self.loss == "dpo":
                z = beta * (ratio_c - ratio_r)
                per = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            elif self.loss == "ipo":
                per = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
            else:  # hinge
                per = torch.relu(1 - beta * (ratio_c - ratio_r))
        if self.sft_weight:
            per = per - self.sft_weight * lp_c / n_c
        with torch.no_grad():
            self._add({"reward_chosen": rew_c.sum(), "reward_rejected": rew_r.sum(), "margin": (rew_c - rew_r).sum(),
                       "pair_accuracy": (rew_c > rew_r).float().sum(), "logp_chosen": lp_c.sum(),
                       "logp_rejected": lp_r.sum(), "n": float(lp_c.numel())})
        return per.sum(), int(lp_c.numel())

    def _kto(self, logp, ref, tag):
        s = (tag == DESIRABLE) | (tag == UNDESIRABLE)
        desirable = tag[s] == DESIRABLE
        ratio = logp[s] - ref[s]
        mism = (logp - ref)[tag == MISMATCHED].detach()
        if self.training and self.step_kl is not None:
            z = torch.tensor(self.step_kl, dtype=torch.float32, device=logp.device)
        else:  # evaluation, or a forward outside the loop: this batch's own mismatched samples
            z = mism.mean().clamp(min=0) if mism.numel() else logp.new_zeros(())
        per = torch.where(desirable, self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - z))),
                          self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - ratio))))
        with torch.no_grad():
            rew = self.beta * ratio.detach()
            self._add({"reward_desirable": rew[desirable].sum(), "n_desirable": float(desirable.sum()),
                       "reward_undesirable": rew[~desirable].sum(), "n_undesirable": float((~desirable).sum()),
                       "kl_sum": mism.sum(), "kl_n": float(mism.numel()), "kl_z": float(z) * float(s.sum()),
                       "n": float(s.sum())})
        return per.sum(), int(s.sum())

    # --------------------------------------------------------------------------- KTO's per-step KL

    @property
    def needs_step_statistics(self) -> bool:
        return self.loss == "kto"

    @torch.no_grad()
    def step_statistics(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(sum of the mismatched samples' log-ratios, their number) over this process's micro-batches.

        Each micro-batch goes through this module's ``__call__``, not straight to :meth:`sequences`: under
        ``train.distributed: fsdp`` / ``deepspeed`` stage 3 the engine gathers the root's parameters (the
        output head among them) in its forward hooks, and outside a forward this rank holds only its shard."""
        out = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            out += self(**b, statistics=True)
        return out

    def use_step_statistics(self, totals: torch.Tensor) -> None:
        """The step's KL estimate from :meth:`step_statistics` summed over processes (clamped at 0)."""
        self.step_kl = max(0.0, float(totals[0] / totals[1].clamp(min=1)))

    # --------------------------------------------------------------------------- metrics

    def _add(self, values: dict[str, Any]) -> None:
        if not self.counting:
            return
        stats = self._stats[self.training]
        for k, v in values.items():
            stats[k] = stats.get(k, 0.0) + float(v)

    def take_metrics(self, accelerator=None, training: bool = False) -> dict[str, float]:
        """Means of the metrics since the last call (with ``accelerator``: summed over processes, so every
        process must call it at the same point); resets them."""
        stats, self._stats[training] = self._stats[training], {}
        if accelerator is not None and accelerator.num_processes > 1:
            # every process sends the same keys in the same order, whatever it saw (an empty slice: zeros)
            keys = sorted(set(stats) | set(self.stat_keys()))
            total = accelerator.reduce(torch.tensor([stats.get(k, 0.0) for k in keys], dtype=torch.float64,
                                                    device=accelerator.device), "sum")
            stats = {k: v for k, v in zip(keys, total.tolist(), strict=True) if k in stats or v}
        return pair_metrics(stats) if stats else {}

    def stat_keys(self) -> tuple[str, ...]:
        """The sums :meth:`_add` keeps for this loss."""
        if self.loss == "kto":
            return ("reward_desirable", "n_desirable", "reward_undesirable", "n_undesirable", "kl_sum", "kl_n",
                    "kl_z", "n")
        return ("reward_chosen", "reward_rejected", "margin", "pair_accuracy", "logp_chosen", "logp_rejected", "n")

    def take_train_metrics(self, accelerator=None) -> dict[str, float]:
        """The training metrics since the last train record (with ``accelerator``: over every process),
        named ``train_*``."""
        return {f"train_{k}": v for k, v in self.take_metrics(accelerator, training=True).items()}


def pair_metrics(stats: dict[str, float]) -> dict[str, float]:
    """Means from the sums :class:`PreferenceLoss` and :class:`RewardLoss` keep."""
    n = max(stats.get("n", 0.0), 1.0)
    out = {k: stats[k] / n for k in ("reward_chosen", "reward_rejected", "margin", "pair_accuracy", "logp_chosen",
                                     "logp_rejected", "score_chosen", "score_rejected") if k in stats}
    for key, count in (("reward_desirable", "n_desirable"), ("reward_undesirable", "n_undesirable"), ("kl", "kl_n")):
        source = "kl_sum" if key == "kl" else key
        if stats.get(count):
            out[key] = stats[source] / stats[count]
    if "kl_z" in stats:
        out["kl_estimate"] = stats["kl_z"] / n
    return out


class RewardLoss(nn.Module, Tally):
    """Bradley-Terry: ``-log sigmoid(r(chosen) - r(rejected))`` per pair, ``r`` the classifier's scalar
    score; returns (sum, pairs). Chosen and rejected arrive packed in one row (their tags); they are
    scored as two right-padded sequences (the head pools the last token by the attention mask)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._stats = {True: {}, False: {}}

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, tags=None, **_) -> LossSum:
        seqs = []
        for b in range(input_ids.shape[0] if tags is not None else 0):
            for t in (CHOSEN, REJECTED):
                m = tags[b] == t
                if m.any():
                    seqs.append(input_ids[b][m])
        n = len(seqs) // 2
        if not n:
            return LossSum(sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad), 0)
        width = max(len(s) for s in seqs)
        ids = input_ids.new_zeros((len(seqs), width))
        mask = input_ids.new_zeros((len(seqs), width))
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        scores = unwrap(self.model)(input_ids=ids, attention_mask=mask).float().squeeze(-1)
        s_c, s_r = scores[0::2], scores[1::2]
        per = -F.logsigmoid(s_c - s_r)
        with torch.no_grad():
            stats = self._stats[self.training] if self.counting else {}
            for k, v in {"score_chosen": s_c.sum(), "score_rejected": s_r.sum(), "margin": (s_c - s_r).sum(),
                         "pair_accuracy": (s_c > s_r).float().sum(), "n": float(n)}.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        return LossSum(per.sum(), n)

    take_metrics = PreferenceLoss.take_metrics
    take_train_metrics = PreferenceLoss.take_train_metrics

    def stat_keys(self) -> tuple[str, ...]:
        return ("score_chosen", "score_rejected", "margin", "pair_accuracy", "n")
