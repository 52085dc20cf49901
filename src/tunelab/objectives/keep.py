"""Keep what the model knew: L2-SP and EWC, penalties towards the weights a run started from.

Both are ``lambda/2 * sum_i F_i (theta_i - theta0_i)^2`` over the *targets* of the run: L2-SP
with ``F = 1`` (Li et al. 2018), EWC with a diagonal Fisher ``F`` (Kirkpatrick et al. 2017;
online EWC, Schwarz et al. 2018: ``F = gamma * F_old + F_new``).

Targets (:func:`collect_targets`) are what the method trains, in the base model's terms:

* :class:`Plain`: a trained parameter itself (full / freeze: every trained weight; IA3 scaling
  vectors, prompt / prefix embeddings, bottleneck adapters, DoRA magnitudes: the parameter),
  anchored at its value when the run starts (adapters: their initial values, e.g. IA3's ones);
* :class:`LowRank`: a LoRA layer, whose target is its *effective weight delta*
  ``dW = scaling * B @ A`` (transposed for embeddings), anchored at the delta the run starts
  with (zero for a fresh adapter; the previous stage's ``B0 @ A0`` when an adapter trains on).
  L2-SP never builds ``dW``: ``||BA - B0A0||_F^2 = tr(B^T B A A^T) - 2 tr(B^T B0 A0 A^T) +
  tr(B0^T B0 A0 A0^T)`` (``r x r`` products). EWC needs ``F * dW^2`` element-wise: one layer's
  ``dW`` exists at a time and :class:`_LowRankEWC` keeps only the rank-``r`` gradients.

A target is named after the base weight it changes (``model.layers.0.self_attn.q_proj.weight``
for a LoRA layer on it as for full fine-tuning), so a Fisher estimated in one run is reused by
another run on the same base, whatever the method.

The Fisher (:func:`estimate_fisher`) is the *sampled-label* ("true") Fisher: for each
reference row, labels are drawn from the model's own predictive distribution at every labelled
position (teacher-forced on the row's tokens) and ``g = grad sum_t log p(y_t)`` is taken with
one backward per row; ``F += g^2 / n_tokens``. Because the labels at different positions are
drawn independently given the context, the cross terms of ``g^2`` vanish in expectation, so
``g^2 / n`` is an unbiased estimate of the mean *per-token* Fisher -- the scale of the per-token
mean loss the loop optimises, which makes ``lambda/2 * F dtheta^2`` the second-order estimate
of the loss increase on the reference data. The empirical Fisher (observed labels) was not
chosen: it is a biased estimate whose cross terms do not cancel and which shrinks where the
model already fits the data (Kunstner et al. 2019). Gradients of LoRA targets (the frozen base
weight) come from hooks on the base layer (``g_out^T x``), which also works on 4-bit bases.

Files: ``<run>/fisher.safetensors`` (``fisher/<target>``, ``theta0/<target>`` or
``theta0/<target>@A`` / ``@B`` for LoRA targets, metadata), written atomically; a resumed run
reads it back instead of estimating again, so its anchor is the one of the run's first session.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from tunelab.errors import UserError
from tunelab.fsutil import atomic_write_bytes

FISHER_FILE = "fisher.safetensors"


# --------------------------------------------------------------------------- targets


def canonical(name: str) -> str:
    """The base model's name of a tuned model's parameter (PEFT's wrapping removed)."""
    for prefix in ("base_model.model.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


@dataclass
class Plain:
    """A trained parameter; its anchor is a tensor of the same shape."""

    key: str
    param: nn.Parameter

    def value(self) -> torch.Tensor:
        return self.param


@dataclass
class LowRank:
    """A LoRA layer: ``dW = scaling * B @ A`` (``.T`` for an embedding), B ``out x r``, A ``r x in``."""

    key: str
    module: nn.Module
    a: nn.Parameter
    b: nn.Parameter
    scaling: float
    embedding: bool

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaling * B, A), so that ``dW = (sB) @ A``."""
        return self.b.float() * self.scaling, self.a.float()

    def delta(self) -> torch.Tensor:
        sb, a = self.factors()
        d = sb @ a
        return d.T if self.embedding else d


def _lora_targets(model: nn.Module) -> tuple[list[LowRank], set[int]]:
    """One :class:`LowRank` per PEFT LoRA layer with trained factors (its active adapter)."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return [], set()
    out, covered = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                a, b, emb = module.lora_A[adapter].weight, module.lora_B[adapter].weight, False
            elif adapter in getattr(module, "lora_embedding_A", {}):
                a, b, emb = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], True
            else:
                continue
            if not (a.requires_grad or b.requires_grad):
                continue
            key = canonical(f"{name}.weight")
            out.append(LowRank(key, module, a, b, float(module.scaling[adapter]), emb))
            covered.update((id(a), id(b)))
    return out, covered


