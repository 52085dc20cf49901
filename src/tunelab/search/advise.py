"""``tunelab advise CONFIG`` / ``tunelab train --dry-run``: memory and time per method, and a strategy.

Memory: the peak of live tensor bytes in a training step (:class:`~tunelab.search.memory.TensorMemory`)
for each method, split into weights, gradients, optimiser states and activations (with the
temporaries of the step), with and without gradient checkpointing. It is *measured* on two
probe models of the same architecture with 1 and 2 decoder layers (random weights, the config's
dtype, method, precision, micro-batch of full-length rows and the same step as the training
loop: autocast forward, backward, clipping, optimiser step), then extrapolated linearly to the
real layer count; every component is linear in the layers (the embeddings, head and loss are
the intercept). The real model is never built for it, so the estimate works for models that
would not fit.

Time: ``probe_steps`` timed steps of the real model at the config's micro-batch, times the
steps the config will run.

The recommendation weighs the data volume (target tokens), the distance of the data from the
base model's pre-training (its loss on the training rows, measured in the time probe), the
need to keep general knowledge (an ``objectives:`` regulariser, or a small data set), and the
hardware (the available memory against each method's peak); :func:`recommend` states the
reasons in words.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tunelab import methods, tasks
from tunelab.config import TuneConfig
from tunelab.data.batching import IGNORE, Row, collate
from tunelab.data.coverage import coverage_warning
from tunelab.data.tasks import record_text
from tunelab.data.templates import set_chat_template
from tunelab.data.workbench import prepare_records
from tunelab.errors import UserError
from tunelab.kernels import training_kernels
from tunelab.methods import METHODS
from tunelab.methods import get as get_method
from tunelab.search.memory import TensorMemory, mib, model_tensors
from tunelab.search.recipes import recipe_for, recipe_sections, shape_of
from tunelab.train import step as step_fn
from tunelab.train.build import (
    build_model,
    build_optimizer,
    concurrent_micro_batches,
    default_threads,
    kernels_apply,
    resolve_dtype,
    set_threads,
)
from tunelab.train.shm_collectives import mapped_bytes, piece_bytes


@dataclass
class Memory:
    """Bytes at the peak of a training step, by component."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # saved activations and the step's temporaries at the peak
    peak: float

    def scaled(self, other: Memory, k: float) -> Memory:
        """self + k * (other - self): linear extrapolation in the layer count."""
        return Memory(*(a + k * (b - a) for a, b in zip(astuple(self), astuple(other), strict=True)))

    def concurrent(self, n: int) -> Memory:
        """The peak with ``n`` micro-batches in flight (``train.micro_batch_threads``): each holds its own
        activations and its own gradient of the trained weights, beside the accumulated one."""
        if n <= 1:
            return self
        return Memory(self.weights, self.gradients * (n + 1), self.optimizer, self.activations * n,
                      self.peak + (n - 1) * self.activations + n * self.gradients)


def astuple(m: Memory) -> tuple[float, ...]:
    return (m.weights, m.gradients, m.optimizer, m.activations, m.peak)


@dataclass
class MethodEstimate:
    method: str
    trainable: int | None = None
    parameters: int | None = None
    memory: Memory | None = None
    memory_checkpointing: Memory | None = None
    by_precision: dict[str, Memory] = field(default_factory=dict)
    error: str | None = None
    per_rank: dict[str, Memory] = field(default_factory=dict)  # train.distributed engines, train.processes ranks
    micro_batches: int = 1  # micro-batches in flight at once (train.micro_batch_threads); memory includes them


@dataclass
class Advice:
    model: str
    layers: int
    precision: str
    tokens_per_micro_batch: int
    estimates: list[MethodEstimate]
    available_bytes: float
    device: str
    time: dict[str, Any] | None
    data: dict[str, Any] | None
    recommendation: str
    reasons: list[str]
    processes: int = 1
    recipe: dict[str, Any] | None = None  # the measured recipe for classification data of this shape


# --------------------------------------------------------------------------- one training step, measured


def _method_cfg(cfg: TuneConfig, name: str):
    return cfg.method if cfg.method.name == name else METHODS[name].Config()


def _probe_config(cfg: TuneConfig, method: str, *, checkpointing: bool, precision: str, model_path: str) -> TuneConfig:
    c = cfg.model_copy(deep=True)
    c.method = _method_cfg(cfg, method)
    c.model.path = model_path
    c.train.gradient_checkpointing = checkpointing
    c.train.precision = precision
    return c


