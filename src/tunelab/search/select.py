"""``tunelab select --candidates A B C --data VAL``: which base model to fine-tune.

For each candidate, on the user's validation rows: the loss of the reference replies zero- and
few-shot (the mean negative log-likelihood per reply token given the prompt, with ``shots``
solved rows of the same file before it; :func:`tunelab.eval.generate.loglik_continuations`),
the task metric zero- and few-shot (classification: accuracy of the most likely label,
:func:`tunelab.eval.tasks.eval_classification` constrained; generation: token F1 of greedy replies,
:func:`tunelab.eval.tasks.eval_generation`), the parameter count, the peak training memory per
method (:mod:`tunelab.search.advise`: full, LoRA, QLoRA) and the training throughput measured on
this machine (tokens per second of ``--method`` steps at ``--batch-size`` x ``--max-length``).

Ranking: candidates whose LoRA peak does not fit in the available memory come last; the others
by the few-shot task metric (how well the model already does the task: the strongest predictor
of the tuned result among these numbers), then the few-shot loss. Each row says why.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tunelab.config import ClassificationSection, load_config
from tunelab.data.formats import read_records
from tunelab.data.records import Message, Record
from tunelab.data.templates import set_chat_template
from tunelab.errors import UserError
from tunelab.eval.evaluate import EVAL_KINDS
from tunelab.fsutil import atomic_write_text
from tunelab.search.memory import mib
from tunelab.search.settings import SelectRequest
from tunelab.train.cpu_tuning import set_threads


@dataclass
class Candidate:
    name: str
    parameters: int = 0
    task: str = ""
    loss_zero: float | None = None
    loss_few: float | None = None
    metric_name: str = ""
    metric_zero: float | None = None
    metric_few: float | None = None
    memory_mib: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    seconds: float = 0.0
    rank: int = 0
    reasons: list[str] = field(default_factory=list)
    error: str | None = None


# --------------------------------------------------------------------------- data


def read_validation(path: str, shots: int, limit: int) -> tuple[list[Record], list[Record], str, list[str]]:
    """(shots, rows to score, evaluation kind, labels): chat rows as they are; text + label rows become chats that
    ask for the label (the prompt of ``task: generative_classification``)."""
    from tunelab.eval.tasks import detect_task, gold_label, label_set

    res = read_records(path, limit=limit + shots)
    records = list(res.records)
    if len(records) <= shots:
        raise UserError(f"--data {path}: {len(records)} usable row(s) ({len(res.rejects)} rejected); need more than "
                        f"--shots {shots}. Use a larger validation file or fewer shots")
    kind = detect_task(records)  # an evaluation kind (lm, generation, classification), not a training task
    labels = label_set(records, None) if EVAL_KINDS[kind].labelled else []
    if labels and all(r.label is not None for r in records):  # text + label rows
        prompt = ClassificationSection().prompt
        records = [Record(r.id, (Message("user", prompt.format(labels=", ".join(labels), text=_text(r))),
                                 Message("assistant", gold_label(r) or "")), label=r.label) for r in records]
    if not EVAL_KINDS[kind].prompted:
        raise UserError(f"--data {path}: plain-text rows have no prompt to condition on. Use chat, instruction "
                        "or classification data (the rows your fine-tuned model will answer)")
    return records[:shots], records[shots:], kind, labels


def _text(r: Record) -> str:
    if r.text is not None:
        return r.text
    return next((m.content for m in r.messages if m.role == "user"), "")


def reply_losses(model, tokenizer, records: list[Record], shots: list[Record]) -> float:
    """Mean NLL per reply token (the reference reply as the complete assistant turn) given the prompt."""
    from tunelab.eval.generate import encode_prompt, loglik_continuations
    from tunelab.eval.tasks import label_continuations, split_reply, with_shots

    contexts, conts = [], []
    for r in records:
        prompt, reply = split_reply(r)
        prompt = with_shots(prompt, shots)
        ids = encode_prompt(tokenizer, prompt)
        contexts.append(ids)
        conts.append(label_continuations(tokenizer, prompt, ids, [reply or ""]))
    scores = loglik_continuations(model, tokenizer, contexts, conts, batch_size=4)
    tokens = sum(len(c[0]) for c in conts)
    return -sum(s[0] for s in scores) / max(tokens, 1)


def task_metric(model, tokenizer, kind: str, records: list[Record], shots: list[Record], labels: list[str],
                max_new_tokens: int) -> tuple[str, float]:
    from tunelab.eval.generate import GenerationSettings
    from tunelab.eval.tasks import eval_classification, eval_generation

    quiet = Console(file=io.StringIO())
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=8)
    if EVAL_KINDS[kind].labelled:
        out = eval_classification(model, tokenizer, records, labels, settings, shots=shots, modes=("constrained",),
                                  console=quiet)
        return "accuracy", float(out["metrics"]["constrained"]["accuracy"])
    out = eval_generation(model, tokenizer, records, settings, shots=shots, console=quiet)
    return "token_f1", float(out["metrics"]["f1"])


# --------------------------------------------------------------------------- one candidate


def _train_config(req: SelectRequest, model: str, method: str):

    return load_config(None, base={"model": {"path": model}, "method": {"name": method},
                                   "data": {"train": [{"path": req.data}], "max_length": req.max_length},
                                   "train": {"batch_size": req.batch_size}})[0]


def throughput(req: SelectRequest, model_path: str) -> float:
    """Training tokens per second of ``req.method`` (3 steps; the best of the last two)."""
    from tunelab.search.advise import build_for_training, probe_kernels, synthetic_batch, train_steps
    from tunelab.train.precision import resolve_precision

    cfg = _train_config(req, model_path, req.method)
    set_threads(None)
    precision = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model, loss, optimizer = build_for_training(cfg, precision)
    vocab = model.get_input_embeddings().weight.shape[0]
    times = train_steps(model, loss, optimizer, synthetic_batch(cfg, vocab), precision=precision, steps=3,
                        max_grad_norm=1.0, kernels=probe_kernels(cfg))
    return req.batch_size * req.max_length / min(times[1:])


def memory(req: SelectRequest, model_path: str) -> dict[str, float]:
    """Peak training memory (MiB) per method, from the advisor's layer probes."""
    from tunelab.search.advise import Probes, estimate_method
    from tunelab.train.precision import resolve_precision

    precision = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    probes = Probes(model_path)
    try:
        return {m: mib(estimate_method(_train_config(req, model_path, m), m, probes, precision=precision,
                                       checkpointing=False)[0].peak) for m in req.memory_methods}
    finally:
        probes.close()