def collect_targets(model: nn.Module, skip: tuple[str, ...] = ()) -> list[Plain | LowRank]:
    """What the method trains, as targets named after the base weights (see the module doc).

    ``skip``: key prefixes left out (a new classification head has no earlier knowledge to keep).
    """
    lows, covered = _lora_targets(model)
    plain = [Plain(canonical(n), p) for n, p in model.named_parameters()
             if p.requires_grad and id(p) not in covered]
    targets = [t for t in [*lows, *plain] if not any(t.key.startswith(s) for s in skip)]
    if not targets:
        raise UserError("objectives: the method trains no parameter the l2sp / ewc penalties could anchor. "
                        "Remove objectives.l2sp / objectives.ewc")
    return targets


# --------------------------------------------------------------------------- anchors


@dataclass
class Anchor:
    """``theta0`` per target: ``key`` for plain targets, ``key@B`` (scaled) and ``key@A`` for LoRA targets."""

    theta0: dict[str, torch.Tensor]

    @classmethod
    def capture(cls, targets: Iterable[Plain | LowRank]) -> Anchor:
        """The targets' values now (the start of the run), detached fp32 copies."""
        theta0: dict[str, torch.Tensor] = {}
        for t in targets:
            if isinstance(t, LowRank):
                sb, a = t.factors()
                theta0[f"{t.key}@B"], theta0[f"{t.key}@A"] = sb.detach().clone(), a.detach().clone()
            else:
                theta0[t.key] = t.param.detach().float().clone()
        return cls(theta0)

    def check(self, targets: Iterable[Plain | LowRank], source: str) -> None:
        for t in targets:
            names = (f"{t.key}@B", f"{t.key}@A") if isinstance(t, LowRank) else (t.key,)
            missing = [n for n in names if n not in self.theta0]
            if missing:
                raise UserError(f"{source}: no anchor for target {missing[0]} of this model/method. "
                                "It was written for another model or method: remove it or re-estimate")