def probe_task(cfg: TuneConfig):
    """The task the advisor builds to measure a step without the real rows: the task itself where its model
    needs nothing from the data but a label set, else sft (the causal LM the other tasks train)."""
    task = tasks.get(cfg.task)
    return task if task.builds_without_data else tasks.get("sft")


def probe_labels(cfg: TuneConfig) -> list[str]:
    """The label set the memory probes build a class head with: the configured labels, else two (the head's
    size is negligible beside the backbone; the time probe uses the data's own label set)."""
    return list(cfg.classification.labels or ["0", "1"])


def build_for_training(cfg: TuneConfig, precision: str, labels: list[str] | None = None):
    """(model, loss module, optimiser) as :func:`tunelab.train.build.build` builds them; a class head gets
    ``labels`` (default :func:`probe_labels`), so that real rows' class ids are within it."""

    dtype = resolve_dtype(cfg.model.dtype, precision, cfg.method.name)
    labels = list(labels or probe_labels(cfg))
    task = SimpleNamespace(labels=labels, label_counts=dict.fromkeys(labels, 1), eval_prompts=[])
    c = cfg.model_copy(update={"task": probe_task(cfg).name})
    torch.manual_seed(cfg.train.seed)
    model, loss, _ = build_model(c, SimpleNamespace(task=task), dtype, None)
    optimizer = build_optimizer(model, cfg.train, methods.lr_multiplier(cfg.method))
    return model, loss, optimizer


def probe_kernels(cfg: TuneConfig) -> bool:
    """Whether training would run our kernels on the probe :func:`build_for_training` builds."""
    return kernels_apply(cfg.model_copy(update={"task": probe_task(cfg).name}))


def synthetic_batch(cfg: TuneConfig, vocab: int) -> dict[str, torch.Tensor]:
    """A micro-batch of ``train.batch_size`` full rows of ``data.max_length`` tokens, every token a target
    (a class-head task: one target per row); the worst case the loop sees."""
    lm_rows = probe_task(cfg).causal_lm_rows
    g = torch.Generator().manual_seed(0)
    length, rows = cfg.data.max_length, []
    for _ in range(cfg.train.batch_size):
        ids = tuple(torch.randint(3, vocab, (length,), generator=g).tolist())
        labels = ids if lm_rows else (IGNORE,) * (length - 1) + (0,)
        rows.append(Row(ids, labels, (length,)))
    return collate(rows, pad_id=0, packed=lm_rows)


def train_steps(model, loss_module, optimizer, batch, *, precision: str, steps: int, max_grad_norm,
                grad_accum: int = 1, kernels: bool = False) -> list[float]:
    """``steps`` optimiser steps through the loop's own step functions (:mod:`tunelab.train.step`), under
    the training precision, with our training kernels if ``kernels`` (:func:`probe_kernels`); seconds per step."""
    with training_kernels(model, kernels):
        return _train_steps(model, loss_module, optimizer, batch, precision=precision, steps=steps,
                            max_grad_norm=max_grad_norm, grad_accum=grad_accum)