def score_candidate(req: SelectRequest, name: str, shots: list[Record], rows: list[Record], task: str,
                    labels: list[str]) -> Candidate:
    from tunelab.models.load import load_model_and_tokenizer

    c = Candidate(name, task=task)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(name)
    set_chat_template(tokenizer, "auto")
    model.eval()
    c.parameters = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        c.loss_zero = reply_losses(model, tokenizer, rows, [])
        c.loss_few = reply_losses(model, tokenizer, rows, shots)
        c.metric_name, c.metric_zero = task_metric(model, tokenizer, task, rows, [], labels, req.max_new_tokens)
        _, c.metric_few = task_metric(model, tokenizer, task, rows, shots, labels, req.max_new_tokens)
    del model
    c.memory_mib = memory(req, name)
    c.tokens_per_s = throughput(req, name)
    c.seconds = time.perf_counter() - t0
    return c


# --------------------------------------------------------------------------- ranking


def rank(cands: list[Candidate], available_mib: float, method: str) -> list[Candidate]:
    """Fits-in-memory first, then few-shot metric (higher), then few-shot loss (lower); reasons in words."""
    ok = [c for c in cands if c.error is None]
    fits = {c.name: c.memory_mib.get(method, c.memory_mib.get("lora", 0.0)) < 0.8 * available_mib for c in ok}
    ordered = sorted(ok, key=lambda c: (not fits[c.name], -(c.metric_few or 0.0), c.loss_few or float("inf")))
    best = ordered[0] if ordered else None
    fastest = max((c.tokens_per_s or 0.0) for c in ok) if ok else 0.0
    for i, c in enumerate(ordered, 1):
        c.rank = i
        r = c.reasons
        if not fits[c.name]:
            r.append(f"{method} needs {c.memory_mib.get(method, 0):,.0f} MiB at its peak, more than 80% of the "
                     f"{available_mib:,.0f} MiB available")
        if c is best:
            r.append(f"best few-shot {c.metric_name} ({c.metric_few:.3f}) and loss {c.loss_few:.3f}"
                     if len(ordered) > 1 else "the only candidate")
        elif best is not None:
            r.append(f"few-shot {c.metric_name} {c.metric_few:.3f} vs {best.metric_few:.3f}, loss {c.loss_few:.3f} vs "
                     f"{best.loss_few:.3f} for {best.name}")
        if c.loss_zero is not None and c.loss_few is not None and c.loss_few < c.loss_zero - 0.05:
            r.append(f"examples help ({c.loss_zero:.2f} -> {c.loss_few:.2f} nats/token): it picks up the format in context")
        if c.tokens_per_s and fastest:
            r.append(f"{c.tokens_per_s:,.0f} training tokens/s here ({c.tokens_per_s / fastest:.2f}x the fastest)")
    failed = [c for c in cands if c.error is not None]
    for c in failed:
        c.rank = len(ordered) + 1
    return ordered + failed