def _tr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tr(x @ y) without the product."""
    return (x * y.T).sum()


def lowrank_sqdist(t: LowRank, b0: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
    """``||sBA - B0 A0||_F^2`` from ``r x r`` products only."""
    sb, a = t.factors()
    b0, a0 = b0.to(sb.device), a0.to(sb.device)
    total = _tr(sb.T @ sb, a @ a.T)
    if b0.abs().sum() > 0:
        total = total - 2 * _tr(sb.T @ b0, a0 @ a.T) + _tr(b0.T @ b0, a0 @ a0.T).detach()
    return total


def l2sp_sum(targets: Iterable[Plain | LowRank], anchor: Anchor) -> torch.Tensor:
    """``sum ||theta - theta0||^2`` over the targets (with a graph to the trained parameters)."""
    total = None
    for t in targets:
        if isinstance(t, LowRank):
            part = lowrank_sqdist(t, anchor.theta0[f"{t.key}@B"], anchor.theta0[f"{t.key}@A"])
        else:
            part = (t.param.float() - anchor.theta0[t.key].to(t.param.device)).pow(2).sum()
        total = part if total is None else total + part
    assert total is not None
    return total


class _LowRankEWC(torch.autograd.Function):
    """``sum F * (sBA - D0)^2`` with gradients computed in the forward; only ``dA``, ``dB`` are kept."""

    @staticmethod
    def forward(ctx, a, b, fisher, b0, a0, scaling: float, embedding: bool):
        a32, sb = a.float(), b.float() * scaling
        d = sb @ a32 - b0 @ a0
        f = fisher.T if embedding else fisher
        fd = f * d
        value = (fd * d).sum()
        # d/dB = 2 s (F*D) A^T ; d/dA = 2 (sB)^T (F*D)
        ctx.save_for_backward((2 * scaling) * (fd @ a32.T), 2 * (sb.T @ fd))
        ctx.dtypes = (a.dtype, b.dtype)
        return value

    @staticmethod
    def backward(ctx, grad):
        gb, ga = ctx.saved_tensors
        da, db = ctx.dtypes
        return (ga * grad).to(da), (gb * grad).to(db), None, None, None, None, None


def ewc_sum(targets: Iterable[Plain | LowRank], anchor: Anchor, fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta0_i)^2`` over the targets."""
    total = None
    for t in targets:
        f = fisher[t.key].to(t.value().device if isinstance(t, Plain) else t.a.device)
        if isinstance(t, LowRank):
            b0, a0 = anchor.theta0[f"{t.key}@B"].to(f.device), anchor.theta0[f"{t.key}@A"].to(f.device)
            part = _LowRankEWC.apply(t.a, t.b, f, b0, a0, t.scaling, t.embedding)
        else:
            part = (f * (t.param.float() - anchor.theta0[t.key].to(f.device)).pow(2)).sum()
        total = part if total is None else total + part
    assert total is not None
    return total


# --------------------------------------------------------------------------- the Fisher


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from ``softmax(logits)``: ``argmax(p / E)`` with ``E ~ Exp(1)`` (the exponential
    race; exact, and several times faster than ``torch.multinomial`` over a 50k vocabulary on CPU)."""
    probs = torch.softmax(logits.float(), -1)
    return probs.div_(torch.empty_like(probs).exponential_(1.0, generator=generator)).argmax(-1)


def _sampled_nll(loss_module: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
                 ) -> tuple[torch.Tensor, int]:
    """``(-sum_t log p(y_t), n)`` with ``y_t`` drawn from the model at every labelled position."""
    from tunelab.objectives.causal_lm import CausalLMLoss, chunked_cross_entropy_sum, plain_cross_entropy_sum

    if isinstance(loss_module, CausalLMLoss):
        # a preference row's tags (chosen / rejected spans) do not matter here: y is sampled at every labelled token
        h, _, _, head = loss_module.target_hidden(**{k: v for k, v in batch.items()
                                                     if k not in ("weights", "groups", "tags")})
        if h.shape[0] == 0:
            return h.sum() * 0.0, 0
        with torch.no_grad():
            sampled = []
            for start in range(0, h.shape[0], loss_module.chunk):
                logits = head(h[start:start + loss_module.chunk]).float()
                if loss_module.softcap:
                    logits = loss_module.softcap * torch.tanh(logits / loss_module.softcap)
                sampled.append(_sample(logits, generator))
            y = torch.cat(sampled)
        if loss_module.fused:
            return chunked_cross_entropy_sum(h, head.weight, y, loss_module.chunk), int(y.numel())
        return plain_cross_entropy_sum(h, head, y, loss_module.softcap, loss_module.chunk), int(y.numel())
    # classification: one class per row
    from tunelab.models.classifier import unwrap

    logits = unwrap(loss_module.model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).float()
    with torch.no_grad():
        y = _sample(logits, generator)
    return nn.functional.cross_entropy(logits, y, reduction="sum"), int(y.numel())


@contextmanager
def _base_weight_grads(targets: list[Plain | LowRank], sink: dict[str, torch.Tensor]):
    """Per-row gradients of the frozen base weights under LoRA layers, from hooks:
    ``dL/dW = g_out^T x`` (linear) or ``g_out`` added at the input ids' rows (embedding)."""
    handles = []
    for t in targets:
        if not isinstance(t, LowRank):
            continue
        base = t.module.get_base_layer()
        store: dict[str, torch.Tensor] = {}

        def fwd(module, args, output, t=t, store=store):
            x = args[0]
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def on_grad(g, t=t, x=x):
                    if t.embedding:
                        grad = torch.zeros(t.module.get_base_layer().weight.shape, dtype=torch.float32, device=g.device)
                        grad.index_add_(0, x.reshape(-1), g.reshape(-1, g.shape[-1]).float())
                    else:
                        grad = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                    sink[t.key] = sink[t.key] + grad if t.key in sink else grad
                output.register_hook(on_grad)

        handles.append(base.register_forward_hook(fwd))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _inputs_require_grad(model: nn.Module):
    """Make the input embeddings' output require grad, so every layer's output has a graph
    (the base-layer hooks need it even in the first layer, whose input comes from a frozen table)."""
    emb = _input_embeddings(model)
    if emb is None:
        yield
        return
    handle = emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True) if not out.requires_grad else None)
    try:
        yield
    finally:
        handle.remove()


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    for candidate in (model, getattr(model, "get_base_model", lambda: model)()):
        for owner in (candidate, getattr(candidate, "backbone", None)):
            get = getattr(owner, "get_input_embeddings", None)
            if get is not None:
                try:
                    return get()
                except (NotImplementedError, AttributeError):
                    continue
    return None