def _train_steps(model, loss_module, optimizer, batch, *, precision: str, steps: int, max_grad_norm,
                 grad_accum: int) -> list[float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device.type
    targets = max(1, int((batch["labels"] != IGNORE).sum()) * grad_accum) if "labels" in batch else 1
    loss_module.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = step_fn.accumulate(
            loss_module, lambda _micro: batch, grad_accum, scale=1.0 / targets,
            forward_context=lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"))
        step_fn.update(optimizer, trainable, loss=float(loss) / targets, max_grad_norm=max_grad_norm)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _one_thread():
    """Memory does not depend on the thread count; one thread avoids oversubscribing a busy machine
    (tiny operators slow down badly when threads compete for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_step_memory(cfg: TuneConfig, precision: str, steps: int = 2) -> tuple[Memory, int, int]:
    """(peak memory of ``steps`` training steps by component, trainable, parameters) of ``cfg`` as is."""
    with _one_thread():
        return _measure_step_memory(cfg, precision, steps)


def _measure_step_memory(cfg: TuneConfig, precision: str, steps: int) -> tuple[Memory, int, int]:
    model, loss, optimizer = build_for_training(cfg, precision)
    batch = synthetic_batch(cfg, _vocab(model))
    weights = sum(_bytes(t) for t in model_tensors(model))
    grads = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())
    tracker = TensorMemory()
    tracker.track(model_tensors(model, optimizer))
    with tracker:
        train_steps(model, loss, optimizer, batch, precision=precision, steps=steps,
                    max_grad_norm=cfg.train.max_grad_norm, kernels=probe_kernels(cfg))
    opt = sum(_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    peak = float(tracker.peak)
    del model, loss, optimizer, tracker
    return Memory(weights, grads, opt, peak - weights - grads - opt, peak), trainable, parameters


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _vocab(model) -> int:
    from tunelab.models.classifier import is_classifier, unwrap

    base = unwrap(model).backbone if is_classifier(model) else model
    return int(base.get_input_embeddings().weight.shape[0])


# --------------------------------------------------------------------------- probes: 1 and 2 layers


def base_config(model_path: str):
    """The base model's transformers config (without loading its weights where a folder has one)."""
    from transformers import AutoConfig

    from tunelab.models.load import offline_mode_from_env, resolve_source

    with offline_mode_from_env():
        source = resolve_source(model_path)
        if source.kind == "folder":
            return AutoConfig.from_pretrained(source.location)
        if source.kind == "hub":
            return AutoConfig.from_pretrained(source.location)
    from tunelab.models.load import load_model

    return load_model(model_path).config  # a .gguf file: read it once


def _layers_key(config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise UserError("advise: the model config names no layer count (num_hidden_layers). It cannot be probed")


class Probes:
    """Random-weight copies of the base architecture with a few layers (and its tokenizer), saved once."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.config = base_config(model_path)
        self.key = _layers_key(self.config)
        self.layers = int(getattr(self.config, self.key))
        self._tmp = tempfile.TemporaryDirectory(prefix="tunelab-probe-")
        self.folders: dict[int, str] = {}

    def folder(self, layers: int) -> str:
        if layers not in self.folders:
            from transformers import AutoModel, AutoModelForCausalLM

            c = copy.deepcopy(self.config)
            setattr(c, self.key, layers)
            if hasattr(c, "layer_types") and isinstance(c.layer_types, list):
                c.layer_types = c.layer_types[:layers]
            torch.manual_seed(0)
            try:
                model = AutoModelForCausalLM.from_config(c)
            except ValueError:  # an encoder (classification backbones)
                model = AutoModel.from_config(c)
            folder = Path(self._tmp.name) / f"layers-{layers}"
            model.save_pretrained(folder)
            with contextlib.suppress(UserError):  # prompt tuning initialises from text: the tokenizer
                from tunelab.models.load import load_tokenizer

                load_tokenizer(self.model_path).save_pretrained(folder)
            self.folders[layers] = str(folder)
        return self.folders[layers]

    def close(self) -> None:
        self._tmp.cleanup()


def estimate_method(cfg: TuneConfig, method: str, probes: Probes, *, precision: str, checkpointing: bool) -> tuple[Memory, int, int]:
    """Peak memory of ``method`` on the full model, extrapolated from probes with ``a`` and ``a + 1`` layers."""
    return estimate_with_layer(cfg, method, probes, precision=precision, checkpointing=checkpointing)[:3]


def estimate_with_layer(cfg: TuneConfig, method: str, probes: Probes, *, precision: str,
                        checkpointing: bool) -> tuple[Memory, int, int, Memory]:
    """:func:`estimate_method`, and what one more decoder layer adds (the sharded engines' unit)."""
    a = methods.memory_linear_from(_method_cfg(cfg, method), probes.layers)
    m1, t1, n1 = measure_step_memory(_probe_config(cfg, method, checkpointing=checkpointing, precision=precision,
                                                   model_path=probes.folder(a)), precision)
    m2, t2, n2 = measure_step_memory(_probe_config(cfg, method, checkpointing=checkpointing, precision=precision,
                                                   model_path=probes.folder(a + 1)), precision)
    k = probes.layers - a
    layer = Memory(*(b - x for x, b in zip(astuple(m1), astuple(m2), strict=True)))
    return m1.scaled(m2, k), round(t1 + k * (t2 - t1)), round(n1 + k * (n2 - n1)), layer


# train.distributed: what each rank holds of the measured single-process step (docs/scaling.md)
ENGINE_ROWS = ("ddp", "fsdp", "zero1", "zero2", "zero3", "zero3+offload")


def per_rank(m: Memory, layer: Memory, layers: int, engine: str, ranks: int, device: str, *, trainable: int = 0,
             precision: str = "fp32", fsdp_mixed: bool = True) -> Memory:
    """Peak memory of one rank of ``ranks`` under ``engine``, from the single-process step ``m``: DDP holds it
    all; ZeRO-1 shards the optimiser state, ZeRO-2 the gradients too; ZeRO-3 and FSDP shard the weights as
    well, plus one decoder layer (``layer``) and the rest of the model (embeddings, head: the root unit,
    which FSDP2 keeps gathered through the step) whole while they run, with their whole gradients until the
    reduce-scatter. Offload (``zero3+offload``: optimiser state and step on the CPU) frees device memory
    only: on a CPU the state stays in the same memory. Activations are per rank whatever the engine; on a
    CPU, the ranks of FSDP and ZeRO also map the buffers of their shared-memory collectives, and FSDP's keep a
    pool of gathered and gradient buffers (``shm_collectives.BufferPool``), counted with them.

    ZeRO's optimiser steps an fp32 copy of this rank's partition of the ``trainable`` parameters (4 bytes each /
    ranks, counted with the optimiser state): ZeRO-1/2 always, ZeRO-3 under bf16 or with the optimiser offloaded,
    where it also keeps an fp32 gradient buffer of the partition for the step on the CPU. In fp32, ZeRO-3 steps
    the model's own partition (``engines._share_master_weights``).

    FSDP under bf16 with ``train.fsdp.mixed_precision`` (``fsdp_mixed``, the default) gathers bf16 copies of its
    fp32 shards (``MixedPrecisionPolicy``): half the bytes of the weights it gathers."""
    n = max(1, ranks)
    w, g, o, a = m.weights, m.gradients, m.optimizer, m.activations
    root_w, root_g = max(0.0, w - layers * layer.weights), max(0.0, g - layers * layer.gradients)  # the root unit
    bf16_gather = engine == "fsdp" and precision == "bf16" and fsdp_mixed
    gathered = 0.5 if bf16_gather else 1.0  # the bytes of a gathered weight, per byte of the model's
    if device == "cpu" and n > 1 and engine == "fsdp":  # sized as engines.FSDP.shard sizes them
        a += mapped_bytes(n, piece_bytes(max(layer.gradients, root_g)))
        # and the buffer pool: two gathered copies and two gradient buffers of a layer and of the root, kept
        a += 2 * ((layer.weights + root_w) * gathered + layer.gradients + root_g)
    elif device == "cpu" and n > 1 and engine.startswith("zero"):  # engines.DeepSpeed.shard: pieces up to 4 B/param
        a += mapped_bytes(n, piece_bytes(w))
    if engine == "zero1":
        w, g, o = w, g, o / n
    elif engine == "zero2":
        w, g, o = w, g / n, o / n
    elif engine in ("fsdp", "zero3", "zero3+offload"):
        # the units gathered whole while they run: the other ranks' shards (fp32), or a bf16 copy of all of it
        w = w / n + (root_w + layer.weights) * (gathered if bf16_gather else 1 - 1 / n)
        g = g / n + (root_g + layer.gradients) * (1 - 1 / n)
        o = 0.0 if engine == "zero3+offload" and device != "cpu" else o / n
    masters = 4 * trainable / n  # ZeRO's fp32 copy of this rank's partition
    if engine in ("zero1", "zero2") or (engine == "zero3" and precision != "fp32"):
        o += masters
    elif engine == "zero3+offload" and device == "cpu":  # the copy, and a gradient buffer for its step on the CPU
        o, g = o + masters, g + masters
    return Memory(w, g, o, a, w + g + o + a)


def micro_batches(cfg: TuneConfig, method: str, trained: float, device: str) -> int:
    """How many micro-batches training would run at once with ``method`` (the rule of
    :func:`tunelab.train.build.concurrent_micro_batches`, the facts taken from the config)."""
    mcfg = _method_cfg(cfg, method)
    return concurrent_micro_batches(
        cfg.train, threads=cfg.train.threads or default_threads(), device=device, processes=cfg.train.processes,
        trained=trained, dropout=bool(getattr(mcfg, "dropout", 0.0)), distill=cfg.objectives.distill is not None,
        kernels=kernels_apply(cfg.model_copy(update={"method": mcfg})),
    )


def applicable_methods(cfg: TuneConfig) -> list[str]:
    class_head = probe_task(cfg).class_head
    names = [n for n in METHODS if class_head or not methods.fact(n, "CLASS_HEAD")]
    if class_head:
        names = [n for n in names if methods.fact(n, "CLASSIFICATION")]
    return names


# --------------------------------------------------------------------------- the advisor


def available_memory(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


DRY_RUN_METHODS = ("full", "lora", "qlora")


def advise(cfg: TuneConfig, *, probe_steps: int = 2, methods: list[str] | None = None,
           console: Console | None = None, all_checkpointing: bool = True) -> Advice:
    """Estimate every applicable method (or ``methods``), time the configured one, recommend.

    ``all_checkpointing=False``: the with-checkpointing column for the configured method only.
    """
    from tunelab.train.precision import resolve_precision

    console = console or Console(file=io.StringIO())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.precision, torch.device(device))
    names = methods or applicable_methods(cfg)
    unknown = [n for n in names if n not in applicable_methods(cfg)]
    if unknown:
        raise UserError(f"--methods {' '.join(unknown)}: not a method for task {cfg.task}. "
                        f"Choose from: {', '.join(applicable_methods(cfg))}")
    if cfg.method.name not in names:
        names = [cfg.method.name, *names]
    probes = Probes(cfg.model.path)
    estimates = []
    try:
        for name in names:
            est = MethodEstimate(name)
            try:
                est.memory, est.trainable, est.parameters, layer = estimate_with_layer(
                    cfg, name, probes, precision=precision, checkpointing=False)
                if name == cfg.method.name:
                    ranks = max(2, cfg.train.processes)
                    fsdp_mixed = cfg.train.fsdp.mixed_precision if cfg.train.fsdp is not None else True
                    est.per_rank = {e: per_rank(est.memory, layer, probes.layers, e, ranks, device,
                                                trainable=est.trainable, precision=precision, fsdp_mixed=fsdp_mixed)
                                    for e in ENGINE_ROWS}
                est.micro_batches = micro_batches(cfg, name, est.trainable / max(1, est.parameters), device)
                est.memory = est.memory.concurrent(est.micro_batches)
                if getattr(get_method(name), "GRADIENT_CHECKPOINTING", True) and (
                        all_checkpointing or name == cfg.method.name):
                    est.memory_checkpointing = estimate_method(cfg, name, probes, precision=precision,
                                                               checkpointing=True)[0]
                if name == cfg.method.name:
                    for other in ("fp32", "bf16"):
                        if other == precision:
                            est.by_precision[other] = est.memory
                        elif other == "fp32" or _bf16_ok(device):
                            est.by_precision[other] = estimate_method(cfg, name, probes, precision=other,
                                                                      checkpointing=False)[0].concurrent(est.micro_batches)
            except UserError:
                raise
            except Exception as err:  # a method that cannot run with this model / task: say so in the table
                est.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            estimates.append(est)
    finally:
        probes.close()
    timing, data = (time_probe(cfg, precision, probe_steps) if probe_steps > 0 else (None, None))
    available = available_memory(device)
    rec, reasons = recommend(cfg, estimates, available, data, device)
    return Advice(cfg.model.path, probes.layers, precision, cfg.train.batch_size * cfg.data.max_length, estimates,
                  available, device, timing, data, rec, reasons, cfg.train.processes, data_recipe(cfg))


def data_recipe(cfg: TuneConfig) -> dict[str, Any] | None:
    """The measured recipe (:mod:`tunelab.search.recipes`) for the shape of a labelled task's training rows."""
    if not tasks.get(cfg.task).labelled:
        return None
    records = prepare_records(cfg, None, Console(file=io.StringIO()), True).train
    shape = shape_of([record_text(r) for r in records], [str(r.label) for r in records])
    recipe = recipe_for(shape)
    if recipe is None:
        return {"shape": shape.describe(), "name": None}
    return {"shape": shape.describe(), "name": recipe.name, "when": recipe.when, "settings": recipe.summary(),
            "sections": recipe_sections(recipe), "evidence": recipe.evidence()}


def _bf16_ok(device: str) -> bool:
    from tunelab.train.precision import cpu_supports_bf16

    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_supports_bf16()


def time_probe(cfg: TuneConfig, precision: str, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Timed steps of the real model on real training rows; the base model's loss on them; the total time."""
    from tunelab.models.load import load_tokenizer

    set_threads(cfg.train.threads)  # timed as training will run
    tokenizer = load_tokenizer(cfg.model.path)
    set_chat_template(tokenizer, cfg.data.template)
    quiet = Console(file=io.StringIO())
    data = tasks.prepare_data(cfg, tokenizer, None, quiet, True)
    rows = sorted(data.train, key=len, reverse=True)[: cfg.train.batch_size]  # the longest: the slowest step
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(rows, pad_id=pad, packed=cfg.data.packing or tasks.get(cfg.task).always_packed)
    model, loss, optimizer = build_for_training(cfg, precision, getattr(data.task, "labels", None))
    with torch.no_grad():
        loss.eval()
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = loss(**batch)
        base_loss = float(out.total) / max(float(out.count), 1.0)
    times = train_steps(model, loss, optimizer, batch, precision=precision, steps=steps + 1,
                        max_grad_norm=cfg.train.max_grad_norm, grad_accum=cfg.train.grad_accum,
                        kernels=probe_kernels(cfg))
    per_step = min(times[1:]) if len(times) > 1 else times[0]
    per_epoch = math.ceil(len(data.train) / (cfg.train.batch_size * cfg.train.grad_accum))
    total = cfg.train.max_steps or max(1, math.ceil((cfg.train.epochs or 1.0) * per_epoch))
    tokens = sum(len(r) for r in rows) * cfg.train.grad_accum
    timing = {"seconds_per_step": per_step, "steps": total, "total_seconds": per_step * total,
              "tokens_per_s": tokens / per_step, "probe_steps": steps, "note": "longest rows; a loaded machine is slower"}
    info = {"train_rows": len(data.train), "target_tokens": data.summary.get("train_target_tokens"),
            "base_loss": base_loss, "task": cfg.task, "unknown_tokens": data.summary.get("unknown_tokens")}
    del model, loss, optimizer
    return timing, info


def recommend(cfg: TuneConfig, estimates: list[MethodEstimate], available: float, data: dict | None,
              device: str) -> tuple[str, list[str]]:
    """Choose a method and say why: data volume, distance from pre-training, keeping general knowledge, hardware."""
    fits = {e.method: e for e in estimates if e.memory is not None and e.memory.peak < 0.8 * available}
    reasons: list[str] = []
    tokens = (data or {}).get("target_tokens")
    base_loss = (data or {}).get("base_loss")
    keep = any(getattr(cfg.objectives, k) is not None for k in ("l2sp", "ewc", "distill", "replay"))
    params = next((e.parameters for e in estimates if e.parameters), None)
    if probe_task(cfg).class_head:
        choice = "head" if tokens is not None and tokens < 20_000 and "head" in fits else "lora"
        reasons.append(f"classification: a new head on a frozen backbone ({'head' if choice == 'head' else 'LoRA'})"
                       + (f"; {tokens:,} target tokens is {'little' if choice == 'head' else 'enough'} data "
                          "for adapting the backbone" if tokens is not None else ""))
    else:
        far = base_loss is not None and base_loss > 3.0
        if base_loss is not None:
            reasons.append(f"the base model's loss on your rows is {base_loss:.2f} nats/token: the data is "
                           f"{'far from' if far else 'close to'} what it was pre-trained on")
        if tokens is not None:
            ratio = tokens / params if params else 0
            reasons.append(f"{tokens:,} target tokens of training data ({ratio:.2g} per model parameter)")
        if keep:
            reasons.append("an objectives: regulariser is set: general knowledge must be kept, so the base "
                           "weights stay frozen (adapters)")
        if tokens is not None and params and tokens > 2 * params and far and not keep:
            choice = "full"
            reasons.append("plenty of data far from pre-training: full fine-tuning can use it all")
        elif tokens is not None and tokens < 20_000 and not far:
            choice = "prompt" if "prompt" in fits else "lora"
            reasons.append("little data close to pre-training: a few virtual tokens (prompt tuning) steer the "
                           "model with the least risk of over-fitting and forgetting")
        else:
            choice = "lora"
            reasons.append("LoRA: a low-rank update of every linear layer learns the task while the base "
                           "weights stay intact")
    warning = coverage_warning((data or {}).get("unknown_tokens"), cfg.model.path)
    if warning is not None:  # no method helps while the tokenizer cannot read the text: say so first
        reasons.insert(0, f"warning: {warning}")
    if choice not in fits:
        order = [m for m in ("lora", "qlora", "freeze", "prompt") if m in fits]
        need = next((e.memory.peak for e in estimates if e.method == choice and e.memory), None)
        reasons.append(f"{choice} needs {mib(need or 0):,.0f} MiB at its peak but {mib(available):,.0f} MiB is "
                       f"available on this {device}" + (f": {order[0]} fits" if order else ": nothing fits; "
                                                         "lower train.batch_size or data.max_length"))
        choice = order[0] if order else choice
    e = next((x for x in estimates if x.method == choice), None)
    if e is not None and e.memory is not None and e.memory_checkpointing is not None:
        saved = e.memory.peak - e.memory_checkpointing.peak
        if e.memory.peak > 0.5 * available and saved > 0:
            reasons.append(f"turn on train.gradient_checkpointing: it saves {mib(saved):,.0f} MiB for ~30% more compute")
    return choice, reasons


# --------------------------------------------------------------------------- printing


def print_advice(a: Advice, console: Console) -> None:
    table = Table(title=f"memory per method: {a.model} ({a.layers} layers), {a.precision}, micro-batch "
                        f"{a.tokens_per_micro_batch:,} tokens; peak of live tensors in MiB")
    for col in ("method", "trainable", "weights", "gradients", "optimiser", "activations", "peak",
                "activations (ckpt)", "peak (ckpt)", "fits"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for e in a.estimates:
        if e.memory is None:
            table.add_row(e.method, "-", *["-"] * 7, f"[red]n/a[/] {e.error}")
            continue
        m, c = e.memory, e.memory_checkpointing
        mark = " *" if e.method == a.recommendation else ""
        table.add_row(f"{e.method}{mark}", f"{e.trainable:,}", *(f"{mib(x):,.1f}" for x in astuple(m)),
                      f"{mib(c.activations):,.1f}" if c else "-", f"{mib(c.peak):,.1f}" if c else "-",
                      "yes" if m.peak < 0.8 * a.available_bytes else ("with ckpt" if c and c.peak < 0.8 * a.available_bytes else "[red]no[/]"))
    console.print(table)
    for e in a.estimates:
        if e.memory is not None and e.micro_batches > 1:
            console.print(f"{e.method}: {e.micro_batches} micro-batches run at once (train.micro_batch_threads); "
                          f"the gradients, activations and peak columns count all of them")
    for e in a.estimates:
        if e.by_precision:
            console.print(f"{e.method} by precision: " + "; ".join(
                f"{p}: weights {mib(m.weights):,.1f}, activations {mib(m.activations):,.1f}, peak {mib(m.peak):,.1f} MiB"
                for p, m in e.by_precision.items()))
    for e in a.estimates:
        if e.per_rank:
            _print_per_rank(e, a, console)
    console.print(f"available memory on this {a.device}: {mib(a.available_bytes):,.0f} MiB (80% of it is the budget)")
    if a.time:
        t = a.time
        console.print(f"time: {t['seconds_per_step']:.2f} s per optimiser step (measured, {t['probe_steps']} steps, "
                      f"{t['tokens_per_s']:,.0f} tokens/s) x {t['steps']:,} steps = about {_duration(t['total_seconds'])}")
    console.print(f"[bold]recommendation: {a.recommendation}[/]")
    for r in a.reasons:
        console.print(f"  - {r}")
    if a.recipe is not None:
        r = a.recipe
        if r["name"] is None:
            console.print(f"classification recipe: none measured for data like yours ({r['shape']}); compare with the "
                          "TF-IDF baseline (tunelab eval RUN --baselines)")
        else:
            console.print(f"[bold]classification recipe for data like yours[/] ({r['shape']}; recipe '{r['name']}': "
                          f"{r['when']}): {r['settings']}")
            if r["evidence"]:
                console.print(f"  - {r['evidence']}")


def _print_per_rank(e: MethodEstimate, a: Advice, console: Console) -> None:
    """The configured method per rank under each train.distributed engine (docs/scaling.md)."""
    ranks = max(2, a.processes)
    table = Table(title=f"{e.method} per rank with {ranks} processes (train.distributed), MiB")
    for col in ("engine", "weights", "gradients", "optimiser", "activations", "peak per rank"):
        table.add_column(col, justify="right" if col != "engine" else "left")
    for engine, m in e.per_rank.items():
        table.add_row(engine, *(f"{mib(x):,.1f}" for x in astuple(m)))
    console.print(table)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def advice_json(a: Advice) -> dict[str, Any]:
    return asdict(a)