def select_model(req: SelectRequest, console: Console | None = None) -> list[Candidate]:
    from tunelab.search.advise import available_memory

    console = console or Console()
    shots, rows, task, labels = read_validation(req.data, req.shots, req.limit)
    console.print(f"select: {len(req.candidates)} candidates on {len(rows)} rows of {req.data} (task {task}, "
                  f"{len(shots)}-shot prompts from the first rows)")
    cands = []
    for name in req.candidates:
        try:
            c = score_candidate(req, name, shots, rows, task, labels)
            console.print(f"{name}: loss {c.loss_zero:.3f} / {c.loss_few:.3f} (0 / {req.shots}-shot), {c.metric_name} "
                          f"{c.metric_zero:.3f} / {c.metric_few:.3f}, {c.tokens_per_s:,.0f} tokens/s "
                          f"({c.seconds:.0f} s)")
        except UserError as err:
            c = Candidate(name, error=str(err))
            console.print(f"[yellow]{name}: skipped[/] ({err})")
        cands.append(c)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ranked = rank(cands, mib(available_memory(device)), req.method)
    _print(ranked, req, console)
    if req.out:
        atomic_write_text(Path(req.out), json.dumps([asdict(c) for c in ranked], indent=2) + "\n")
    return ranked


def _print(ranked: list[Candidate], req: SelectRequest, console: Console) -> None:
    metric = next((c.metric_name for c in ranked if c.metric_name), "metric")
    table = Table(title=f"base models on {req.data}: ranked")
    for col in ("#", "model", "params", f"loss 0/{req.shots}-shot", f"{metric} 0/{req.shots}-shot",
                *(f"{m} MiB" for m in req.memory_methods), "tokens/s"):
        table.add_column(col)
    for c in ranked:
        if c.error:
            table.add_row(str(c.rank), c.name, *["-"] * (4 + len(req.memory_methods)))
            continue
        table.add_row(str(c.rank), c.name, f"{c.parameters / 1e6:,.1f}M", f"{c.loss_zero:.3f} / {c.loss_few:.3f}",
                      f"{c.metric_zero:.3f} / {c.metric_few:.3f}",
                      *(f"{c.memory_mib.get(m, float('nan')):,.0f}" for m in req.memory_methods),
                      f"{c.tokens_per_s:,.0f}")
    console.print(table)
    for c in ranked:
        console.print(f"{c.rank}. {c.name}: " + (f"[red]not scored[/]: {c.error}" if c.error else "; ".join(c.reasons)))