def estimate_fisher(loss_module: nn.Module, rows: list, targets: list[Plain | LowRank], *, samples: int,
                    pad_id: int, packed: bool, seed: int = 0, autocast: Callable[[], Any] | None = None,
                    rank: int = 0, world: int = 1, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    console=None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The diagonal sampled-label Fisher of ``targets`` on ``samples`` of ``rows`` (see the module doc).

    ``loss_module``: the run's :class:`~tunelab.objectives.causal_lm.CausalLMLoss` or
    :class:`~tunelab.objectives.classification.ClassificationLoss` (the model inside it is used
    as it is; call it with the stock, not the fused, kernels). Rows are a seeded choice; with
    several processes each takes every ``world``-th one and ``reduce`` sums the result.
    """

    from tunelab.data.batching import collate

    model = loss_module.model
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = order[:samples]
    mine = chosen[rank::world]
    sums = {t.key: torch.zeros(t.param.shape if isinstance(t, Plain) else base_shape(t), dtype=torch.float32)
            for t in targets}
    device = device or next(model.parameters()).device
    sums = {k: v.to(device) for k, v in sums.items()}
    counted = torch.zeros((), dtype=torch.float64, device=device)
    was_training = loss_module.training
    loss_module.eval()  # no dropout: the Fisher of the model as it is
    progress = Progress(TextColumn("[bold]fisher[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                        TimeRemainingColumn(), console=console, disable=console is None or rank != 0, transient=True)
    try:
        with progress, _inputs_require_grad(model):
            task = progress.add_task("fisher", total=len(mine))
            for i in mine:
                batch = {k: v.to(device) for k, v in collate([rows[i]], pad_id=pad_id, packed=packed).items()}
                grads: dict[str, torch.Tensor] = {}
                with torch.enable_grad(), _base_weight_grads(targets, grads), (autocast() if autocast else nullcontext()):
                    # labels drawn from a generator per row: the same Fisher on 1 or N processes
                    nll, n = _sampled_nll(loss_module, batch,
                                          torch.Generator(device=device).manual_seed(seed * 1_000_003 + i))
                if n:
                    for t in targets:
                        if isinstance(t, Plain):
                            t.param.grad = None
                    nll.backward()
                    for t in targets:
                        g = grads.get(t.key) if isinstance(t, LowRank) else t.param.grad
                        if g is not None:
                            sums[t.key] += g.float().pow(2) / n
                    counted += 1
                for t in targets:
                    if isinstance(t, Plain):
                        t.param.grad = None
                for p in model.parameters():
                    p.grad = None
                progress.advance(task)
    finally:
        loss_module.train(was_training)
    if reduce is not None:
        sums = {k: reduce(v) for k, v in sums.items()}
        counted = reduce(counted)
    if counted.item() == 0:
        raise UserError("objectives.ewc: no reference row has a labelled token to estimate the Fisher on. "
                        "Check objectives.ewc.data")
    return {k: (v / counted.float()).cpu() for k, v in sums.items()}


def base_shape(t: LowRank) -> torch.Size:
    w = t.module.get_base_layer().weight
    if hasattr(w, "quant_state") and getattr(w, "quant_state", None) is not None:  # bitsandbytes 4-bit
        return torch.Size(w.quant_state.shape)
    return w.shape


def combine_fisher(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], gamma: float) -> dict[str, torch.Tensor]:
    """Online EWC: ``gamma * F_old + F_new`` (targets only in one of them keep their own term)."""
    out = {k: v.clone() for k, v in new.items()}
    for k, v in old.items():
        out[k] = gamma * v + out[k] if k in out else gamma * v
    return out


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], anchor: Anchor, meta: dict[str, Any]) -> None:
    """``fisher/<key>``, ``theta0/<key>`` and JSON metadata in one safetensors file, atomically."""
    from safetensors.torch import save


    tensors = {f"fisher/{k}": v.contiguous().cpu() for k, v in fisher.items()}
    tensors.update({f"theta0/{k}": v.contiguous().cpu() for k, v in anchor.theta0.items()})
    atomic_write_bytes(Path(path), save(tensors, metadata={"tunelab": json.dumps(meta)}))


def load_fisher(path: Path) -> tuple[dict[str, torch.Tensor], Anchor, dict[str, Any]]:
    """``(fisher, anchor, meta)`` from :func:`save_fisher`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"objectives.ewc.fisher: {path} not found. Point it to the fisher.safetensors of an earlier run")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("tunelab", "{}"))
            fisher, theta0 = {}, {}
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                kind, _, key = name.partition("/")
                (fisher if kind == "fisher" else theta0)[key] = fh.get_tensor(name)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"objectives.ewc.fisher: {path} is not a readable fisher.safetensors ({err}). "
                        "Re-estimate it (remove objectives.ewc.fisher)") from None
    return fisher, Anchor(theta0), meta


def check_fisher(fisher: dict[str, torch.Tensor], targets: list[Plain | LowRank], source: str) -> None:
    for t in targets:
        want = tuple(t.param.shape if isinstance(t, Plain) else base_shape(t))
        got = fisher.get(t.key)
        if got is None or tuple(got.shape) != want:
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise UserError(f"{source}: Fisher for {t.key} is {found}, this run needs {want}. It was estimated for "
                            "another base model: remove objectives.ewc.fisher to estimate it again")


# --------------------------------------------------------------------------- the penalty of a run


@dataclass
class KeepPenalty:
    """The per-step penalty (``LoopSetup.penalty``): L2-SP + EWC + reference-data distillation.

    Calling it returns the sum (a scalar with a graph to the trained weights); ``last`` holds
    each term's value for the metrics.
    """

    targets: list[Plain | LowRank]
    anchor: Anchor
    l2sp: float | None = None
    ewc: float | None = None
    fisher: dict[str, torch.Tensor] | None = None
    extra: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)  # e.g. distill_ref
    last: dict[str, float] = field(default_factory=dict)

    def __call__(self) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        if self.l2sp is not None:
            terms["l2sp"] = 0.5 * self.l2sp * l2sp_sum(self.targets, self.anchor)
        if self.ewc is not None and self.fisher is not None:
            terms["ewc"] = 0.5 * self.ewc * ewc_sum(self.targets, self.anchor, self.fisher)
        for name, fn in self.extra.items():
            terms[name] = fn()
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        total = None
        for v in terms.values():
            total = v if total is None else total + v
        assert total is not None
        return total


# --------------------------------------------------------------------------- wiring into fine_tune
